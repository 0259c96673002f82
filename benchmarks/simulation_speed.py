#!/usr/bin/env python
"""How fast is fedsim? MNIST-2NN FedAvg against a bare PyTorch loop and Flower's Ray simulation.

    .venv/bin/python benchmarks/simulation_speed.py [--rounds 10] [--quick] [--repeat N]
        [--systems floor,floor-plain,fedsim,fedsim-vec,ray] [--workers 1,auto] [--device cpu|cuda]

Workload (McMahan et al. 2017, MNIST 2NN, IID): 100 clients x 600 examples, E = 1, B = 10,
SGD lr 0.1, central evaluation on the 10k test set after every round; once with 10 and once
with 100 clients per round. MNIST is read from ../shared/datasets/mnist.npz (relative to the
repository) when present, else a synthetic stand-in of the same shapes is written to a temp NPZ.
Systems, each configuration in a fresh subprocess:

  floor       a plain single-process PyTorch loop: the same model (shared.recipe), the same sampled
              clients, shuffles, SGD steps, weighted average and evaluation; no Flower at all;
  floor-plain the floor with fedsim's SGD step (shared.task.PlainSGD) instead of torch.optim.SGD:
              the same weights, without torch.optim's per-step and first-use (torch._dynamo) costs;
  fedsim      simulations.engine.run_simulation, vectorized = "off", once per --workers value
              (`1`: the clients in the process; `auto`: one worker process per core);
  fedsim-vec  the same with vectorized = "on" (where simulations.vectorized provides a batch runner);
  ray         Flower's own simulation runtime on Ray (needs `pip install -e '.[ray]'`; skipped, and
              said so, without it), running the same ServerApp (fedserver.app:app) and ClientApp
              (fedclient.app:app), 100 SuperNodes, 1 CPU a client, through
              simulations.ray_engine.run_on_ray_engine (the entry `flwr run`'s simulation process uses).

--device cuda runs all of them on the GPU: the floor and fedsim with device = "cuda" (give
--workers 1,2,4 for workers per GPU; fedsim and fedsim-vec for the vectorized path off and on),
Ray with --ray-gpus of a GPU per ClientApp (default 0.25: four share a GPU). Without CUDA it stops
with a one-line error.

Columns: "wall s" is the whole run call in its process (data loading, setup, every round, run
directory writes, fedsim's plot and worker processes, Ray's start and stop), without interpreter
start-up and imports; "CPU s" the process's user + system time over the same span, with its
reaped children (fedsim's workers; Ray: the driver and what it reaps, not its workers, marked *);
"s/round" the mean round (training + central evaluation) as the ServerApp records it (`seconds`
in metrics.jsonl) or, for the floor, as measured around the same work; "steady" the median of
rounds 2.. ; "peak MB" the peak RSS of the whole process tree (the sampled sum over the process
and its descendants from /proc, at least the process's own exact peak, VmHWM); "x floor" wall
time over the floor's; "Ray/x" Ray's wall time over this row's. Below the table, the targets
(set for a 2-core CPU machine) next to the measured ratios, PASS or MISS.
With --repeat N the configurations run round-robin N times and each keeps its fastest run.
The `--app` comparison (a Flower app directory, whole commands) is benchmarks/app_speed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.processes import descendants  # noqa: E402 - stdlib only: the children's import timing is unaffected

MNIST_NPZ = REPO.parent / "shared" / "datasets" / "mnist.npz"
NUM_CLIENTS = 100
FIRST_NODE_ID = 1001  # simulations.grid.FIRST_NODE_ID: node id = FIRST_NODE_ID + partition id
SYSTEMS = ("floor", "floor-plain", "fedsim", "fedsim-vec", "ray")
FEDSIM = ("fedsim", "fedsim-vec")  # run once per --workers value: the table's row "fedsim:auto"
LABELS = {
    "floor": "floor: plain PyTorch loop",
    "floor-plain": "floor, fedsim's SGD step",
    "fedsim": "fedsim",
    "fedsim-vec": "fedsim vectorized",
    "ray": "Flower on Ray",
}
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
NO_RAY = "skipped: Ray is not installed here (pip install -e '.[ray]')"
# The targets, set for a 2-core CPU machine: (clients a round, measure, row / against, bound).
TARGETS = (
    (100, "wall", "fedsim:1", "floor", "<=", 1.10),
    (100, "wall", "fedsim:auto", "floor", "<=", 0.65),
    (100, "wall", "ray", "fedsim:auto", ">=", 1.8),
    (10, "wall", "ray", "fedsim:auto", ">=", 3.0),
    (100, "peak MB", "fedsim:auto", "ray", "<=", 0.5),
    (10, "peak MB", "fedsim:auto", "ray", "<=", 0.5),
    (100, "peak PSS MB", "fedsim:auto", "ray", "<=", 0.5),
    (10, "peak PSS MB", "fedsim:auto", "ray", "<=", 0.5),
    (100, "wall", "fedsim:auto", "floor-plain", "<=", 0.65),
)


# ----------------------------------------------------------------------------- configuration


def run_config(
    data_path: str, per_round: int, rounds: int, vectorized: str = "off", workers: str = "1", device: str = "cpu"
) -> Any:
    from shared.config import RunConfig

    return RunConfig(
        dataset="mnist",
        data_path=data_path,
        partition="iid",
        model="2nn",
        num_clients=NUM_CLIENTS,
        clients_per_round=per_round,
        rounds=rounds,
        local_epochs=1,
        batch_size=10,
        lr=0.1,
        optimizer="sgd",
        strategy="fedavg",
        seed=0,
        device=device,
        torch_threads=1,
        vectorized=vectorized,
        workers=workers,
    )


def write_stand_in(path: Path) -> None:
    """A learnable synthetic MNIST of the same shapes and dtypes (class prototypes plus noise)."""
    import numpy as np

    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0, 255, size=(10, 28, 28))  # (10, 28, 28)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n).astype(np.uint8)  # (n,)
        x = 128 + 0.15 * (prototypes[y] - 128) + rng.normal(0, 70, size=(n, 28, 28))  # (n, 28, 28); faint classes
        return np.clip(x, 0, 255).astype(np.uint8), y

    x_train, y_train = split(60_000)
    x_test, y_test = split(10_000)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


# ----------------------------------------------------------------------------- the systems
# Each runs inside a child process and returns a result dict; wall time excludes imports.


def bare_local_training(model: Any, x: Any, y: Any, cfg: Any, seed: int, plain: bool = False) -> None:
    """The floor's local training: plain SGD over shuffled batches, nothing else."""
    import torch
    import torch.nn.functional as F

    model.train()
    if plain:  # fedsim's step (bit-identical weights) without torch.optim's per-step and first-use costs
        from shared.task import PlainSGD

        opt: Any = PlainSGD(list(model.parameters()), lr=cfg.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(y), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def child_floor(spec: dict[str, Any], plain: bool = False) -> dict[str, Any]:
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F

    from shared.data.federation import DataSpec
    from shared.recipe import model_from_config

    cfg = run_config(spec["data"], spec["per_round"], spec["rounds"], device=spec["device"])
    torch.set_num_threads(cfg.torch_threads)  # fedsim's default torch-threads = 1
    started, cpu = time.perf_counter(), cpu_seconds()

    # Data: the whole training set as float32 once; IID split as shared.data.partition.iid does it.
    with np.load(cfg.data_path) as f:
        x_train = torch.from_numpy(f["x_train"].reshape(60_000, -1).astype(np.float32) / 255.0)  # (60000, 784)
        y_train = torch.from_numpy(f["y_train"].astype(np.int64))  # (60000,)
        x_test = torch.from_numpy(f["x_test"].reshape(10_000, -1).astype(np.float32) / 255.0)  # (10000, 784)
        y_test = torch.from_numpy(f["y_test"].astype(np.int64))  # (10000,)
    x_train, y_train, x_test, y_test = (t.to(cfg.device) for t in (x_train, y_train, x_test, y_test))
    order = np.random.default_rng(cfg.seed).permutation(len(y_train))
    parts = [np.sort(p) for p in np.array_split(order, cfg.num_clients)]
    clients = [(x_train[p], y_train[p]) for p in parts]  # (600, 784), (600,) each

    model = model_from_config(cfg, DataSpec(784, 10)).to(cfg.device)  # the ServerApp's initial weights
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sampler = random.Random(cfg.seed)  # Flower's sample_nodes draws random.sample under seed `seed`
    node_ids = list(range(FIRST_NODE_ID, FIRST_NODE_ID + cfg.num_clients))
    round_seconds, accuracy = [], None
    for server_round in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        sampled = sampler.sample(node_ids, cfg.clients_per_round)
        total = sum(len(clients[n - FIRST_NODE_ID][1]) for n in sampled)
        new_weights: dict[str, torch.Tensor] = {}
        for node_id in sampled:
            x, y = clients[node_id - FIRST_NODE_ID]
            model.load_state_dict(global_weights)
            # fedclient.app.client_seed: one shuffle seed per (run seed, round, node)
            seed = (cfg.seed * 1_000_003 + server_round * 10_007 + node_id) % (2**63)
            bare_local_training(model, x, y, cfg, seed, plain)
            weight = len(y) / total  # FedAvg: weighted by num-examples, summed in reply order
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    if key in new_weights:
                        new_weights[key] += value * weight
                    else:
                        new_weights[key] = value * weight
        global_weights = new_weights
        model.load_state_dict(global_weights)
        model.eval()
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(y_test), cfg.eval_batch_size):
                logits = model(x_test[start : start + cfg.eval_batch_size])
                F.cross_entropy(logits, y_test[start : start + cfg.eval_batch_size], reduction="sum")
                correct += int((logits.argmax(dim=1) == y_test[start : start + cfg.eval_batch_size]).sum())
        accuracy = correct / len(y_test)
        round_seconds.append(time.perf_counter() - t0)
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": cpu_seconds() - cpu,
        "round_s": round_seconds,
        "accuracy": accuracy,
    }


