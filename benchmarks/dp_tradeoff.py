#!/usr/bin/env python
"""The privacy-utility trade-off: MNIST 2NN accuracy at epsilon 1, 2, 4, 8 and without DP.

    .venv/bin/python benchmarks/dp_tradeoff.py [--rounds R] [--epsilons 1,2,4,8,inf]
        [--modes central,local-sgd] [--clients 3000] [--per-round 100] [--out docs/img/dp_tradeoff.png]
        [--results FILE] [--reuse central] [--workers auto] [--jobs 1] [--set KEY=VALUE ...]
        [--sample-clip C] [--sample-set KEY=VALUE ...]

Workload: configs/mnist-dp.toml (3,000 IID clients x 20 MNIST examples, 100 a round, the 2NN),
every run of it a fresh `fedsim run` process, R rounds (default: the preset's). Each mode is one
line of the picture, with its own settings (--set for every run, --sample-set and --sample-clip for
local-sgd's) and its own non-private twin (epsilon = inf: the same settings with `dp = "none"`).
For each target epsilon the noise multiplier z is calibrated with dp-accounting's RDP accountant,
by bisection, as the smallest z (to 0.1 %) whose epsilon at delta = `dp-delta` stays at or under
the target:

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

Printed, one row per run: the target epsilon, z, the achieved epsilon (summary.json), the final and
the best accuracy on the 10k MNIST test set (central evaluation after every round), how far the
final accuracy is below its twin's, and "eps without amplification": the epsilon the same z would
be accounted at without the sampling amplification (GaussianDpEvent(z) composed R times for
central: sampling probability 1, as an accountant that knows no Poisson sampling, Flower's, reports
it; K * E * ceil(n/B) times for local-sgd), by the same RDP accountant at the same delta; and each
run's wall time. The PNG (--out) plots final accuracy against the achieved epsilon, one line per
mode, each twin's accuracy as a horizontal line. Every run's figures, with each line's settings
and commands, go to --results (default: the PNG's name with .json); --reuse MODES reads those
modes' runs back from it instead of running them, so one line can be rerun alone.

Needs MNIST at ../shared/datasets/mnist.npz beside the checkout (or --set data-path=FILE); exits
with a one-line message without it. Needs dp-accounting (the `server` extra), matplotlib, and for
local-sgd Opacus (the `opacus` extra). Measured figures and runtimes: docs/privacy.md#privacy-and-utility.
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
    mode: str  # the line it is on: central or local-sgd
    target: float  # inf: the line's non-private twin (dp = none)
    z: float
    no_amplification: float
    achieved: float | None = None
    final: float | None = None
    best: float | None = None
    rounds: int = 0
    seconds: float | None = None
    command: str = ""

    @property
    def private(self) -> bool:
        return not math.isinf(self.target)


@dataclass
class Line:
    """One mode's settings: the --set items of all its runs, its config, how it is described."""

    mode: str
    overrides: list[str]
    cfg: object  # shared.config.RunConfig; None where the line is read back from --results
    header: str = ""  # the settings, one line
    title: str = ""  # the population, for the plot
    delta: float = 0.0
    runs: list[Run] | None = None


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
    shown = ["fedsim", "run", str(PRESET.relative_to(REPO)), *command[7:]]  # without the scratch --output
    return json.loads((output / "summary.json").read_text()), seconds, " ".join(shown)


def training_examples(data: Path) -> int:
    """MNIST's training examples: the NPZ's y_train, else the standard 60,000 (an IDX directory)."""
    if data.suffix == ".npz":
        import numpy as np  # noqa: PLC0415

        with np.load(data) as arrays:
            return int(arrays["y_train"].shape[0])
    return 60_000


def one_run(run: Run, output: Path, line: Line, workers: str) -> str:
    """Runs `run` (fills in its results); its lines of the log: the command, the results."""
    if not run.private:
        overrides = ["dp=none"]
    elif run.mode == "central":
        overrides = [f"dp-noise-multiplier={run.z!r}", f"dp-target-epsilon={run.target!r}"]
    else:
        overrides = [f"dp-noise-multiplier={run.z!r}"]
    label = "inf" if not run.private else f"{run.target:g}"
    output = output.with_name(f"{output.name}-{run.mode}-eps{label}")
    summary, run.seconds, run.command = fedsim([*line.overrides, *overrides], output, workers)
    run.final, run.best = summary.get("final_accuracy"), summary.get("best_accuracy")
    run.rounds = int(summary.get("rounds") or 0)
    run.achieved = summary.get("epsilon") if run.private else math.inf
    return "  $ " + run.command + "\n" + (f"  {run.mode} ε {label}: final {fmt(run.final, 4)}, "
            f"best {fmt(run.best, 4)}, ε {fmt(run.achieved)}, {run.rounds} rounds, {run.seconds:.0f} s")  # fmt: skip


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


