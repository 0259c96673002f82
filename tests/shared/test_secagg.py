"""SecAgg+ over the in-process Grid: exact FedAvg, uniform-looking uploads, dropouts, tampering.

The toy ClientApp's updates are known functions of the partition id, so every expected sum is
computed here in plain float64.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from shared.secagg import (
    COMPATIBLE_STRATEGIES,
    SecAggError,
    SecAggIntegrityError,
    SecAggSettings,
    SecureAggregate,
    as_mean_reply,
    secagg_mod,
    secure_train_round,
)
from shared.flower_compat.messages import ErrorCode
from shared.pki import PkiPaths, init_pki
from shared.flower_compat.secagg import share_keys_plaintext_concat
from shared.secagg import crypto
from shared.secagg import protocol as p
from shared.secagg.client import STATE, NodeState
from shared.secagg.encoding import encode, layout_of
from shared.secagg.enrollment import load_enrollment, signed_keys
from shared.secagg.settings import CERTIFICATE, ENROLLMENT_CA, SIGNING_KEY
from simulations.grid import FIRST_NODE_ID, InProcessGrid, simulation_node_config

SETTINGS = SecAggSettings(threshold=4, neighbours=6, clipping_range=1.0, quantization_range=1 << 20)
CLIENTS = 10


# ----------------------------------------------------------------------------- the toy federation


def reference_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {
        "w": rng.standard_normal((100, 50)).astype(np.float32),
        "b": rng.standard_normal(50).astype(np.float32),
        "steps": np.array(3, dtype=np.int64),
    }


def examples(pid: int) -> int:
    return 10 * (pid + 1)


def client_update(reference: dict[str, np.ndarray], pid: int) -> dict[str, np.ndarray]:
    """Partition `pid`'s new weights: the reference plus a fixed delta within [-0.9, 0.9]."""
    rng = np.random.default_rng(pid)
    out = {}
    for name, value in reference.items():
        if np.issubdtype(value.dtype, np.floating):
            out[name] = (value + rng.uniform(-0.9, 0.9, value.shape)).astype(value.dtype)
        else:
            out[name] = np.asarray(value + pid)
    return out


def toy_app(secure: bool = True, crash: dict[int, str] | None = None, outer: list[Callable] | None = None) -> ClientApp:
    """Trains to `client_update`; with `crash`, node -> the stage at which it raises; `outer`: mods
    around all others (a client misbehaving)."""
    mods = (outer or []) + ([crash_mod(crash)] if crash else []) + ([secagg_mod] if secure else [])
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        arrays = ArrayRecord({k: Array(v) for k, v in client_update(received, pid).items()})
        metrics = MetricRecord({"num-examples": examples(pid), "train_loss": pid / 10})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def crash_mod(crash: dict[int, str]) -> Callable:
    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        record = msg.content.get(p.RECORD) if msg.has_content() else None
        if record is not None and crash.get(msg.metadata.dst_node_id) == record[p.STAGE]:
            raise RuntimeError(f"node crashed at {record[p.STAGE]}")
        return call_next(msg, context)

    return mod


class FaultyGrid(InProcessGrid):
    """An InProcessGrid that records each stage's traffic, loses chosen replies, and lets a test
    rewrite the messages of a stage on their way out (a man in the middle, or the server)."""

    def __init__(
        self, app: ClientApp, n: int = CLIENTS, run_config: dict | None = None, node_config: Callable | None = None
    ) -> None:
        super().__init__(app, n, run_config or {}, node_config or simulation_node_config(n))
        self.lose: dict[str, set[int]] = {}
        self.rewrite: dict[str, Callable[[list[Message]], None]] = {}
        self.log: list[tuple[str, list[Message], list[Message]]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = stage_of(messages[0]) if messages else ""
        if stage in self.rewrite:
            self.rewrite[stage](messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        self.log.append((stage, messages, replies))
        return [r for r in replies if r.metadata.src_node_id not in self.lose.get(stage, set())]

    def traffic(self, stage: str) -> tuple[list[Message], list[Message]]:
        """The last round's messages and replies of `stage`."""
        sent, received = next((s, r) for st, s, r in reversed(self.log) if st == stage)
        return sent, received


def stage_of(message: Message) -> str:
    record = message.content.get(p.RECORD) if message.has_content() else None
    return str(record[p.STAGE]) if isinstance(record, ConfigRecord) else ""


def train_messages(grid: InProcessGrid, reference: dict[str, np.ndarray] | None = None) -> list[Message]:
    reference = reference_arrays() if reference is None else reference
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in reference.items()}), "config": ConfigRecord({"server-round": 1})}
    )
    return [Message(content, node, "train", group_id="1") for node in grid.get_node_ids()]


def plaintext_sum(pids, reference=None) -> tuple[dict[str, np.ndarray], int]:
    """sum_i n_i x_i in float64, and sum_i n_i, over partitions `pids`."""
    reference = reference_arrays() if reference is None else reference
    total = {k: np.zeros(v.shape) for k, v in reference.items()}
    for pid in pids:
        for k, v in client_update(reference, pid).items():
            total[k] += examples(pid) * v.astype(np.float64)
    return total, sum(examples(pid) for pid in pids)


def pids(nodes) -> list[int]:
    return [node - FIRST_NODE_ID for node in nodes]


def assert_sum_within_bound(aggregate: SecureAggregate, settings: SecAggSettings = SETTINGS) -> None:
    """The weighted sum over the clients the round says it summed, within W * step / 2."""
    expected, count = plaintext_sum(pids(aggregate.survivors.masked))
    assert aggregate.num_examples == count
    for name in ("w", "b"):
        got = aggregate.weighted_sum[name].astype(np.float64)
        slack = 4 * np.finfo(np.float32).eps * np.abs(expected[name])  # the float32 result itself
        assert np.all(np.abs(got - expected[name]) <= count * settings.error_bound() + slack), name


def secure_round(grid: InProcessGrid, settings: SecAggSettings = SETTINGS) -> SecureAggregate:
    return secure_train_round(grid, train_messages(grid), settings, timeout=60)


# ----------------------------------------------------------------------------- (1) exact FedAvg


