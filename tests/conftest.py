"""Fixtures shared by the whole test suite."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """Where the real datasets live: $FLOWERBED_DATASETS, else ../shared/datasets beside the repo.

    Tests that need a file there skip with a message when it is absent.
    """
    override = os.environ.get("FLOWERBED_DATASETS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"
