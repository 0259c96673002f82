"""The vectorized fast path: the same replies as the ClientApp, or None where it falls back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

import simulations.vectorized as vectorized
from fedclient.app import app as client_app
from fedserver.checkpoints import MODEL_FILE, read_metrics
from shared import messages as keys
from shared.config import ConfigError, RunConfig
from shared.data.federation import Federation, data_spec, load_federation
from shared.recipe import model_from_config
from shared.weights import load_safetensors, to_arrayrecord, to_state_dict
from simulations import engine
from simulations.engine import run_simulation
from simulations.grid import FIRST_NODE_ID, InProcessGrid, RoundRunner, simulation_node_config
from simulations.vectorized import VectorizedTrainer, batch_runner_for

ATOL = 1e-5
NUM_CLIENTS, PER_CLIENT = 6, 32  # 32 examples with B=5: six full batches and one of 2


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)  # the ClientApp sets torch-threads


def write_blobs(path: Path, features: int) -> Path:
    """A tiny learnable dataset: `features` features, 3 classes, for NUM_CLIENTS equal client shares."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, features)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, size=n)
        return (centers[y] + 0.7 * rng.normal(size=(n, features))).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = draw(NUM_CLIENTS * PER_CLIENT), draw(60)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    return write_blobs(tmp_path / "tiny.npz", 8)


def make_cfg(npz: Path, **changes: object) -> RunConfig:
    base = RunConfig(
        dataset="npz", data_path=str(npz), partition="iid", num_clients=NUM_CLIENTS, clients_per_round=4,
        rounds=2, model="mlp", hidden="16", batch_size=5, local_epochs=2, lr=0.1, optimizer="sgd",
        device="cpu", vectorized="on",
    )  # fmt: skip
    return base.replace(**changes)


