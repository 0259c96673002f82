"""Shorter reply polling for a deployed ServerApp, through Flower's public `Grid` API, and a bound
on each reply's size.

Flower 1.41's `HttpGrid` pushes a round's tasks, then pulls replies every 3 s; `fast_polling(grid)`
pulls after `interval` (0.2 s; `FLOWERBED_GRID_POLL_INTERVAL`, 0 keeps Flower's grid), backing off
while nothing comes back, as each pull costs the SuperLink SQLite queries, and starts pulling while
a large round's tasks are still being pushed (`_Pushing`). A reply over `max-reply-bytes` is pulled
no further, deleted and handed on as an error reply coded `REPLY_TOO_LARGE` (docs/deploy.md).
Other grids are returned as they are.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Error, Message
from flwr.serverapp import Grid

from fedserver.grid_wrapper import GridWrapper
from shared.device_errors import REPLY_TOO_LARGE
from shared.flower_compat.http_grid import ReplyTooLarge, is_http_grid, pull_replies_within, retry_handshake_timeouts

DEFAULT_INTERVAL = 0.2  # s; Flower polls every 3 s
BACKOFF = 1.5  # the wait grows by this factor after each pull that brought nothing
MAX_INTERVAL = 0.5  # s: replies often come all at once (held pulls hand a round's tasks out together)
ENV_INTERVAL = "FLOWERBED_GRID_POLL_INTERVAL"
LOG = logging.getLogger("flowerbed.server")
# Messages a closed round left unanswered are pulled with later ones for this long, so that their
# late replies leave the SuperLink's state; at most this many.
LATE_WINDOW = 600.0  # s
MAX_ABANDONED = 10_000
PUSH_CHUNK = 10  # messages a push request carries after the first (pushed alone)
REPLY_MARGIN = 1 << 20  # bytes beyond 2 x the weights: records' headers, metrics, SecAgg+ keys and shares


def fast_polling(grid: Grid, interval: float | None = None, *, max_reply_bytes: int = 0) -> Grid:
    """`grid`, pulling replies every `interval` s, each bounded by `max_reply_bytes` (0: derived
    from the model), if it is Flower's deployment (HTTP) grid; that grid rides out a SuperLink
    too busy to finish a TLS handshake in time (`retry_handshake_timeouts`)."""
    if not is_http_grid(grid):
        return grid
    retry_handshake_timeouts(grid)
    interval = poll_interval() if interval is None else interval
    if interval <= 0:
        return grid
    return FastPollingGrid(BoundedRepliesGrid(grid, max_reply_bytes), interval)


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
    (after a reply) up to every `MAX_INTERVAL` s (after empty pulls).

    `send_and_receive_until` also stops as soon as the replies so far are `enough` to close the
    round (`fedserver.cohort`); the messages still unanswered then are pulled along with later
    ones, and their replies, late, are deleted from the SuperLink that way and logged, never returned.
    """

    def __init__(self, inner: Grid, interval: float) -> None:
        super().__init__(inner)
        self.interval = interval
        self.abandoned: dict[str, tuple[int, float]] = {}  # message id -> (node, when) a closed round left it

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull replies until all came or `timeout` passed."""
        return self.send_and_receive_until(messages, timeout=timeout)

    def send_and_receive_until(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        enough: Callable[[Sequence[Message]], bool] | None = None,
    ) -> list[Message]:
        """Push `messages` (`_Pushing`) and pull the replies to those pushed, until all came,
        `enough(replies)` holds, or `timeout` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: set[str] = set()
        replies: list[Message] = []
        wait = self.interval / BACKOFF  # the first wait is `interval`
        with _Pushing(self.inner, list(messages)) as pushing:
            while True:
                done = pushing.done()  # before taking: a push that is done has nothing left to give
                pending.update(pushing.take())
                received = self._pull(pending) if pending else []
                replies.extend(received)
                pending.difference_update(m.metadata.reply_to_message_id for m in received)
                if (done and not pending) or (enough is not None and enough(replies)):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                wait = self.interval if received else min(wait * BACKOFF, max(MAX_INTERVAL, self.interval))
                time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        pending.update(pushing.take())  # pushed after the round closed
        self._abandon({message_id: pushing.nodes[message_id] for message_id in pending})
        return replies

    def _pull(self, pending: set[str]) -> list[Message]:
        """The replies to `pending` messages; replies to abandoned ones are logged and dropped."""
        received = list(self.pull_messages(pending | self.abandoned.keys()))
        late = [m for m in received if m.metadata.reply_to_message_id in self.abandoned]
        for reply in late:
            node, _ = self.abandoned.pop(reply.metadata.reply_to_message_id)
            LOG.warning("node %d: a reply came after its round closed; discarded", node)
        return [m for m in received if m.metadata.reply_to_message_id in pending]

    def _abandon(self, nodes: dict[str, int]) -> None:
        """Remember what a closed round left unanswered for LATE_WINDOW s (a node that never
        replies is not asked after for ever), at most MAX_ABANDONED messages."""
        now = time.monotonic()
        self.abandoned.update((message_id, (node, now)) for message_id, node in nodes.items())
        kept = [(i, v) for i, v in self.abandoned.items() if now - v[1] < LATE_WINDOW][-MAX_ABANDONED:]
        self.abandoned = dict(kept)