def test_secure_mean_is_plaintext_fedavg_within_the_quantization_bound():
    """Per element |secure - plaintext FedAvg| <= step/2 = c/(Q-1) (+ float32 rounding of the results)."""
    plain_grid = FaultyGrid(toy_app(secure=False))
    plain, plain_metrics = FedAvg().aggregate_train(1, plain_grid.send_and_receive(train_messages(plain_grid)))

    grid = FaultyGrid(toy_app())
    messages = train_messages(grid)
    aggregate = secure_train_round(grid, messages, SETTINGS)
    secure, secure_metrics = FedAvg().aggregate_train(1, [as_mean_reply(aggregate, messages[0])])

    assert aggregate.survivors.masked == tuple(grid.get_node_ids())
    for name in ("w", "b"):
        a, b = secure[name].numpy(), plain[name].numpy()
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        slack = 4 * np.finfo(np.float32).eps * np.abs(b)
        assert np.all(np.abs(a.astype(np.float64) - b) <= SETTINGS.error_bound() + slack)
    assert aggregate.mean["steps"].dtype == np.int64
    assert secure_metrics["train_loss"] == pytest.approx(plain_metrics["train_loss"], abs=SETTINGS.metric_step)
    assert_sum_within_bound(aggregate)


@pytest.mark.parametrize("modulus_bits, levels", [(64, 1 << 24), (40, 1 << 20), (32, 1 << 16)])
def test_any_modulus_gives_the_sum_within_the_bound(modulus_bits, levels):
    settings = SecAggSettings(threshold=4, neighbours=6, clipping_range=1.0, quantization_range=levels, modulus_bits=modulus_bits)
    grid = FaultyGrid(toy_app())
    aggregate = secure_round(grid, settings)
    y = grid.traffic(p.MASKED_INPUT)[1][0].content[p.MASKED][p.VECTOR].numpy()
    assert y.dtype == settings.dtype and int(y.max()) < 2**modulus_bits
    assert_sum_within_bound(aggregate, settings)


STRATEGY_CLASSES = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam,
    "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "fedavgm": FedAvgM,
}  # fmt: skip


@pytest.mark.parametrize("name", COMPATIBLE_STRATEGIES)
def test_compatible_strategies_aggregate_the_mean_reply_as_the_replies_themselves(name):
    """One reply with the weighted mean and num-examples = W gives bit-identical arrays."""
    grid = FaultyGrid(toy_app(secure=False))
    arrays = ArrayRecord({k: Array(v) for k, v in reference_arrays().items()})
    results = []
    for single in (False, True):
        strategy = STRATEGY_CLASSES[name]()
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        replies = sorted(grid.send_and_receive(messages), key=lambda r: r.metadata.src_node_id)
        if single:
            mean, metrics = FedAvg().aggregate_train(1, replies)
            aggregate = SecureAggregate(
                {}, {k: v.numpy() for k, v in mean.items()}, sum(examples(i) for i in range(CLIENTS)),
                {"train_loss": float(metrics["train_loss"])}, survivors=None,
            )  # fmt: skip
            replies = [as_mean_reply(aggregate, messages[0])]
        results.append(strategy.aggregate_train(1, replies)[0])
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key].numpy(), results[1][key].numpy())


# ----------------------------------------------------------------------------- (2) what the server sees