def count_answered_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every batch of messages the vectorized runner answers (not falls back on)."""
    sizes: list[int] = []
    original = VectorizedTrainer.__call__

    def spy(self: VectorizedTrainer, messages: list[Message], contexts: list[Context]) -> list[Message] | None:
        replies = original(self, messages, contexts)
        if replies is not None:
            sizes.append(len(replies))
        return replies

    monkeypatch.setattr(VectorizedTrainer, "__call__", spy)
    return sizes


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"optimizer": "adam", "lr": 0.01},
        # FedProx with stragglers: proximal term, and groups with different local epochs.
        {"strategy": "fedprox", "proximal_mu": 0.5, "stragglers": 0.5},
    ],
    ids=["sgd", "adam", "fedprox-stragglers"],
)
def test_a_vectorized_run_equals_the_sequential_run(npz, tmp_path, monkeypatch, changes):
    # Prepare
    cfg = make_cfg(npz, **changes)
    sizes = count_answered_batches(monkeypatch)

    # Execute
    run_simulation(cfg.replace(vectorized="off"), tmp_path / "off", progress=False)
    assert sizes == []
    run_simulation(cfg, tmp_path / "on", progress=False)

    # Assert
    assert sizes  # the fast path answered, so it trained stacked clients (it falls back when none stack)
    off, on = load_safetensors(tmp_path / "off" / MODEL_FILE), load_safetensors(tmp_path / "on" / MODEL_FILE)
    assert off.keys() == on.keys()
    for key in off:
        torch.testing.assert_close(on[key], off[key], atol=ATOL, rtol=0)
    rows_off, rows_on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    assert len(rows_off) == len(rows_on) == cfg.rounds
    for row_off, row_on in zip(rows_off, rows_on, strict=True):
        assert row_on["train_loss"] == pytest.approx(row_off["train_loss"], abs=ATOL)
        assert row_on["accuracy"] == pytest.approx(row_off["accuracy"], abs=1e-9)


def test_a_vectorized_cnn_run_equals_the_sequential_run(tmp_path, monkeypatch):
    # Prepare: 8x8 "images", two clients trained together each round
    images = write_blobs(tmp_path / "images.npz", 64)
    cfg = make_cfg(images, model="cnn", cnn_hidden=8, clients_per_round=2, local_epochs=1)
    sizes = count_answered_batches(monkeypatch)

    # Execute
    run_simulation(cfg.replace(vectorized="off"), tmp_path / "off", progress=False)
    run_simulation(cfg, tmp_path / "on", progress=False)

    # Assert
    assert sizes == [2] * cfg.rounds
    off, on = load_safetensors(tmp_path / "off" / MODEL_FILE), load_safetensors(tmp_path / "on" / MODEL_FILE)
    assert off.keys() == on.keys() and any(k.startswith("features.") for k in off)
    for key in off:
        torch.testing.assert_close(on[key], off[key], atol=ATOL, rtol=0)
    for row_off, row_on in zip(read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on"), strict=True):
        assert row_on["train_loss"] == pytest.approx(row_off["train_loss"], abs=ATOL)


def make_grid(cfg: RunConfig) -> InProcessGrid:
    return InProcessGrid(client_app, cfg.num_clients, cfg.to_mapping(), simulation_node_config(cfg.num_clients))


def pushed(
    grid: InProcessGrid, cfg: RunConfig, nodes: list[int], message_type: str = MessageType.TRAIN
) -> list[Message]:
    """Messages as the strategy sends them (global weights, config), with ids from the grid."""
    arrays = to_arrayrecord(model_from_config(cfg, data_spec(cfg)).state_dict())
    config = ConfigRecord({keys.SERVER_ROUND: 3})
    messages = [
        grid.create_message(RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}), message_type, node, "3")
        for node in nodes
    ]
    grid.push_messages(messages)
    return messages


BATCHES_FILE = "vectorized-batches.txt"


def noting_batch_runner_for(cfg: RunConfig, federation: Federation | None = None) -> RoundRunner | None:
    """batch_runner_for, noting in the run directory the size of each batch it trains (whatever process it runs in)."""
    runner = batch_runner_for(cfg, federation)

    def run(messages: list[Message], contexts: list[Context]) -> list[Message] | None:
        replies = runner(messages, contexts)
        if replies is not None:
            with (Path(cfg.run_dir) / BATCHES_FILE).open("a") as note:
                note.write(f"{len(messages)}\n")
        return replies

    return run


def test_worker_processes_train_their_share_of_a_round_vectorized(npz, tmp_path, monkeypatch):
    # Prepare
    cfg = make_cfg(npz, clients_per_round=6)
    monkeypatch.setattr(engine, "batch_runner_for", noting_batch_runner_for)

    # Execute
    run_simulation(cfg, tmp_path / "one", progress=False)
    run_simulation(cfg.replace(workers="2"), tmp_path / "two", progress=False)

    # Assert: each worker trained its half of each round at once
    assert (tmp_path / "one" / BATCHES_FILE).read_text().split() == ["6"] * cfg.rounds
    assert (tmp_path / "two" / BATCHES_FILE).read_text().split() == ["3"] * 2 * cfg.rounds
    one, two = (load_safetensors(tmp_path / run / MODEL_FILE) for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:  # vmap over 3 clients instead of 6: equal but for the order of float operations
        torch.testing.assert_close(two[name], one[name], atol=ATOL, rtol=0)


def test_runner_replies_equal_the_client_apps(npz):
    # Prepare
    cfg = make_cfg(npz)
    grid = make_grid(cfg)
    messages = pushed(grid, cfg, [FIRST_NODE_ID + 4, FIRST_NODE_ID, FIRST_NODE_ID + 2])
    contexts = [grid.context(m.metadata.dst_node_id) for m in messages]
    runner = batch_runner_for(cfg)

    # Execute
    fast = runner(messages, contexts)
    slow = [client_app(m, c) for m, c in zip(messages, contexts, strict=True)]

    # Assert
    assert fast is not None and len(fast) == len(slow)
    for f, s in zip(fast, slow, strict=True):
        assert f.metadata.reply_to_message_id == s.metadata.reply_to_message_id
        assert (f.metadata.src_node_id, f.metadata.message_type) == (s.metadata.src_node_id, s.metadata.message_type)
        assert f.content.keys() == s.content.keys() == {keys.ARRAYS, keys.METRICS}
        assert f.content[keys.METRICS].keys() == s.content[keys.METRICS].keys()
        assert f.content[keys.METRICS][keys.NUM_EXAMPLES] == s.content[keys.METRICS][keys.NUM_EXAMPLES] == PER_CLIENT
        fast_loss, slow_loss = f.content[keys.METRICS][keys.TRAIN_LOSS], s.content[keys.METRICS][keys.TRAIN_LOSS]
        assert isinstance(fast_loss, float) and fast_loss == pytest.approx(slow_loss, abs=ATOL)
        like = model_from_config(cfg, data_spec(cfg)).state_dict()
        fw, sw = (to_state_dict(r.content[keys.ARRAYS], like=like) for r in (f, s))
        assert list(fw) == list(sw)
        for key in sw:
            assert fw[key].dtype == sw[key].dtype
            torch.testing.assert_close(fw[key], sw[key], atol=ATOL, rtol=0)


def test_evaluate_messages_fall_back(npz):
    cfg = make_cfg(npz)
    grid = make_grid(cfg)
    messages = pushed(grid, cfg, [FIRST_NODE_ID, FIRST_NODE_ID + 1], MessageType.EVALUATE)
    contexts = [grid.context(m.metadata.dst_node_id) for m in messages]

    assert batch_runner_for(cfg)(messages, contexts) is None


def test_clients_that_cannot_stack_fall_back(npz):
    # Two "synthetic" devices of unequal sizes take different numbers of steps.
    cfg = make_cfg(npz)
    grid = make_grid(cfg)
    unequal = RunConfig(
        dataset="synthetic", num_clients=4, clients_per_round=2, hidden="8", device="cpu", vectorized="on"
    )
    ugrid = make_grid(unequal)
    messages = pushed(ugrid, unequal, [FIRST_NODE_ID, FIRST_NODE_ID + 1])
    contexts = [ugrid.context(m.metadata.dst_node_id) for m in messages]
    sizes = [len(load_federation(unequal).client(i).y_train) for i in (0, 1)]

    assert sizes[0] != sizes[1]
    assert batch_runner_for(unequal)(messages, contexts) is None
    # A single message has nothing to stack with either.
    (one,) = pushed(grid, cfg, [FIRST_NODE_ID])
    assert batch_runner_for(cfg)([one], [grid.context(FIRST_NODE_ID)]) is None


def test_weights_that_do_not_fit_fall_back_to_the_client_app(npz):
    cfg = make_cfg(npz)
    grid = make_grid(cfg)
    bad = to_arrayrecord({"layers.0.weight": torch.zeros(2, 2)})
    messages = [
        grid.create_message(RecordDict({keys.ARRAYS: bad, keys.CONFIG: ConfigRecord()}), MessageType.TRAIN, node, "1")
        for node in (FIRST_NODE_ID, FIRST_NODE_ID + 1)
    ]
    grid.push_messages(messages)
    contexts = [grid.context(m.metadata.dst_node_id) for m in messages]

    assert batch_runner_for(cfg)(messages, contexts) is None


def test_off_and_auto_on_cpu_give_no_runner(npz, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert batch_runner_for(make_cfg(npz, vectorized="off")) is None
    assert batch_runner_for(make_cfg(npz, vectorized="auto", device="auto")) is None
    assert batch_runner_for(make_cfg(npz, vectorized="auto", device="cpu")) is None
    assert isinstance(batch_runner_for(make_cfg(npz, vectorized="on")), VectorizedTrainer)


def test_on_with_an_unsupported_model_is_a_config_error(npz, monkeypatch):
    def with_dropout(cfg: RunConfig, spec: object) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3))

    monkeypatch.setattr(vectorized, "model_from_config", with_dropout)

    with pytest.raises(ConfigError, match="cannot be vectorized: model 'mlp' has Dropout layers"):
        batch_runner_for(make_cfg(npz))
    assert batch_runner_for(make_cfg(npz, vectorized="auto")) is None


def test_on_with_an_unsupported_optimizer_is_a_config_error(npz, monkeypatch):
    monkeypatch.setattr(vectorized, "SUPPORTED_OPTIMIZERS", ("sgd",))

    with pytest.raises(ConfigError, match="cannot be vectorized: optimizer 'adam'"):
        batch_runner_for(make_cfg(npz, optimizer="adam"))
