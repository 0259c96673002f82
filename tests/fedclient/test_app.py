"""The ClientApp: a node's own data, file or partition; its seed; the state it keeps per run."""

import hashlib
import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

import fedclient.app as client
from fedclient.app import ClientRuntimes, app, client_seed, make_client_app
from shared import messages as keys
from shared import task
from shared.config import RunConfig
from shared.data.federation import data_spec, load_federation
from shared.data.text import FileTokenizer
from shared.device_errors import MESSAGES, DeviceCode
from shared.recipe import model_from_config
from shared.weights import to_arrayrecord, to_state_dict, validate_update
from simulations.grid import FIRST_NODE_ID, InProcessGrid, simulation_node_config


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """The ClientApp sets this process's torch threads to the run's; put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def global_weights(cfg: RunConfig):
    return to_arrayrecord(model_from_config(cfg, data_spec(cfg)).state_dict())


def send(grid: InProcessGrid, arrays, nodes: list[int], message_type: str = MessageType.TRAIN) -> list[Message]:
    """One round's messages, as a strategy sends them (one ArrayRecord for all), and the replies."""
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 2})})
    replies = grid.send_and_receive([grid.create_message(content, message_type, node, "2") for node in nodes])
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    return replies


def simulated(client_app, cfg: RunConfig) -> InProcessGrid:
    return InProcessGrid(client_app, cfg.num_clients, cfg.to_mapping(), simulation_node_config(cfg.num_clients))


def test_a_deployed_node_trains_on_its_own_file(tmp_path):
    # Prepare
    rng = np.random.default_rng(0)
    path = tmp_path / "local.npz"
    np.savez(path, x=rng.random((40, 5), dtype=np.float32), y=rng.integers(0, 3, 40))
    cfg = RunConfig.from_mapping({"dataset": "npz", "input-dim": 5, "num-classes": 3, "hidden": "4"})
    arrays = global_weights(cfg)
    grid = InProcessGrid(app, 1, cfg.to_mapping(), lambda _: {"data-path": str(path), "device": "cpu"})

    # Execute
    (reply,) = send(grid, arrays, [FIRST_NODE_ID])

    # Assert
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 32  # 40 minus the 20 % held out
    validate_update(arrays, reply.content[keys.ARRAYS])


