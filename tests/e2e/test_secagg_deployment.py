"""Secure aggregation deployed: `fedserver init`, `fedserver start` with `secure-aggregation =
true` (threshold 2 of 3), three `fedclient start` over TLS on 127.0.0.1, two rounds. The devices
are enrolled (each signs its keys and verifies its peers') and their policy requires secure
aggregation in groups of 3.

Is the aggregate right? This process replays every client's local training of each round
(the ClientApp's own train handler, the client's data file, its node id and so its seed, from
the global weights the server checkpointed before the round) and checks that the server's new
global weights are the plaintext weighted FedAvg of those updates within the quantization bound:
per element, |secure - plaintext| <= c / (Q - 1) (`SecAggSettings.error_bound`, half a
quantization step), plus the float32 rounding of the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from fedclient.app import app
from fedclient.app import train as client_train
from fedserver.checkpoints import CHECKPOINT_DIR, read_metrics
from fedserver.state import StateDir
from shared import messages as keys
from shared.config import RunConfig, load_config
from shared.data.federation import data_spec
from shared.processes import free_port
from shared.recipe import model_from_config
from shared.secagg import SecAggSettings
from shared.weights import load_safetensors, to_arrayrecord, to_state_dict
from simulations.grid import InProcessGrid, simulation_node_config

pytestmark = pytest.mark.e2e

CLIENTS, ROUNDS = 3, 2
SAMPLES = (60, 150, 240)  # unequal, so the weighted mean is far from the unweighted one
SECAGG = {
    "secure_aggregation": True,
    "secagg_threshold": 2,
    "secagg_neighbours": 2,
    "secagg_clipping_range": 2.0,
    "secagg_quantization_range": 1 << 20,  # bound c / (Q - 1) = 1.9e-6
}

Weights = dict[str, np.ndarray]


@dataclass
class SecureFederation:
    cfg: RunConfig
    run_dir: Path
    nodes: list[tuple[int, Path]]  # (node id, data file) of each client


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory, e2e) -> SecureFederation:
    work = tmp_path_factory.mktemp("secagg")
    pki = work / "pki"
    assert e2e.run_cli(["fedserver.cli", "init", str(pki), "--clients", str(CLIENTS)]).returncode == 0
    parts, server_data = e2e.write_partitions(work, CLIENTS, max(SAMPLES))
    for part, size in zip(parts, SAMPLES, strict=True):
        _truncate(part, size)
    config = work / "run.toml"
    config.write_text(e2e.run_toml(server_data, CLIENTS, ROUNDS, **SECAGG))
    state, address = StateDir(work / "state"), f"127.0.0.1:{free_port()}"
    e2e.start_daemon("secagg-server", pki, config, state, address)
    names = [f"secagg-client-{k}" for k in range(1, CLIENTS + 1)]
    for k, (name, part) in enumerate(zip(names, parts, strict=True), start=1):
        enrolled = ["--enrollment-cert", str(pki / "clients" / f"client-{k}.crt"),
                    "--enrollment-ca", str(pki / "enrollment" / "enrollment-ca.pem")]  # fmt: skip
        strict = ["--require-secure-aggregation", "--min-secure-group", str(CLIENTS)]
        e2e.start_fedclient(name, address, pki, pki / "clients" / f"client-{k}.key", part, *enrolled, *strict)
    e2e.wait_until(lambda: len(read_metrics(state.run_dir)) >= ROUNDS, 180, f"{ROUNDS} secure rounds (see {e2e.logs})")
    nodes = [(e2e.node_id(name), part) for name, part in zip(names, parts, strict=True)]
    return SecureFederation(load_config(config), state.run_dir, nodes)


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    """The replayed ClientApp sets this process's torch threads to the run's; put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_secure_aggregate_is_the_plaintext_weighted_fedavg_within_the_bound(
    secure_federation: SecureFederation, keep_torch_threads: None
):
    fed = secure_federation
    bound = SecAggSettings.from_mapping(fed.cfg.to_mapping()).error_bound()
    InProcessGrid(app, 1, {}, simulation_node_config(1))  # the identity a server-side message needs
    start = {k: v.numpy() for k, v in model_from_config(fed.cfg, data_spec(fed.cfg)).state_dict().items()}

    for server_round in range(1, ROUNDS + 1):
        replies = [_replay(fed.cfg, start, server_round, node, data) for node, data in fed.nodes]
        secure = _checkpoint(fed.run_dir, server_round)
        weighted = _mean([w for w, _ in replies], [n for _, n in replies])
        tolerance = bound + max(float(np.spacing(np.abs(v).max().astype(np.float32))) for v in weighted.values())

        assert [n for _, n in replies] == [round(0.8 * s) for s in SAMPLES]  # 20 % held out on each client
        assert _max_abs(_delta(w, start) for w, _ in replies) < SECAGG["secagg_clipping_range"]  # nothing clipped
        assert _max_abs(_delta(secure, weighted)) <= tolerance
        # the check can tell: the unweighted mean is far outside the bound
        assert _max_abs(_delta(secure, _mean([w for w, _ in replies], [1] * CLIENTS))) > 10 * tolerance
        start = secure


def _truncate(part: Path, size: int) -> None:
    with np.load(part) as data:
        x, y = data["x"][:size], data["y"][:size]
    np.savez(part, x=x, y=y)


def _replay(cfg: RunConfig, weights: Weights, server_round: int, node: int, data: Path) -> tuple[Weights, int]:
    """What `node` sent back in `server_round`: the ClientApp's train handler run here."""
    config = ConfigRecord({keys.SERVER_ROUND: server_round})
    tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
    content = RecordDict({keys.ARRAYS: to_arrayrecord(tensors), keys.CONFIG: config})
    msg = Message(content, node, MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"replay-{server_round}-{node}"
    context = Context(1, node, {"data-path": str(data), "device": "cpu"}, RecordDict(), cfg.to_mapping())
    reply = client_train(msg, context)
    arrays = {k: v.numpy() for k, v in to_state_dict(reply.content[keys.ARRAYS], like=tensors).items()}
    return arrays, int(reply.content[keys.METRICS][keys.NUM_EXAMPLES])


def _checkpoint(run_dir: Path, server_round: int) -> Weights:
    path = run_dir / CHECKPOINT_DIR / f"round-{server_round}.safetensors"
    return {k: v.numpy() for k, v in load_safetensors(path).items()}


def _mean(weights: list[Weights], counts: list[int]) -> Weights:
    total = sum(counts)
    return {k: sum(n * w[k].astype(np.float64) for w, n in zip(weights, counts, strict=True)) / total for k in weights[0]}


def _delta(a: Weights, b: Weights) -> Weights:
    return {k: a[k].astype(np.float64) - b[k].astype(np.float64) for k in a}


def _max_abs(arrays: Weights | Iterator[Weights]) -> float:
    many = [arrays] if isinstance(arrays, dict) else list(arrays)
    return max(float(np.abs(v).max()) for one in many for v in one.values())
