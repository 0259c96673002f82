"""A `Grid` that passes every call to another grid: the base of grids that change one thing.

`fedserver.polling.FastPollingGrid` (shorter reply polling in a deployment) and
`simulations.stragglers.StragglerGrid` (simulated slow clients) each override only
`send_and_receive`; everything else reaches the wrapped grid unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from shared.flower_compat.runs import Run


class GridWrapper(Grid):
    """Delegates every `Grid` method, and any other attribute (e.g. `close`), to `inner`."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)