def _chi_square_top_byte(values: np.ndarray) -> float:
    counts = np.bincount((values >> np.uint64(56)).astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _ks_uniform(values: np.ndarray) -> float:
    u = np.sort(values.astype(np.float64) / 2.0**64)
    n = u.size
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


CHI2_LIMIT = 255 + 7 * np.sqrt(2 * 255)  # 255 degrees of freedom, ~7 standard deviations


def test_masked_uploads_look_uniform_modulo_2_to_the_m_and_unlike_the_update():
    grid = FaultyGrid(toy_app())
    secure_round(grid)
    _, replies = grid.traffic(p.MASKED_INPUT)
    reference = reference_arrays()
    layout = layout_of(reference).with_metrics(("train_loss",))
    uploads = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        y = reply.content[p.MASKED][p.VECTOR].numpy()
        pid = node - FIRST_NODE_ID
        v = encode(client_update(reference, pid), reference, examples(pid), {"train_loss": pid / 10}, layout, SETTINGS)
        ks_limit = np.sqrt(-np.log(1e-6 / 2) / (2 * y.size))  # KS critical value at alpha = 1e-6

        assert y.dtype == np.uint64 and y.size == layout.length
        assert _chi_square_top_byte(y) < CHI2_LIMIT
        assert _ks_uniform(y) < ks_limit
        assert _chi_square_top_byte(v) > 100 * CHI2_LIMIT and _ks_uniform(v) > 0.99  # the tests see plaintext
        assert np.mean(y == v) < 0.001
        delta = client_update(reference, pid)["w"].astype(np.float64) - reference["w"]
        as_if_plain = y[: delta.size].astype(np.float64) * SETTINGS.step / examples(pid) - SETTINGS.clipping_range
        assert np.median(np.abs(as_if_plain - delta.ravel())) > 1e6 * SETTINGS.clipping_range  # read as an update: noise
        assert abs(np.corrcoef(y.astype(np.float64), v.astype(np.float64))[0, 1]) < 6 / np.sqrt(y.size)
        uploads[node] = y
    ys = list(uploads.values())
    assert abs(np.corrcoef(ys[0].astype(np.float64), ys[1].astype(np.float64))[0, 1]) < 6 / np.sqrt(ys[0].size)


def test_the_same_update_is_masked_afresh_every_round():
    grid = FaultyGrid(toy_app())
    secure_round(grid)
    first = {r.metadata.src_node_id: r.content[p.MASKED][p.VECTOR].numpy() for r in grid.traffic(p.MASKED_INPUT)[1]}
    secure_round(grid)
    second = {r.metadata.src_node_id: r.content[p.MASKED][p.VECTOR].numpy() for r in grid.traffic(p.MASKED_INPUT)[1]}
    for node, y in first.items():
        assert np.mean(y == second[node]) < 0.001


def test_the_server_never_asks_for_both_secrets_of_one_client():
    grid = FaultyGrid(toy_app())
    grid.lose[p.SHARE_KEYS] = {1003}
    grid.lose[p.MASKED_INPUT] = {1004, 1007}
    secure_round(grid)
    requests, _ = grid.traffic(p.UNMASK)
    alive = {n for m in requests for n in m.content[p.RECORD][p.ALIVE]}
    dropped = {n for m in requests for n in m.content[p.RECORD][p.DROPPED]}
    assert dropped == {1004, 1007} and not alive & dropped


# ----------------------------------------------------------------------------- (3) dropouts


@pytest.mark.parametrize("how", ["crash", "lost"])
@pytest.mark.parametrize("stage", p.STAGES)
def test_dropouts_at_any_stage_with_threshold_survivors_give_the_right_sum(stage, how):
    dropped = {1002, 1005, 1009}
    grid = FaultyGrid(toy_app(crash=dict.fromkeys(dropped, stage) if how == "crash" else None))
    if how == "lost":  # the client did the stage's work, its reply never arrived
        grid.lose[stage] = dropped
    aggregate = secure_round(grid)
    survivors = aggregate.survivors
    after = {p.ADVERTISE_KEYS: survivors.advertised, p.SHARE_KEYS: survivors.shared,
             p.MASKED_INPUT: survivors.masked, p.UNMASK: survivors.unmasked}  # fmt: skip
    assert not set(after[stage]) & dropped and len(after[stage]) == CLIENTS - len(dropped)
    expected_in_sum = CLIENTS if stage == p.UNMASK else CLIENTS - len(dropped)
    assert len(survivors.masked) == expected_in_sum  # a vector that arrived is summed even if its sender then drops
    assert_sum_within_bound(aggregate)


def test_the_caller_is_told_of_each_error_reply_with_its_node_and_code():
    grid = FaultyGrid(toy_app(crash={1001: p.ADVERTISE_KEYS, 1003: p.MASKED_INPUT}))
    errors: list[tuple[int, int]] = []

    secure_train_round(grid, train_messages(grid), SETTINGS, on_error=lambda node, code: errors.append((node, code)))

    assert sorted(errors) == [(1001, ErrorCode.CLIENT_APP_RAISED_EXCEPTION), (1003, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)]


def test_dropouts_at_every_stage_at_once():
    settings = SecAggSettings(threshold=6, neighbours=10, clipping_range=1.0, quantization_range=1 << 20)
    grid = FaultyGrid(toy_app(crash={1001: p.ADVERTISE_KEYS, 1003: p.SHARE_KEYS}))
    grid.lose = {p.MASKED_INPUT: {1006}, p.UNMASK: {1010}}
    aggregate = secure_round(grid, settings)
    assert set(aggregate.survivors.masked) == set(grid.get_node_ids()) - {1001, 1003, 1006}
    assert len(aggregate.survivors.unmasked) == 6
    assert_sum_within_bound(aggregate, settings)


@pytest.mark.parametrize("stage", p.STAGES)
def test_fewer_than_threshold_survivors_stop_the_round_with_nothing_aggregated(stage):
    settings = SecAggSettings(threshold=4, neighbours=6, clipping_range=1.0)
    grid = FaultyGrid(toy_app(), n=6)
    grid.lose[stage] = {1001, 1002, 1003}
    with pytest.raises(SecAggError, match=f"stopped at {stage}: 3 clients left, threshold 4; nothing was aggregated"):
        secure_round(grid, settings)


def test_a_neighbourhood_with_too_few_share_holders_stops_the_round(monkeypatch):
    """Enough clients overall, but a dropped client's masking key has two surviving holders of three needed."""

    def ring(nodes, degree):  # sorted order: 1001's neighbours are 1009, 1010, 1002, 1003
        order = sorted(nodes)
        return {n: frozenset(order[(i + d) % len(order)] for d in (-2, -1, 1, 2)) for i, n in enumerate(order)}

    monkeypatch.setattr(p, "neighbour_graph", ring)
    grid = FaultyGrid(toy_app())
    grid.lose = {p.MASKED_INPUT: {1001}, p.UNMASK: {1009, 1003}}  # every self-mask seed keeps 3 holders
    with pytest.raises(SecAggError, match="masking key of dropped node 1001: 2 shares, 3 needed"):
        secure_round(grid, SecAggSettings(threshold=3, neighbours=4, clipping_range=1.0))


def test_too_small_a_round_is_refused_before_any_message():
    grid = FaultyGrid(toy_app(), n=3)
    with pytest.raises(SecAggError, match="stopped at sampled: 3 clients left, threshold 4"):
        secure_round(grid)
    assert grid.log == []


# ----------------------------------------------------------------------------- (4) tampering and replay


def assert_dropped_alone(aggregate: SecureAggregate, reason: str) -> int:
    """The one client whose failure says `reason` dropped out, alone; the round summed the others
    (a client's error never stops the round: it could be a lie). That client."""
    refused = [node for node, why in aggregate.failures.items() if reason in why]
    assert len(refused) == 1 and refused[0] not in aggregate.survivors.unmasked, aggregate.failures
    assert len(aggregate.failures) == 1, aggregate.failures
    assert_sum_within_bound(aggregate)
    return refused[0]


def assert_share_refused(grid: FaultyGrid, aggregate: SecureAggregate, receiver: int, dealer: int) -> None:
    """`receiver` refused `dealer`'s share and stayed; `dealer`, in dispute, is left out of the sum."""
    (reply,) = [r for r in grid.traffic(p.MASKED_INPUT)[1] if r.metadata.src_node_id == receiver]
    assert list(reply.content[p.RECORD][p.REFUSED]) == [dealer]
    assert receiver in aggregate.survivors.unmasked
    assert assert_dropped_alone(aggregate, f"its shares refused by [{receiver}]") == dealer


def _first_share_message(messages: list[Message]) -> ConfigRecord:
    return next(m.content[p.RECORD] for m in messages if m.content[p.RECORD][p.SOURCES])


def _first_share(messages: list[Message]) -> tuple[int, int]:
    """(receiver, dealer) of the first share relayed at masked-input."""
    message = next(m for m in messages if m.content[p.RECORD][p.SOURCES])
    return message.metadata.dst_node_id, message.content[p.RECORD][p.SOURCES][0]


def test_a_tampered_share_is_refused():
    def flip_a_bit(messages):
        record = _first_share_message(messages)
        blobs = list(record[p.CIPHERTEXTS])
        blobs[0] = blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])
        record[p.CIPHERTEXTS] = blobs

    grid = FaultyGrid(toy_app())
    grid.rewrite[p.MASKED_INPUT] = flip_a_bit
    aggregate = secure_round(grid)
    assert_share_refused(grid, aggregate, *_first_share(grid.traffic(p.MASKED_INPUT)[0]))


def test_a_share_unlike_its_commitment_is_refused_by_its_receiver():
    """A dealer that commits to one share and seals another: its receiver refuses it, rather than
    reveal it at unmask and be blamed for it."""
    grid = FaultyGrid(toy_app())

    def recommit(messages):
        record = _first_share_message(messages)
        record[p.SEED_COMMITMENTS] = [bytes(32), *list(record[p.SEED_COMMITMENTS])[1:]]

    grid.rewrite[p.MASKED_INPUT] = recommit
    aggregate = secure_round(grid)
    assert_share_refused(grid, aggregate, *_first_share(grid.traffic(p.MASKED_INPUT)[0]))


