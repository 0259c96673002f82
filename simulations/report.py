"""fedsim's progress line: a round-event subscriber (`fedserver.events`).

The summary and the plot, which a deployment's run directory gets too, are drawn by
`fedserver.report`; fedsim draws the plot in a child process (`simulations.plotter`).
"""

from __future__ import annotations

import sys
from typing import TextIO

from fedserver.events import RoundEvent


class ProgressBar:
    """Draws a progress bar with the latest metrics, a round at a time. Between evaluations
    (`eval-every`) it shows the last evaluated round's scores, naming that round."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.elapsed = 0.0
        self.evaluated: RoundEvent | None = None

    def __call__(self, event: RoundEvent) -> None:
        self.elapsed += event.seconds
        if event.accuracy is not None or event.eval_loss is not None:
            self.evaluated = event
        self.stream.write(progress_line(event, self.elapsed, self.width, self.evaluated))
        self.stream.write("\r" if self.stream.isatty() and event.round < event.rounds else "\n")
        self.stream.flush()


def progress_line(event: RoundEvent, elapsed: float, width: int = 30, evaluated: RoundEvent | None = None) -> str:
    """The bar at `event`, with the scores of `evaluated` (the latest evaluated round; default `event`)."""
    evaluated = evaluated or event
    filled = int(width * event.round / event.rounds)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] round {event.round}/{event.rounds}"]
    for value, label in ((evaluated.accuracy, "acc"), (evaluated.eval_loss, "loss")):
        if value is not None:
            parts.append(f"{label} {value:.4f}")
    if evaluated.round != event.round:
        parts[-1] += f" (round {evaluated.round})"
    if event.train_loss is not None:
        parts.append(f"train {event.train_loss:.4f}")
    epsilon = getattr(event, "epsilon", None)  # a DP run's PrivateRoundEvent (fedserver.privacy)
    if epsilon is not None:
        parts.append(f"eps {epsilon:.3g}")
    parts.append(f"{elapsed:.1f}s")
    return " | ".join(parts)
