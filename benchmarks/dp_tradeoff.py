#!/usr/bin/env python
"""The privacy-utility trade-off: MNIST 2NN accuracy at epsilon 1, 2, 4, 8 and without DP.

    .venv/bin/python benchmarks/dp_tradeoff.py [--rounds R] [--epsilons 1,2,4,8,inf]
        [--modes central,local-sgd] [--clients 3000] [--out docs/img/dp_tradeoff.png]
        [--workers auto] [--jobs 1] [--set KEY=VALUE ...]

Workload: configs/mnist-dp.toml (3,000 IID clients x 20 MNIST examples, 100 a round, the 2NN),
every run of it a fresh `fedsim run` process, R rounds (default: the preset's). For each target
epsilon and mode the noise multiplier z is calibrated with dp-accounting's RDP accountant, by
bisection, as the smallest z (to 0.1 %) whose epsilon at delta = `dp-delta` stays at or under the target:

  central    client-level DP-FedAvg (`dp = "central"`, the preset's clipping norm): R releases of
             PoissonSampledDpEvent(q, GaussianDpEvent(z)), q = clients-per-round / --clients, as
             fedserver/privacy.py composes them; the run's `dp-target-epsilon` is the target.
  local-sgd  sample-level DP-SGD on each device (`dp = "local-sgd"`, per-example clipping norm
             --sample-clip): a client of n examples takes E * ceil(n/B) steps of
             PoissonSampledDpEvent(B/n, GaussianDpEvent(z)) in each round it trains in. How many
             rounds a client trains in is random (fedsim samples clients-per-round of --clients
             each round); z is calibrated for K rounds, the smallest K that fewer than half a client
             of the population is expected to pass (Binomial(R, q) tail times --clients). This is an
             approximation: the achieved column is the ledger's epsilon of the client that trained
             most (summary.json's `epsilon`), which may pass the target where a client passes K.

epsilon = inf is the same preset with `dp = "none"`: the non-private line, one run for both modes.

Printed, one row per run: the target epsilon, z, the achieved epsilon (summary.json), the final and
the best accuracy on the 10k MNIST test set (central evaluation after every round), and "eps
without amplification": the epsilon the same z would be accounted at without the sampling
amplification (GaussianDpEvent(z) composed R times for central: sampling probability 1, as an
accountant that knows no Poisson sampling, Flower's, reports it; K * E * ceil(n/B) times for
local-sgd), by the same RDP accountant at the same delta; and each run's wall time. Then how
far each private run's final accuracy is below the non-private one's. The PNG (--out) plots final
accuracy against the achieved epsilon, one line per mode, the non-private accuracy as a
horizontal line.

Runtime on the 2-core CPU machine of docs/benchmarks.md, measured 2026-12-07, two runs at a time
(--jobs 2 --workers 1): a central run of the preset (100 rounds) 157-195 s, the no-DP run 91 s,
`--modes central` 8 minutes in all; a local-sgd round about 20 s (Opacus computes 100 clients'
per-example gradients), so the defaults (both modes, 9 runs at the preset's 100 rounds) would take
hours there: docs/privacy.md#privacy-and-utility shows central at the full scale and local-sgd at
10 rounds only.

Needs MNIST at ../shared/datasets/mnist.npz beside the checkout (or --set data-path=FILE); exits
with a one-line message without it. Needs dp-accounting (the `server` extra), matplotlib, and for
local-sgd Opacus (the `opacus` extra).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PRESET = REPO / "configs" / "mnist-dp.toml"
MODES = ("central", "local-sgd")


@dataclass
class Run:
    mode: str  # central, local-sgd, none
    target: float  # inf for dp = none
    z: float
    no_amplification: float
    achieved: float | None = None
    final: float | None = None
    best: float | None = None
    rounds: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- accounting


def _accountant():  # noqa: ANN202 - dp_accounting's RdpAccountant
    import dp_accounting  # noqa: PLC0415
    from dp_accounting.rdp import RdpAccountant  # noqa: PLC0415

    logging.getLogger("absl").setLevel(logging.ERROR)  # its warning on large q leaves out orders; the bound holds
    return dp_accounting, RdpAccountant()


def central_epsilon(z: float, rounds: int, q: float, delta: float) -> float:
    """epsilon of `rounds` Poisson-sampled (q) Gaussian (z) releases, as PoissonAccountant composes them."""
    dp_accounting, accountant = _accountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(accountant.get_epsilon(delta))


def sample_epsilon(z: float, client_rounds: int, q: float, steps: int, delta: float) -> float:
    """A client's sample-level epsilon: `client_rounds` rounds of `steps` Poisson-sampled (q) Gaussian steps."""
    dp_accounting, accountant = _accountant()
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(step, client_rounds * steps)
    return float(accountant.get_epsilon(delta))