def test_a_share_reflected_to_its_sender_is_refused():
    """The pair's key is symmetric, so only the (src, dst) binding stops v's own share coming back as u's."""
    grid = FaultyGrid(toy_app())

    def reflect(messages):
        _, share_replies = grid.traffic(p.SHARE_KEYS)
        message = next(m for m in messages if m.content[p.RECORD][p.SOURCES])
        record, node = message.content[p.RECORD], message.metadata.dst_node_id
        source = record[p.SOURCES][0]
        own = next(r.content[p.RECORD] for r in share_replies if r.metadata.src_node_id == node)
        blobs = list(record[p.CIPHERTEXTS])
        blobs[0] = own[p.CIPHERTEXTS][list(own[p.DESTINATIONS]).index(source)]  # node -> source, sent back
        record[p.CIPHERTEXTS] = blobs

    grid.rewrite[p.MASKED_INPUT] = reflect
    aggregate = secure_round(grid)
    assert_share_refused(grid, aggregate, *_first_share(grid.traffic(p.MASKED_INPUT)[0]))


def test_shares_replayed_from_an_earlier_round_are_refused():
    """Every share the receiver gets is refused: it, in dispute with all its peers, is the one left out."""
    settings = SecAggSettings(threshold=4, neighbours=6, clipping_range=1.0)  # complete graph: same sources
    grid = FaultyGrid(toy_app(), n=6)
    secure_round(grid, settings)
    old = {m.metadata.dst_node_id: m.content[p.RECORD] for m in grid.traffic(p.MASKED_INPUT)[0]}

    def replay(messages):
        record = messages[0].content[p.RECORD]
        previous = old[messages[0].metadata.dst_node_id]
        record[p.SOURCES], record[p.CIPHERTEXTS] = list(previous[p.SOURCES]), list(previous[p.CIPHERTEXTS])

    grid.rewrite[p.MASKED_INPUT] = replay
    receiver = assert_dropped_alone(secure_round(grid, settings), "refused the shares of [")
    assert receiver == grid.traffic(p.MASKED_INPUT)[0][0].metadata.dst_node_id


def test_a_duplicated_share_is_detected():
    def duplicate(messages):
        record = _first_share_message(messages)
        record[p.SOURCES] = [*record[p.SOURCES], record[p.SOURCES][0]]
        record[p.CIPHERTEXTS] = [*record[p.CIPHERTEXTS], record[p.CIPHERTEXTS][0]]

    grid = FaultyGrid(toy_app())
    grid.rewrite[p.MASKED_INPUT] = duplicate
    assert_dropped_alone(secure_round(grid), "arrived twice")


def test_a_stage_message_of_an_earlier_round_is_refused():
    grid = FaultyGrid(toy_app())
    secure_round(grid)
    old = {m.metadata.dst_node_id: m.content for m in grid.traffic(p.SHARE_KEYS)[0]}

    def replay(messages):
        messages[0].content = old[messages[0].metadata.dst_node_id]

    grid.rewrite[p.SHARE_KEYS] = replay
    assert_dropped_alone(secure_round(grid), "another round")


def test_a_client_refuses_to_reveal_both_secrets_of_a_node():
    def list_alive_as_dropped(messages):
        record = messages[0].content[p.RECORD]
        record[p.DROPPED] = [*record[p.DROPPED], record[p.ALIVE][-1]]

    grid = FaultyGrid(toy_app())
    grid.rewrite[p.UNMASK] = list_alive_as_dropped
    assert_dropped_alone(secure_round(grid), "both alive and dropped")


def test_a_client_answers_one_unmask_request_per_round():
    grid = FaultyGrid(toy_app())
    secure_round(grid)
    request = grid.traffic(p.UNMASK)[0][0]
    again = Message(request.content, request.metadata.dst_node_id, "train", group_id="1")
    (reply,) = grid.send_and_receive([again])
    assert reply.has_error() and "no secure round in progress" in reply.error.reason


def spoil_vector(node: int) -> Callable:
    """A mod outside SecAgg's by which `node` adds 2^40 to the first elements of its masked vector
    (its count untouched): past any n * q(update) an honest client could send."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        arrays = reply.content.get(p.MASKED) if reply.has_content() else None
        if msg.metadata.dst_node_id == node and isinstance(arrays, ArrayRecord):
            vector = arrays[p.VECTOR].numpy().copy()
            vector[:10] += vector.dtype.type(1 << 40)
            arrays[p.VECTOR] = Array(vector)
        return reply

    return mod


def claim_integrity_failure(node: int, stage: str) -> Callable:
    """A mod by which `node` answers `stage` with an error naming SecAggIntegrityError (a lie)."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        if msg.metadata.dst_node_id == node and stage_of(msg) == stage:
            raise SecAggIntegrityError("a share failed authentication (says this client)")
        return call_next(msg, context)

    return mod


def test_a_malformed_masked_vector_is_caught_by_the_clipping_range():
    grid = FaultyGrid(toy_app(outer=[spoil_vector(1004)]))
    with pytest.raises(SecAggIntegrityError, match="outside the clipping range ±1: a malformed masked vector"):
        secure_round(grid)


@pytest.mark.parametrize("stage", p.STAGES)
def test_a_client_claiming_an_integrity_failure_only_drops_out(stage):
    aggregate = secure_round(FaultyGrid(toy_app(outer=[claim_integrity_failure(1004, stage)])))
    assert "SecAggIntegrityError" in aggregate.failures[1004] and 1004 not in aggregate.survivors.unmasked
    assert_sum_within_bound(aggregate)


# ----------------------------------------------------------------------------- (4b) malicious clients

CHEAT = 1004