LABELS = {"central": "client-level (central)", "local-sgd": "sample-level (local-sgd)"}
STYLES = {"central": ("o", "C0"), "local-sgd": ("s", "C1")}


def plot(lines: list[Line], out: Path, title: str, delta: float) -> None:
    import matplotlib  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ticks: set[float] = set()
    for line in lines:
        marker, colour = STYLES[line.mode]
        done = [r for r in line.runs or [] if r.final is not None]
        private = sorted((r for r in done if r.private and r.achieved is not None), key=lambda r: r.achieved)
        rounds = max((r.rounds for r in done), default=0)
        if private:
            ax.plot([r.achieved for r in private], [r.final for r in private], marker=marker, color=colour,
                    label=f"{LABELS[line.mode]}, R = {rounds}")  # fmt: skip
            for r in private:
                ax.annotate(f"ε≤{r.target:g}", (r.achieved, r.final), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)  # fmt: skip
            ticks |= {r.target for r in private}
        for r in done:
            if not r.private:
                ax.axhline(r.final, color=colour, linestyle="--", alpha=0.7,
                           label=f"{LABELS[line.mode].split()[0]}, its twin without DP ({r.final:.3f})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [f"{tick:g}" for tick in sorted(ticks)])  # the targets; the points sit at ε achieved
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(f"ε achieved (δ = {delta:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


# ----------------------------------------------------------------------------- lines, results


def make_line(mode: str, args: argparse.Namespace) -> Line:
    """`mode`'s settings: the preset with --rounds, --clients, --per-round, --set (and local-sgd's own)."""
    from shared.config import load_config  # noqa: PLC0415

    overrides = list(args.overrides)
    for flag, key in ((args.rounds, "rounds"), (args.clients, "num-clients"), (args.per_round, "clients-per-round")):
        if flag:
            overrides.append(f"{key}={flag}")
    if mode == "local-sgd":
        overrides += ["dp=local-sgd", "dp-target-epsilon=0", f"dp-clipping-norm={args.sample_clip!r}"]
        overrides += args.sample_overrides
    return Line(mode, overrides, load_config(PRESET, overrides))


def plan(line: Line, epsilons: list[float], examples: int) -> None:
    """The line's runs, z calibrated for each target; its header (the settings, as printed)."""
    cfg = line.cfg
    rounds, clients, q, delta = cfg.rounds, cfg.num_clients, cfg.clients_per_round / cfg.num_clients, cfg.dp_delta
    line.header = (
        f"{line.mode}: MNIST 2NN, {clients} clients x {examples} examples, {cfg.clients_per_round} a round "
        f"(q = {q:.4g}), R = {rounds}, E = {cfg.local_epochs}, B = {cfg.batch_size}, lr = {cfg.lr:g}, "
        f"C = {cfg.dp_clipping_norm:g}, delta = {delta:g}"
    )
    line.title = f"MNIST 2NN, {clients} clients x {examples}, {cfg.clients_per_round}/round"
    line.delta, line.runs = delta, []
    if line.mode == "local-sgd":
        from shared.privacy_local import sampling  # noqa: PLC0415

        sample_q, steps = sampling(examples, cfg.batch_size, cfg.local_epochs)  # as the server's ledger
        busiest = busiest_client_rounds(rounds, q, clients)
        line.header += f" (per example; K = {busiest} rounds, {steps} steps a round, q = {sample_q:g})"
    for target in epsilons:
        if math.isinf(target):
            line.runs.append(Run(line.mode, math.inf, 0.0, math.inf))
        elif line.mode == "central":
            z = calibrate(lambda z: central_epsilon(z, rounds, q, delta), target)
            line.runs.append(Run(line.mode, target, z, gaussian_epsilon(z, rounds, delta)))
        else:
            z = calibrate(lambda z: sample_epsilon(z, busiest, sample_q, steps, delta), target)
            line.runs.append(Run(line.mode, target, z, gaussian_epsilon(z, busiest * steps, delta)))
    line.header += f"; {datetime.date.today().isoformat()}"


def _number(value: float | None) -> float | str | None:
    return "inf" if value is not None and math.isinf(value) else value


def save_results(path: Path, lines: list[Line]) -> None:
    """Every line's header and runs, as JSON (inf as "inf"); `load_line` reads a line back."""
    rows = {
        line.mode: {"header": line.header, "title": line.title, "delta": line.delta, "overrides": line.overrides,
                    "runs": [{key: _number(value) if isinstance(value, float) else value
                              for key, value in vars(run).items()} for run in line.runs or []]}  # fmt: skip
        for line in lines
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_line(path: Path, mode: str) -> Line:
    """`mode`'s line as `save_results` wrote it to `path`."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))[mode]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"--reuse {mode}: no {mode} runs in {path} ({type(err).__name__}: {err})") from err
    floats = ("target", "z", "no_amplification", "achieved", "final", "best", "seconds")
    runs = [Run(**{key: float(value) if key in floats and value is not None else value for key, value in row.items()})
            for row in saved["runs"]]  # fmt: skip
    return Line(mode, saved["overrides"], None, saved["header"], saved["title"], float(saved["delta"]), runs)


def below(twin: float, final: float) -> str:
    """How far `final` is below `twin`, in points of accuracy ("above" where it is not)."""
    gap = 100 * (twin - final)
    return f"{gap:.1f} points" if gap >= 0 else f"{-gap:.1f} points above"


def print_table(lines: list[Line]) -> None:
    print("| mode | ε target | z | ε achieved | final accuracy | best accuracy | below its twin (final) "
          "| ε without amplification | rounds | wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        twin = next((r.final for r in line.runs or [] if not r.private), None)
        for run in line.runs or []:
            gap = "-" if twin is None or run.final is None or not run.private else below(twin, run.final)
            print(
                f"| {line.mode if run.private else line.mode + ', dp none'} | "
                f"{f'{run.target:g}' if run.private else '∞'} | {fmt(run.z) if run.private else '-'} | "
                f"{fmt(run.achieved, 2)} | {fmt(run.final, 4)} | {fmt(run.best, 4)} | {gap} | "
                f"{fmt(run.no_amplification, 1) if run.private else '-'} | {run.rounds} | "
                f"{'-' if run.seconds is None else f'{run.seconds:.0f}'} |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0, help="rounds R of every run (default: the preset's)")
    parser.add_argument("--epsilons", default="1,2,4,8,inf", help="target epsilons; inf = the twin, dp none")
    parser.add_argument("--modes", default="central,local-sgd", help="central, local-sgd, or both")
    parser.add_argument("--clients", type=int, default=0, help="num-clients (default: the preset's 3000)")
    parser.add_argument("--per-round", type=int, default=0, help="clients-per-round (default: the preset's 100)")
    parser.add_argument("--sample-clip", type=float, default=1.0, help="local-sgd: per-example clipping norm")
    parser.add_argument("--sample-set", dest="sample_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset key in local-sgd's runs and its twin (e.g. lr=2.0)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "dp_tradeoff.png", help="the PNG")
    parser.add_argument("--results", type=Path, default=None, help="every run's figures (default: --out as .json)")
    parser.add_argument("--reuse", default="", help="modes read back from --results instead of run (e.g. central)")
    parser.add_argument("--workers", default="auto", help="fedsim --workers of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (e.g. 2 with --workers 1 on 2 cores)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset key in every run (e.g. lr=0.05)")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    reuse = {m.strip() for m in args.reuse.split(",") if m.strip()}
    if unknown := (set(modes) | reuse) - set(MODES):
        raise SystemExit(f"--modes/--reuse: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    results = args.results or args.out.with_suffix(".json")
    epsilons = parse_epsilons(args.epsilons)
    lines = [load_line(results, mode) if mode in reuse else make_line(mode, args) for mode in modes]
    fresh = [line for line in lines if line.mode not in reuse]
    if fresh:
        data = Path(fresh[0].cfg.data_path)
        if not data.exists():
            print(f"MNIST not found at {data} (put mnist.npz in ../shared/datasets, or --set data-path=FILE); nothing run")
            return 2
        for line in fresh:
            plan(line, epsilons, training_examples(data) // line.cfg.num_clients)  # an IID split
    for line in lines:
        print(line.header + (f" (read back from {results})" if line.mode in reuse else ""), flush=True)
    todo = [(line, run) for line in fresh for run in line.runs or []]
    with tempfile.TemporaryDirectory(prefix="dp-tradeoff-") as scratch:
        where = args.runs_dir or Path(scratch)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for done in pool.map(lambda item: one_run(item[1][1], where / f"{item[0]:02d}", item[1][0], args.workers),
                                 enumerate(todo)):  # fmt: skip
                print(done, flush=True)
    print()
    print_table(lines)
    save_results(results, lines)
    plot(lines, args.out, lines[0].title, lines[0].delta)
    print(f"wrote {args.out} and {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
