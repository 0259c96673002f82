"""What the three command lines share: one-line argument errors, `--version`, subcommands with a
description, and `run_cli`, which turns every user-facing error into one line and its exit status."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable

from shared.errors import ExitCode, FlowerbedError, UsageError

PACKAGE = "flowerbed"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a `UsageError` (one line, exit USAGE) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def package_version() -> str:
    """The installed version of Flowerbed ('unknown' when run from a checkout that was never installed)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(prog: str, description: str) -> Parser:
    """The top-level parser of a command: its description and `--version`."""
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    return parser


def add_command(sub: argparse._SubParsersAction, name: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line description shows both in the command list and on its own --help."""
    return sub.add_parser(name, help=description, description=description)


def run_cli(prog: str, main_fn: Callable[[], int]) -> int:
    """Run `main_fn` and return its exit status; a user-facing error is one line on stderr, never a traceback.

    The statuses are `shared.errors.ExitCode`; `--help` and `--version` return 0 instead of exiting.
    """
    try:
        return int(main_fn())
    except FlowerbedError as err:
        return fail(prog, err, err.exit_code)
    except OSError as err:  # the filesystem refused (permissions, disk full, ...)
        return fail(prog, err, ExitCode.FAILED)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except SystemExit as exit_:  # argparse's --help and --version
        return exit_.code if isinstance(exit_.code, int) else ExitCode.OK


def fail(prog: str, err: Exception | str, status: ExitCode) -> int:
    """Print `PROG: error: MESSAGE` as one line (even if a path in it holds a newline); return `status`."""
    message = " ".join(str(err).splitlines())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status
