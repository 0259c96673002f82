"""Torch threads: a simulated client runs on the run's `torch-threads`, a deployed device on its own."""

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from fedclient.app import make_client_app
from shared import messages as keys
from shared.config import RunConfig
from shared.data.federation import DataSpec
from shared.recipe import model_from_config
from shared.weights import to_arrayrecord
from simulations.grid import FIRST_NODE_ID, InProcessGrid

RECIPE = {"dataset": "npz", "input-dim": 5, "num-classes": 3, "hidden": "4", "torch-threads": 1}
DEVICE_OWN = 3  # a count no run asks for


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(DEVICE_OWN)
    yield
    torch.set_num_threads(threads)


def train_once(node_config: dict, recipe: dict) -> None:
    cfg = RunConfig.from_mapping(recipe)
    arrays = to_arrayrecord(model_from_config(cfg, DataSpec(5, 3)).state_dict())
    grid = InProcessGrid(make_client_app(), 1, cfg.to_mapping(), lambda _: node_config)
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})})

    (reply,) = grid.send_and_receive([grid.create_message(content, MessageType.TRAIN, FIRST_NODE_ID, "1")])

    assert not reply.has_error(), reply.error.reason


def test_a_deployed_device_keeps_its_own_threads_whatever_the_run_asks(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "own.npz", x=rng.random((20, 5), dtype=np.float32), y=rng.integers(0, 3, 20))

    train_once({"data-path": str(tmp_path / "own.npz"), "device": "cpu"}, RECIPE)

    assert torch.get_num_threads() == DEVICE_OWN


def test_a_simulated_client_runs_on_the_runs_torch_threads(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "all.npz", x=rng.random((40, 5), dtype=np.float32), y=rng.integers(0, 3, 40))

    train_once({"partition-id": 0, "num-partitions": 2}, {**RECIPE, "data-path": str(tmp_path / "all.npz")})

    assert torch.get_num_threads() == 1
