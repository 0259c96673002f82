"""The installed ClientApp against a hostile server: driven as a SuperNode drives it (a Message and
a Context with the device's node config), with a hostile run config and hostile messages. Every
task it will not do is an error reply with a code and a fixed message; no byte of a file outside
`--data` leaves the device, and nothing is written outside its own folders."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

import fedclient.app as client
from fedclient.app import make_client_app
from fedclient.policy import DevicePolicy
from shared import messages as keys
from shared.config import DEVICE_OWNED_KEYS, RunConfig
from shared.data.federation import DataSpec
from shared.data.shipping import MAX_TOKENIZER_BYTES
from shared.device_errors import MESSAGES, DeviceCode
from shared.recipe import model_from_config
from shared.secagg import protocol as p
from shared.weights import to_arrayrecord, to_state_dict
from simulations.grid import FIRST_NODE_ID, InProcessGrid

SECRET = "SECRET-7f3a-credentials"
RECIPE = {"dataset": "npz", "model": "mlp", "hidden": "4", "input-dim": 5, "num-classes": 3}


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device(tmp_path):
    """A device's own data (`--data`), and a secret file elsewhere on it that the server names."""
    rng = np.random.default_rng(0)
    own = tmp_path / "own.npz"
    np.savez(own, x=rng.random((40, 5), dtype=np.float32), y=rng.integers(0, 3, 40))
    secret = tmp_path / "secret.csv"
    secret.write_text(f"{SECRET},label\n1,0\n")
    return own, secret


def node(data, policy: DevicePolicy | None = None, run_config: dict | None = None) -> InProcessGrid:
    """A deployed node running the installed ClientApp (a fresh one: no state from other tests)."""
    node_config = {"data-path": str(data), "device": "cpu", **(policy.to_node_config() if policy else {})}
    return InProcessGrid(make_client_app(), 1, {**RECIPE, **(run_config or {})}, lambda _: node_config)


def weights(**recipe) -> object:
    cfg = RunConfig.from_mapping({**RECIPE, **recipe})
    return to_arrayrecord(model_from_config(cfg, DataSpec(cfg.input_dim, cfg.num_classes)).state_dict())


def task(grid: InProcessGrid, content: RecordDict, kind: str = MessageType.TRAIN) -> Message:
    (reply,) = grid.send_and_receive([grid.create_message(content, kind, FIRST_NODE_ID, "1")])
    return reply


def train(grid: InProcessGrid, arrays=None, **config) -> Message:
    record = ConfigRecord({keys.SERVER_ROUND: 1, **config})
    return task(grid, RecordDict({keys.ARRAYS: arrays or weights(), keys.CONFIG: record}))


def assert_refused(reply: Message, code: DeviceCode) -> None:
    assert reply.has_error(), "the task was done"
    assert (reply.error.code, reply.error.reason) == (code, MESSAGES[code])


def leaked(reply: Message) -> bool:
    return SECRET in repr(reply) or (reply.has_content() and SECRET.encode() in repr(reply.content).encode())


def test_every_path_key_is_ignored_and_the_device_trains_on_its_own_data(device, tmp_path, caplog):
    # Prepare: a run config naming the secret file for every path key, and a run-dir to write
    own, secret = device
    hostile = dict.fromkeys(DEVICE_OWNED_KEYS, str(secret)) | {"run-dir": str(tmp_path / "server-chose-this")}

    # Execute
    reply = train(node(own, run_config={**hostile, "dataset": "csv", "input-dim": 0, "num-classes": 0}))

    # Assert: trained on its own 40 examples (32 after the held-out fifth), nothing of the secret
    assert not reply.has_error(), reply.error
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 32
    assert not leaked(reply)
    assert not (tmp_path / "server-chose-this").exists()
    assert "data-path, run-dir, tokenizer-path" in caplog.text