def child_fedsim(spec: dict[str, Any], vectorized: str) -> dict[str, Any]:
    import torch

    from fedserver.checkpoints import read_metrics
    from simulations import vectorized as vec
    from simulations.engine import planned_workers, run_simulation

    cfg = run_config(spec["data"], spec["per_round"], spec["rounds"], vectorized, spec["workers"], spec["device"])
    if vectorized == "on":
        try:
            runner = vec.batch_runner_for(cfg)
        except Exception as err:  # noqa: BLE001 - report whatever the helper raises
            return {"skipped": f"batch_runner_for raised {type(err).__name__}: {err}"}
        if runner is None:
            return {"skipped": "batch_runner_for returned None (no vectorized path yet)"}
        del runner
    output = Path(spec["tmp"]) / "run"
    del torch  # imported only so that torch's import is not timed
    started, cpu = time.perf_counter(), cpu_seconds()
    result = run_simulation(cfg, output, progress=False)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    rows = read_metrics(output)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "round_s": [r["seconds"] for r in rows],
        "accuracy": rows[-1]["accuracy"] if rows else None,
        "interrupted": result.interrupted,
        "workers": planned_workers(cfg),  # what `auto` chose
    }


def child_ray(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return {"skipped": NO_RAY}

    import logging

    import torch

    from fedclient.app import app as client_app
    from fedserver.app import app as server_app
    from fedserver.checkpoints import read_metrics
    from simulations.ray_engine import run_on_ray_engine

    tmp = Path(spec["tmp"])
    run_dir = tmp / "run"
    cfg = run_config(spec["data"], spec["per_round"], spec["rounds"], device=spec["device"]).replace(run_dir=str(run_dir))
    logging.getLogger("flwr").setLevel(logging.WARNING)  # as fedsim does: no INFO line per sampling
    torch.set_num_threads(cfg.torch_threads)  # the ServerApp's central evaluation, as in fedsim
    started, cpu = time.perf_counter(), cpu_seconds()
    run_on_ray_engine(
        client_app=client_app,
        server_app=server_app,
        run_config=cfg.to_mapping(),
        num_supernodes=NUM_CLIENTS,
        num_cpus=os.cpu_count() or 1,
        client_resources={"num_cpus": 1, "num_gpus": spec["ray_gpus"] if cfg.device == "cuda" else 0.0},
    )
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu  # the driver's CPU only
    rows = read_metrics(run_dir)
    if len(rows) != cfg.rounds:
        raise RuntimeError(f"the Ray run recorded {len(rows)} of {cfg.rounds} rounds")
    return {"wall_s": wall, "cpu_s": cpu, "round_s": [r["seconds"] for r in rows], "accuracy": rows[-1]["accuracy"]}


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads, and of its children it has reaped."""
    usages = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    system = spec["system"]
    if system in ("floor", "floor-plain"):
        result = child_floor(spec, plain=system == "floor-plain")
    elif system == "fedsim":
        result = child_fedsim(spec, "off")
    elif system == "fedsim-vec":
        result = child_fedsim(spec, "on")
    elif system == "ray":
        result = child_ray(spec)
    else:
        raise ValueError(f"unknown system {system!r}")
    if "round_s" in result:
        if len(result["round_s"]) != spec["rounds"]:
            raise RuntimeError(f"{len(result['round_s'])} of {spec['rounds']} rounds recorded")
        if sum(result["round_s"]) > result["wall_s"] * 1.01:
            raise RuntimeError(f"rounds took {sum(result['round_s']):.2f} s in a {result['wall_s']:.2f} s run")
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's RSS and survives exec.
    result["maxrss_mb"] = _status_kib(os.getpid(), "VmHWM:") / 1024
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


# ----------------------------------------------------------------------------- process-tree memory


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of a process and all its descendants (Linux /proc; no psutil).

    Sampled, so a short peak can be missed; processes that leave the tree (re-parented to init)
    are not counted. PSS shares shared pages out among the processes, so its sum does not count
    a shared library or Ray's object store twice, as the RSS sum does.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.max_processes = 0
        self.seen: set[int] = set()  # every pid ever sampled in the tree
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def sample(self) -> None:
        pids = [self.pid, *descendants(self.pid)]
        self.seen.update(pids)
        rss = pss = 0.0
        for pid in pids:
            rss += _status_kib(pid, "VmRSS:")
            pss += _rollup_kib(pid, "Pss:")
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 1024)
        self.peak_pss_mb = max(self.peak_pss_mb, pss / 1024)
        self.max_processes = max(self.max_processes, len(pids))


def _status_kib(pid: int, field: str) -> float:
    return _field_kib(f"/proc/{pid}/status", field)


def _rollup_kib(pid: int, field: str) -> float:
    return _field_kib(f"/proc/{pid}/smaps_rollup", field)


def _field_kib(path: str, field: str) -> float:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


# ----------------------------------------------------------------------------- the parent


def run_measured(
    argv: list[str], log_path: Path, timeout: float, interval: float = 0.5
) -> tuple[int | None, float, TreeMemory]:
    """Run `argv` in the repository (Flower telemetry off, the repository first on PYTHONPATH) with
    its output in `log_path`: its exit code (None: killed after `timeout` s), its wall time from
    start to exit, and its process tree's memory. Then wait for what it left behind to stop."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **ENV, "PYTHONPATH": path}
    with open(log_path, "w", encoding="utf-8") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        sampler = TreeMemory(proc.pid, interval)
        sampler.start()
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        finally:
            wall = time.perf_counter() - started
            sampler.stop()
            settle(sampler.seen - {os.getpid()})
    return rc, wall, sampler


def failure(log_path: Path, rc: int | None, timeout: float) -> str:
    """Why a measured command failed, with the last lines of its log."""
    tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
    why = f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}"
    return f"{why}; last lines of {log_path}:\n      " + "\n      ".join(tail)


