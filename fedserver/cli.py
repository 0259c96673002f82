"""`fedserver` command line: parses arguments and calls the library; no logic of its own.

To add a subcommand, add a `Command` to `COMMANDS`: `add_arguments` fills its sub-parser and
`run` gets the parsed namespace and returns the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedserver.state import DEFAULT_ADDRESS, DEFAULT_DASHBOARD, StateDir
from shared.cli import add_command, build_parser as build_command_parser, run_cli
from shared.errors import ExitCode
from shared.pki import PkiPaths, add_client, enroll, init_pki, remove_client

PROG = "fedserver"
EXIT_NOT_RUNNING = ExitCode.NOT_RUNNING  # `status`: no daemon runs for this state directory


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="PKI directory to create")
    parser.add_argument(
        "--host",
        dest="hosts",
        metavar="NAME",
        action="append",
        default=[],
        help="extra DNS name or IP for the server certificate (repeatable); "
        "localhost and 127.0.0.1 are always included",
    )
    parser.add_argument(
        "--clients", metavar="N", type=_non_negative_int, default=1, help="node key pairs (default 1)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing PKI in DIR")


def _run_init(args: argparse.Namespace) -> int:
    paths = init_pki(args.dir, hosts=args.hosts, clients=args.clients, force=args.force)
    print("\n".join(describe_pki(args.dir, paths)))
    return 0


def describe_pki(directory: Path, paths: PkiPaths) -> list[str]:
    """What `init` made, one file a line, and the commands that use it."""
    lines = [
        f"created a PKI in {directory}:",
        f"  CA certificate      {paths.ca}  (copy to every device: fedclient start --ca)",
        f"  CA key              {paths.ca_key}  (keep secret: it signs the server certificate)",
        f"  server certificate  {paths.server_cert}",
        f"  server key          {paths.server_key}",
        f"  enrollment CA       {paths.enrollment_ca}  (copy to every device: fedclient start --enrollment-ca)",
        f"  enrollment CA key   {paths.enrollment_ca_key}  (move it OFFLINE now: whoever holds it "
        f"can enroll devices into secure aggregation; '{PROG} enroll --ca-key' needs it)",
    ]
    lines += [
        f"  client key pair     {key}  {pub}  enrollment certificate {crt}"
        for (key, pub), crt in zip(paths.client_keys, paths.client_certificates, strict=True)
    ]
    lines.append(f"next: {PROG} start --pki {directory} --config RUN.toml")
    if paths.client_keys:
        key, crt = paths.client_keys[0][0], paths.client_certificates[0]
        lines.append(
            f"then on each device: fedclient start --server HOST:{DEFAULT_ADDRESS.rsplit(':', 1)[1]} "
            f"--ca {paths.ca} --key {key} --enrollment-cert {crt} --enrollment-ca {paths.enrollment_ca} "
            "--data FILE  (one .key and .crt per device; its .pub stays here)"
        )
    return lines


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="PKI directory made by 'fedserver init'")
    parser.add_argument("name", metavar="NAME", help="client name: letters, digits, '_', '-', '.'")


def _run_add_client(args: argparse.Namespace) -> int:
    for path in add_client(args.dir, args.name):
        print(path)
    return 0


def _enroll_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-key", required=True, type=Path, metavar="PATH", help="the enrollment CA key (kept offline)")
    parser.add_argument(
        "--ca-cert", required=True, type=Path, metavar="PATH", help="the enrollment CA certificate (enrollment-ca.pem)"
    )
    parser.add_argument("public_key", metavar="NAME.pub", type=Path, help="the device's node public key")
    parser.add_argument(
        "--out", type=Path, metavar="NAME.crt", help="where to write the certificate (default: beside NAME.pub)"
    )


def _run_enroll(args: argparse.Namespace) -> int:
    print(enroll(args.ca_key, args.ca_cert, args.public_key, args.out))
    return 0


def _remove_client_arguments(parser: argparse.ArgumentParser) -> None:
    _add_client_arguments(parser)
    _add_state_dir(parser)


def _run_remove_client(args: argparse.Namespace) -> int:
    from fedserver import daemon
    from fedserver.control import load_public_key

    public_key = args.dir / "clients" / f"{args.name}.pub"
    key = load_public_key(public_key) if public_key.is_file() else None
    for path in remove_client(args.dir, args.name):
        print(f"deleted {path}")
    revoked = daemon.revoke(args.state_dir, key) if key is not None else None
    if revoked is None:
        print(f"{args.name} can no longer join once '{PROG} start' runs again with {args.dir}")
    else:
        nodes = ", ".join(f"node {node_id}" for node_id, _ in revoked) or "no node"
        print(f"unregistered from the running fedserver: {nodes}; {args.name} can no longer join")
    return 0


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=StateDir.DEFAULT,
        metavar="PATH",
        help=f"the daemon's state directory (default ./{StateDir.DEFAULT})",
    )


def _start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pki", required=True, type=Path, metavar="DIR", help="PKI directory made by 'fedserver init'")
    parser.add_argument("--config", required=True, type=Path, metavar="RUN.toml", help="the run config (fedsim's keys)")
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"where the SuperLink's Fleet API listens (default {DEFAULT_ADDRESS}); "
        "see docs/deploy.md before exposing it",
    )
    parser.add_argument(
        "--control-address",
        metavar="HOST:PORT",
        help="the Control API's address: Flower 1.41 serves it on --address's port, so an --address off "
        "127.0.0.1 needs this flag, set to the same address, to expose it knowingly",
    )
    _add_state_dir(parser)
    parser.add_argument(
        "--db",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="the SuperLink's state: STATE/state.db (default), or in memory: faster rounds, "
        "but runs and node ids are forgotten on restart",
    )
    parser.add_argument(
        "--fleet-front",
        choices=("on", "off"),
        default="on",
        help="answer idle devices' pulls for tasks without Flower's request stack (default on; "
        "docs/deploy.md#how-many-devices-one-server-holds)",
    )
    add_dashboard_arguments(parser, DEFAULT_DASHBOARD)


def add_dashboard_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--dashboard [HOST:]PORT, --dashboard-token-file, --dashboard-names (docs/dashboard.md)."""
    shown = f"default {default}; 'off' for none" if default else "off unless given"
    parser.add_argument("--dashboard", default=default, metavar="[HOST:]PORT",
                        help=f"serve the live, read-only dashboard here ({shown}; PORT 0: any free port)")
    parser.add_argument("--dashboard-token-file", type=Path, metavar="FILE",
                        help="a file (mode 0600) holding the token the dashboard asks for; needed off 127.0.0.1")
    parser.add_argument("--dashboard-names", type=Path, metavar="FILE",
                        help='names the dashboard shows for node ids: a TOML file of lines NODE_ID = "name"')