def gaussian_epsilon(z: float, releases: int, delta: float) -> float:
    """epsilon of `releases` Gaussian (z) releases without sampling amplification (q = 1)."""
    dp_accounting, accountant = _accountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), releases)
    return float(accountant.get_epsilon(delta))


def calibrate(epsilon_of, target: float, low: float = 0.05, high: float = 200.0) -> float:  # noqa: ANN001
    """The smallest z (relative precision 1e-3) with epsilon_of(z) <= target; epsilon falls as z grows."""
    if epsilon_of(high) > target:
        raise SystemExit(f"no noise multiplier up to {high} reaches epsilon {target:g}")
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if epsilon_of(middle) > target:
            low = middle
        else:
            high = middle
    return high


def busiest_client_rounds(rounds: int, q: float, clients: int) -> int:
    """The smallest K with clients * P(Binomial(rounds, q) > K) < 1/2: rounds the busiest client trains in, about."""
    tail, k = 1.0, 0
    pmf = (1 - q) ** rounds  # P(X = 0)
    while True:
        tail -= pmf  # P(X > k)
        if clients * tail < 0.5 or k >= rounds:
            return k
        k += 1
        pmf *= (rounds - k + 1) / k * q / (1 - q)


# ----------------------------------------------------------------------------- runs


def fedsim(overrides: list[str], output: Path, workers: str) -> tuple[dict, float, str]:
    """One `fedsim run` of the preset with `overrides`; its summary.json, wall seconds and command line."""
    command = [sys.executable, "-m", "simulations.cli", "run", str(PRESET), "--output", str(output), "--quiet"]
    command += ["--workers", workers]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)  # noqa: S603 - our own CLI
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"fedsim exited {done.returncode} ({' '.join(overrides)})")
    return json.loads((output / "summary.json").read_text()), seconds, "  $ fedsim run " + " ".join(command[4:])


def training_examples(data: Path) -> int:
    """MNIST's training examples: the NPZ's y_train, else the standard 60,000 (an IDX directory)."""
    if data.suffix == ".npz":
        import numpy as np  # noqa: PLC0415

        with np.load(data) as arrays:
            return int(arrays["y_train"].shape[0])
    return 60_000


def one_run(run: Run, output: Path, base: list[str], args: argparse.Namespace) -> str:
    """Runs `run` (fills in its results); its lines of the log: the command, the results."""
    if run.mode == "none":
        overrides = ["dp=none"]
    elif run.mode == "central":
        overrides = [f"dp-noise-multiplier={run.z!r}", f"dp-target-epsilon={run.target!r}"]
    else:
        overrides = ["dp=local-sgd", f"dp-clipping-norm={args.sample_clip!r}",
                     f"dp-noise-multiplier={run.z!r}", "dp-target-epsilon=0"]  # fmt: skip
    label = "inf" if math.isinf(run.target) else f"{run.target:g}"
    output = output.with_name(f"{output.name}-{run.mode}-eps{label}")
    summary, run.seconds, line = fedsim([*base, *overrides], output, args.workers)
    run.final, run.best = summary.get("final_accuracy"), summary.get("best_accuracy")
    run.rounds = int(summary.get("rounds") or 0)
    run.achieved = math.inf if run.mode == "none" else summary.get("epsilon")
    return line + "\n" + (f"  {run.mode} ε {label}: final {fmt(run.final, 4)}, best {fmt(run.best, 4)}, "
            f"ε {fmt(run.achieved)}, {run.rounds} rounds, {run.seconds:.0f} s")  # fmt: skip


