"""Simulated stragglers (`stragglers` key): a Grid that slows down some of each round's clients.

Li et al. 2020 (FedProx) make a fraction of each round's sampled clients do a uniform
1..E local epochs instead of E. FedProx keeps their partial work; every other strategy drops
them, as FedAvg does there. Dropping happens at the grid, as a slow client would: it never
replies, so the ServerApp's quorum counts it as missing.

The wrapper acts on training messages (those carrying the round's config), in the order the
strategy sent them, and draws from a generator seeded with (seed, round), so a run is the
same for the same seed. Everything else passes through unchanged. Under secure aggregation
the round's config travels in the masked-input stage, so a dropped straggler drops out there,
after the key exchange, as a slow client would, and SecAgg+ removes its masks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedserver.grid_wrapper import GridWrapper
from shared import messages as keys
from shared.config import RunConfig


def with_stragglers(grid: Grid, cfg: RunConfig) -> Grid:
    """`grid`, with `cfg.stragglers` of each round's training clients slowed down (if any)."""
    return StragglerGrid(grid, cfg) if cfg.stragglers > 0 else grid


class StragglerGrid(GridWrapper):
    """Delegates to `inner`; `send_and_receive` slows down the stragglers of a training round."""

    def __init__(self, inner: Grid, cfg: RunConfig) -> None:
        super().__init__(inner)
        self.cfg = cfg

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and all(_is_training(m) for m in messages):
            messages = self.slowed(messages)
        return self.inner.send_and_receive(messages, timeout=timeout)

    def slowed(self, messages: list[Message]) -> list[Message]:
        """`messages` without the dropped stragglers, or with FedProx's stragglers' fewer epochs."""
        server_round = int(messages[0].content[keys.CONFIG][keys.SERVER_ROUND])
        rng = np.random.default_rng([self.cfg.seed, server_round])
        count = int(round(self.cfg.stragglers * len(messages)))
        slow = set(rng.choice(len(messages), size=count, replace=False))
        if self.cfg.strategy != "fedprox":
            return [m for i, m in enumerate(messages) if i not in slow]
        out = []
        for i, message in enumerate(messages):
            if i in slow:
                epochs = int(rng.integers(1, self.cfg.local_epochs + 1))
                message = _with_config(message, {keys.LOCAL_EPOCHS: epochs})
            out.append(message)
        return out


def _is_training(message: Message) -> bool:
    content = message.content
    is_train = message.metadata.message_type == MessageType.TRAIN
    return is_train and keys.CONFIG in content and keys.SERVER_ROUND in content[keys.CONFIG]


def _with_config(message: Message, changes: dict[str, int]) -> Message:
    """A copy of a training message whose config has `changes` (the other records are shared)."""
    content = message.content
    new_content = RecordDict({**content, keys.CONFIG: ConfigRecord({**content[keys.CONFIG], **changes})})
    metadata = message.metadata
    return Message(new_content, metadata.dst_node_id, metadata.message_type, group_id=metadata.group_id)
