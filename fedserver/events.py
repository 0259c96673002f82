"""What the ServerApp tells its subscribers after each committed round.

`run_federation(..., on_round=[...])` calls every subscriber with one `RoundEvent` once the
round's checkpoint is committed; a subscriber that returns True asks the run to stop there
(the round stays committed). fedsim's progress bar and plot and a run directory's summary
are subscribers; so can be a live dashboard or a privacy accountant. A field added here
takes a default, so that existing subscribers keep working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

Row = dict[str, float | None]  # one line of metrics.jsonl


@dataclass(frozen=True)
class RoundEvent:
    """Round `round` of `rounds` is committed, with these metrics (None where not measured)."""

    round: int
    rounds: int  # the rounds the run is configured for (it may stop earlier)
    train_loss: float | None
    eval_loss: float | None
    accuracy: float | None
    seconds: float  # the round's own time: sampling, training, aggregation, evaluation

    def row(self) -> Row:
        """The round's line of `metrics.jsonl`."""
        row: Row = asdict(self)
        del row["rounds"]
        return row


RoundCallback = Callable[[RoundEvent], "bool | None"]


def notify(subscribers: Sequence[RoundCallback], event: RoundEvent) -> bool:
    """Hand `event` to every subscriber, in order; whether any of them asked to stop."""
    stop = False
    for subscriber in subscribers:
        stop = bool(subscriber(event)) or stop
    return stop