def run_child(spec: dict[str, Any], tmp: Path, timeout: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"{spec['system']}-{spec['per_round']}-", dir=tmp))  # one per run
    spec = {**spec, "tmp": str(work), "result": str(work / "result.json")}
    log_path = work / "child.log"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    rc, _, sampler = run_measured(argv, log_path, timeout)
    result_path = Path(spec["result"])
    if rc != 0 or not result_path.exists():
        return {"error": failure(log_path, rc, timeout)}
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["tree_rss_mb"], result["tree_pss_mb"] = sampler.peak_rss_mb, sampler.peak_pss_mb
    result["tree_processes"] = sampler.max_processes
    return result


def settle(pids: set[int], timeout: float = 30.0) -> None:
    """Wait for what a run left behind (Ray's raylet, GCS and workers stop seconds after its
    driver) so that it does not load the machine during the next run; at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


def peak_mb(result: dict[str, Any]) -> float:
    """The process tree's sampled peak RSS sum, at least the process's own exact peak (VmHWM)."""
    return max(result["tree_rss_mb"], result["maxrss_mb"])


def mean_round(result: dict[str, Any]) -> float:
    return sum(result["round_s"]) / len(result["round_s"])


def steady_round(result: dict[str, Any]) -> float:
    """The median round after the first (Ray starts its workers and they load the data in round 1)."""
    rest = sorted(result["round_s"][1:] or result["round_s"])
    mid = len(rest) // 2
    return rest[mid] if len(rest) % 2 else (rest[mid - 1] + rest[mid]) / 2


def table_rows(systems: list[str], workers: list[str]) -> list[str]:
    """The table's rows in order: a fedsim system once per `workers` value ("fedsim:auto"), the others once."""
    rows: list[str] = []
    for system in systems:
        rows += [f"{system}:{w}" for w in workers] if system in FEDSIM else [system]
    return rows


