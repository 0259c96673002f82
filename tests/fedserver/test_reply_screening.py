"""The bad-reply matrix: whatever one client sends, its reply is refused with the reason, the run
completes, and the model stays finite and learns. The ServerApp's rounds on an in-process grid
whose node 1001 runs Flowerbed's ClientApp with its reply spoiled."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

import fedclient.app
from fedserver.app import RoundFailed, run_federation
from fedserver.node_ledger import NodeLedger
from shared import messages as keys
from shared.device_errors import DeviceCode
from shared.secagg import secagg_mod
from simulations.grid import InProcessGrid, simulation_node_config

BAD_NODE = 1001
Spoil = Callable[[RecordDict], RecordDict]


def with_metric(name: str, value: object) -> Spoil:
    def spoil(content: RecordDict) -> RecordDict:
        metrics = dict(content[keys.METRICS])
        metrics[name] = value
        return RecordDict({**content, keys.METRICS: MetricRecord(metrics)})

    return spoil


def without_metric(name: str) -> Spoil:
    def spoil(content: RecordDict) -> RecordDict:
        metrics = {k: v for k, v in content[keys.METRICS].items() if k != name}
        return RecordDict({**content, keys.METRICS: MetricRecord(metrics)})

    return spoil


def second_metric_record(content: RecordDict) -> RecordDict:
    return RecordDict({**content, "more-metrics": MetricRecord({"x": 1.0})})


def without_arrays(content: RecordDict) -> RecordDict:
    return RecordDict({keys.METRICS: content[keys.METRICS]})


def with_arrays(content: RecordDict) -> RecordDict:
    return RecordDict({**content, keys.ARRAYS: ArrayRecord({"float32": Array(np.zeros(3, dtype=np.float32))})})


def map_arrays(change: Callable[[np.ndarray], np.ndarray]) -> Spoil:
    def spoil(content: RecordDict) -> RecordDict:
        arrays = {k: Array(np.ascontiguousarray(change(v.numpy()))) for k, v in content[keys.ARRAYS].items()}
        return RecordDict({**content, keys.ARRAYS: ArrayRecord(arrays)})

    return spoil


NUM_EXAMPLES = [
    ("num-examples 0", with_metric(keys.NUM_EXAMPLES, 0), "num-examples: 0 is not an integer in [1, 1000000]"),
    ("num-examples negative", with_metric(keys.NUM_EXAMPLES, -5), "num-examples: -5 is not an integer in [1, 1000000]"),
    ("num-examples 10^12", with_metric(keys.NUM_EXAMPLES, 10**12), "num-examples: 1000000000000 is not an integer"),
    ("num-examples 10^400", with_metric(keys.NUM_EXAMPLES, 10**400), "num-examples: 1000000000000000000000"),
    ("num-examples a float", with_metric(keys.NUM_EXAMPLES, 12.5), "num-examples: 12.5 is not an integer"),
    ("num-examples a list", with_metric(keys.NUM_EXAMPLES, [1, 2]), "num-examples: [1, 2] is not an integer"),
    ("an extra metric", with_metric("extra", 1.0), "metrics: missing [], unexpected ['extra']"),
]
TRAIN_CASES = [
    *NUM_EXAMPLES,
    ("a missing metric", without_metric(keys.TRAIN_LOSS), "metrics: missing ['train_loss'], unexpected []"),
    ("a NaN metric", with_metric(keys.TRAIN_LOSS, math.nan), "metric 'train_loss': nan is not a finite number"),
    ("an infinite metric", with_metric(keys.TRAIN_LOSS, math.inf), "metric 'train_loss': inf is not a finite number"),
    ("a negative loss", with_metric(keys.TRAIN_LOSS, -0.5), "metric 'train_loss': -0.5 is outside [0, inf]"),
    ("a loss no float holds", with_metric(keys.TRAIN_LOSS, 10**400), "metric 'train_loss': 1000000000000000000000"),
    ("two metric records", second_metric_record, "records: ['arrays', 'metrics', 'more-metrics'], expected exactly"),
    ("no arrays", without_arrays, "records: ['metrics'], expected exactly ['arrays', 'metrics']"),
    ("a wrong dtype", map_arrays(lambda v: v.astype(np.float64)), "float32 weights: dtype float64 != expected float32"),
    ("a huge norm", map_arrays(lambda v: v + 1e6), "exceeds max_norm 100"),
]
EVALUATE_CASES = [
    *NUM_EXAMPLES,
    ("a missing metric", without_metric(keys.ACCURACY), "metrics: missing ['accuracy'], unexpected []"),
    ("a NaN metric", with_metric(keys.ACCURACY, math.nan), "metric 'accuracy': nan is not a finite number"),
    ("an infinite metric", with_metric(keys.EVAL_LOSS, -math.inf), "metric 'eval_loss': -inf is not a finite number"),
    ("an infinite loss", with_metric(keys.EVAL_LOSS, math.inf), "metric 'eval_loss': inf is not a finite number"),
    ("a negative loss", with_metric(keys.EVAL_LOSS, -1e300), "metric 'eval_loss': -1e+300 is outside [0, inf]"),
    ("a loss no float holds", with_metric(keys.EVAL_LOSS, 10**400), "metric 'eval_loss': 1000000000000000000000"),
    ("accuracy 1.5", with_metric(keys.ACCURACY, 1.5), "metric 'accuracy': 1.5 is outside [0, 1]"),
    ("accuracy 1e9", with_metric(keys.ACCURACY, 1e9), "metric 'accuracy': 1000000000.0 is outside [0, 1]"),
    ("accuracy -0.1", with_metric(keys.ACCURACY, -0.1), "metric 'accuracy': -0.1 is outside [0, 1]"),
    ("accuracy an int", with_metric(keys.ACCURACY, 2), "metric 'accuracy': 2 is outside [0, 1]"),
    ("two metric records", second_metric_record, "records: ['metrics', 'more-metrics'], expected exactly ['metrics']"),
    ("arrays", with_arrays, "records: ['arrays', 'metrics'], expected exactly ['metrics']"),
]


def spoiling_app(train: Spoil | None = None, evaluate: Spoil | None = None) -> ClientApp:
    """Flowerbed's ClientApp, except that node BAD_NODE spoils its training or evaluation reply."""
    app = ClientApp()

    def spoiled(handler: Callable[[Message, Context], Message], spoil: Spoil | None) -> Callable:
        def handle(msg: Message, context: Context) -> Message:
            reply = handler(msg, context)
            if spoil is None or context.node_id != BAD_NODE:
                return reply
            return Message(spoil(reply.content), reply_to=msg)

        return handle

    app.train()(spoiled(fedclient.app.train, train))
    app.evaluate()(spoiled(fedclient.app.evaluate, evaluate))
    return app


