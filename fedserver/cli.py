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

from shared.pki import PkiError, add_client, init_pki

PROG = "fedserver"
EXIT_USAGE = 2  # bad arguments or an unusable PKI directory, as argparse does
EXIT_OS_ERROR = 1  # the filesystem refused (permissions, disk full, ...)


class UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so main() prints one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


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
    created = [paths.ca, paths.ca_key, paths.server_cert, paths.server_key]
    created += [p for pair in paths.client_keys for p in pair]
    _print_paths(created)
    return 0


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="PKI directory made by 'fedserver init'")
    parser.add_argument("name", metavar="NAME", help="client name: letters, digits, '_', '-', '.'")


def _run_add_client(args: argparse.Namespace) -> int:
    _print_paths(add_client(args.dir, args.name))
    return 0


def _print_paths(paths: list[Path] | tuple[Path, ...]) -> None:
    for path in paths:
        print(path)


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
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Flowerbed federated-learning server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedserver` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, PkiError) as err:
        return _fail(err, EXIT_USAGE)
    except OSError as err:
        return _fail(err, EXIT_OS_ERROR)


def _fail(err: Exception, status: int) -> int:
    message = " ".join(str(err).splitlines())  # one line even if a path holds a newline
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