def label(row: str, result: dict[str, Any]) -> str:
    """The row's name in the table: "fedsim workers=auto (2)" says how many workers `auto` made."""
    system, _, workers = row.partition(":")
    if not workers:
        return LABELS[system]
    count = f" ({result['workers']})" if workers == "auto" and "workers" in result else ""
    return f"{LABELS[system]} workers={workers}{count}"


def measure(result: dict[str, Any], what: str) -> float | None:
    """A row's "wall" s, "peak MB" (the tree's RSS sum) or "peak PSS MB" (each shared page counted
    once: the memory the tree takes from the machine); None where the row was not measured."""
    if "wall_s" not in result:
        return None
    return {"wall": result["wall_s"], "peak MB": peak_mb(result), "peak PSS MB": result["tree_pss_mb"]}[what]


def ratio(results: dict[str, dict[str, Any]], num: str, den: str, what: str = "wall") -> float | None:
    """`what` (see `measure`) of row `num` over row `den`; None where either was not measured."""
    a, b = measure(results.get(num, {}), what), measure(results.get(den, {}), what)
    return None if a is None or b is None else a / b


def fmt_row(workload: str, row: str, results: dict[str, dict[str, Any]]) -> str:
    result = results[row]
    name = label(row, result)
    if "skipped" in result or "error" in result:
        return f"{workload:<10} {name:<34} {result.get('skipped') or 'ERROR: ' + result['error']}"
    acc = "-" if result["accuracy"] is None else f"{result['accuracy']:.4f}"
    cpu = f"{result['cpu_s']:.2f}" + ("*" if row == "ray" else " ")
    ratios = [ratio(results, row, "floor"), ratio(results, "ray", row)]
    x_floor, ray_x = ("-" if r is None else f"{r:.2f}x" for r in ratios)
    return (
        f"{workload:<10} {name:<34} {result['wall_s']:>8.2f} {cpu:>8} {mean_round(result):>8.3f} "
        f"{steady_round(result):>8.3f} {peak_mb(result):>8.0f} {x_floor:>8} {ray_x:>8} {acc:>9}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds")
    parser.add_argument("--per-round", default="10,100", help="clients per round, comma-separated")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--workers", default="1,auto", help="fedsim's workers values, comma-separated (default 1,auto)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every system trains")
    parser.add_argument("--ray-gpus", type=float, default=0.25, help="with --device cuda: GPU share of a Ray ClientApp")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is shown")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (run dirs, child logs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return args
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; allowed: {','.join(SYSTEMS)}")
    args.workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    bad = [w for w in args.workers if w != "auto" and not (w.isascii() and w.isdigit() and int(w) >= 1)]
    if bad or not args.workers:
        parser.error(f"--workers takes counts >= 1 or 'auto', comma-separated; got {bad or 'nothing'}")
    why_not = unusable_device(args.device)
    if why_not:
        parser.error(why_not)
    return args


