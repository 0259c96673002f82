#!/usr/bin/env python
"""Round latency of a TLS deployment on this machine: stock Flower and Flowerbed, side by side.

    .venv/bin/python benchmarks/deployment_latency.py [--rounds 5] [--clients 3] [--samples 600]

Workload: the MNIST 2NN (784-200-200-10), FedAvg, every client every round, E = 1, B = 10,
lr 0.1; each client trains on its own NPZ of `--samples` MNIST images (a subset of
../shared/datasets/mnist.npz where it exists, else random MNIST-shaped data), the server
evaluates on 2000 held-out images after every round. Everything on 127.0.0.1, with TLS and
SuperNode authentication, in a temporary directory. Each system after the other:

  stock      `flower-superlink` and `flower-supernode` with Flower's defaults (a fresh
             `flwr-clientapp` process per message) and the ServerApp on Flower's own grid
             (FLOWERBED_GRID_POLL_INTERVAL=0: replies pulled every 3 s);
  flowerbed  `fedserver start` and `fedclient start` (warm worker, `fast_polling` grid),
             with the SuperLink's state in SQLite (the default) and with `--db memory`.

All run the same staged app. "s/round" is the ServerApp's own measure of each round
(`seconds` in metrics.jsonl: sending, local training, replies, aggregation, evaluation);
round 1 also waits for the nodes to connect, so the summary is over rounds 2..N. "CPU s"
is the CPU time all of a system's processes (server and clients) spent per round, rounds
2..N: unlike wall time, it does not grow when other programs load the machine.
"Peak client memory" is the highest, over clients and time (sampled every 0.2 s), of the
summed memory of one client's processes (fedclient, flower-supernode, its SuperExec,
worker or flwr-clientapp): RSS (shared pages counted in each process) and PSS (shared
pages split between the processes sharing them).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from fedclient.node import NodeOptions, node_env, supernode_argv  # noqa: E402
from fedserver.checkpoints import read_metrics  # noqa: E402
from fedserver.control import ControlClient  # noqa: E402
from fedserver.daemon import Pki, flower_env, superexec_argv, superlink_argv  # noqa: E402
from shared.files import write_secret  # noqa: E402
from fedserver.polling import ENV_INTERVAL  # noqa: E402
from fedserver.staging import stage_app  # noqa: E402
from fedserver.state import StateDir  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.pki import init_pki  # noqa: E402
from shared.processes import descendants, free_port, spawn, stop_tree, wait_for_port  # noqa: E402

MNIST = Path(os.environ.get("FLOWERBED_DATASETS", REPO.parent / "shared" / "datasets")) / "mnist.npz"
TEST_SIZE = 2000
TIMEOUT = 600.0  # seconds one system may take for all its rounds
RUN_CHECK_SECONDS = 2.0  # how often the benchmark asks the SuperLink whether the run failed
# Every client shares this machine's cores: one torch thread each, as docs/deploy.md says of a shared device.
CLIENT_ENV = {"OMP_NUM_THREADS": "1"}


@dataclass
class Result:
    system: str
    seconds: list[float] = field(default_factory=list)  # per round
    cpu_per_round: float = 0.0  # CPU seconds of every process of the system, rounds 2..N
    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0

    def summary(self) -> str:
        later = self.seconds[1:] or self.seconds
        per_round = " ".join(f"{s:5.1f}" for s in self.seconds)
        return (
            f"{self.system:<23} {statistics.median(later):7.2f} {statistics.mean(later):7.2f} {max(later):7.2f}"
            f" {self.cpu_per_round:8.2f}   {self.peak_rss_mb:6.0f} {self.peak_pss_mb:6.0f}   {per_round}"
        )


def cpu_seconds(roots: list[int]) -> float:
    """User + system CPU of the roots' process trees, their reaped children's included."""
    ticks = 0
    for pid in set(roots).union(*(descendants(root) for root in roots)):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class MemoryPeak(threading.Thread):
    """Samples the summed RSS and PSS of each root's process tree; keeps the highest."""

    def __init__(self, roots: list[int], every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.roots, self.every = roots, every
        self.peak_rss = self.peak_pss = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            for root in self.roots:
                pids = {root} | descendants(root)
                self.peak_rss = max(self.peak_rss, sum(_memory_kb(p, "Rss") for p in pids))
                self.peak_pss = max(self.peak_pss, sum(_memory_kb(p, "Pss") for p in pids))

    def stop(self) -> None:
        self._done.set()
        self.join()


def _memory_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def write_data(directory: Path, clients: int, samples: int) -> tuple[list[Path], Path, str]:
    """One NPZ per client and the server's test NPZ; real MNIST where available."""
    rng = np.random.default_rng(0)
    if MNIST.exists():
        with np.load(MNIST) as mnist:
            x, y, x_test, y_test = mnist["x_train"], mnist["y_train"], mnist["x_test"], mnist["y_test"]
        source = f"MNIST subset ({MNIST})"
    else:
        x = rng.integers(0, 256, (clients * samples, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, clients * samples).astype(np.uint8)
        x_test, y_test = x[:TEST_SIZE], y[:TEST_SIZE]
        source = "random MNIST-shaped data (no ../shared/datasets/mnist.npz)"
    order = rng.permutation(len(y))
    parts = []
    for k in range(clients):
        idx = order[k * samples : (k + 1) * samples]
        parts.append(directory / f"client-{k + 1}.npz")
        np.savez(parts[-1], x=x[idx], y=y[idx])
    server = directory / "server.npz"
    # The server reads only the test split; a train split of one example per client keeps it valid.
    test = rng.permutation(len(y_test))[:TEST_SIZE]  # a random subset: the NPZ's test split is sorted by label
    np.savez(server, x_train=x[:clients], y_train=y[:clients], x_test=x_test[test], y_test=y_test[test])
    return parts, server, source


def run_config(server_data: Path, clients: int, rounds: int) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "dataset": "mnist", "data-path": str(server_data), "model": "2nn", "num-clients": clients,
            "clients-per-round": clients, "rounds": rounds, "local-epochs": 1, "batch-size": 10, "lr": 0.1,
            "device": "cpu",
        }
    )  # fmt: skip


