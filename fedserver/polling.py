"""Shorter reply polling for a deployed ServerApp, through Flower's public `Grid` API.

Flower 1.41's deployment grid (`HttpGrid`) pushes a round's messages, then pulls the replies
every 3 s, so each `send_and_receive` ends up to 3 s after the last reply arrived.
`fast_polling(grid)` wraps such a grid so that it pulls after `interval` seconds (default
0.2) instead; every other call goes to the wrapped grid unchanged. Each pull costs the
SuperLink a round of SQLite queries (about 0.1 s of CPU measured here), so while nothing comes
back the wait grows by `BACKOFF` up to `MAX_INTERVAL`, and drops to `interval` again as soon as
a reply arrives (the others tend to follow soon). Grids that do not poll
that way (fedsim's in-process grid, Flower's in-memory simulation grid) are returned as they are.

`FLOWERBED_GRID_POLL_INTERVAL` (seconds) overrides the default; `0` keeps Flower's own grid,
which is how benchmarks/deployment_latency.py measures stock Flower with the same ServerApp.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedserver.grid_wrapper import GridWrapper
from shared.flower_compat import is_http_grid

DEFAULT_INTERVAL = 0.2  # s; Flower polls every 3 s
BACKOFF = 1.5  # the wait grows by this factor after each pull that brought nothing
MAX_INTERVAL = 1.0  # s
ENV_INTERVAL = "FLOWERBED_GRID_POLL_INTERVAL"


def fast_polling(grid: Grid, interval: float | None = None) -> Grid:
    """`grid`, pulling replies every `interval` s if it is Flower's deployment (HTTP) grid."""
    interval = poll_interval() if interval is None else interval
    if interval <= 0 or not is_http_grid(grid):
        return grid
    return FastPollingGrid(grid, interval)


def poll_interval() -> float:
    """The interval from $FLOWERBED_GRID_POLL_INTERVAL, else the default; 0 = Flower's own."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{ENV_INTERVAL} must be >= 0 seconds, got {raw!r}")
    return value


class FastPollingGrid(GridWrapper):
    """A `Grid` that delegates everything to `inner` but polls replies from every `interval` s
    (after a reply) up to every `MAX_INTERVAL` s (after empty pulls)."""

    def __init__(self, inner: Grid, interval: float) -> None:
        super().__init__(inner)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull replies until all came or `timeout` passed."""
        pending = {message_id for message_id in self.push_messages(messages) if message_id}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.interval / BACKOFF  # the first wait is `interval`
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(m.metadata.reply_to_message_id for m in received)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            wait = self.interval if received else min(wait * BACKOFF, max(MAX_INTERVAL, self.interval))
            time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        return replies