def unusable_device(device: str) -> str | None:
    """Why `device` cannot run here, or None."""
    if device != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return f"--device cuda: no CUDA device is available here (torch {torch.__version__}, {build})"


def mnist_data(tmp: Path) -> tuple[Path, str]:
    """MNIST's NPZ and what it is: the real one where present, else a stand-in written to `tmp`."""
    if MNIST_NPZ.is_file():
        return MNIST_NPZ, f"real MNIST ({MNIST_NPZ})"
    data = tmp / "mnist-stand-in.npz"
    write_stand_in(data)
    return data, f"SYNTHETIC stand-in of MNIST's shapes ({MNIST_NPZ} not found)"


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child)
        return
    rounds = 2 if args.quick else args.rounds
    workloads = [int(k) for k in args.per_round.split(",")]
    rows = table_rows(args.systems, args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="flowerbed-bench-"))
    try:
        data, source = mnist_data(tmp)
        import torch

        print(
            f"MNIST-2NN FedAvg: {source}\n"
            f"  {NUM_CLIENTS} clients x 600 (IID), E=1, B=10, SGD lr 0.1, {rounds} rounds, central eval on "
            f"the 10k test set each round; device {args.device}; torch {torch.__version__}, 1 torch thread, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
            flush=True,
        )
        base = {"rounds": rounds, "data": str(data), "device": args.device, "ray_gpus": args.ray_gpus}
        load_before = os.getloadavg()
        all_results, failures = run_all(base, workloads, rows, tmp, args)
        load = os.getloadavg()
        print(f"  load average before: {load_before[0]:.2f}, after: {load[0]:.2f} (1 min; other work on the machine skews timings)")
        for failed in failures:
            print(f"  FAILED {failed}")
        print_report(all_results, rows, args.repeat)
        if args.keep:
            print(f"kept {tmp}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def run_all(
    base: dict[str, Any], workloads: list[int], rows: list[str], tmp: Path, args: argparse.Namespace
) -> tuple[dict[int, dict[str, dict[str, Any]]], list[str]]:
    """Every row at every workload, `args.repeat` times round-robin (so that a noisy spell on the
    machine hits all of them alike), each keeping its fastest (least disturbed) run; and the failures."""
    all_results: dict[int, dict[str, dict[str, Any]]] = {k: {} for k in workloads}
    failures: list[str] = []
    for repeat in range(args.repeat):
        for per_round in workloads:
            for row in rows:
                if "skipped" in all_results[per_round].get(row, {}):
                    continue
                system, _, workers = row.partition(":")
                spec = {**base, "system": system, "workers": workers or "1", "per_round": per_round}
                print(f"  run {repeat + 1}/{args.repeat}: {row}, {per_round}/round ...", flush=True, file=sys.stderr)
                result = run_child(spec, tmp, args.timeout)
                if "error" in result:
                    failures.append(f"{row} {per_round}/round, run {repeat + 1}: {result['error']}")
                best = all_results[per_round].get(row)
                if best is None or "wall_s" not in best or result.get("wall_s", float("inf")) < best["wall_s"]:
                    all_results[per_round][row] = result
    return all_results, failures


