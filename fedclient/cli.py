"""`fedclient start ...`: an edge node, as Flower's own SuperNode running this ClientApp.

Thin: it checks the files it is given, then replaces itself with `flower-supernode`, passing
TLS, node authentication and the node config (`data-path`, `device`) that the ClientApp reads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from shared.config import DEVICES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedclient", description="Run a Flowerbed edge client.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="connect to a fedserver and train on local data")
    start.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's Fleet API address")
    start.add_argument("--ca", required=True, type=Path, help="the federation's CA certificate (ca.pem)")
    start.add_argument("--key", required=True, type=Path, help="this node's private key (client-K.key)")
    start.add_argument("--data", required=True, type=Path, help="this device's data file or directory")
    start.add_argument("--device", default="auto", choices=DEVICES, help="where to train (default: auto)")
    return parser


def supernode_command(args: argparse.Namespace) -> list[str]:
    """The `flower-supernode` command line for `fedclient start`."""
    node_config = f'data-path="{args.data.resolve()}" device="{args.device}"'
    return [
        "flower-supernode",
        "--superlink", args.server,
        "--root-certificates", str(args.ca),
        "--auth-supernode-private-key", str(args.key),
        "--node-config", node_config,
    ]  # fmt: skip


def check_inputs(args: argparse.Namespace) -> None:
    for flag, path in (("--ca", args.ca), ("--key", args.key), ("--data", args.data)):
        if not path.exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if '"' in str(args.data.resolve()):
        raise ValueError(f"--data {args.data}: a path with a double quote cannot be passed to Flower")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_inputs(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"fedclient: error: {err}", file=sys.stderr)
        return 2
    command = supernode_command(args)
    executable = shutil.which(command[0]) or str(Path(sys.executable).with_name(command[0]))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    os.execve(executable, command, env)
    return 0  # not reached: execve replaces this process


if __name__ == "__main__":
    sys.exit(main())
