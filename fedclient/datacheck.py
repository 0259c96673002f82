"""`python -m fedclient.datacheck PATH`: check a device's data before `fedclient start` joins a run.

A short-lived child of `fedclient start` (fedclient/node.py `check_inputs`): reading the data needs
numpy and the data readers, which the long-running supervisor does not keep in memory. Prints the
data's summary (exit 0), or the one-line reason no run could train on it to stderr (exit 2).
"""

from __future__ import annotations

import sys

from shared.data.errors import DataError
from shared.data.federation import check_local
from shared.errors import ExitCode


def main(argv: list[str]) -> int:
    """Check the one data path in `argv`; the exit status says whether it can be trained on."""
    [path] = argv
    try:
        print(check_local(path))
    except DataError as err:
        print(err, file=sys.stderr)
        return ExitCode.USAGE
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
