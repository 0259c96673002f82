"""fedsim's progress line: a round-event subscriber (`fedserver.events`).

The summary and the plot, which a deployment's run directory gets too, are drawn by
`fedserver.report`; fedsim draws the plot in a child process (`simulations.plotter`).
"""

from __future__ import annotations

import sys
from typing import TextIO

from fedserver.events import RoundEvent


class ProgressBar:
    """Draws a progress bar with the latest metrics, a round at a time."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.elapsed = 0.0

    def __call__(self, event: RoundEvent) -> None:
        self.elapsed += event.seconds
        self.stream.write(progress_line(event, self.elapsed, self.width))
        self.stream.write("\r" if self.stream.isatty() and event.round < event.rounds else "\n")
        self.stream.flush()


def progress_line(event: RoundEvent, elapsed: float, width: int = 30) -> str:
    filled = int(width * event.round / event.rounds)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] round {event.round}/{event.rounds}"]
    for value, label in ((event.accuracy, "acc"), (event.eval_loss, "loss"), (event.train_loss, "train")):
        if value is not None:
            parts.append(f"{label} {value:.4f}")
    parts.append(f"{elapsed:.1f}s")
    return " | ".join(parts)
