"""`curves.png` drawn by a child process while the rounds run.

Importing matplotlib and drawing a figure cost about a second of CPU. fedsim trains on one
thread, so a child process does the drawing on another core: it imports matplotlib while the
first round trains, redraws the plot as rounds end (as `fedserver.report.Curves` does in a
deployment), and draws the final plot when its input closes. Rows travel as JSON lines on
the child's stdin: `python -m simulations.plotter PNG TITLE`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from fedserver.events import RoundEvent, Row
from fedserver.report import Curves, draw_curves
from shared.errors import ExitCode, FedsimError

CLOSE_TIMEOUT = 120.0  # s to wait for the final plot


class PlotError(FedsimError, RuntimeError):
    """The plotting process failed; the message carries its last output line (the error)."""

    exit_code = ExitCode.FAILED


class LivePlot:
    """A round-event subscriber that hands each round's row to a plotting child; `close()`
    waits for the final `path`. `rows` are the rounds before (of a resumed run)."""

    def __init__(self, path: Path, title: str, rows: Iterable[Row] = ()) -> None:
        self.path = path
        self._child = subprocess.Popen(
            [sys.executable, "-m", __name__, str(path), title],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for row in rows:
            self._send(row)

    def __call__(self, event: RoundEvent) -> None:
        self._send(event.row())

    def _send(self, row: Row) -> None:
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(json.dumps(row) + "\n")
            self._child.stdin.flush()
        except BrokenPipeError:  # the child died: close() reports why
            pass

    def cancel(self) -> None:
        """Stop the child without a final plot."""
        self._child.kill()
        self._child.communicate()

    def close(self) -> None:
        """Wait for the final plot; raise PlotError if the child failed."""
        try:
            _, stderr = self._child.communicate(timeout=CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._child.kill()
            _, stderr = self._child.communicate()
        if self._child.returncode != 0:
            cause = ((stderr or "").strip().splitlines() or ["no output"])[-1]  # the exception, not its traceback
            raise PlotError(f"could not draw {self.path} (exit code {self._child.returncode}): {cause}")


def _serve(path: Path, title: str) -> None:
    draw_curves([], title)  # imports matplotlib and loads its fonts while the first round trains
    curves = Curves(path, title)
    for line in sys.stdin:
        curves.add(json.loads(line))
    curves.close()


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), sys.argv[2])