def run_stock(work: Path, pki: Pki, parts: list[Path], cfg: RunConfig) -> Result:
    """Flower's own SuperLink and SuperNodes, default isolation, Flower's grid polling."""
    state = StateDir(work / "stock")
    state.create()
    cfg = cfg.replace(run_dir=str(state.run_dir))
    stage_app(state.app, cfg)
    port = free_port()
    env = {**flower_env(state), ENV_INTERVAL: "0"}
    write_secret(state.superexec_secret)  # the SuperLink's Runtime API takes the ServerApp's task only from its SuperExec
    superlink_log = open(state.superlink_log, "ab")  # noqa: SIM115 - the children write to it
    processes = [spawn(superlink_argv(pki, "127.0.0.1", port, state), env=env, stdout=superlink_log)]
    try:
        if not wait_for_port("127.0.0.1", port, 60, alive=processes[0]):
            raise RuntimeError(f"stock SuperLink did not start; see {state.superlink_log}")
        superexec = superexec_argv(pki, f"127.0.0.1:{port}", state, processes[0].pid)
        processes.append(spawn(superexec, env=env, stdout=superlink_log))
        with ControlClient(f"127.0.0.1:{port}", pki.ca) as control:
            for key in pki.client_keys:
                control.register_node(key)
            control.start_run(state.app)
        log = open(work / "stock-nodes.log", "ab")  # noqa: SIM115
        for k, part in enumerate(parts):
            options = NodeOptions(f"127.0.0.1:{port}", pki.ca, _private_key(pki, k), part, "cpu", "subprocess")
            processes.append(spawn(supernode_argv(options, free_port()), env={**node_env(), **CLIENT_ENV}, stdout=log))
        return _measure("stock", state, processes, cfg.rounds, ControlClient(f"127.0.0.1:{port}", pki.ca))
    finally:
        for process in reversed(processes):
            stop_tree(process, 10.0)


