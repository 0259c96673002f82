#!/usr/bin/env python
"""What does the live dashboard cost a run? The same fedsim run with and without it, side by side.

    .venv/bin/python benchmarks/dashboard_overhead.py [--repeats 5] [--rounds 30] [--set KEY=VALUE ...]

Each repetition runs `fedsim run` twice as child processes, in alternating order: once plain,
once with `--dashboard 127.0.0.1:PORT` while a client of this process polls the page's JSON
(/api/status, /api/rounds, /api/nodes) and /metrics every `--poll-seconds` (1 s; the page itself
polls every 2 s). The run is the embedded default federation (FedProx Synthetic(1,1), 30 clients)
with `--rounds` rounds and `workers = 1`, plus any `--set`.

Reported per run and as the median ratio with / without over the repetitions: the command's wall
time, the child's CPU time (user + system; the polling client's own CPU is not the run's and is
not counted), and the rounds' own time (summary.json's `wall_seconds`). On a shared machine these
differ by more from run to run than the dashboard costs, so the dashboard's own cost is also
measured directly: the CPU time of the thread serving it (`flowerbed_dashboard_cpu_seconds`, as
the client last scraped it) as a share of the run's wall time and of its CPU time. The last line
is one JSON object with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("api/status", "api/rounds", "api/nodes", "metrics")


@dataclass(frozen=True)
class Measured:
    wall: float  # s, the command
    cpu: float  # s, the child's user + system time
    rounds: float  # s, the rounds' own time (summary.json)
    polls: int  # requests the client made (0 without the dashboard)
    dashboard_cpu: float  # s, the serving thread's CPU time at the client's last scrape (0 without)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(url: str, every: float, stop: threading.Event, seen: dict[str, float]) -> None:
    """GET each of PATHS every `every` s until `stop` (the dashboard not yet up is no error);
    `seen` counts the requests and keeps the last `flowerbed_dashboard_cpu_seconds_total`."""
    while not stop.wait(every):
        for path in PATHS:
            try:
                with urllib.request.urlopen(url + path, timeout=5) as response:
                    body = response.read().decode()
            except OSError:
                continue
            seen["requests"] += 1
            for line in body.splitlines() if path == "metrics" else ():
                if line.startswith("flowerbed_dashboard_cpu_seconds_total "):
                    seen["cpu"] = float(line.split()[1])


def run_once(args: argparse.Namespace, work: Path, dashboard: bool) -> Measured:
    output = Path(tempfile.mkdtemp(dir=work))
    argv = [sys.executable, "-m", "simulations.cli", "run", "--quiet", "--output", str(output / "run"),
            "--set", f"rounds={args.rounds}", "--set", "workers=1", *[f"--set={s}" for s in args.set]]  # fmt: skip
    stop, seen, poller = threading.Event(), {"requests": 0, "cpu": 0.0}, None
    if dashboard:
        port = free_port()
        argv += ["--dashboard", str(port)]
        poller = threading.Thread(target=poll, args=(f"http://127.0.0.1:{port}/", args.poll_seconds, stop, seen))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONPATH": str(REPO)}
    errors = output / "stderr.txt"
    with errors.open("wb") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        if poller is not None:
            poller.start()
        _, status, usage = os.wait4(child.pid, 0)  # the child's own CPU time with its exit
        wall = time.perf_counter() - started
    stop.set()
    if poller is not None:
        poller.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"fedsim failed ({child.returncode}): {errors.read_text(errors='replace')}")
    summary = json.loads((output / "run" / "summary.json").read_text())
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(wall, cpu, summary["wall_seconds"], int(seen["requests"]), seen["cpu"])


def run_pair(args: argparse.Namespace, work: Path, order: tuple[bool, bool]) -> dict[bool, Measured]:
    """Both runs at once, the first of `order` started first: the machine's other load falls on both alike."""
    runs: dict[bool, Measured] = {}
    threads = [threading.Thread(target=lambda d=dashboard: runs.__setitem__(d, run_once(args, work, d))) for dashboard in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config key")
    parser.add_argument("--together", action="store_true", help="run each pair at the same time, not one after the other")
    args = parser.parse_args(argv)
    ratios: dict[str, list[float]] = {"wall": [], "cpu": [], "rounds": []}
    shares: dict[str, list[float]] = {"of_wall": [], "of_cpu": []}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            runs = run_pair(args, Path(work), order) if args.together else {
                dashboard: run_once(args, Path(work), dashboard) for dashboard in order}
            plain, shown = runs[False], runs[True]
            for key in ratios:
                ratios[key].append(getattr(shown, key) / getattr(plain, key))
            shares["of_wall"].append(shown.dashboard_cpu / shown.wall)
            shares["of_cpu"].append(shown.dashboard_cpu / shown.cpu)
            print(f"repeat {repeat + 1}: without {_line(plain)} | with {_line(shown)}, {shown.polls} requests, "
                  f"dashboard thread cpu {shown.dashboard_cpu:.3f} s", flush=True)  # fmt: skip
    medians = {f"{key}_ratio": round(statistics.median(values), 4) for key, values in ratios.items()}
    medians |= {f"dashboard_cpu_share_{key}": round(statistics.median(values), 5) for key, values in shares.items()}
    print(json.dumps({"repeats": args.repeats, "rounds": args.rounds, "poll_seconds": args.poll_seconds, **medians}))
    return 0


def _line(m: Measured) -> str:
    return f"wall {m.wall:.2f} s, cpu {m.cpu:.2f} s, rounds {m.rounds:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