def test_a_failing_task_replies_a_code_and_never_its_exception_text(tmp_path, caplog):
    # Prepare: the device's data has a label the run's model cannot take
    data = tmp_path / f"{SECRET}.npz"
    np.savez(data, x=np.zeros((10, 5), np.float32), y=np.full(10, 7))

    # Execute
    reply = train(node(data))

    # Assert
    assert reply.has_error() and reply.error.code in {c.value for c in DeviceCode}
    assert reply.error.reason == MESSAGES[DeviceCode(reply.error.code)]
    assert not leaked(reply)
    assert "node" in caplog.text  # the detail is in the device's own log


def test_weights_that_do_not_fit_the_devices_model_are_a_malformed_task(device):
    reply = train(node(device[0]), arrays=weights(hidden="6"))

    assert_refused(reply, DeviceCode.BAD_MESSAGE)


def test_a_model_over_the_policy_size_is_refused_before_it_is_built(device, monkeypatch):
    # Prepare: the hostile `hidden`, 144 M parameters; building it would fail the test
    monkeypatch.setattr(client, "model_from_config", lambda *_: pytest.fail("the model was built"))
    grid = node(device[0], DevicePolicy(), run_config={"hidden": "12000,12000"})

    # Execute / Assert
    assert_refused(train(grid), DeviceCode.POLICY_MODEL_SIZE)
    assert_refused(task(grid, RecordDict({keys.ARRAYS: weights()}), MessageType.EVALUATE), DeviceCode.POLICY_MODEL_SIZE)


@pytest.mark.parametrize(
    ("policy", "run_config", "message_config", "code"),
    [
        (DevicePolicy(require_secure_aggregation=True), {}, {}, DeviceCode.POLICY_SECURE_AGGREGATION),
        (DevicePolicy(max_local_epochs=2), {"local-epochs": 3}, {}, DeviceCode.POLICY_LOCAL_EPOCHS),
        (DevicePolicy(max_local_epochs=2), {}, {keys.LOCAL_EPOCHS: 50}, DeviceCode.POLICY_LOCAL_EPOCHS),
        (DevicePolicy(allowed_models="cnn"), {}, {}, DeviceCode.POLICY_MODEL),
        (DevicePolicy(max_model_parameters=10), {}, {}, DeviceCode.POLICY_MODEL_SIZE),
    ],
    ids=["secure-aggregation", "epochs-in-run-config", "epochs-in-message", "model", "model-size"],
)
def test_each_policy_limit_refuses_with_its_code(device, policy, run_config, message_config, code):
    reply = train(node(device[0], policy, run_config), **message_config)

    assert_refused(reply, code)


def test_the_default_policy_lets_todays_runs_train(device):
    reply = train(node(device[0], DevicePolicy()))

    assert not reply.has_error(), reply.error


def secure_stage(stage: str, **entries) -> RecordDict:
    return RecordDict({p.RECORD: ConfigRecord({p.STAGE: stage, p.ROUND_ID: b"r" * 16, **entries})})


@pytest.mark.parametrize(
    ("entries", "refused"),
    [
        ({p.NEIGHBOURS: [2, 3], p.THRESHOLD: 3}, True),  # a group of 3 (the server alone could fill it)
        ({p.NEIGHBOURS: [2, 3, 4, 5], p.THRESHOLD: 2}, True),  # a group of 5, threshold under a majority of 5
        ({p.NEIGHBOURS: [2, 3, 4, 5], p.THRESHOLD: 3}, False),
    ],
    ids=["small-group", "low-threshold", "allowed"],
)
def test_a_secure_round_below_min_secure_group_is_refused(device, entries, refused):
    # Prepare: the advertise-keys stage with the settings every secure round sends
    settings = {p.DEGREE: 4, p.CLIPPING_RANGE: 8.0, p.QUANTIZATION_RANGE: 1 << 24, p.MODULUS_BITS: 64,
                p.METRIC_CLIPPING_RANGE: 1000.0}  # fmt: skip
    grid = node(device[0], DevicePolicy(min_secure_group=5))

    # Execute
    reply = task(grid, secure_stage(p.ADVERTISE_KEYS, **settings, **entries))

    # Assert
    if refused:
        assert_refused(reply, DeviceCode.POLICY_SECURE_GROUP)
    else:
        assert not reply.has_error(), reply.error


