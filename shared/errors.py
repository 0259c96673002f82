"""The errors a user sees, and the exit status each kind of them gives (the one table of them).

An error the user can act on derives from `FlowerbedError`: its message is one line and is all
the user sees (the command line prints `PROG: error: MESSAGE`, no traceback). Each side has its
base: `FedserverError`, `FedclientError`, `FedsimError`; what both sides share (configuration,
data, PKI, updates, secure aggregation) derives from `FlowerbedError` directly. Each subclass keeps
its builtin base (ValueError, RuntimeError) so code that catches those still catches it.

Anything else that escapes is a bug, and keeps its traceback.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """The exit status of `fedserver`, `fedclient` and `fedsim`."""

    OK = 0
    FAILED = 1  # the input was accepted but the work failed: a round without quorum, a refused node,
    #             a daemon that stopped, the filesystem refusing a write (OSError)
    USAGE = 2  # bad input: arguments, config, data, PKI, checkpoint, output directory (as argparse)
    NOT_RUNNING = 3  # `fedserver status`: no daemon runs for this state directory (as LSB init scripts)
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


class FlowerbedError(Exception):
    """A user-facing error: its message is one line and is all the user sees.

    `exit_code` says which kind it is: USAGE (the default) for bad input, FAILED where a
    subclass reports work that could not be done.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.USAGE


class FedserverError(FlowerbedError):
    """The base of the server side's user-facing errors."""


class FedclientError(FlowerbedError):
    """The base of the edge client's user-facing errors."""


class FedsimError(FlowerbedError):
    """The base of the simulator's user-facing errors."""


class UsageError(FlowerbedError):
    """Bad command-line arguments (what argparse would print with the usage and exit 2 for)."""
