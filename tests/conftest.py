"""Fixtures shared by the whole test suite."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.config import RunConfig

TINY_FEDERATION = {
    "dataset": "synthetic",
    "num-clients": 6,
    "clients-per-round": 4,
    "rounds": 2,
    "hidden": "8",
    "synthetic-max-samples": 200,
    "lr": 0.05,
    "vectorized": "off",
}


@pytest.fixture
def tiny_config() -> Callable[..., RunConfig]:
    """Makes the config of a tiny synthetic federation (6 clients, 4 a round, 2 rounds, seconds
    to run), with changes given as keyword arguments (`min_replies=2` for `min-replies`)."""

    def make(**changes: object) -> RunConfig:
        return RunConfig.from_mapping({**TINY_FEDERATION, **{k.replace("_", "-"): v for k, v in changes.items()}})

    return make


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """Where the real datasets live: $FLOWERBED_DATASETS, else ../shared/datasets beside the repo.

    Tests that need a file there skip with a message when it is absent.
    """
    override = os.environ.get("FLOWERBED_DATASETS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"
