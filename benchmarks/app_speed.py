#!/usr/bin/env python
"""How fast is `fedsim run --app` against Flower's Ray engine on the same Flower app? Whole commands.

    .venv/bin/python benchmarks/app_speed.py [--pytorch] [--app DIR] [--run-config 'key=value ...']
        [--num-supernodes N[,N...]] [--workers 1,auto] [--systems fedsim,ray] [--repeat N]

Each command runs in a fresh process, timed from start to exit: fedsim's `run --app DIR --quiet`
once per --workers value, and the app on Flower's Ray engine (tests/simulations/apps/flower_engine.py;
skipped, and said so, without Ray). The default app is tests/simulations/apps/quickstart_numpy;
--pytorch is examples/quickstart_pytorch (Flower's quickstart-pytorch on offline tensors) at 10
and 50 nodes with --workers 1,2,auto, plus a worker's start-up (a fresh interpreter loading the
ClientApp). Columns and targets: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from simulation_speed import NO_RAY, failure, run_measured  # noqa: E402

DEFAULT_APP = REPO / "tests" / "simulations" / "apps" / "quickstart_numpy"
PYTORCH_APP = REPO / "examples" / "quickstart_pytorch"
PYTORCH_NODES, PYTORCH_WORKERS = "10,50", "1,2,auto"
TIMING_FILE = "timing.json"  # simulations.apps.TIMING_FILE (not imported: this process stays light)
WORKERS_TARGET = 0.85  # --workers 2 / in process, wall, at the most nodes
RAY_TARGET = 1.5  # Flower on Ray / fedsim's fastest row, wall
STARTUP = "worker start-up"  # its row's name: a fresh interpreter loading the app's ClientApp
FLOWER_ENGINE = REPO / "tests" / "simulations" / "apps" / "flower_engine.py"
RESULT_KEY = "result-path"  # the run-config key where the default app saves its final arrays
TARGET = 3.0  # Ray / fedsim, whole command
SAMPLE_INTERVAL = 0.2  # seconds between memory samples: these commands take seconds
RAY = "Flower on Ray"  # its row's name


def app_takes_workers() -> bool:
    """Whether `fedsim run --app` accepts --workers (asked of fedsim's own argument check)."""
    from shared.errors import UsageError
    from simulations.cli import parse_args

    try:
        parse_args(["run", "--app", str(DEFAULT_APP), "--workers", "1"])
    except UsageError:
        return False
    return True


@dataclass(frozen=True)
class Command:
    """A measured command; fedsim's takes the run config as --run-config and an --output, the
    Flower engine script takes the run config as arguments and writes no output of its own."""

    argv: list[str]
    fedsim: bool

    def full(self, run_config: list[str], work: Path) -> list[str]:
        if self.fedsim:
            return [*self.argv, *(f"--run-config={rc}" for rc in run_config), "--output", str(work / "out")]
        return [*self.argv, *run_config]


def commands(args: argparse.Namespace, num_supernodes: int) -> dict[str, Command]:
    """Each measured command by its row's name (with --pytorch, a worker's start-up too)."""
    fedsim = [sys.executable, "-m", "simulations.cli", "run", "--app", str(args.app), "--quiet",
              "--num-supernodes", str(num_supernodes)]  # fmt: skip
    rows: dict[str, Command] = {}
    if "fedsim" in args.systems:
        if app_takes_workers():
            rows.update({f"fedsim --app --workers {w}": Command([*fedsim, "--workers", w], True) for w in args.workers})
        else:
            rows["fedsim --app (in process)"] = Command(fedsim, True)
    if "ray" in args.systems:
        rows[RAY] = Command([sys.executable, str(FLOWER_ENGINE), str(args.app), str(num_supernodes)], False)
    if args.pytorch:
        load = f"from pathlib import Path; from simulations.apps import load_flower_app as f; f(Path({str(args.app)!r}), [])"
        load += ".load_client_app()"
        rows[STARTUP] = Command([sys.executable, "-c", load], False)
    return rows


def run_once(command: Command, run_config: list[str], work: Path, saves_result: bool, timeout: float) -> dict[str, Any]:
    """One measured run of `command` in `work`: its wall time, its tree's peak RSS, its result file."""
    work.mkdir(parents=True)
    result_file = work / "final.npy"
    extra = [f"{RESULT_KEY}='{result_file}'"] if saves_result else []
    log_path = work / "command.log"
    rc, wall, sampler = run_measured(command.full([*run_config, *extra], work), log_path, timeout, SAMPLE_INTERVAL)
    if rc != 0:
        return {"error": failure(log_path, rc, timeout)}
    timing_file = work / "out" / TIMING_FILE
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    return {"wall_s": wall, "peak_mb": sampler.peak_rss_mb, "result": result_file if saves_result else None,
            "round_s": timing.get("seconds_per_round"), "workers": timing.get("workers")}  # fmt: skip


def same_result(result: dict[str, Any], ray: dict[str, Any]) -> str:
    """Whether a row's final arrays equal Ray's, as the results column says it."""
    import numpy as np

    files = [r.get("result") for r in (result, ray)]
    if not all(f is not None and f.exists() for f in files):
        return "-"
    return "same as Ray" if np.allclose(np.load(result["result"]), np.load(ray["result"])) else "DIFFERS"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", type=Path, default=DEFAULT_APP, help="a Flower app directory (default: %(default)s)")
    parser.add_argument("--run-config", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help="override the app's config, as `flwr run --run-config` (repeatable)")  # fmt: skip
    parser.add_argument("--num-supernodes", help="virtual nodes, one or a list (default: the app's federation)")
    parser.add_argument("--workers", default="1,auto", help="fedsim's --workers values, where --app takes them")
    parser.add_argument("--pytorch", action="store_true",
                        help=f"the PyTorch app ({PYTORCH_APP.relative_to(REPO)}) at {PYTORCH_NODES} nodes, "
                             f"--workers {PYTORCH_WORKERS}, with the targets for it")  # fmt: skip
    parser.add_argument("--systems", default="fedsim,ray", help="subset of fedsim,ray")
    parser.add_argument("--repeat", type=int, default=1, help="runs per command; the fastest is shown")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (outputs, logs)")
    args = parser.parse_args()
    if args.pytorch:
        args.app, args.workers = PYTORCH_APP, PYTORCH_WORKERS
        args.num_supernodes = args.num_supernodes or PYTORCH_NODES
    args.nodes = [int(n) for n in args.num_supernodes.split(",")] if args.num_supernodes else [None]
    args.systems = [s for s in args.systems.split(",") if s]
    args.workers = [w for w in args.workers.split(",") if w]
    unknown = set(args.systems) - {"fedsim", "ray"}
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; allowed: fedsim,ray")
    if "ray" in args.systems and importlib.util.find_spec("ray") is None:
        print(f"{RAY}: {NO_RAY}")
        args.systems.remove("ray")
    return args


def main() -> None:
    from simulations.apps import load_flower_app

    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flowerbed-app-bench-"))
    try:
        for nodes in args.nodes:
            app = load_flower_app(args.app, args.run_config, nodes)
            print(f"\nFlower app {app.directory}: {app.num_supernodes} SuperNodes, run config {app.run_config}; "
                  f"{os.cpu_count()} CPUs; whole commands, interpreter start included", flush=True)  # fmt: skip
            best = measure_all(args, commands(args, app.num_supernodes), RESULT_KEY in app.run_config, tmp / str(nodes))
            print_report(best)
            if args.pytorch:
                print_pytorch_targets(best, app.num_supernodes == max(args.nodes))
        if args.keep:
            print(f"kept {tmp}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def measure_all(
    args: argparse.Namespace, rows: dict[str, Command], saves_result: bool, work: Path
) -> dict[str, dict[str, Any]]:
    """Each command's fastest run of --repeat, the commands taking turns."""
    best: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeat):
        for k, (name, command) in enumerate(rows.items()):
            print(f"  run {repeat + 1}/{args.repeat}: {name} ...", flush=True, file=sys.stderr)
            result = run_once(command, args.run_config, work / f"{repeat}-{k}", saves_result, args.timeout)
            if name not in best or result.get("wall_s", float("inf")) < best[name].get("wall_s", float("inf")):
                best[name] = result
    return best