def tamper(stage: str, change: Callable[[RecordDict], None]) -> Callable:
    """A mod by which CHEAT changes its reply's content at `stage` (a client that lies)."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.dst_node_id == CHEAT and stage_of(msg) == stage:
            change(reply.content)
        return reply

    return mod


def entry(name: str, value: object) -> Callable[[RecordDict], None]:
    def change(content: RecordDict) -> None:
        content[p.RECORD][name] = value

    return change


def edit(name: str, how: Callable[[list], list]) -> Callable[[RecordDict], None]:
    def change(content: RecordDict) -> None:
        content[p.RECORD][name] = how(list(content[p.RECORD][name]))

    return change


def without(name: str) -> Callable[[RecordDict], None]:
    def change(content: RecordDict) -> None:
        del content[p.RECORD][name]

    return change


def flip(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


def narrow_vector(content: RecordDict) -> None:
    content[p.MASKED][p.VECTOR] = Array(content[p.MASKED][p.VECTOR].numpy().astype(np.uint32))


TAMPERING = [  # stage, fault, change, the stage it drops out at and why
    (p.ADVERTISE_KEYS, "pk-c an integer", entry(p.PUBLIC_KEY_C, 5), "advertise-keys: malformed public keys"),
    (p.ADVERTISE_KEYS, "pk-s of 31 bytes", entry(p.PUBLIC_KEY_S, bytes(31)), "advertise-keys: malformed public keys"),
    (p.SHARE_KEYS, "destinations an integer", entry(p.DESTINATIONS, 5), "share-keys: destinations: not a list"),
    (p.SHARE_KEYS, "destinations naming itself", edit(p.DESTINATIONS, lambda d: [CHEAT, *d[1:]]),
     f"share-keys: destinations: nodes [{CHEAT}] it was not given"),
    (p.SHARE_KEYS, "one destination short", edit(p.DESTINATIONS, lambda d: d[:-1]), "not addressed to exactly its peers"),
    (p.SHARE_KEYS, "ciphertexts an integer", entry(p.CIPHERTEXTS, 5), "share-keys: ciphertexts: not 6 byte strings"),
    (p.SHARE_KEYS, "one ciphertext short", edit(p.CIPHERTEXTS, lambda c: c[:-1]), "share-keys: ciphertexts: not 6"),
    (p.SHARE_KEYS, "a ciphertext cut", edit(p.CIPHERTEXTS, lambda c: [c[0][:-1], *c[1:]]), "of 120 bytes"),
    (p.SHARE_KEYS, "ciphertexts flipped", edit(p.CIPHERTEXTS, lambda c: [flip(b) for b in c]),
     "masked-input: its shares refused by [1"),
    (p.SHARE_KEYS, "seed commitments an integer", entry(p.SEED_COMMITMENTS, 5), "seed commitments: not 7 byte strings"),
    (p.SHARE_KEYS, "key commitments missing", without(p.KEY_COMMITMENTS), "share-keys: key commitments: not 7"),
    (p.SHARE_KEYS, "a commitment of 31 bytes", edit(p.SEED_COMMITMENTS, lambda c: [bytes(31), *c[1:]]), "of 32 bytes"),
    (p.SHARE_KEYS, "a wrong commitment", edit(p.KEY_COMMITMENTS, lambda c: [*c[:-1], flip(c[-1])]),
     "masked-input: its shares refused by [1"),
    (p.MASKED_INPUT, "metric keys an integer", entry(p.METRIC_KEYS, 5), "masked-input: metric keys: not a list"),
    (p.MASKED_INPUT, "refused an integer", entry(p.REFUSED, 5), "masked-input: refused: not a list"),
    (p.MASKED_INPUT, "refused naming itself", entry(p.REFUSED, [CHEAT]), f"refused: nodes [{CHEAT}] it was not given"),
    (p.MASKED_INPUT, "a vector of uint32", narrow_vector, "masked-input: no masked vector of the agreed type"),
    (p.UNMASK, "owners an integer", entry(p.OWNERS, 5), "unmask: owners: not a list"),
    (p.UNMASK, "owners repeated", edit(p.OWNERS, lambda o: [o[0], *o[:-1]]), "unmask: owners: not a list of distinct"),
    (p.UNMASK, "owners not asked about", edit(p.OWNERS, lambda o: [*o[:-1], 99]), "owners: nodes [99] it was not given"),
    (p.UNMASK, "shares an integer", entry(p.SHARES, 5), "unmask: shares: not 7 byte strings"),
    (p.UNMASK, "a share cut", edit(p.SHARES, lambda s: [s[0][:-1], *s[1:]]), "unmask: shares: not 7 byte strings of 36"),
    (p.UNMASK, "a wrong share", edit(p.SHARES, lambda s: [*s[:-1], flip(s[-1])]), "that is not the one node"),
]


@pytest.mark.parametrize(
    ("stage", "change", "reason"), [case[:1] + case[2:] for case in TAMPERING], ids=[f"{c[0]}: {c[1]}" for c in TAMPERING]
)
def test_a_client_tampering_with_its_reply_is_left_out_and_named(stage, change, reason):
    aggregate = secure_round(FaultyGrid(toy_app(outer=[tamper(stage, change)])))
    assert list(aggregate.failures) == [CHEAT] and reason in aggregate.failures[CHEAT], aggregate.failures
    assert CHEAT not in aggregate.survivors.unmasked
    assert (CHEAT in aggregate.survivors.masked) == (stage == p.UNMASK)  # a vector that arrived stays summed
    assert_sum_within_bound(aggregate)


def test_the_holder_of_a_wrong_share_is_named_and_the_sum_is_right():
    grid = FaultyGrid(toy_app(outer=[tamper(p.UNMASK, edit(p.SHARES, lambda s: [flip(share) for share in s]))]))
    aggregate = secure_round(grid)
    (request,) = [m for m in grid.traffic(p.UNMASK)[0] if m.metadata.dst_node_id == CHEAT]
    owner = request.content[p.RECORD][p.ALIVE][0]
    assert aggregate.failures == {CHEAT: f"unmask: a share of node {owner} that is not the one node {owner} committed to"}
    assert aggregate.survivors.masked == tuple(grid.get_node_ids())
    assert aggregate.survivors.unmasked == tuple(n for n in grid.get_node_ids() if n != CHEAT)
    assert_sum_within_bound(aggregate)


def deal_uneven_shares(msg: Message, context: Context, call_next: Callable) -> Message:
    """A mod by which CHEAT seals and commits to shares of 35 and 37 bytes for its first peer:
    authentic, committed to, and as long as two honest shares together."""
    reply = call_next(msg, context)
    if msg.metadata.dst_node_id == CHEAT and stage_of(msg) == p.SHARE_KEYS:
        state, record = NodeState.from_record(context.state[STATE]), reply.content[p.RECORD]
        peer, b_share, sk_share = state.peers[0], bytes(crypto.SHARE_BYTES - 1), bytes(crypto.SHARE_BYTES + 1)
        aad = crypto.share_aad(state.round_id, p.SHARE_KEYS, CHEAT, peer)
        sealed = crypto.seal(state.share_keys[0], share_keys_plaintext_concat(CHEAT, peer, b_share, sk_share), aad)
        record[p.CIPHERTEXTS] = [sealed, *list(record[p.CIPHERTEXTS])[1:]]
        for name, kind, share in ((p.SEED_COMMITMENTS, crypto.SEED_SHARE, b_share), (p.KEY_COMMITMENTS, crypto.KEY_SHARE, sk_share)):
            commitments = list(record[name])
            commitments[1] = crypto.commit_share(state.round_id, CHEAT, peer, kind, share)
            record[name] = commitments
    return reply


def test_a_receiver_refuses_shares_of_the_wrong_length_rather_than_reveal_them():
    grid = FaultyGrid(toy_app(outer=[deal_uneven_shares]))
    aggregate = secure_round(grid)
    (request,) = [m for m in grid.traffic(p.SHARE_KEYS)[0] if m.metadata.dst_node_id == CHEAT]
    assert_share_refused(grid, aggregate, request.content[p.RECORD][p.PEERS][0], CHEAT)


class SlowGrid(FaultyGrid):
    """Each stage's clients take `share` of the time the server gives them, on a fake clock."""

    def __init__(self, app: ClientApp, share: float) -> None:
        super().__init__(app)
        self.now, self.share, self.timeouts = 0.0, share, []

    def monotonic(self) -> float:
        return self.now

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        self.now += self.share * timeout
        return super().send_and_receive(messages, timeout=timeout)


