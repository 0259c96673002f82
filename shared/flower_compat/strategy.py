"""Flower's strategies' sampling minimums, lowered for one sampling call (a device gone for good must not stall a run).

Writes the public attributes `min_available_nodes`, `min_train_nodes`, `min_evaluate_nodes`
that every `flwr.serverapp.strategy` strategy sets in its constructor and waits on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flwr.serverapp.strategy import Strategy

__all__ = ["SAMPLING_MINIMUMS", "sampling_from"]


SAMPLING_MINIMUMS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


@contextlib.contextmanager
def sampling_from(strategy: Strategy, connected: int) -> Iterator[None]:
    """Let one configure_train/configure_evaluate call sample from `connected` nodes.

    Writes Flower strategies' public sampling minimums (`SAMPLING_MINIMUMS`), set in their
    constructors, and puts them back after the block.

    Flower's strategies wait, without end, until `min_available_nodes` nodes are connected; a
    device that is gone for good would stall the run. Within this block the minimums are at
    most `connected`, so the strategy samples from the nodes that are there.
    """
    saved = {name: getattr(strategy, name) for name in SAMPLING_MINIMUMS}
    for name, value in saved.items():
        setattr(strategy, name, min(value, connected))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(strategy, name, value)