def run(app: ClientApp, cfg) -> list[dict]:
    grid = InProcessGrid(app, cfg.num_clients, cfg.to_mapping(), simulation_node_config(cfg.num_clients))
    result = run_federation(grid, cfg)
    weights = result.arrays
    assert weights is not None and all(np.isfinite(a.numpy()).all() for a in weights.values())
    return result.history


@pytest.fixture
def matrix_config(tiny_config):
    # Every client sampled each round, so node 1001 is in every round and every evaluation.
    return tiny_config(rounds=3, clients_per_round=6, max_update_norm=100.0)


def assert_learned(history: list[dict], rounds: int) -> None:
    assert [row["round"] for row in history] == list(range(1, rounds + 1))
    assert history[-1]["accuracy"] > history[0]["accuracy"]


CASES = [("train", *case) for case in TRAIN_CASES] + [("evaluate", *case) for case in EVALUATE_CASES]
REFUSED = {"train": "update refused", "evaluate": "evaluation refused"}  # how the log names each


@pytest.mark.parametrize(
    ("handler", "spoil", "reason"),
    [(handler, spoil, reason) for handler, _, spoil, reason in CASES],
    ids=[f"{handler}: {name}" for handler, name, *_ in CASES],
)
def test_a_bad_reply_is_refused_with_its_reason(handler, spoil, reason, matrix_config, caplog):
    history = run(spoiling_app(**{handler: spoil}), matrix_config)

    refused = f"node {BAD_NODE}: {REFUSED[handler]}: "
    refusals = [r.getMessage() for r in caplog.records if refused in r.getMessage()]
    assert len(refusals) == matrix_config.rounds and all(reason in line for line in refusals), refusals
    assert_learned(history, matrix_config.rounds)


def test_an_honest_federation_refuses_nothing(matrix_config, caplog):
    history = run(spoiling_app(), matrix_config)

    assert "refused" not in caplog.text
    assert_learned(history, matrix_config.rounds)


