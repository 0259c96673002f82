"""Helpers for the end-to-end tests: real Flower processes on 127.0.0.1, all stopped at teardown.

Select them with `pytest -m e2e`, leave them out with `pytest -m "not e2e"`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedclient.node import CONNECTED, node_env
from fedserver.events import EVENTS_FILE, EventFollower
from fedserver.state import StateDir
from shared.processes import spawn, stop_trees, wait_for_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = [sys.executable, "-m"]




class E2E:
    """What the e2e tests use: processes started in their own groups (every one stopped at
    teardown, each logging to a file), `python -m` commands run to completion, waiting, data."""

    python = PYTHON

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child writes to it
        process = spawn(argv, env=env or e2e_env(), stdout=log, cwd=REPO)
        log.close()
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_id(self, name: str) -> int:
        """The node id the SuperNode of fedclient `name` logged when it connected."""
        found = re.search(rf"{CONNECTED}\s*(\d+)", self.log(name))
        assert found, self.log(name)
        return int(found.group(1))

    def stop_all(self) -> None:
        stop_trees(self.started, grace=10.0)

    def start_daemon(
        self, name: str, pki: Path, config: Path, state: StateDir, address: str, *extra: str
    ) -> subprocess.Popen[bytes]:
        """`fedserver start` (its dashboard on any free port, unless `extra` says otherwise), returned
        once its port accepts connections."""
        argv = [*self.python, "fedserver.cli", "start", "--pki", str(pki), "--config", str(config), "--dashboard", "0"]
        daemon = self.start(name, [*argv, "--state-dir", str(state.root), "--address", address, *extra])
        host, port = address.rsplit(":", 1)
        assert wait_for_port(host, int(port), 60, alive=daemon), self.log(name)
        return daemon

    def start_fedclient(
        self, name: str, address: str, pki: Path, key: Path, data: Path, *extra: str
    ) -> subprocess.Popen[bytes]:
        """`fedclient start` with `pki`'s CA, the private key `key`, on the CPU."""
        argv = [*self.python, "fedclient.cli", "start", "--server", address, "--ca", str(pki / "ca.pem")]
        return self.start(name, [*argv, "--key", str(key), "--data", str(data), "--device", "cpu", *extra])

    def status(self, state: StateDir) -> dict:
        """`fedserver status --json`."""
        result = self.run_cli(["fedserver.cli", "status", "--state-dir", str(state.root), "--json"])
        return json.loads(result.stdout)

    @staticmethod
    def run_cli(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(argv, timeout)

    @staticmethod
    def run_cli_raw(
        argv: list[str], env: dict[str, str], timeout: float = 60, cwd: Path = REPO
    ) -> subprocess.CompletedProcess[str]:
        """Any command (e.g. `flwr`) to completion, with `env`, in `cwd`."""
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    @staticmethod
    def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
        return wait_until(predicate, timeout, what, every)

    @staticmethod
    def write_partitions(directory: Path, clients: int, samples: int) -> tuple[list[Path], Path]:
        return write_partitions(directory, clients, samples)

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        return e2e_env(**extra)

    @staticmethod
    def run_toml(server_data: Path, clients: int, rounds: int, **extra: object) -> str:
        return run_toml(server_data, clients, rounds, **extra)


def run_toml(server_data: Path, clients: int, rounds: int, **extra: object) -> str:
    """A deployment's run config: the MNIST 2NN on `clients` devices, evaluated on `server_data`.

    `extra` adds or replaces keys, `min_replies=3` written as `min-replies = 3`.
    """
    keys: dict[str, object] = {
        "dataset": "mnist", "data-path": str(server_data), "model": "2nn", "num-clients": clients,
        "clients-per-round": clients, "rounds": rounds, "lr": 0.1, "device": "cpu",
    }  # fmt: skip
    keys.update({key.replace("_", "-"): value for key, value in extra.items()})
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())


def e2e_env(**extra: str) -> dict[str, str]:
    """Telemetry off, this environment's tools first on PATH, this checkout importable; one torch
    thread a process, as on a device whose cores others share (every client here shares them)."""
    env = {**node_env(), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


def run_cli(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ...` to completion (fedserver/fedclient commands that return)."""
    return subprocess.run([*PYTHON, *argv], env=e2e_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def rounds_told(state: StateDir) -> int:
    """The rounds events.jsonl tells: a round is told once its checkpoint and node ledger are
    written, and `fedserver status` reads it (metrics.jsonl is written before either)."""
    return len(EventFollower(state.run_dir / EVENTS_FILE).poll()[1])


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def digits_as_mnist() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1797 of them, 8x8, shipped offline) drawn at
    MNIST's size: (N, 28, 28) uint8 images, each pixel a 3x3 block in a 2-pixel border, and labels.

    The e2e tests use them wherever they run: real digits that a 2NN does not separate in one
    round, so "accuracy rises" means learning, with or without ../shared/datasets."""
    digits = load_digits()
    images = np.pad(np.kron(digits.images, np.ones((1, 3, 3))), ((0, 0), (2, 2), (2, 2)))  # (N, 28, 28), 0..16
    return np.round(images * 255 / 16).astype(np.uint8), digits.target.astype(np.int64)


def write_partitions(directory: Path, clients: int, samples: int) -> tuple[list[Path], Path]:
    """One NPZ of `samples` digits per client, and the server's NPZ whose test split is every digit left."""
    x, y = digits_as_mnist()
    order = np.random.default_rng(0).permutation(len(y))
    assert clients * samples <= len(y) - 500, f"{clients} x {samples} digits leave too few to test on"
    parts = []
    for k in range(clients):
        parts.append(directory / f"part-{k}.npz")
        idx = order[k * samples : (k + 1) * samples]
        np.savez(parts[-1], x=x[idx], y=y[idx])
    server = directory / "server.npz"  # the server evaluates on the test split; one train example per client
    test = order[clients * samples :]
    np.savez(server, x_train=x[:clients], y_train=y[:clients], x_test=x[test], y_test=y[test])
    return parts, server


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    """One per test module: its processes live as long as the module's tests."""
    tools = E2E(tmp_path_factory.mktemp("logs"))
    yield tools
    tools.stop_all()