def test_each_stage_waits_only_what_is_left_of_the_round_timeout(monkeypatch):
    grid = SlowGrid(toy_app(), share=0.5)
    monkeypatch.setattr("shared.secagg.server.time", grid)
    aggregate = secure_train_round(grid, train_messages(grid), SETTINGS, timeout=60)
    assert grid.timeouts == [60, 30, 15, 7.5] and grid.now <= 60
    assert_sum_within_bound(aggregate)


def test_a_round_whose_clients_take_all_its_time_stops_at_the_next_stage(monkeypatch):
    grid = SlowGrid(toy_app(), share=1.0)
    monkeypatch.setattr("shared.secagg.server.time", grid)
    with pytest.raises(SecAggError, match="stopped at share-keys: its time \\(60 s\\) ran out"):
        secure_train_round(grid, train_messages(grid), SETTINGS, timeout=60)
    assert sum(grid.timeouts) <= 60


# ----------------------------------------------------------------------------- the mod in a ClientApp


def test_plain_training_is_refused_when_the_run_requires_secure_aggregation():
    grid = FaultyGrid(toy_app(), n=2, run_config={"secure-aggregation": True})
    (reply,) = grid.send_and_receive(train_messages(grid)[:1])
    assert reply.has_error() and "refusing to send a plaintext update" in reply.error.reason
    plain = FaultyGrid(toy_app(), n=2)  # without the switch the mod passes plain training through
    (reply,) = plain.send_and_receive(train_messages(plain)[:1])
    assert not reply.has_error() and "arrays" in reply.content


def test_unsafe_settings_sent_by_the_server_are_refused():
    grid = FaultyGrid(toy_app())

    def weaken(messages):
        for message in messages:
            message.content[p.RECORD][p.THRESHOLD] = 1

    grid.rewrite[p.ADVERTISE_KEYS] = weaken
    with pytest.raises(SecAggError, match="stopped at advertise-keys: 0 clients left"):
        secure_round(grid)


def test_with_the_real_fedclient_train_handler():
    """fedclient.app.train under the mod: secure FedAvg equals the plaintext FedAvg of the same training."""
    from fedclient import app as fedclient_app
    from shared.config import RunConfig
    from shared.data.federation import data_spec
    from shared.recipe import model_from_config
    from shared.weights import to_arrayrecord

    cfg = RunConfig(dataset="synthetic", num_clients=6, clients_per_round=6, rounds=1, hidden="32", seed=3, device="cpu")
    run_config = cfg.to_mapping()
    arrays = to_arrayrecord(model_from_config(cfg, data_spec(cfg)).state_dict())
    secure_app = ClientApp(mods=[secagg_mod])
    secure_app.train()(fedclient_app.train)
    settings = SecAggSettings(threshold=4, neighbours=6, clipping_range=4.0)

    results = []
    for app in (fedclient_app.app, secure_app):
        grid = InProcessGrid(app, cfg.num_clients, run_config, simulation_node_config(cfg.num_clients))
        strategy = FedAvg(fraction_train=1.0, min_available_nodes=cfg.num_clients)
        messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        if app is secure_app:
            aggregate = secure_train_round(grid, messages, settings)
            replies = [as_mean_reply(aggregate, messages[0])]
        else:
            replies = grid.send_and_receive(messages)
        results.append(strategy.aggregate_train(1, replies))
    (plain, plain_metrics), (secure, secure_metrics) = results
    for name in plain:
        a, b = secure[name].numpy().astype(np.float64), plain[name].numpy()
        assert np.all(np.abs(a - b) <= settings.error_bound() + 4 * np.finfo(np.float32).eps * np.abs(b)), name
    assert secure_metrics["train_loss"] == pytest.approx(plain_metrics["train_loss"], abs=settings.metric_step)


# ----------------------------------------------------------------------------- (5) enrolled devices


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """A PKI whose client-(pid + 1) is partition pid's device; client-11 is enrolled but not in the round."""
    return init_pki(tmp_path_factory.mktemp("pki"), clients=CLIENTS + 1)


def enrolled_config(pki: PkiPaths) -> Callable:
    def node_config(pid: int) -> dict:
        key = pki.client_keys[pid][0]
        return {"partition-id": pid, "num-partitions": CLIENTS, SIGNING_KEY: str(key),
                CERTIFICATE: str(pki.client_certificates[pid]), ENROLLMENT_CA: str(pki.enrollment_ca)}  # fmt: skip

    return node_config


def enrolled_grid(pki: PkiPaths) -> FaultyGrid:
    return FaultyGrid(toy_app(), node_config=enrolled_config(pki))


def test_a_round_of_enrolled_devices_gives_the_right_sum(enrolled):
    grid = enrolled_grid(enrolled)
    aggregate = secure_round(grid)
    assert aggregate.survivors.unmasked == tuple(grid.get_node_ids()) and not aggregate.failures
    assert_sum_within_bound(aggregate)
    advertised = [r.content[p.RECORD] for r in grid.traffic(p.ADVERTISE_KEYS)[1]]
    assert all(len(r[p.CERTIFICATE]) > 0 and len(r[p.SIGNATURE]) > 0 for r in advertised)
    relayed = [m.content[p.RECORD] for m in grid.traffic(p.SHARE_KEYS)[0]]
    assert all(len(r[p.PEER_CERTIFICATES]) == len(r[p.PEERS]) for r in relayed)