def parse_epsilons(text: str) -> list[float]:
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    values = [math.inf if item in ("inf", "infinity", "none") else float(item) for item in items]
    if any(not value > 0 for value in values):
        raise SystemExit("--epsilons must be > 0 (inf = no DP)")
    return sorted(set(values))


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def plot(runs: list[Run], out: Path, title: str, delta: float) -> None:
    import matplotlib  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for mode, marker in (("central", "o"), ("local-sgd", "s")):
        points = sorted((r.achieved, r.final) for r in runs if r.mode == mode and r.final is not None)
        if points:
            label = "client-level (central)" if mode == "central" else "sample-level (local-sgd)"
            ax.plot(*zip(*points, strict=True), marker=marker, label=label)
            for r in runs:
                if r.mode == mode and r.final is not None:
                    where = (r.achieved, r.final)
                    ax.annotate(f"ε≤{r.target:g}", where, textcoords="offset points", xytext=(4, -10), fontsize=7)
    for r in runs:
        if r.mode == "none" and r.final is not None:
            ax.axhline(r.final, color="grey", linestyle="--", label=f"no DP ({r.final:.3f})")
    ax.set_xscale("log")
    ticks = sorted({r.achieved for r in runs if r.mode != "none" and r.achieved is not None})
    ax.set_xticks(ticks, [f"{tick:.3g}" for tick in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(f"ε achieved (δ = {delta:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0, help="rounds R of every run (default: the preset's)")
    parser.add_argument("--epsilons", default="1,2,4,8,inf", help="target epsilons; inf = dp none")
    parser.add_argument("--modes", default="central,local-sgd", help="central, local-sgd, or both")
    parser.add_argument("--clients", type=int, default=0, help="num-clients (default: the preset's 3000)")
    parser.add_argument("--sample-clip", type=float, default=1.0, help="local-sgd: per-example clipping norm")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "dp_tradeoff.png", help="the PNG")
    parser.add_argument("--workers", default="auto", help="fedsim --workers of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (e.g. 2 with --workers 1 on 2 cores)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset key in every run (e.g. lr=0.05)")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    from shared.config import load_config  # noqa: PLC0415

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    epsilons = parse_epsilons(args.epsilons)
    base = list(args.overrides)
    if args.rounds:
        base.append(f"rounds={args.rounds}")
    if args.clients:
        base.append(f"num-clients={args.clients}")
    cfg = load_config(PRESET, base)
    data = Path(cfg.data_path)
    if not data.exists():
        print(f"MNIST not found at {data} (put mnist.npz in ../shared/datasets, or --set data-path=FILE); nothing run")
        return 2
    rounds, clients, per_round, delta = cfg.rounds, cfg.num_clients, cfg.clients_per_round, cfg.dp_delta
    q = per_round / clients
    examples = training_examples(data) // clients  # an IID split: sizes differ by at most one
    sample_q = min(1.0, cfg.batch_size / examples)
    steps = cfg.local_epochs * -(-examples // cfg.batch_size)
    busiest = busiest_client_rounds(rounds, q, clients)
    local = (
        f" (local-sgd: per-example C = {args.sample_clip:g}, K = {busiest} rounds, {steps} steps a round, "
        f"q = {sample_q:g})" if "local-sgd" in modes else ""
    )
    print(
        f"MNIST 2NN, {clients} clients x {examples} examples, {per_round} a round (q = {q:.4g}), R = {rounds}, "
        f"E = {cfg.local_epochs}, B = {cfg.batch_size}, lr = {cfg.lr:g}, C = {cfg.dp_clipping_norm:g}{local}, "
        f"delta = {delta:g}; {datetime.date.today().isoformat()}",
        flush=True,
    )

    runs: list[Run] = []
    for mode in modes:
        for target in epsilons:
            if math.isinf(target):
                continue
            if mode == "central":
                z = calibrate(lambda z: central_epsilon(z, rounds, q, delta), target)
                runs.append(Run(mode, target, z, gaussian_epsilon(z, rounds, delta)))
            else:
                z = calibrate(lambda z: sample_epsilon(z, busiest, sample_q, steps, delta), target)
                runs.append(Run(mode, target, z, gaussian_epsilon(z, busiest * steps, delta)))
    if math.isinf(epsilons[-1]):
        runs.append(Run("none", math.inf, 0.0, math.inf))

    with tempfile.TemporaryDirectory(prefix="dp-tradeoff-") as scratch:
        where = args.runs_dir or Path(scratch)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for done in pool.map(lambda item: one_run(item[1], where / f"{item[0]:02d}", base, args), enumerate(runs)):
                print(done, flush=True)

    print()
    print("| mode | ε target | z | ε achieved | final accuracy | best accuracy | ε without amplification "
          "| rounds | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        mode = "no DP" if run.mode == "none" else run.mode
        print(
            f"| {mode} | {fmt(run.target, 0) if math.isinf(run.target) else f'{run.target:g}'} | "
            f"{fmt(run.z) if run.mode != 'none' else '-'} | {fmt(run.achieved, 2)} | {fmt(run.final, 4)} | "
            f"{fmt(run.best, 4)} | {fmt(run.no_amplification, 1) if run.mode != 'none' else '-'} | {run.rounds} | "
            f"{run.seconds:.0f} |"
        )
    plain = next((r.final for r in runs if r.mode == "none"), None)
    if plain is not None:
        for run in runs:
            if run.mode != "none" and run.final is not None:
                gap = 100 * (plain - run.final)
                side = "below" if gap >= 0 else "above"
                print(f"  {run.mode} ε ≤ {run.target:g}: final accuracy {abs(gap):.1f} points {side} no DP's")
    title = f"MNIST 2NN, {clients} clients x {examples}, {per_round}/round, R = {rounds}"
    plot(runs, args.out, title, delta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