class _Pushing:
    """Messages pushed through `grid`, the first on its own, and, if they are more than
    1 + PUSH_CHUNK, the rest in chunks of PUSH_CHUNK from a thread of their own, so that the
    replies to those pushed are pulled while the others are pushed.

    A push's tasks reach their devices as the SuperLink stores each (the fleet front wakes their
    held pulls), but it takes their objects only once it has stored them all: pushed first on its
    own, the objects the tasks share (the weights) are there when the other tasks go out, instead
    of each device waiting out Flower's backoff (1 s, then 2, 4, 8...). And 100 tasks take
    seconds to store on a busy SuperLink, by which time most of their replies are in.
    """

    def __init__(self, grid: Grid, messages: list[Message]) -> None:
        self._grid, self._lock, self._error = grid, threading.Lock(), None
        self.nodes: dict[str, int] = {}  # message id -> its node, of the messages pushed, in push order
        self._taken = 0  # how many of them `take` gave
        self._push(messages[:1])
        rest = [messages[i : i + PUSH_CHUNK] for i in range(1, len(messages), PUSH_CHUNK)]
        self._thread = threading.Thread(target=self._push_all, args=(rest,), name="push-messages", daemon=True)
        if len(rest) > 1:
            self._thread.start()
        else:
            for chunk in rest:  # here, where what a push raises is raised at once
                self._push(chunk)

    def __enter__(self) -> _Pushing:
        return self

    def __exit__(self, *exc: object) -> None:
        """Waits for the push to end; raises what it raised."""
        if self._thread.is_alive():
            self._thread.join()
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def take(self) -> list[str]:
        """The ids of the messages pushed since the last take; a message not pushed (Flower
        answered None for it) is not among them."""
        with self._lock:
            ids = list(self.nodes)[self._taken :]
            self._taken += len(ids)
        return ids

    def _push_all(self, chunks: list[list[Message]]) -> None:
        try:
            for chunk in chunks:
                self._push(chunk)
        except Exception as err:  # noqa: BLE001 - raised in the polling thread, by __exit__
            self._error = err

    def _push(self, messages: list[Message]) -> None:
        ids = list(self._grid.push_messages(messages)) if messages else []
        with self._lock:
            self.nodes.update({i: m.metadata.dst_node_id for i, m in zip(ids, messages) if i})  # none when refused whole


class BoundedRepliesGrid(GridWrapper):
    """A `Grid` over Flower's HttpGrid `inner` that pulls each reply within `reply_bound()`
    bytes (`shared.flower_compat.pull_replies_within`); everything else goes to `inner`, its
    `send_and_receive` too (unbounded): `FastPollingGrid` wraps it and polls through it."""

    def __init__(self, inner: Grid, max_reply_bytes: int = 0) -> None:
        super().__init__(inner)
        self.max_reply_bytes = max_reply_bytes
        self.model_bytes = 0  # the largest weights pushed so far

    def reply_bound(self) -> int:
        """Bytes a reply may bring: `max-reply-bytes`, else 2 x the model's weights + the margin."""
        return self.max_reply_bytes or 2 * self.model_bytes + REPLY_MARGIN

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.model_bytes = max([self.model_bytes, *(weights_bytes(message) for message in messages)])
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return pull_replies_within(self.inner, message_ids, self.reply_bound(), too_large)


def weights_bytes(message: Message) -> int:
    """The bytes of the arrays `message` carries (0 for an error message)."""
    if message.has_error():
        return 0
    records = message.content.array_records.values()
    return sum(len(array.data) for record in records for array in record.values())


def too_large(err: ReplyTooLarge) -> Error:
    """The error reply that stands for a reply refused for its size, its sizes in the reason."""
    return Error(REPLY_TOO_LARGE, f"reply too large: {err} (max-reply-bytes); not inflated, deleted")