def _foreign_credentials(record: ConfigRecord, tmp_path) -> tuple[bytes, bytes]:
    """A device of another enrollment CA (same CA name) that properly signs peer 0's keys."""
    other = init_pki(tmp_path / "other", clients=1)
    key = serialization.load_ssh_private_key(other.client_keys[0][0].read_bytes(), None)
    payload = signed_keys(record[p.ROUND_ID], record[p.PEERS][0], record[p.PEER_KEYS_C][0], record[p.PEER_KEYS_S][0])
    certificate = x509.load_pem_x509_certificate(other.client_certificates[0].read_bytes())
    return certificate.public_bytes(serialization.Encoding.DER), key.sign(payload, ec.ECDSA(hashes.SHA384()))


def _set(record: ConfigRecord, name: str, index: int, value: bytes) -> None:
    values = list(record[name])
    values[index] = value
    record[name] = values


def _swap_pk_s(record, grid, pki, tmp_path):
    _set(record, p.PEER_KEYS_S, 0, os.urandom(32))


def _valid_certificate_of_another_key(record, grid, pki, tmp_path):
    outsider = x509.load_pem_x509_certificate(pki.client_certificates[CLIENTS].read_bytes())
    _set(record, p.PEER_CERTIFICATES, 0, outsider.public_bytes(serialization.Encoding.DER))


def _unsigned_peer(record, grid, pki, tmp_path):
    _set(record, p.PEER_CERTIFICATES, 0, b"")
    _set(record, p.PEER_SIGNATURES, 0, b"")


def _not_relayed(record, grid, pki, tmp_path):
    del record[p.PEER_CERTIFICATES], record[p.PEER_SIGNATURES]


def _another_ca(record, grid, pki, tmp_path):
    certificate, signature = _foreign_credentials(record, tmp_path)
    _set(record, p.PEER_CERTIFICATES, 0, certificate)
    _set(record, p.PEER_SIGNATURES, 0, signature)


def _same_certificate_twice(record, grid, pki, tmp_path):
    _set(record, p.PEER_CERTIFICATES, 1, record[p.PEER_CERTIFICATES][0])
    _set(record, p.PEER_SIGNATURES, 1, record[p.PEER_SIGNATURES][0])


def _own_certificate(record, grid, pki, tmp_path, node=FIRST_NODE_ID):
    own = next(r.content[p.RECORD] for r in grid.traffic(p.ADVERTISE_KEYS)[1] if r.metadata.src_node_id == node)
    _set(record, p.PEER_CERTIFICATES, 0, own[p.CERTIFICATE])
    _set(record, p.PEER_SIGNATURES, 0, own[p.SIGNATURE])


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_swap_pk_s, "did not sign these keys"),
        (_valid_certificate_of_another_key, "did not sign these keys"),
        (_unsigned_peer, "its keys are unsigned"),
        (_not_relayed, "differ in number"),
        (_another_ca, "is not issued by the enrollment CA"),
        (_same_certificate_twice, "one device counted twice"),
        (_own_certificate, "one device counted twice"),
    ],
)
def test_an_enrolled_device_refuses_a_peer_it_cannot_verify_before_sharing(enrolled, tmp_path, tamper, reason):
    grid = enrolled_grid(enrolled)

    def rewrite(messages):
        target = next(m for m in messages if m.metadata.dst_node_id == FIRST_NODE_ID)
        tamper(target.content[p.RECORD], grid, enrolled, tmp_path)

    grid.rewrite[p.SHARE_KEYS] = rewrite
    aggregate = secure_round(grid)
    (reply,) = [r for r in grid.traffic(p.SHARE_KEYS)[1] if r.metadata.src_node_id == FIRST_NODE_ID]
    assert reply.has_error() and "SecAggUnverifiedPeer" in reply.error.reason and reason in reply.error.reason
    assert FIRST_NODE_ID not in aggregate.survivors.shared  # it sent no share
    assert_sum_within_bound(aggregate)


def test_a_device_replies_its_refusal_of_an_unverified_peer_as_code_106_only(enrolled, tmp_path):
    # Prepare: the device's own outermost mod (fedclient's), which turns what a task raises into a code
    from fedclient.guard import error_reply_mod
    from shared.device_errors import MESSAGES, DeviceCode

    grid = FaultyGrid(toy_app(outer=[error_reply_mod]), node_config=enrolled_config(enrolled))

    def rewrite(messages):
        target = next(m for m in messages if m.metadata.dst_node_id == FIRST_NODE_ID)
        _swap_pk_s(target.content[p.RECORD], grid, enrolled, tmp_path)

    grid.rewrite[p.SHARE_KEYS] = rewrite

    # Execute
    secure_round(grid)

    # Assert
    (reply,) = [r for r in grid.traffic(p.SHARE_KEYS)[1] if r.metadata.src_node_id == FIRST_NODE_ID]
    assert (reply.error.code, reply.error.reason) == (DeviceCode.UNVERIFIED_PEER, MESSAGES[DeviceCode.UNVERIFIED_PEER])


def test_a_device_without_enrollment_neither_signs_nor_verifies(enrolled):
    grid = FaultyGrid(toy_app())
    grid.rewrite[p.SHARE_KEYS] = lambda messages: _unsigned_peer(messages[0].content[p.RECORD], grid, enrolled, None)
    aggregate = secure_round(grid)
    assert not aggregate.failures
    assert all(p.CERTIFICATE not in r.content[p.RECORD] for r in grid.traffic(p.ADVERTISE_KEYS)[1])