def failing_once(monkeypatch, aggregate: Callable) -> list[int]:
    """FedAvg.aggregate_train's first call made by `aggregate(real_method, self, round, replies)`;
    the rounds of all calls are returned, as they come."""
    real, calls = FedAvg.aggregate_train, []

    def patched(self, server_round, replies):
        calls.append(server_round)
        if len(calls) == 1:
            return aggregate(real, self, server_round, replies)
        return real(self, server_round, replies)

    monkeypatch.setattr(FedAvg, "aggregate_train", patched)
    return calls


def test_what_the_strategy_raises_fails_the_attempt_and_the_round_is_retried(monkeypatch, matrix_config, caplog):
    def raising(real, self, server_round, replies):
        raise InconsistentMessageReplies(reason="All MetricRecords must have the same keys")

    calls = failing_once(monkeypatch, raising)
    history = run(spoiling_app(), matrix_config)

    assert calls[:2] == [1, 1]  # round 1 attempted twice
    assert "round 1: the strategy could not aggregate: InconsistentMessageReplies" in caplog.text
    assert_learned(history, matrix_config.rounds)


@pytest.mark.parametrize(
    ("change", "reason"),
    [(lambda v: np.full_like(v, np.nan), "non-finite values"), (lambda v: v + 1e3, "exceeds max_norm 100")],
    ids=["non-finite", "too far"],
)
def test_an_aggregate_is_checked_before_it_is_committed(monkeypatch, matrix_config, caplog, change, reason):
    def spoiled(real, self, server_round, replies):
        arrays, metrics = real(self, server_round, replies)
        return ArrayRecord({k: Array(np.ascontiguousarray(change(v.numpy()))) for k, v in arrays.items()}), metrics

    calls = failing_once(monkeypatch, spoiled)
    history = run(spoiling_app(), matrix_config)

    assert calls[:2] == [1, 1]
    assert any("round 1: aggregate refused: " in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert_learned(history, matrix_config.rounds)


def test_refusals_below_the_quorum_stop_the_run_clearly_after_the_retries(matrix_config):
    app = spoiling_app(train=with_metric(keys.NUM_EXAMPLES, 0))
    cfg = matrix_config.replace(min_replies=6.0)  # node 1001's refusal leaves 5 of 6
    failure = r"round 1: fewer than 6 valid replies after 3 attempts; nothing was aggregated$"

    with pytest.raises(RoundFailed, match=failure):
        run(app, cfg)


SECRET = "/home/owner/.ssh/id_ed25519"  # what a device's error text must never carry into the server's log


def erring_app(error: Error) -> ClientApp:
    """Flowerbed's ClientApp, except that node BAD_NODE answers every task with `error`."""
    app = ClientApp()

    def erring(handler: Callable[[Message, Context], Message]) -> Callable:
        def handle(msg: Message, context: Context) -> Message:
            return Message(error, reply_to=msg) if context.node_id == BAD_NODE else handler(msg, context)

        return handle

    app.train()(erring(fedclient.app.train))
    app.evaluate()(erring(fedclient.app.evaluate))
    return app


DEVICE_ERRORS = [
    (DeviceCode.POLICY_SECURE_AGGREGATION, "refused the task: code 110 (refused by the device's policy: secure aggregation is required)"),
    (DeviceCode.BAD_DATA, "failed the task: code 101 (the device's data cannot serve this run)"),
    (DeviceCode.FOREIGN_CODE, "refused the task: code 104 (the run names a ClientApp other than the one installed on the device)"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "logged"), DEVICE_ERRORS, ids=[code.name for code, _ in DEVICE_ERRORS])
def test_a_device_error_is_logged_with_its_node_and_code_never_its_text(code, logged, matrix_config, caplog, tmp_path):
    cfg = matrix_config.replace(run_dir=str(tmp_path))
    history = run(erring_app(Error(code, f"open {SECRET}: permission denied")), cfg)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"node {BAD_NODE}: ")]
    assert lines == [f"node {BAD_NODE}: {logged}"] * (2 * cfg.rounds)  # its training and its evaluation
    assert SECRET not in caplog.text
    device = NodeLedger.read(tmp_path).nodes[BAD_NODE]
    refused = 0 if code == DeviceCode.BAD_DATA else cfg.rounds
    assert (device.last_code, device.last_round, device.accepted) == (code, cfg.rounds, 0)
    assert (device.rounds_refused, device.rounds_failed) == (refused, cfg.rounds - refused)
    assert_learned(history, cfg.rounds)