def print_report(all_results: dict[int, dict[str, dict[str, Any]]], rows: list[str], repeat: int) -> None:
    print()
    print(
        f"{'workload':<10} {'system':<34} {'wall s':>8} {'CPU s':>8} {'s/round':>8} {'steady':>8} "
        f"{'peak MB':>8} {'x floor':>8} {'Ray/x':>8} {'final acc':>9}"
    )
    print("-" * 120)
    for per_round, results in all_results.items():
        for row in rows:
            print(fmt_row(f"{per_round}/round", row, results))
    print()
    for note in [*general_notes(repeat), *memory_notes(all_results), *accuracy_notes(all_results)]:
        print("note: " + note)
    print()
    print(f"targets (set for a 2-core CPU machine; this one has {os.cpu_count()} CPUs):")
    for line in target_lines(all_results):
        print("  " + line)


def general_notes(repeat: int) -> list[str]:
    return [
        "wall s: the whole run call in a fresh process (data load, setup, every round, run-dir writes, "
        "fedsim's plot and workers, Ray start/stop), imports excluded. s/round: mean recorded round (train + "
        "central eval); steady: median of rounds 2.. (round 1 includes starting Ray's or fedsim's workers). "
        "CPU s: user+system time of the process and its reaped children (fedsim's workers) over the same span "
        "as wall s; * Ray: the driver and what it reaps, its workers' CPU may be missed."
        + (f" Fastest of {repeat} runs each, run round-robin." if repeat > 1 else ""),
        "peak MB: the peak of the summed RSS of the process and all its descendants (fedsim's workers and "
        "plot process; Ray's GCS, raylet and workers), sampled every 0.5 s from /proc, at least the "
        "process's own peak (VmHWM). x floor: wall s over the floor's; Ray/x: Ray's wall s over this row's.",
        "floor and fedsim run each client in one thread (torch-threads = 1), fedsim workers=N in N processes; "
        f"Ray runs one ClientApp per CPU ({os.cpu_count()} in parallel here) and the ServerApp in the driver.",
    ]


