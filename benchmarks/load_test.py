#!/usr/bin/env python
"""Many clients on one machine: `fedserver start` and N `fedclient start` on 127.0.0.1, TLS on.

The clients here are the load: what one machine's worth of real devices costs. What the server
itself holds (hundreds of devices, emulated, the server's CPU and memory alone) is
benchmarks/fleet.py's.

    .venv/bin/python benchmarks/load_test.py [--clients 50] [--rounds 3] [--samples 100] [--db sqlite] [--batch 10]

Workload: the MNIST 2NN, FedAvg, every client every round, E = 1, B = 10, lr 0.1, `--samples`
images per client (the data and config of benchmarks/deployment_latency.py), the server
evaluating on 2000 held-out images. Training is a small part of a round: what is measured is
the platform's cost per client. Printed:

- start-up: seconds from starting the first client (once the server has submitted its run)
  until round 1 was recorded (all N connected, one round run), and the CPU seconds one client
  spent until then (mean over clients);
- seconds per round (the ServerApp's own `seconds` in metrics.jsonl);
- server peak memory: the highest summed RSS and PSS of the daemon's process tree
  (fedserver, flower-superlink, SuperExec, the ServerApp), sampled every 0.2 s;
- client memory: the highest of one client's tree (fedclient, flower-supernode, warm
  worker), and the summed PSS of all clients after the last round.

The clients start `--batch` at a time, each batch once the previous one has connected. All
50 at once on 2 cores (load average above 70) made some activations time out on the client
after the SuperLink had done them; the retry is then refused as "already online" (Flower's
code 2004, the same as for an unregistered key) for the node's 60 s online window, and
fedclient, past its 15 s grace for that code, gives up.

With `--db sqlite` (the default) and 50 clients on 2 cores at a load average near 35, the
ServerApp's push of round 1's messages failed with "database is locked" in the SuperLink and
no round started; `--db memory` completed (the figures in docs/benchmarks.md).

It stops early, stopping everything, if the machine's available memory falls below
MIN_AVAILABLE_MB while the clients start. Whatever was measured is printed even then.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from deployment_latency import MemoryPeak, _memory_kb, cpu_seconds, run_config, write_data  # noqa: E402

from fedclient.node import CONNECTED, node_env  # noqa: E402
from fedserver.checkpoints import read_metrics  # noqa: E402
from fedserver.state import StateDir  # noqa: E402
from shared.pki import init_pki  # noqa: E402
from shared.processes import descendants, free_port, spawn, stop_trees, wait_for_port  # noqa: E402

MIN_AVAILABLE_MB = 1500
TIMEOUT = 900.0  # seconds for all rounds


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def start_clients(
    work: Path, parts: list[Path], address: str, env: dict[str, str], batch: int
) -> list[subprocess.Popen[bytes]]:
    """Start the clients `batch` at a time, each batch once the previous one has connected."""
    clients: list[subprocess.Popen[bytes]] = []
    for k, part in enumerate(parts, start=1):
        if available_mb() < MIN_AVAILABLE_MB:
            raise RuntimeError(f"stopped at client {k}: less than {MIN_AVAILABLE_MB} MB of memory available")
        argv = [sys.executable, "-m", "fedclient.cli", "start", "--server", address, "--ca", str(work / "pki" / "ca.pem")]
        argv += ["--key", str(work / "pki" / "clients" / f"client-{k}.key"), "--data", str(part), "--device", "cpu"]
        with open(work / f"client-{k}.log", "ab") as log:
            clients.append(spawn(argv, env=env, stdout=log))
        if k % batch == 0 or k == len(parts):
            wait_connected(work, clients)
    return clients


def wait_connected(work: Path, clients: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 300
    for k, client in enumerate(clients, start=1):
        log = work / f"client-{k}.log"
        while CONNECTED not in log.read_text(errors="replace"):
            if client.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"client {k} did not connect; see {log}")
            time.sleep(0.2)


def wait_for_run(state: StateDir, daemon: subprocess.Popen[bytes], address: str) -> None:
    """Until the daemon has registered the node keys and submitted the run, as devices joining a
    running server find it (a node refused as unregistered in its first seconds gives up)."""
    if not wait_for_port("127.0.0.1", int(address.rsplit(":", 1)[1]), 60, alive=daemon):
        raise RuntimeError("fedserver did not start")
    deadline = time.monotonic() + 120
    while "submitted" not in (state.log.read_text() if state.log.exists() else ""):
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"fedserver submitted no run; see {state.log}")
        time.sleep(0.2)


def wait_for_rounds(state: StateDir, rounds: int, daemon: subprocess.Popen[bytes], deadline: float) -> None:
    while len(read_metrics(state.run_dir)) < rounds:
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"not {rounds} rounds; see {state.root}")
        time.sleep(0.2)


def tree_pss_mb(roots: list[int]) -> float:
    pids = set(roots).union(*(descendants(root) for root in roots))
    return sum(_memory_kb(pid, "Pss") for pid in pids) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100, help="training examples per client")
    parser.add_argument("--db", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--batch", type=int, default=10, help="clients started at a time, each batch once the last connected")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every process started, then exit
    with tempfile.TemporaryDirectory(prefix="flowerbed-load-") as tmp:
        run(Path(tmp), args)
    return 0


@dataclass
class Measures:
    """What was measured so far: printed even when the run stops early."""

    state: StateDir
    clients: int
    server: MemoryPeak
    client: MemoryPeak | None = None
    connected: float | None = None  # s from the first client started to the last connected
    startup: float | None = None  # s from the first client started to round 1 recorded
    startup_cpu: float | None = None  # CPU s per client until round 1
    clients_pss: float | None = None  # MB, all clients after the last round

    def report(self) -> None:
        rows = read_metrics(self.state.run_dir)
        print(f"all {self.clients} clients connected after: {_fmt(self.connected)} s")
        print(f"start-up: {_fmt(self.startup)} s until round 1 was recorded; "
              f"{_fmt(self.startup_cpu)} CPU s per client until then")  # fmt: skip
        print(f"rounds completed: {len(rows)}; s/round: " + " ".join(f"{row['seconds']:.1f}" for row in rows))
        print("accuracy: " + " ".join(f"{row['accuracy']:.3f}" for row in rows))
        print(f"server peak memory (fedserver + SuperLink + SuperExec + ServerApp): "
              f"{self.server.peak_rss / 1024:.0f} MB RSS, {self.server.peak_pss / 1024:.0f} MB PSS")  # fmt: skip
        if self.client is not None:
            print(f"client peak memory (one client's processes): {self.client.peak_rss / 1024:.0f} MB RSS, "
                  f"{self.client.peak_pss / 1024:.0f} MB PSS; all clients after the last round: "
                  f"{_fmt(self.clients_pss, '.0f')} MB PSS")  # fmt: skip


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def run(work: Path, args: argparse.Namespace) -> None:
    init_pki(work / "pki", clients=args.clients)
    parts, server_data, source = write_data(work, args.clients, args.samples)
    (work / "run.toml").write_text(run_config(server_data, args.clients, args.rounds).to_toml())
    print(f"{args.clients} clients x {args.samples} examples of {source}; 2NN, {args.rounds} rounds, TLS on, --db {args.db}")
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    env = {**node_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    address, state = f"127.0.0.1:{free_port()}", StateDir(work / "state")
    argv = [sys.executable, "-m", "fedserver.cli", "start", "--pki", str(work / "pki"), "--config", str(work / "run.toml")]
    argv += ["--state-dir", str(state.root), "--address", address, "--db", args.db]
    with open(work / "fedserver.log", "ab") as log:
        processes = [spawn(argv, env=env, stdout=log)]
    measures = Measures(state, args.clients, MemoryPeak([processes[0].pid]))
    measures.server.start()
    try:
        wait_for_run(state, processes[0], address)
        started = time.monotonic()
        clients = start_clients(work, parts, address, env, args.batch)
        measures.connected = time.monotonic() - started
        processes += clients
        measures.client = MemoryPeak([c.pid for c in clients])
        measures.client.start()
        deadline = time.monotonic() + TIMEOUT
        wait_for_rounds(state, 1, processes[0], deadline)
        measures.startup = time.monotonic() - started
        measures.startup_cpu = cpu_seconds([c.pid for c in clients]) / len(clients)
        wait_for_rounds(state, args.rounds, processes[0], deadline)
        measures.clients_pss = tree_pss_mb([c.pid for c in clients])
    finally:
        for peak in (measures.server, measures.client):
            if peak is not None:
                peak.stop()
        stop_trees(processes, grace=15.0)
        measures.report()


if __name__ == "__main__":
    sys.exit(main())