def run_flowerbed(work: Path, pki: Pki, parts: list[Path], cfg: RunConfig, db: str) -> Result:
    """`fedserver start --db DB` and `fedclient start` as a user runs them."""
    system = "flowerbed" if db == "sqlite" else f"flowerbed, --db {db}"
    config = work / "run.toml"
    config.write_text(cfg.to_toml())
    state = StateDir(work / f"flowerbed-{db}")
    port = free_port()
    python = [sys.executable, "-m"]
    env = {**node_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(work / "flowerbed.log", "ab")  # noqa: SIM115
    daemon = [*python, "fedserver.cli", "start", "--pki", str(pki.ca.parent), "--config", str(config)]
    daemon += ["--state-dir", str(state.root), "--address", f"127.0.0.1:{port}", "--db", db, "--dashboard", "0"]
    processes = [spawn(daemon, env=env, stdout=log)]
    try:
        if not wait_for_port("127.0.0.1", port, 60, alive=processes[0]):
            raise RuntimeError(f"fedserver did not start; see {work / 'flowerbed.log'}")
        for k, part in enumerate(parts):
            client = [*python, "fedclient.cli", "start", "--server", f"127.0.0.1:{port}", "--ca", str(pki.ca)]
            client += ["--key", str(_private_key(pki, k)), "--data", str(part), "--device", "cpu"]
            processes.append(spawn(client, env={**env, **CLIENT_ENV}, stdout=log))
        return _measure(system, state, processes, cfg.rounds, ControlClient(f"127.0.0.1:{port}", pki.ca))
    finally:
        for process in reversed(processes):
            stop_tree(process, 15.0)


def _measure(
    system: str, state: StateDir, processes: list[subprocess.Popen[bytes]], rounds: int, control: ControlClient
) -> Result:
    """Wait for every round; `processes` are the server's first, then one per client."""
    memory = MemoryPeak([c.pid for c in processes[1:]])
    memory.start()
    roots = [p.pid for p in processes]
    try:
        _wait_for_rounds(system, state, 1, control)
        cpu_start = cpu_seconds(roots)
        _wait_for_rounds(system, state, rounds, control)
        cpu = (cpu_seconds(roots) - cpu_start) / max(rounds - 1, 1)
    finally:
        memory.stop()
        control.close()
    rows = read_metrics(state.run_dir)
    return Result(system, [float(r["seconds"]) for r in rows], cpu, memory.peak_rss / 1024, memory.peak_pss / 1024)


def _wait_for_rounds(system: str, state: StateDir, rounds: int, control: ControlClient) -> None:
    """Wait until `rounds` rows are in metrics.jsonl (read every 0.2 s); fail on a failed run.

    The run's status is asked for only every RUN_CHECK_SECONDS: each ListRuns is a database
    query for the SuperLink that is being measured.
    """
    deadline = time.monotonic() + TIMEOUT
    next_check = 0.0
    while len(read_metrics(state.run_dir)) < rounds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system}: not {rounds} rounds in {TIMEOUT:.0f} s; see {state.root}")
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + RUN_CHECK_SECONDS
            failed = [r for r in control.list_runs() if r.status.endswith("failed")]
            if failed:
                raise RuntimeError(f"{system}: run {failed[0].run_id} failed: {failed[0].details}")
        time.sleep(0.2)


def _private_key(pki: Pki, k: int) -> Path:
    return pki.client_keys[k].with_suffix(".key")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--samples", type=int, default=600, help="training examples per client")
    parser.add_argument(
        "--systems", default="stock,sqlite,memory", help="a subset of stock, sqlite, memory (Flowerbed's --db)"
    )
    parser.add_argument("--keep", type=Path, help="work in this directory and keep its logs and state (default: a temporary one)")
    args = parser.parse_args()
    systems = args.systems.split(",")
    if not systems or set(systems) - {"stock", "sqlite", "memory"}:
        parser.error(f"--systems: choose from stock, sqlite, memory, got {args.systems!r}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every process started, then exit
    with tempfile.TemporaryDirectory(prefix="flowerbed-latency-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        init_pki(work / "pki", clients=args.clients)
        pki = Pki.load(work / "pki")
        parts, server_data, source = write_data(work, args.clients, args.samples)
        cfg = run_config(server_data, args.clients, args.rounds)
        print(f"{args.clients} clients x {args.samples} examples of {source}; 2NN, {args.rounds} rounds, TLS on")
        print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}", flush=True)
        results = [run_stock(work, pki, parts, cfg)] if "stock" in systems else []
        results += [run_flowerbed(work, pki, parts, cfg, db) for db in ("sqlite", "memory") if db in systems]
    print(f"\n{'system':<23} {'median':>7} {'mean':>7} {'max':>7} {'CPU s':>8}   {'RSS MB':>6} {'PSS MB':>6}   s/round, rounds 1..N")
    print(f"{'':<23} {'s/round, rounds 2..N (CPU: all processes)':>41}   {'peak client memory':>13}")
    for result in results:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
