"""Fixtures for the tests of shared/."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Small models train fastest on one thread here; put torch's setting back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
