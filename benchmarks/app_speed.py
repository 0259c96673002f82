#!/usr/bin/env python
"""How fast is `fedsim run --app` against Flower's Ray engine on the same Flower app? Whole commands.

    .venv/bin/python benchmarks/app_speed.py [--app DIR] [--run-config 'key=value ...']
        [--num-supernodes N] [--workers 1,auto] [--systems fedsim,ray] [--repeat N]

The app (default tests/simulations/apps/quickstart_numpy: the shape of Flower's quickstart-numpy
example, 10 SuperNodes, 3 rounds of FedAvg on a 1x1 array, deterministic) runs, each command in a
fresh process and timed from its start to its exit, interpreter start-up and imports included:

  fedsim  `python -m simulations.cli run --app DIR --quiet` (the `fedsim` console script), once per
          --workers value where `fedsim run --app` takes --workers, else once in process;
  ray     `python tests/simulations/apps/flower_engine.py DIR N`: the app's ServerApp and ClientApp
          on Flower's simulation engine on Ray, as `flwr run` runs a local simulation (needs
          `pip install -e '.[ray]'`; skipped, and said so, without it).

Both get the same app, --run-config and --num-supernodes (default: the app's local-simulation
federation). Columns: "wall s" the whole command; "peak MB" the sampled (0.2 s) peak of the
summed RSS of the command's process tree (Ray's GCS, raylet and workers; fedsim's workers);
"Ray/x" Ray's wall time over this row's; "result" whether the app's final arrays (where its run
config has `result-path`, which the default app saves them to) equal Ray's. Target:
Ray / fedsim >= 3x, whole command. With --repeat N the commands run round-robin N times and each
keeps its fastest run.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    """Each measured command by its row's name."""
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
    return {"wall_s": wall, "peak_mb": sampler.peak_rss_mb, "result": result_file if saves_result else None}


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
    parser.add_argument("--num-supernodes", type=int, help="virtual nodes (default: the app's federation)")
    parser.add_argument("--workers", default="1,auto", help="fedsim's --workers values, where --app takes them")
    parser.add_argument("--systems", default="fedsim,ray", help="subset of fedsim,ray")
    parser.add_argument("--repeat", type=int, default=1, help="runs per command; the fastest is shown")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (outputs, logs)")
    args = parser.parse_args()
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
    app = load_flower_app(args.app, args.run_config, args.num_supernodes)
    rows = commands(args, app.num_supernodes)
    saves_result = RESULT_KEY in app.run_config
    print(f"Flower app {app.directory}: {app.num_supernodes} SuperNodes, run config {app.run_config}; "
          f"{os.cpu_count()} CPUs; whole commands, interpreter start included", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="flowerbed-app-bench-"))
    try:
        best: dict[str, dict[str, Any]] = {}
        for repeat in range(args.repeat):
            for k, (name, command) in enumerate(rows.items()):
                print(f"  run {repeat + 1}/{args.repeat}: {name} ...", flush=True, file=sys.stderr)
                result = run_once(command, args.run_config, tmp / f"{repeat}-{k}", saves_result, args.timeout)
                if name not in best or result.get("wall_s", float("inf")) < best[name].get("wall_s", float("inf")):
                    best[name] = result
        print_report(best)
        if args.keep:
            print(f"kept {tmp}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def print_report(best: dict[str, dict[str, Any]]) -> None:
    ray = best.get(RAY, {})
    print(f"\n{'command':<28} {'wall s':>8} {'peak MB':>8} {'Ray/x':>8}  result")
    print("-" * 66)
    for name, result in best.items():
        if "error" in result:
            print(f"{name:<28} ERROR: {result['error']}")
            continue
        ray_x = f"{ray['wall_s'] / result['wall_s']:.2f}x" if "wall_s" in ray else "-"
        same = "(the reference)" if name == RAY else same_result(result, ray)
        print(f"{name:<28} {result['wall_s']:>8.2f} {result['peak_mb']:>8.0f} {ray_x:>8}  {same}")
    print(f"\ntarget: Flower on Ray / fedsim --app >= {TARGET:.1f}x, whole command")
    for name, result in best.items():
        if name != RAY:
            print("  " + verdict(name, result, ray))


def verdict(name: str, result: dict[str, Any], ray: dict[str, Any]) -> str:
    if "wall_s" not in result or "wall_s" not in ray:
        return f"{name}: n/a (not measured in this run)"
    measured = ray["wall_s"] / result["wall_s"]
    return f"{name}: {measured:.2f}x  {'PASS' if measured >= TARGET else 'MISS'}"


if __name__ == "__main__":
    main()