def replace_certificate(node: int, value: object) -> Callable:
    """A mod by which `node` advertises `value` as its certificate."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.dst_node_id == node and stage_of(msg) == p.ADVERTISE_KEYS:
            reply.content[p.RECORD][p.CERTIFICATE] = value
        return reply

    return mod


@pytest.mark.parametrize("value", [b"x" * (p.MAX_SIGNED_BYTES + 1), "text", [b"x"]])
def test_the_server_drops_a_client_whose_certificate_is_not_bounded_bytes(enrolled, value):
    grid = FaultyGrid(toy_app(outer=[replace_certificate(1004, value)]), node_config=enrolled_config(enrolled))
    aggregate = secure_round(grid)
    assert aggregate.failures[1004] == "advertise-keys: malformed public keys, certificate or signature"
    assert_sum_within_bound(aggregate)


def test_a_server_given_the_enrollment_ca_drops_an_unverified_client_early(enrolled):
    grid = FaultyGrid(toy_app(outer=[replace_certificate(1004, b"x" * p.MAX_SIGNED_BYTES)]),
                      node_config=enrolled_config(enrolled))  # fmt: skip
    ca = x509.load_pem_x509_certificate(enrolled.enrollment_ca.read_bytes())
    aggregate = secure_train_round(grid, train_messages(grid), SETTINGS, enrollment_ca=ca)
    assert aggregate.failures == {1004: "advertise-keys: node 1004's certificate is malformed"}
    assert_sum_within_bound(aggregate)


def twice_enrolled(pki: PkiPaths) -> Callable:
    """Partitions 0 and 1 are one device: the same node key and certificate."""
    config = enrolled_config(pki)
    return lambda pid: {**config(0 if pid < 2 else pid), "partition-id": pid}


def test_one_device_as_two_nodes_is_refused_by_its_peers(enrolled):
    settings = SecAggSettings(threshold=4, neighbours=6, clipping_range=1.0)  # complete graph
    grid = FaultyGrid(toy_app(), n=6, node_config=twice_enrolled(enrolled))
    with pytest.raises(SecAggError, match="stopped at share-keys: 0 clients left"):
        secure_round(grid, settings)
    _, replies = grid.traffic(p.SHARE_KEYS)
    assert all("SecAggUnverifiedPeer" in r.error.reason and "counted twice" in r.error.reason for r in replies)


def test_a_server_given_the_enrollment_ca_drops_the_second_node_of_one_device(enrolled):
    grid = FaultyGrid(toy_app(), node_config=twice_enrolled(enrolled))
    ca = x509.load_pem_x509_certificate(enrolled.enrollment_ca.read_bytes())
    aggregate = secure_train_round(grid, train_messages(grid), SETTINGS, enrollment_ca=ca)
    (dropped,) = aggregate.failures
    assert dropped in (FIRST_NODE_ID, FIRST_NODE_ID + 1) and "counted twice" in aggregate.failures[dropped]
    assert_sum_within_bound(aggregate)


def test_enrollment_in_node_config_must_be_whole_and_consistent(enrolled):
    ca = {ENROLLMENT_CA: str(enrolled.enrollment_ca)}
    with pytest.raises(SecAggError, match="sets secagg-enrollment-ca but not secagg-signing-key, secagg-certificate"):
        load_enrollment(ca)
    mismatched = {**ca, SIGNING_KEY: str(enrolled.client_keys[0][0]), CERTIFICATE: str(enrolled.client_certificates[1])}
    with pytest.raises(SecAggError, match="not for this device's signing key"):
        load_enrollment(mismatched)
    with pytest.raises(SecAggError, match="cannot read the certificate"):
        load_enrollment({**mismatched, CERTIFICATE: "/nonexistent.crt"})
    assert load_enrollment({"partition-id": 0}) is None


# ----------------------------------------------------------------------------- distributed DP


DISTRIBUTED_SETTINGS = SecAggSettings(threshold=3, neighbours=4, clipping_range=16.0, quantization_range=1 << 20)


def _distributed_dp_round(
    updates: dict[int, float], clipping_norm: float, noise_multiplier: float, expected_cohort: int = 4, size: int = 1000
) -> tuple[np.ndarray, np.ndarray, DistributedDP]:
    """One secure round of 4 toy clients under `dp = "distributed"`, each adding `updates[pid]`
    (default 0) to every element it received; the reference and the model DistributedDP makes of
    the secure sum, and the wrapper (its accountant composed)."""
    from fedserver.privacy import DistributedDP, PoissonAccountant

    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        received = msg.content["arrays"]["w"].numpy()
        arrays = ArrayRecord({"w": Array((received + updates.get(pid, 0.0)).astype(np.float32))})
        metrics = MetricRecord({"num-examples": 10 * (pid + 1), "train_loss": 0.5})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    run_config = {
        "secure-aggregation": True, "dp": "distributed", "dp-clipping-norm": clipping_norm,
        "dp-noise-multiplier": noise_multiplier, "clients-per-round": expected_cohort,
    }  # fmt: skip
    grid = InProcessGrid(app, 4, run_config, simulation_node_config(4))
    reference = {"w": np.full(size, 0.25, np.float32)}
    aggregate = secure_train_round(grid, train_messages(grid, reference), DISTRIBUTED_SETTINGS, timeout=60)
    strategy = DistributedDP(
        FedAvg(), clipping_norm=clipping_norm, noise_multiplier=noise_multiplier, expected_cohort=expected_cohort,
        accountant=PoissonAccountant(4 / 6, noise_multiplier, 1e-5),
    )  # fmt: skip
    strategy.current_arrays = ArrayRecord({"w": Array(reference["w"])})
    new_arrays, _ = strategy.aggregate_train(1, [as_mean_reply(aggregate, train_messages(grid, reference)[0])])
    assert aggregate.num_examples == len(aggregate.survivors.masked) == 4  # each client weighs 1, not its examples
    return reference["w"], new_arrays["w"].numpy(), strategy


def test_distributed_dp_noise_on_a_secure_aggregate_has_std_z_c_over_the_expected_cohort():
    np.random.seed(0)  # each device's share draws from numpy's global stream (Flower's function)

    reference, new, strategy = _distributed_dp_round({}, clipping_norm=2.0, noise_multiplier=1.5, size=200_000)

    noise = new.astype(np.float64) - reference  # zero updates: the noise alone
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.02)  # 4 shares of std zC/2, over m = 4
    assert strategy.accountant.releases == 1 and strategy.accountant.achieved == []  # k = m: at z


def test_distributed_dp_clips_each_clients_update_on_its_device():
    reference, new, _ = _distributed_dp_round({0: 5.0}, clipping_norm=2.0, noise_multiplier=0.0)  # one huge update

    moved = float(np.linalg.norm(new.astype(np.float64) - reference))
    assert moved == pytest.approx(2.0 / 4, rel=1e-3)  # clipped to C, over the expected cohort m
    within, small, _ = _distributed_dp_round({0: 0.001, 1: 0.001}, clipping_norm=2.0, noise_multiplier=0.0)
    np.testing.assert_allclose(small.astype(np.float64) - within, 2 * 0.001 / 4, atol=1e-5)  # within C: unclipped


def test_distributed_dp_without_its_keys_refuses_to_send_an_update():
    from shared.secagg.client import distributed_dp_settings

    assert distributed_dp_settings({"dp": "central"}) is None
    assert distributed_dp_settings(
        {"dp": "distributed", "dp-clipping-norm": 1.0, "dp-noise-multiplier": 0.5, "clients-per-round": 4}
    ) == (1.0, 0.5, 4.0)
    with pytest.raises(SecAggError, match="needs numbers for"):
        distributed_dp_settings({"dp": "distributed", "dp-clipping-norm": 1.0})
    with pytest.raises(SecAggError, match="dp-clipping-norm > 0"):
        distributed_dp_settings({"dp": "distributed", "dp-clipping-norm": 0.0, "dp-noise-multiplier": 1.0,
                                 "clients-per-round": 4})  # fmt: skip