def test_flowers_own_error_is_logged_with_its_reason_shortened(matrix_config, caplog):
    run(erring_app(Error(2, "ValueError: " + "x" * 1000)), matrix_config)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"node {BAD_NODE}: ")]
    assert lines and all(line.startswith(f"node {BAD_NODE}: failed the task: code 2 (Flower: ValueError: xxx") for line in lines)
    assert all(len(line) < 300 for line in lines), lines


def test_a_round_failed_by_refusals_names_the_code_and_keeps_the_ledger(matrix_config, tmp_path):
    app = erring_app(Error(DeviceCode.POLICY_MODEL, f"model {SECRET}"))
    cfg = matrix_config.replace(min_replies=6.0, run_dir=str(tmp_path))  # node 1001's refusal leaves 5 of 6
    failure = (
        rf"round 1: fewer than 6 valid replies after 3 attempts \(node {BAD_NODE}: refused the task: code 113 "
        r"\(refused by the device's policy: model not allowed\)\); nothing was aggregated$"
    )

    with pytest.raises(RoundFailed, match=failure):
        run(app, cfg)

    device = NodeLedger.read(tmp_path).nodes[BAD_NODE]
    assert (device.rounds_refused, device.last_code, device.last_round) == (1, DeviceCode.POLICY_MODEL, 1)
    assert NodeLedger.read(tmp_path).nodes[BAD_NODE + 1].accepted == 3  # each of the three attempts


def test_a_resumed_run_continues_the_ledger(matrix_config, tmp_path):
    app = erring_app(Error(DeviceCode.BAD_DATA, "whatever"))
    run(app, matrix_config.replace(rounds=2, run_dir=str(tmp_path)))
    first = NodeLedger.read(tmp_path)

    run(app, matrix_config.replace(rounds=3, run_dir=str(tmp_path)))

    again = NodeLedger.read(tmp_path)
    assert (first.nodes[BAD_NODE].rounds_failed, again.nodes[BAD_NODE].rounds_failed) == (2, 3)
    assert (first.nodes[BAD_NODE + 1].accepted, again.nodes[BAD_NODE + 1].accepted) == (4, 6)  # train + evaluation


def test_a_device_refusing_a_secure_round_is_in_the_ledger(matrix_config, tmp_path):
    # Prepare: Flowerbed's ClientApp on every node, node BAD_NODE refusing each secure stage by its policy
    def refusing_mod(msg: Message, context: Context, call_next: Callable) -> Message:
        if context.node_id == BAD_NODE and msg.metadata.message_type == "train":
            return Message(Error(DeviceCode.POLICY_SECURE_GROUP, f"{SECRET} text"), reply_to=msg)
        return call_next(msg, context)

    app = ClientApp(mods=[refusing_mod, secagg_mod])
    app.train()(fedclient.app.train)
    app.evaluate()(fedclient.app.evaluate)
    cfg = matrix_config.replace(run_dir=str(tmp_path), secure_aggregation=True, secagg_threshold=3,
                                secagg_neighbours=4, max_update_norm=0.0)  # fmt: skip

    # Execute
    history = run(app, cfg)

    # Assert: the rounds went on with the five others; the refusals are counted, the others accepted
    device = NodeLedger.read(tmp_path).nodes[BAD_NODE]
    assert (device.last_code, device.rounds_refused) == (DeviceCode.POLICY_SECURE_GROUP, cfg.rounds)
    assert device.accepted == cfg.rounds  # its evaluations only
    assert NodeLedger.read(tmp_path).nodes[BAD_NODE + 1].accepted == 2 * cfg.rounds  # in each secure sum, and evaluated
    assert len(history) == cfg.rounds


def test_a_reply_cannot_forge_or_flood_log_lines(matrix_config, caplog):
    # Prepare: node BAD_NODE's metrics carry a name with a newline and a forged line, and 5,000 more names
    forged = "x\n2026-01-01 WARNING flowerbed.server: node 1002: everything is fine"

    def flood(content: RecordDict) -> RecordDict:
        names = {forged: 1.0, **{f"m{i}": 1.0 for i in range(5000)}}
        return RecordDict({**content, keys.METRICS: MetricRecord({**content[keys.METRICS], **names})})

    # Execute
    run(spoiling_app(train=flood), matrix_config)

    # Assert: every line the node's refusals wrote is one line, and bounded
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"node {BAD_NODE}: update refused")]
    assert lines and all("\n" not in line and len(line) < 600 for line in lines)