def print_report(best: dict[str, dict[str, Any]]) -> None:
    ray = best.get(RAY, {})
    print(f"\n{'command':<28} {'wall s':>8} {'s/round':>8} {'workers':>8} {'peak MB':>8} {'Ray/x':>8}  result")
    print("-" * 84)
    for name, result in best.items():
        if "error" in result:
            print(f"{name:<28} ERROR: {result['error']}")
            continue
        ray_x = f"{ray['wall_s'] / result['wall_s']:.2f}x" if "wall_s" in ray and name != STARTUP else "-"
        same = "(the reference)" if name == RAY else "-" if name == STARTUP else same_result(result, ray)
        per_round, workers = result.get("round_s"), result.get("workers")
        print(f"{name:<28} {result['wall_s']:>8.2f} {per_round if per_round is not None else '-':>8} "
              f"{workers if workers is not None else '-':>8} {result['peak_mb']:>8.0f} {ray_x:>8}  {same}")  # fmt: skip
    if STARTUP in best:
        return
    print(f"\ntarget: Flower on Ray / fedsim --app >= {TARGET:.1f}x, whole command")
    for name, result in best.items():
        if name != RAY:
            print("  " + verdict(name, result, ray))


def print_pytorch_targets(best: dict[str, dict[str, Any]], most_nodes: bool) -> None:
    """The PyTorch app's targets: --workers 2 against in process (at the most nodes), `auto` against
    in process plus a worker's start-up, Ray against fedsim's fastest row."""
    wall = {name: r["wall_s"] for name, r in best.items() if "wall_s" in r}
    one, two, auto = (wall.get(f"fedsim --app --workers {w}") for w in ("1", "2", "auto"))
    startup, ray = wall.get(STARTUP), wall.get(RAY)
    fastest = min((w for name, w in wall.items() if name.startswith("fedsim")), default=None)
    print("\ntargets:")
    if most_nodes:
        print("  " + check("--workers 2 / in process", two / one if one and two else None, "<=", WORKERS_TARGET))
    bound = (one + startup) / auto if one and auto and startup else None  # >= 1: auto within in process + start-up
    print("  " + check("(in process + worker start-up) / auto", bound, ">=", 1.0))
    print("  " + check("Flower on Ray / fedsim's fastest", ray / fastest if ray and fastest else None, ">=", RAY_TARGET))


def check(what: str, measured: float | None, sense: str, bound: float) -> str:
    if measured is None:
        return f"{what}: n/a (not measured in this run)"
    ok = measured <= bound if sense == "<=" else measured >= bound
    return f"{what}: {measured:.2f} (target {sense} {bound:.2f})  {'PASS' if ok else 'MISS'}"


def verdict(name: str, result: dict[str, Any], ray: dict[str, Any]) -> str:
    if "wall_s" not in result or "wall_s" not in ray:
        return f"{name}: n/a (not measured in this run)"
    measured = ray["wall_s"] / result["wall_s"]
    return f"{name}: {measured:.2f}x  {'PASS' if measured >= TARGET else 'MISS'}"


if __name__ == "__main__":
    main()
