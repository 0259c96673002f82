"""`fedclient` command line: parses arguments and calls fedclient.node; no logic of its own."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from fedclient.node import ISOLATIONS, REFUSAL_GRACE, NodeOptions, run_node
from fedclient.policy import DevicePolicy, policy_key, read_policy
from shared.cli import add_command, build_parser as build_command_parser, run_cli
from shared.config import DEVICES
from shared.flower_compat.supernode_log import ACTIVATION_REFUSED_CODE

PROG = "fedclient"


def build_parser() -> argparse.ArgumentParser:
    parser = build_command_parser(PROG, "Flowerbed edge client: a device that trains on its own data.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    start = add_command(sub, "start", "connect to a fedserver and train on this device's data until stopped")
    start.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's Fleet API address")
    start.add_argument("--ca", required=True, type=Path, help="the federation's CA certificate (ca.pem)")
    start.add_argument("--key", required=True, type=Path, help="this node's private key (client-K.key)")
    start.add_argument("--data", required=True, type=Path, help="this device's data file or directory")
    start.add_argument("--device", default="auto", choices=DEVICES, help="where to train (default: auto)")
    start.add_argument(
        "--isolation",
        default="warm",
        choices=ISOLATIONS,
        help="warm (default): one long-lived worker runs every message; "
        "subprocess: Flower's default, a fresh flwr-clientapp process per message",
    )
    start.add_argument(
        "--runtime-port",
        type=int,
        default=0,
        metavar="PORT",
        help="the SuperNode's local Runtime API port on 127.0.0.1 (default: any free port)",
    )
    start.add_argument(
        "--client-app",
        default="",
        metavar="MODULE:ATTR",
        help="for tests: run this ClientApp object (importable here) instead of the installed one",
    )
    start.add_argument(
        "--trust-server-code",
        action="store_true",
        help="run the ClientApp code each run's FAB ships from the server (Flower's behaviour); "
        "by default a device runs only its installed ClientApp and refuses a run naming another",
    )
    start.add_argument(
        "--refusal-grace",
        type=float,
        default=REFUSAL_GRACE,
        metavar="SECONDS",
        help=f"how long a refusal with Flower's code {ACTIVATION_REFUSED_CODE} (an unregistered key, or a node the server still "
        f"counts online after an unclean stop) is retried before fedclient gives up (default: {REFUSAL_GRACE:.0f})",
    )
    _policy_arguments(start)
    start.add_argument(
        "--enrollment-cert",
        type=Path,
        metavar="FILE",
        help="this device's enrollment certificate (NAME.crt from 'fedserver enroll'): it signs its "
        "secure-aggregation keys with --key; needs --enrollment-ca",
    )
    start.add_argument(
        "--enrollment-ca",
        type=Path,
        metavar="FILE",
        help="the federation's enrollment CA certificate: a secure round holding a peer it did not sign is refused",
    )
    policy = add_command(sub, "policy", "print what a device policy file allows, or why it cannot be used")
    policy.add_argument("file", type=Path, metavar="FILE", help="the policy file (TOML)")
    keygen = add_command(sub, "keygen", "make this device's key pair; only its public key goes to the server")
    keygen.add_argument("name", metavar="NAME", help="the device's name: letters, digits, '_', '-', '.'")
    keygen.add_argument(
        "--dir", type=Path, default=Path("."), metavar="DIR", help="where to write NAME.key and NAME.pub (default: .)"
    )
    return parser


def _policy_arguments(start: argparse.ArgumentParser) -> None:
    """`--policy FILE` and a flag for each policy key, which wins over the file."""
    start.add_argument("--policy", type=Path, metavar="FILE", help="the device owner's policy (TOML; docs/deploy.md)")
    for f in fields(DevicePolicy):
        flag = "--" + policy_key(f.name)
        meaning = f.metadata["meaning"]
        if isinstance(f.default, bool):
            start.add_argument(flag, action="store_const", const=True, dest=f.name, help=meaning)
        else:
            start.add_argument(flag, type=type(f.default), dest=f.name, metavar="VALUE", help=meaning)


def policy_from(args: argparse.Namespace) -> DevicePolicy:
    """The policy of `--policy`, with the flags given on the command line over it."""
    flags = {policy_key(f.name): getattr(args, f.name) for f in fields(DevicePolicy)}
    return read_policy(args.policy, {key: value for key, value in flags.items() if value is not None})


def run_policy(args: argparse.Namespace) -> int:
    """`fedclient policy FILE`: what the file allows, a key a line."""
    print("\n".join(read_policy(args.file).describe()))
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    """`fedclient keygen NAME`: the key pair, and where each half goes."""
    from shared.pki import make_node_key_pair  # noqa: PLC0415 - `start` runs for days without `cryptography`

    key, pub = make_node_key_pair(args.dir, args.name)
    print(f"private key  {key}  (stays on this device: {PROG} start --key {key})")
    print(f"public key   {pub}  (give it to the server's operator: it goes to the PKI as clients/{pub.name})")
    return 0


def run_command(args: argparse.Namespace) -> int:
    commands = {"keygen": run_keygen, "policy": run_policy}
    return commands[args.command](args) if args.command in commands else run_node(options_from(args))


def options_from(args: argparse.Namespace) -> NodeOptions:
    return NodeOptions(
        args.server,
        args.ca,
        args.key,
        args.data,
        args.device,
        args.isolation,
        args.runtime_port,
        args.client_app,
        args.trust_server_code,
        args.refusal_grace,
        policy=policy_from(args),
        enrollment_cert=args.enrollment_cert,
        enrollment_ca=args.enrollment_ca,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedclient` console script; returns the exit status (shared.errors.ExitCode)."""
    return run_cli(PROG, lambda: run_command(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
