"""The one runner: its imports run one way, every process gets its share of the cores, `auto` decides
for any app, and Flowerbed's data is built once and passed on."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.data import federation as federation_module
from simulations import apps, cli
from simulations.apps import TIMING_FILE
from simulations.engine import run_simulation
from simulations.grid import FIRST_NODE_ID, InProcessGrid, simulation_node_config
from simulations.runner import MeasuredWorkers
from simulations.workers import THREAD_VARIABLES, available_cores, client_workers, thread_share

SIMULATIONS = Path(__file__).resolve().parents[2] / "simulations"
NUMPY_APP = Path(__file__).parent / "apps" / "numpy_app"


# --- imports -------------------------------------------------------------------------------------


def simulations_imports(path: Path) -> set[str]:
    """The `simulations` modules `path` imports at module level (lazy imports inside functions excluded)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "simulations":
                names.update(f"simulations.{alias.name}" for alias in node.names)
            elif node.module.startswith("simulations."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("simulations."))
    return names


def test_the_simulation_modules_import_one_way():
    graph = {f"simulations.{p.stem}": simulations_imports(p) for p in SIMULATIONS.glob("*.py")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    cycles = sorted(module for module in graph if reaches(module, module, set()))
    assert not cycles, f"import cycle through {cycles}"


# --- the thread rule -----------------------------------------------------------------------------


def threads_app() -> ClientApp:
    """A ClientApp replying with what its process sees: PyTorch's threads and the thread variables."""
    import torch

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen = {name: int(os.environ.get(name, "0")) for name in THREAD_VARIABLES}
        metrics = MetricRecord({"torch": torch.get_num_threads(), **seen, "pid": os.getpid()})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def train_messages(grid: InProcessGrid, nodes: int) -> list[Message]:
    messages = [
        grid.create_message(RecordDict({"config": ConfigRecord({"server-round": 1})}), MessageType.TRAIN, node, "1")
        for node in range(FIRST_NODE_ID, FIRST_NODE_ID + nodes)
    ]
    grid.push_messages(messages)
    return messages


def test_each_worker_and_this_process_train_on_their_share_of_the_cores():
    # Prepare: three workers (this process and two spawned ones), more of them than there may be cores
    workers, nodes = 3, 12
    share = thread_share(workers)
    before = {name: os.environ.get(name) for name in THREAD_VARIABLES}

    # Execute
    with client_workers(threads_app, workers) as pool:
        grid = InProcessGrid(threads_app(), nodes, {}, simulation_node_config(nodes), batch_runner=pool)
        replies = list(grid.pull_messages([m.metadata.message_id for m in train_messages(grid, nodes)]))

    # Assert: every process, spawned or not, saw its share, set before the ClientApp was imported
    metrics = [reply.content["metrics"] for reply in replies]
    assert len({m["pid"] for m in metrics}) > 1
    assert {(m["torch"], *(m[name] for name in THREAD_VARIABLES)) for m in metrics} == {(share,) * 3}
    assert {name: os.environ.get(name) for name in THREAD_VARIABLES} == before  # put back here after the run


def test_a_share_is_at_least_one_thread():
    assert thread_share(1) == available_cores()
    assert thread_share(available_cores() + 1) == 1




# --- `auto` for an app whose work is not known ahead -----------------------------------------------


def app_timing(tmp_path: Path, *args: str) -> dict:
    assert cli.main(["run", "--app", str(NUMPY_APP), "--quiet", "--output", str(tmp_path / "out"), *args]) == 0
    return json.loads((tmp_path / "out" / TIMING_FILE).read_text())


@pytest.mark.skipif(available_cores() < 2, reason="auto trains in process on one core")
def test_auto_starts_workers_after_a_first_round_slower_than_a_workers_start_up(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(apps, "worker_startup_estimate", lambda: -1.0)  # any round outlasts such a start-up
    result = tmp_path / "final.npy"

    timing = app_timing(tmp_path, "--workers", "auto", "--run-config", f"step=2 result-path='{result}'")

    assert timing["workers"] == min(available_cores(), 4) and timing["client_errors"] == 0
    direction = np.array([1.0, -1.0, 0.5])  # numpy_app, 4 nodes, 3 rounds (tests/simulations/test_apps.py)
    np.testing.assert_allclose(np.load(result), 2.0 * 6 * 9 / 12 * direction, rtol=1e-12)


def test_auto_stays_in_process_after_a_first_round_quicker_than_a_workers_start_up(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(apps, "worker_startup_estimate", lambda: 1e9)

    assert app_timing(tmp_path, "--workers", "auto")["workers"] == 1


def counting_app(calls: list[str]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls.append("in process")
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return app


def test_measured_workers_time_only_the_first_training_batch():
    calls: list[str] = []
    started: list[str] = []
    pool = lambda messages, contexts: [Message(RecordDict(), reply_to=m) for m in messages]  # noqa: E731
    measured = MeasuredWorkers(counting_app(calls), lambda: started.append("pool") or pool, 2, startup_seconds=-1.0)
    grid = InProcessGrid(counting_app(calls), 2, {}, simulation_node_config(2), batch_runner=measured)

    for _ in range(2):
        grid.pull_messages([m.metadata.message_id for m in train_messages(grid, 2)])

    assert calls == ["in process"] * 2 and started == ["pool"] and measured.workers == 2


# --- data passed, not cached -----------------------------------------------------------------------


@pytest.fixture
def npz_config(tiny_config, tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (240, 4, 4), dtype=np.uint8), rng.integers(0, 3, 240)
    np.savez(tmp_path / "data.npz", x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    return tiny_config(dataset="npz", data_path=str(tmp_path / "data.npz"), partition="dirichlet", rounds=2)


@pytest.fixture
def builds(monkeypatch) -> list[bool]:
    """Each federation this process builds: whether from its file (True) or from shared arrays."""
    built: list[bool] = []
    build = federation_module.FEDERATIONS["npz"]

    def counted(cfg, source):
        built.append(source is None)
        return build(cfg, source)

    monkeypatch.setitem(federation_module.FEDERATIONS, "npz", counted)
    return built


def test_a_run_in_process_builds_its_federation_once(npz_config, builds, tmp_path):
    result = run_simulation(npz_config.replace(workers="1"), tmp_path / "r", progress=False)

    assert result.summary["rounds"] == 2 and "central test set" in result.summary["evaluated_on"]
    assert builds == [True]  # the ServerApp, the ClientApp and the summary got that one


def test_a_run_with_workers_reads_its_file_once(npz_config, builds, tmp_path):
    result = run_simulation(npz_config.replace(workers="2"), tmp_path / "r", progress=False)

    assert result.summary["rounds"] == 2
    assert builds == [True, False]  # read once; then this process too holds the arrays the workers map


# --- the PyTorch example of the benchmark -----------------------------------------------------------


def test_the_quickstart_pytorch_example_ends_alike_in_process_and_in_workers(tmp_path, monkeypatch):
    # Prepare: Flower's quickstart-pytorch shape (examples/quickstart_pytorch), tiny: 2 nodes, 1 round
    monkeypatch.setattr(sys, "path", list(sys.path))
    app = Path(__file__).resolve().parents[2] / "examples" / "quickstart_pytorch"
    tiny = "num-server-rounds=1 partition-fraction=0.005"

    # Execute
    finals = []
    for workers in ("1", "2"):
        result = tmp_path / f"final-{workers}.npy"
        code = cli.main(["run", "--app", str(app), "--quiet", "--num-supernodes", "2", "--workers", workers,
                         "--run-config", f"{tiny} result-path='{result}'", "--output", str(tmp_path / workers)])  # fmt: skip
        assert code == 0
        finals.append(np.load(result))

    # Assert: the same model, up to float sums in another order and thread count
    np.testing.assert_allclose(finals[0], finals[1], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "2" / TIMING_FILE).read_text())["workers"] == 2