def memory_notes(all_results: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """The process trees' sizes, for the rows that ran more than one process."""
    notes = []
    for per_round, results in all_results.items():
        for row, result in results.items():
            if result.get("tree_processes", 0) > 1:
                notes.append(
                    f"{per_round}/round {label(row, result)} memory: its own peak {result['maxrss_mb']:.0f} MB; tree of "
                    f"up to {result['tree_processes']} processes: RSS sum {result['tree_rss_mb']:.0f} MB (shared "
                    f"pages counted once per process), PSS sum {result['tree_pss_mb']:.0f} MB."
                )
    return notes


def accuracy_notes(all_results: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """Each fedsim row's final accuracy against the floor's, and why Ray's differs."""
    why = {
        "fedsim": "same clients sampled, same shuffles and SGD steps",
        "fedsim-vec": "same clients, shuffles and steps; only the float order in batched matmuls differs",
    }
    notes = []
    for per_round, results in all_results.items():
        floor = results.get("floor", {}).get("accuracy")
        for row, result in results.items():
            system = row.partition(":")[0]
            if system in why and floor is not None and result.get("accuracy") is not None:
                diff = result["accuracy"] - floor
                same = "identical" if diff == 0 else f"differs by {diff:+.4f}"
                notes.append(
                    f"{per_round}/round accuracy: floor {floor:.4f} vs {label(row, result)} "
                    f"{result['accuracy']:.4f} ({same}; {why[system]})."
                )
        if results.get("ray", {}).get("accuracy") is not None:
            notes.append(
                f"{per_round}/round: Ray's accuracy differs only because its SuperNodes have random 64-bit ids, "
                "so other clients are sampled and shuffled."
            )
    return notes


def target_lines(all_results: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """Each target of TARGETS whose workload ran, next to the measured ratio: PASS, MISS or n/a."""
    lines = []
    for per_round, what, num, den, op, bound in TARGETS:
        if per_round not in all_results:
            continue
        measured = ratio(all_results[per_round], num, den, what)
        if measured is None:
            verdict = "n/a (not measured in this run)"
        else:
            met = measured <= bound if op == "<=" else measured >= bound
            verdict = f"{measured:.2f}x  {'PASS' if met else 'MISS'}"
        name = f"{per_round}/round {what}: {label(num, {})} / {label(den, {})}"
        lines.append(f"{name:<55} target {op} {bound:.2f}x   {verdict}")
    return lines


if __name__ == "__main__":
    main()