def dashboard_flag(value: str | None) -> str | None:
    """--dashboard's value, None for 'off'."""
    return None if value is None or value.lower() == "off" else value


def _run_start(args: argparse.Namespace) -> int:
    from fedserver import daemon  # Flower is imported only by the commands that need it

    options = daemon.StartOptions(args.pki, args.config, args.address, args.state_dir, args.db, args.control_address,
                                  dashboard_flag(args.dashboard), args.dashboard_token_file, args.dashboard_names,
                                  args.fleet_front == "on")
    return daemon.start(options)


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _add_state_dir(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _run_status(args: argparse.Namespace) -> int:
    from fedserver import status

    snapshot = status.collect(args.state_dir)
    print(snapshot.to_json() if args.json else status.render(snapshot))
    if snapshot.failed:
        return ExitCode.FAILED
    return 0 if snapshot.running else EXIT_NOT_RUNNING


def _stop_arguments(parser: argparse.ArgumentParser) -> None:
    _add_state_dir(parser)
    parser.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="wait this long before SIGKILL (default 30)"
    )


def _run_stop(args: argparse.Namespace) -> int:
    from fedserver import daemon

    if daemon.stop(args.state_dir, timeout=args.timeout):
        print(f"stopped the fedserver of {StateDir(args.state_dir).root}")
    else:
        print(f"no fedserver running for {StateDir(args.state_dir).root}")
    return 0


COMMANDS: dict[str, Command] = {
    "init": Command(
        "create a CA, a server TLS certificate and SuperNode key pairs",
        _init_arguments,
        _run_init,
    ),
    "add-client": Command(
        "add a SuperNode key pair (clients/NAME.key, clients/NAME.pub)",
        _add_client_arguments,
        _run_add_client,
    ),
    "enroll": Command(
        "sign a device's node public key into its enrollment certificate for secure aggregation (CN = NAME)",
        _enroll_arguments,
        _run_enroll,
    ),
    "remove-client": Command(
        "revoke a SuperNode key: delete clients/NAME.*, and unregister it from a running daemon at once",
        _remove_client_arguments,
        _run_remove_client,
    ),
    "start": Command(
        "run the SuperLink with TLS and node authentication, register the node keys, submit the run",
        _start_arguments,
        _run_start,
    ),
    "status": Command("show the daemon, its runs, connected nodes and the last round's metrics", _status_arguments, _run_status),
    "stop": Command("stop the daemon (SIGTERM, then SIGKILL after --timeout)", _stop_arguments, _run_stop),
}


def build_parser() -> argparse.ArgumentParser:
    parser = build_command_parser(PROG, "Flowerbed federated-learning server: PKI, and the SuperLink daemon.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub_parser = add_command(sub, name, command.help)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedserver` console script; returns the exit status (shared.errors.ExitCode)."""

    def run() -> int:
        args = build_parser().parse_args(argv)
        return args.run(args)

    return run_cli(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