def test_a_reply_is_task_train_on_the_partition_with_the_client_seed(tiny_config):
    # Prepare
    cfg = tiny_config()
    arrays = global_weights(cfg)
    node = FIRST_NODE_ID + 3

    # Execute
    (reply,) = send(simulated(make_client_app(), cfg), arrays, [node])
    model = model_from_config(cfg, data_spec(cfg))
    data = load_federation(cfg).client(3)
    expected = task.train(
        model, data.x_train, data.y_train, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        device=cfg.device, seed=client_seed(cfg, 2, node),
    )  # fmt: skip

    # Assert
    assert reply.content[keys.METRICS][keys.TRAIN_LOSS] == expected.loss
    weights = to_state_dict(reply.content[keys.ARRAYS], like=model.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[None]:
    """Count the ClientApp's calls to its collaborator `name` (e.g. the weights' decoder)."""
    calls: list[None] = []
    original: Callable = getattr(client, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(client, name, counted)
    return calls


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_round_decodes_the_global_weights_once_for_all_its_clients(tiny_config, monkeypatch, message_type):
    # Prepare
    cfg = tiny_config()
    grid = simulated(make_client_app(), cfg)
    decodes = count_calls(monkeypatch, "to_state_dict")
    nodes = [FIRST_NODE_ID, FIRST_NODE_ID + 2, FIRST_NODE_ID + 5]

    # Execute / Assert
    send(grid, global_weights(cfg), nodes, message_type)
    assert len(decodes) == 1
    send(grid, global_weights(cfg), nodes, message_type)  # the next round's weights: a new record
    assert len(decodes) == 2


def test_each_message_runs_on_its_runs_torch_threads(tiny_config):
    # Prepare: one ClientApp serving two runs in turn
    client_app = make_client_app()
    grids = {threads: simulated(client_app, tiny_config(torch_threads=threads)) for threads in (2, 1)}
    arrays = global_weights(tiny_config())

    # Execute / Assert
    for threads in (2, 1, 2):
        send(grids[threads], arrays, [FIRST_NODE_ID], MessageType.EVALUATE)
        assert torch.get_num_threads() == threads


def test_a_client_app_keeps_the_state_of_its_last_max_runs_runs(tiny_config, monkeypatch):
    # Prepare: runs a, b, c differ in their seed only
    client_app = make_client_app(ClientRuntimes(max_runs=2))
    grids = {run: simulated(client_app, tiny_config(seed=seed)) for run, seed in zip("abc", (1, 2, 3), strict=True)}
    arrays = global_weights(tiny_config())
    builds = count_calls(monkeypatch, "model_from_config")

    # Execute: c drops b, the least recently used, so b's model is built again
    for run in "abacab":
        send(grids[run], arrays, [FIRST_NODE_ID], MessageType.EVALUATE)

    # Assert
    assert len(builds) == 4  # a, b, c, b


def text_node(tmp_path, sha256: str) -> tuple[InProcessGrid, RunConfig, dict]:
    """A deployed node holding reviews, in a run with a `file` tokenizer pinned to `sha256`, and
    the config entries its server ships (the tokenizer file is the server's, not the node's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["good bad film"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer.save(str(tmp_path / "server-tokenizer.json"))
    shipped = (tmp_path / "server-tokenizer.json").read_bytes()
    reviews = tmp_path / "reviews.jsonl"
    rows = [{"text": f"{word} film", "label": i % 2} for i, word in enumerate(["bad", "good"] * 5)]
    reviews.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = RunConfig.from_mapping({
        "dataset": "imdb", "model": "transformer-classifier", "tokenizer": "file", "max-len": 4, "d-model": 8,
        "num-heads": 2, "num-layers": 1, "tokenizer-path": "/on/the/server.json", "tokenizer-sha256": sha256,
    })  # fmt: skip
    grid = InProcessGrid(app, 1, cfg.to_mapping(), lambda _: {"data-path": str(reviews), "device": "cpu"})
    return grid, cfg, {keys.TOKENIZER: shipped, keys.TOKENIZER_SHA256: hashlib.sha256(shipped).hexdigest()}


def train_with(grid: InProcessGrid, arrays, config: dict) -> Message:
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1, **config})})
    (reply,) = grid.send_and_receive([grid.create_message(content, MessageType.TRAIN, FIRST_NODE_ID, "1")])
    return reply


def test_a_deployed_node_trains_on_its_reviews_with_the_shipped_tokenizer(tmp_path):
    sha256 = text_node(tmp_path, "")[2][keys.TOKENIZER_SHA256]
    grid, cfg, shipped = text_node(tmp_path, sha256)
    spec = data_spec(cfg, FileTokenizer(shipped[keys.TOKENIZER]))
    arrays = to_arrayrecord(model_from_config(cfg, spec).state_dict())

    reply = train_with(grid, arrays, shipped)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 8  # 10 reviews, a fifth held out
    validate_update(arrays, reply.content[keys.ARRAYS])


def test_a_deployed_node_refuses_a_tokenizer_the_run_did_not_pin(tmp_path, caplog):
    grid, cfg, shipped = text_node(tmp_path, "0" * 64)
    arrays = to_arrayrecord(model_from_config(cfg, data_spec(cfg, FileTokenizer(shipped[keys.TOKENIZER]))).state_dict())

    reply = train_with(grid, arrays, shipped)

    assert reply.has_error() and reply.error.code == DeviceCode.BAD_MESSAGE
    assert reply.error.reason == MESSAGES[DeviceCode.BAD_MESSAGE]  # the detail stays on the device:
    assert "tokenizer checksum mismatch" in caplog.text
