"""Faults in a real deployment on 127.0.0.1: `fedserver` and `fedclient` processes killed with
SIGKILL, and two of 4 clients sending NaN / wrong-shape / huge updates and malformed metrics.

Each test runs a federation of its own (MNIST 2NN, a few hundred digits per client) and stops
its processes when it ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fedserver.checkpoints import read_metrics
from fedserver.state import StateDir
from shared.processes import descendants, free_port, is_alive, port_in_use, recorded_process, stop_trees
from shared.weights import load_safetensors
from tests.e2e.conftest import rounds_told

pytestmark = pytest.mark.e2e

SAMPLES = 200  # per client
FAULTY_APP = "tests.e2e.faulty_client:app"
BAD_REPLY_APP = "tests.e2e.bad_reply_client:app"


@dataclass
class Deployment:
    """A PKI, data, a run config and a state directory; the daemon and clients once started."""

    e2e: object
    work: Path
    clients: int
    state: StateDir = field(init=False)
    address: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    daemon: subprocess.Popen[bytes] | None = None
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = StateDir(self.work / "state")

    @property
    def pki(self) -> Path:
        return self.work / "pki"

    @property
    def config(self) -> Path:
        return self.work / "run.toml"

    def start_daemon(self, name: str = "fedserver") -> subprocess.Popen[bytes]:
        self.daemon = self.e2e.start_daemon(f"{self.work.name}-{name}", self.pki, self.config, self.state, self.address)
        return self.daemon

    def start_clients(self, extra: dict[int, list[str]] | None = None) -> None:
        """Client k (1-based) gets `extra[k]` on its command line."""
        for k in range(1, self.clients + 1):
            key = self.pki / "clients" / f"client-{k}.key"
            data = self.work / f"part-{k - 1}.npz"
            name = f"{self.work.name}-client-{k}"
            self.nodes.append(self.e2e.start_fedclient(name, self.address, self.pki, key, data, *(extra or {}).get(k, [])))

    def rows(self) -> list[dict]:
        return read_metrics(self.state.run_dir)

    def wait_for_rounds(self, rounds: int, timeout: float) -> list[dict]:
        self.e2e.wait_until(lambda: rounds_told(self.state) >= rounds, timeout, f"{rounds} rounds (see {self.e2e.logs})")
        return self.rows()

    def run_log(self) -> str:
        """The ServerApp's log of the run (Flower keeps it in the SuperLink): `flwr log RUN_ID --show`."""
        run_id = str(self.e2e.status(self.state)["run_id"])
        env = self.e2e.env(FLWR_HOME=str(self.state.flwr_home))
        result = self.e2e.run_cli_raw(["flwr", "log", run_id, "--show"], env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


@pytest.fixture
def deploy(e2e, tmp_path_factory) -> Iterator[Callable[..., Deployment]]:
    """Make a Deployment (`clients`, `rounds`, other run keys); its processes stop after the test."""
    first = len(e2e.started)

    def make(clients: int, rounds: int, **keys: object) -> Deployment:
        work = tmp_path_factory.mktemp("faults")
        assert e2e.run_cli(["fedserver.cli", "init", str(work / "pki"), "--clients", str(clients)]).returncode == 0
        _parts, server_data = e2e.write_partitions(work, clients, SAMPLES)
        deployment = Deployment(e2e, work, clients)
        deployment.config.write_text(e2e.run_toml(server_data, clients, rounds, **keys))
        return deployment

    yield make
    stop_trees(e2e.started[first:], grace=10.0)


def _kill(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _learned(rows: list[dict]) -> bool:
    """The central test loss fell from round 1 to the last, and a later round's accuracy beat round 1's
    (a deployment's random node ids seed its clients, so one round may dip)."""
    return rows[-1]["eval_loss"] < rows[0]["eval_loss"] and max(r["accuracy"] for r in rows[1:]) > rows[0]["accuracy"]


def _wait_dead(e2e, pids: set[int], what: str, timeout: float = 15) -> None:
    e2e.wait_until(lambda: not any(is_alive(pid) for pid in pids), timeout, what, every=0.1)


def test_a_server_killed_with_sigkill_resumes_without_losing_or_repeating_a_round(deploy, e2e):
    # Prepare: 3 clients, 3 rounds; SIGKILL the daemon once round 1 is recorded
    fed = deploy(clients=3, rounds=3)
    fed.start_daemon()
    fed.start_clients()
    fed.wait_for_rounds(1, 180)
    _kill(fed.daemon)
    orphan = recorded_process(fed.state.superlink_pid)
    orphan_tree = descendants(orphan) if orphan else set()
    # What a SIGKILL leaves: the SuperLink (own process group) still runs and holds the port
    assert orphan is not None and port_in_use("127.0.0.1", int(fed.address.rsplit(":", 1)[1]))

    # Execute: the same command, same state directory
    restarted = fed.start_daemon("restarted")
    # (the new daemon stops them once it has started: seconds, more on a loaded machine)
    _wait_dead(e2e, {orphan, *orphan_tree}, "the old SuperLink and its processes to be stopped", timeout=60)
    rows = fed.wait_for_rounds(3, 240)

    # Assert: the new daemon took over and every round is recorded exactly once, with its checkpoint
    # (on a loaded machine the orphan may finish the run before the new daemon has started its own)
    e2e.wait_until(
        lambda: recorded_process(fed.state.superlink_pid) not in (None, orphan), 120, "the new daemon's SuperLink"
    )
    assert restarted.poll() is None
    assert f"stopped SuperLink pid {orphan}" in e2e.log(f"{fed.work.name}-restarted")
    assert [row["round"] for row in rows] == [1, 2, 3]
    checkpoints = sorted(p.name for p in (fed.state.run_dir / "checkpoints").glob("round-*.safetensors"))
    assert checkpoints == [f"round-{n}.safetensors" for n in range(1, 4)]
    assert recorded_process(fed.state.superlink_pid) not in (None, orphan)
    assert all(node.poll() is None for node in fed.nodes)


def test_a_client_killed_with_sigkill_mid_round_leaves_the_round_to_the_others(deploy, e2e):
    # Prepare: 4 devices; a round needs 3 valid replies and waits at most 10 s. num-clients = 3
    # lets a round start as soon as 3 devices are connected (else it waits node-wait-timeout first).
    timeout = 10.0
    fed = deploy(clients=4, rounds=3, num_clients=3, clients_per_round=3, min_replies=3, round_timeout=timeout)
    fed.start_daemon()
    fed.start_clients()
    rows = fed.wait_for_rounds(1, 180)
    victim = fed.nodes[-1]
    children = descendants(victim.pid)  # its SuperNode and warm worker

    # Execute: SIGKILL one fedclient as round 2 starts
    _kill(victim)
    rows = fed.wait_for_rounds(3, 3 * (timeout + 30))

    # Assert: its processes died with it; the rounds went on from the 3 others, each within the timeout
    assert children and not any(is_alive(pid) for pid in children)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all(row["seconds"] < timeout + 30 for row in rows[1:])  # the timeout, and a loaded machine's slack
    assert _learned(rows)
    assert all(node.poll() is None for node in fed.nodes[:-1])


def test_bad_updates_and_bad_reply_metrics_are_refused_with_the_node_and_reason_and_the_model_keeps_learning(
    deploy, e2e
):
    # Prepare: 4 clients (the suite's load test: benchmarks/load_test.py runs 50, too heavy for
    # the suite at ~400 MB a client). Client 4 runs a ClientApp that sends NaN weights (round 1),
    # a wrong shape (2), +1e6 (3); client 3 one that claims 10^12 examples (1), adds a metric key
    # (2), sends a NaN loss (3). A round needs the 2 honest replies.
    fed = deploy(clients=4, rounds=3, min_replies=2, max_update_norm=100.0)
    fed.start_daemon()
    fed.start_clients(extra={3: ["--client-app", BAD_REPLY_APP], 4: ["--client-app", FAULTY_APP]})

    # Execute
    rows = fed.wait_for_rounds(3, 300)

    # Assert
    refused = {
        4: ["non-finite values", "shape", "exceeds max_norm"],
        3: [
            "num-examples: 1000000000000 is not an integer in [1, 1000000]",
            "metrics: missing [], unexpected ['extra']",
            "metric 'train_loss': nan is not a finite number",
        ],
    }
    _assert_refused_each_round(fed, e2e, rows, refused)


def _assert_refused_each_round(fed: Deployment, e2e, rows: list[dict], refused: dict[int, list[str]]) -> None:
    """Each client k of `refused` had its training reply refused in round r with a log line naming
    its node and `refused[k][r - 1]`, no other reply refused; every round committed, the model
    finite and learning, every client still running."""
    server_log = fed.run_log()
    for client, reasons in refused.items():
        node_id = e2e.node_id(f"{fed.work.name}-client-{client}")
        refusals = re.findall(rf"node {node_id}: update refused: (.*)", server_log)
        assert len(refusals) == len(reasons), server_log[-3000:]
        assert all(reason in refusal for reason, refusal in zip(reasons, refusals, strict=True)), refusals
    assert server_log.count("update refused") == sum(len(reasons) for reasons in refused.values())
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert _learned(rows)
    model = load_safetensors(fed.state.run_dir / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in model.values())
    assert all(node.poll() is None for node in fed.nodes)


STRICT_POLICY = """\
max-local-epochs = 2
max-train-seconds = 120
allowed-models = "2nn"
max-model-parameters = 1_000_000
dp-clipping-norm = 20.0
"""


def test_a_device_whose_policy_requires_secure_aggregation_refuses_a_plain_run_and_the_others_go_on(deploy, e2e):
    # Prepare: client 1 requires secure aggregation; client 2 runs a strict policy; client 3 the default
    fed = deploy(3, 3, min_replies=2, round_timeout=60)
    policy = fed.work / "strict.toml"
    policy.write_text(STRICT_POLICY)

    # Execute
    fed.start_daemon()
    fed.start_clients({1: ["--require-secure-aggregation"], 2: ["--policy", str(policy)]})
    fed.wait_for_rounds(3, 300)

    # Assert: the run learned from the two others; client 1 refused with its code and said why on its own side
    assert _learned(fed.rows())
    refusing, strict = e2e.log(f"{fed.work.name}-client-1"), e2e.log(f"{fed.work.name}-client-2")
    assert "policy: require-secure-aggregation = true" in refusing
    assert re.search(r"train task refused \(code 110\)", refusing), refusing[-3000:]
    assert "policy: max-local-epochs = 2; max-train-seconds = 120.0" in strict
    assert "task refused" not in strict and "task failed" not in strict
    devices = {d["node_id"]: d for d in e2e.status(fed.state)["devices"]}
    refuser = devices[e2e.node_id(f"{fed.work.name}-client-1")]
    assert refuser["last_code"] == 110 and refuser["rounds_refused"] >= 1 and refuser["accepted"] == 0
    assert devices[e2e.node_id(f"{fed.work.name}-client-2")]["accepted"] >= 3