@pytest.mark.parametrize("stage, listed", [(p.SHARE_KEYS, p.PEERS), (p.MASKED_INPUT, p.SOURCES)])
def test_a_secure_group_that_shrinks_below_the_minimum_later_is_refused(device, stage, listed):
    reply = task(node(device[0], DevicePolicy(min_secure_group=5)), secure_stage(stage, **{listed: [2, 3]}))

    assert_refused(reply, DeviceCode.POLICY_SECURE_GROUP)


def test_training_stops_at_max_train_seconds_and_replies_what_it_has(device):
    # Prepare: a limit any step passes; 32 examples in batches of 10
    grid = node(device[0], DevicePolicy(max_train_seconds=1e-9), run_config={"local-epochs": 5})

    # Execute
    reply = train(grid)

    # Assert: one batch trained, and said so by the count FedAvg weights it with
    assert not reply.has_error(), reply.error
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 10


def update_norm(reply: Message, arrays) -> float:
    like = model_from_config(RunConfig.from_mapping(RECIPE), DataSpec(5, 3)).state_dict()
    new, old = to_state_dict(reply.content[keys.ARRAYS], like), to_state_dict(arrays, like)
    return float(torch.sqrt(sum(((new[k] - old[k]) ** 2).sum() for k in new)))


def test_the_local_privacy_floor_clips_the_update_whatever_the_server_asks(device):
    # Prepare: a large learning rate, so the plain update is far beyond the floor's norm
    arrays = weights()
    plain = train(node(device[0], DevicePolicy(), {"lr": 1.0}), arrays)
    clipped = train(node(device[0], DevicePolicy(dp_clipping_norm=0.01), {"lr": 1.0}), arrays)
    noised = train(node(device[0], DevicePolicy(dp_clipping_norm=0.01, dp_noise_multiplier=10.0), {"lr": 1.0}), arrays)

    # Assert
    assert update_norm(plain, arrays) > 0.1
    assert update_norm(clipped, arrays) == pytest.approx(0.01, rel=1e-3)
    # noise of standard deviation 0.1 on each of 39 parameters: a norm of about 0.62 (0.3 is 5 sigma under)
    assert 0.3 < update_norm(noised, arrays) < 1.0


def test_a_shipped_tokenizer_that_is_too_large_or_malformed_is_refused(tmp_path):
    # Prepare: a text device whose run ships a tokenizer file
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": "good film", "label": i % 2}) + "\n" for i in range(10)))
    recipe = {"dataset": "imdb", "model": "transformer-classifier", "tokenizer": "file", "input-dim": 0,
              "num-classes": 0, "d-model": 8, "num-heads": 2, "num-layers": 1, "max-len": 4}  # fmt: skip
    grid = InProcessGrid(make_client_app(), 1, recipe, lambda _: {"data-path": str(reviews), "device": "cpu"})
    import hashlib

    for data in (b"{not json", b" " * (MAX_TOKENIZER_BYTES + 1)):
        config = {keys.TOKENIZER: data, keys.TOKENIZER_SHA256: hashlib.sha256(data).hexdigest()}
        # Execute / Assert
        assert_refused(train(grid, weights(), **config), DeviceCode.BAD_MESSAGE)


def test_a_device_never_loads_a_simulations_federation(tmp_path, monkeypatch):
    # Prepare: a text run asking for fedsim's fitted tokenizer, which reads every client's text
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"text": "good film", "label": i % 2}) + "\n" for i in range(10)))
    monkeypatch.setattr("shared.data.federation.load_federation", lambda *_: pytest.fail("loaded a federation"))
    recipe = {"dataset": "imdb", "model": "transformer-classifier", "tokenizer": "fitted", "input-dim": 0,
              "num-classes": 0, "d-model": 8, "num-heads": 2, "num-layers": 1, "max-len": 4}  # fmt: skip
    grid = InProcessGrid(make_client_app(), 1, recipe, lambda _: {"data-path": str(reviews), "device": "cpu"})

    # Execute / Assert
    assert_refused(train(grid, weights()), DeviceCode.BAD_DATA)
