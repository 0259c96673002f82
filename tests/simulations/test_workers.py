"""Parallel clients: worker processes give the results of one process, keep state, survive a death."""

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.config import ConfigError, RunConfig
from shared.errors import ExitCode
from shared.flower_compat.messages import context_from_bytes, context_to_bytes, message_from_bytes, message_to_bytes
from shared.processes import is_alive
from fedclient.app import ClientRuntimes, make_client_app
from shared.data.federation import load_federation
from shared import messages as keys
from simulations import cli, engine
from simulations.engine import estimated_run_examples, planned_workers, run_simulation
from simulations.grid import FIRST_NODE_ID, InProcessGrid, RoundRunner, simulation_node_config
from simulations import workers as workers_module
from simulations.workers import AUTO_MIN_EXAMPLES, WorkerPool, available_cores, limit_gpu_memory, worker_count, worker_gpu

NODES = 6
DIE_AT = "die"  # config key: the node whose partition id it holds makes its worker exit at once
INTERRUPT_AT = "interrupt"  # ... makes its worker send Ctrl-C (SIGINT) to the pool's process


def state_app() -> ClientApp:
    """A ClientApp counting its calls in Context.state, echoing the sum of its arrays and its process."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        if DIE_AT in config and config[DIE_AT] == context.node_config["partition-id"]:
            os._exit(9)
        if INTERRUPT_AT in config and config[INTERRUPT_AT] == context.node_config["partition-id"]:
            os.kill(os.getppid(), signal.SIGINT)
        calls = context.state.config_records.get("calls", ConfigRecord({"n": 0}))
        calls["n"] = int(calls["n"]) + 1
        context.state["calls"] = calls
        total = float(sum(a.sum() for a in msg.content["arrays"].to_numpy_ndarrays()))
        metrics = MetricRecord({"calls": calls["n"], "sum": total, "pid": os.getpid(), "at": time.monotonic_ns()})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_grid(pool: WorkerPool) -> InProcessGrid:
    return InProcessGrid(state_app(), NODES, {"k": 1}, simulation_node_config(NODES), batch_runner=pool)


def train_messages(grid: InProcessGrid, **config: int) -> list[Message]:
    arrays = ArrayRecord([np.arange(4, dtype=np.float32)])  # one record for all: the global weights
    content = lambda: RecordDict({"arrays": arrays, "config": ConfigRecord(config)})  # noqa: E731
    return [grid.create_message(content(), "train", node, group_id="1") for node in grid.get_node_ids()]


@pytest.fixture
def pool():
    with WorkerPool(state_app, 2) as workers:
        yield workers


def test_state_persists_across_rounds_whichever_worker_serves_a_node(pool):
    grid = make_grid(pool)

    first = grid.send_and_receive(train_messages(grid))
    second = grid.send_and_receive(train_messages(grid))

    assert [r.content["metrics"]["calls"] for r in first] == [1] * NODES
    assert [r.content["metrics"]["calls"] for r in second] == [2] * NODES
    assert [r.content["metrics"]["sum"] for r in second] == [6.0] * NODES  # the shared weights arrived whole
    assert [r.metadata.src_node_id for r in second] == grid.get_node_ids()  # replies in message order
    assert {r.content["metrics"]["pid"] for r in first + second} <= set(pool.pids)
    assert grid.context(FIRST_NODE_ID).state.config_records["calls"]["n"] == 2


def test_a_dead_worker_makes_its_message_an_error_and_is_replaced(pool):
    grid = make_grid(pool)
    before = set(pool.pids)

    replies = grid.send_and_receive(train_messages(grid, die=3))
    after = grid.send_and_receive(train_messages(grid))

    lost = [i for i, r in enumerate(replies) if r.has_error()]
    assert 3 in lost and len(lost) <= 2  # the message it served, and the one queued behind it
    assert all("died" in replies[i].error.reason for i in lost)
    assert len(pool.pids) == 2 and set(pool.pids) != before
    assert not any(r.has_error() for r in after)
    # a lost message left its node's state as it was
    assert [r.content["metrics"]["calls"] for r in after] == [1 if i in lost else 2 for i in range(NODES)]


def test_the_largest_clients_are_served_first():
    with WorkerPool(state_app, 1, size=lambda context: int(context.node_config["partition-id"]) % 4) as pool:
        grid = make_grid(pool)
        replies = grid.send_and_receive(train_messages(grid))

    served = sorted(range(NODES), key=lambda i: replies[i].content["metrics"]["at"])
    assert served == [3, 2, 1, 5, 0, 4]  # sizes 0,1,2,3,0,1: largest first, ties in message order


@contextmanager
def _sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the block, as in fedsim run from a terminal (a
    pytest-xdist worker process ignores SIGINT)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_n_workers_are_this_process_and_n_minus_1_worker_processes():
    with workers_module.client_workers(state_app, 2) as pool:
        grid = make_grid(pool)
        first = grid.send_and_receive(train_messages(grid))
        second = grid.send_and_receive(train_messages(grid))
        spawned = set(pool.pids)

    served = {r.content["metrics"]["pid"] for r in first + second}
    assert len(spawned) == 1 and served == spawned | {os.getpid()}  # each serves a share
    assert [r.content["metrics"]["calls"] for r in second] == [2] * NODES  # state kept, whoever serves
    assert [r.metadata.src_node_id for r in second] == grid.get_node_ids()  # replies in message order


def test_with_a_batch_runner_this_process_serves_a_share_too():
    with WorkerPool(state_app, 1, batch_factory=batch_runner, serve_here=True) as pool:
        grid = make_grid(pool)
        replies = grid.send_and_receive(train_messages(grid))
        spawned = set(pool.pids)

    assert [r.content["metrics"]["batch"] for r in replies] == [NODES // 2] * NODES  # half a round each
    assert {r.content["metrics"]["pid"] for r in replies} == spawned | {os.getpid()}


def test_ctrl_c_stops_every_worker():
    pool = WorkerPool(state_app, 2)
    grid = make_grid(pool)
    pids = pool.pids

    with _sigint_raises(), pytest.raises(KeyboardInterrupt), pool:
        grid.send_and_receive(train_messages(grid, interrupt=1))

    assert pids and not any(is_alive(pid) for pid in pids)


def test_a_client_app_that_cannot_be_built_gives_error_replies():
    with WorkerPool(broken_app, 1) as pool:
        grid = make_grid(pool)
        replies = grid.send_and_receive(train_messages(grid))

    assert all(r.has_error() and "could not be loaded" in r.error.reason for r in replies)


def broken_app() -> ClientApp:
    raise RuntimeError("no such app")


def batch_runner() -> RoundRunner:
    """A batch runner taking TRAIN batches (as the vectorized path does): each reply says the size
    of the batch it came in and the node's calls so far; other batches go to the ClientApp."""

    def run(messages: list[Message], contexts: list[Context]) -> list[Message] | None:
        if any(m.metadata.message_type != "train" for m in messages):
            return None
        replies = []
        for message, context in zip(messages, contexts, strict=True):
            calls = context.state.config_records.get("calls", ConfigRecord({"n": 0}))
            calls["n"] = int(calls["n"]) + 1
            context.state["calls"] = calls
            metrics = MetricRecord({"batch": len(messages), "calls": calls["n"], "pid": os.getpid()})
            replies.append(Message(RecordDict({"metrics": metrics}), reply_to=message))
        return replies

    return run


def test_with_a_batch_runner_each_worker_serves_its_share_of_a_round_at_once():
    with WorkerPool(state_app, 2, batch_factory=batch_runner) as pool:
        grid = make_grid(pool)
        first = grid.send_and_receive(train_messages(grid))
        second = grid.send_and_receive(train_messages(grid))
        evaluated = grid.send_and_receive(
            [grid.create_message(RecordDict(), "evaluate", node, group_id="1") for node in grid.get_node_ids()]
        )

    assert [r.content["metrics"]["batch"] for r in first] == [NODES // 2] * NODES  # half a round each
    assert len({r.content["metrics"]["pid"] for r in first}) == 2
    assert [r.metadata.src_node_id for r in second] == grid.get_node_ids()  # replies in message order
    assert [r.content["metrics"]["calls"] for r in second] == [2] * NODES  # state kept, whoever serves
    assert all(r.has_error() for r in evaluated)  # declined: the ClientApp (no evaluate) replied


def test_two_workers_give_the_weights_of_one_process(tiny_config, tmp_path):
    cfg = tiny_config(rounds=2)

    run_simulation(cfg, tmp_path / "one", progress=False)
    run_simulation(cfg.replace(workers="2"), tmp_path / "two", progress=False)

    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()


def test_workers_train_on_the_data_read_once_and_give_the_weights_of_one_process(tiny_config, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (240, 4, 4), dtype=np.uint8), rng.integers(0, 3, 240)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    cfg = tiny_config(dataset="npz", data_path=str(data), partition="dirichlet", rounds=2)

    def pool_without_the_file(*args, **kwargs) -> WorkerPool:
        data.unlink()  # the engine has read it: the workers must not need it
        return WorkerPool(*args, **kwargs)

    run_simulation(cfg, tmp_path / "one", progress=False)
    monkeypatch.setattr(workers_module, "WorkerPool", pool_without_the_file)
    result = run_simulation(cfg.replace(workers="2"), tmp_path / "two", progress=False)

    assert not data.exists() and result.summary["rounds"] == 2
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("value", [0, -1, "abc", "0", "²"])
def test_workers_below_one_or_not_a_count_is_a_one_line_error(value, tiny_config):
    with pytest.raises(ConfigError, match=r"config key 'workers' must be 'auto' or an integer >= 1") as err:
        tiny_config(workers=value)
    assert "\n" not in str(err.value)


def test_workers_takes_a_count_or_auto():
    assert RunConfig.from_mapping({"workers": 3}).workers == "3"
    assert worker_count("3", clients_per_round=10) == 3
    assert worker_count("auto", clients_per_round=2) == 1  # too small a round to pay for processes
    assert 1 <= worker_count("auto", clients_per_round=100) <= os.cpu_count()


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_fedsim_run_workers_flag_refuses_a_bad_count_in_one_line(value, tmp_path, capsys):
    code = cli.main(["run", "--workers", value, "--output", str(tmp_path / "run"), "--quiet"])

    err = capsys.readouterr().err.strip()
    assert code == ExitCode.USAGE and "config key 'workers'" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_message_and_a_context_cross_processes_whole():
    grid = make_grid_in_process()
    (message,) = train_messages(grid)[:1]
    grid.push_messages([message])
    context = grid.context(message.metadata.dst_node_id)
    context.state["calls"] = ConfigRecord({"n": 3})

    light = RecordDict({"config": message.content["config"]})
    sent = message_from_bytes(message_to_bytes(message, light))
    back = context_from_bytes(context_to_bytes(context))

    assert sent.metadata == message.metadata
    assert list(sent.content) == ["config"] and sent.content["config"] == message.content["config"]
    assert back.node_config == context.node_config and back.run_config == context.run_config
    assert back.state.config_records["calls"]["n"] == 3


def make_grid_in_process() -> InProcessGrid:
    return InProcessGrid(state_app(), NODES, {"k": 1}, simulation_node_config(NODES))


DIE_ONCE = "FLOWERBED_TEST_DIE_ONCE"  # a file the first worker process to train in round 1 creates, then dies


def dying_fedclient_app(runtimes: ClientRuntimes | None = None) -> ClientApp:
    """fedclient's ClientApp, except that the first worker process to train a node in round 1
    dies (fedsim's own process, which serves a share too, never does)."""
    inner = make_client_app(runtimes)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content[keys.CONFIG][keys.SERVER_ROUND] == 1 and multiprocessing.parent_process() is not None:
            with contextlib.suppress(FileExistsError):
                with open(os.environ[DIE_ONCE], "x"):
                    os._exit(9)
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


def test_a_run_goes_on_past_a_dead_worker_when_the_quorum_holds(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "make_client_app", dying_fedclient_app)
    monkeypatch.setenv(DIE_ONCE, str(tmp_path / "died"))
    cfg = tiny_config(num_clients=6, clients_per_round=6, rounds=2, min_replies=3, workers="2")

    result = engine.run_simulation(cfg, tmp_path / "run", progress=False)

    assert (tmp_path / "died").exists()  # a worker process did die
    assert result.summary["rounds"] == 2 and not result.interrupted


# --- GPUs ---------------------------------------------------------------------------------------


def gpu_app() -> ClientApp:
    """A ClientApp replying with the CUDA_VISIBLE_DEVICES its worker process sees."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen = ConfigRecord({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES", "none")})
        return Message(RecordDict({"seen": seen}), reply_to=msg)

    return app


@pytest.mark.parametrize(
    ("gpus", "visible", "expected"),
    [
        (0, None, [None, None, None]),  # no CUDA: no GPU for any worker
        (2, None, ["0", "1", "0"]),  # worker i on GPU i mod 2
        (1, None, ["0", "0", "0"]),
        (2, "3,5", ["3", "5", "3"]),  # the devices this process sees, as it names them
        (2, "GPU-a1, GPU-b2,GPU-c3", ["GPU-a1", "GPU-b2", "GPU-a1"]),  # UUIDs; only the `gpus` first usable
    ],
)
def test_worker_i_gets_gpu_i_mod_the_visible_gpus(gpus, visible, expected):
    assert [worker_gpu(index, gpus, visible) for index in range(3)] == expected


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or any(os.path.exists(p) for p in workers_module.GPU_DRIVERS),
    reason="needs Linux without a GPU driver",
)
def test_without_a_gpu_driver_no_gpu_is_counted_and_pytorch_is_not_imported():
    code = "import sys; from simulations.workers import visible_gpus; print(visible_gpus(), 'torch' in sys.modules)"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert out.split() == ["0", "False"]


def test_auto_is_one_worker_per_gpu_where_the_clients_train_on_cuda():
    assert worker_count("auto", clients_per_round=100, gpus=3) == 3
    assert worker_count("auto", clients_per_round=5, gpus=8) == 5  # at most one per client
    assert worker_count("auto", clients_per_round=2, gpus=4) == 1  # too small a round
    assert worker_count("2", clients_per_round=100, gpus=4) == 2  # a count is a count


def test_each_worker_sees_only_its_gpu_and_a_memory_cap_is_a_no_op_without_cuda(monkeypatch):
    # Prepare: this process "sees" GPUs 4 and 6 (no CUDA here: the workers only get the variable)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")

    # Execute
    with WorkerPool(gpu_app, 2, gpus=2, gpu_memory_fraction=0.5) as pool:
        grid = InProcessGrid(gpu_app(), NODES, {}, simulation_node_config(NODES), batch_runner=pool)
        replies = grid.send_and_receive(train_messages(grid))

    # Assert
    assert not any(r.has_error() for r in replies)
    assert {r.content["seen"]["gpu"] for r in replies} == {"4", "6"}


def test_serving_here_this_process_keeps_the_first_gpu_and_the_worker_processes_take_the_next(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")

    with workers_module.client_workers(gpu_app, 3, gpus=2) as pool:
        grid = InProcessGrid(gpu_app(), NODES, {}, simulation_node_config(NODES), batch_runner=pool)
        replies = grid.send_and_receive(train_messages(grid))

    seen = [r.content["seen"]["gpu"] for r in replies]
    assert seen[0] == "4,6"  # the largest-first message is served here, on cuda:0, the first visible GPU
    assert set(seen) == {"4,6", "6", "4"}  # worker processes 1 and 2: GPUs 1 mod 2 and 2 mod 2


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as `limit_gpu_memory` sees it, CUDA or not as the test says; returns the caps set."""
    import torch

    capped: list[tuple[float, int]] = []

    def install(available: bool) -> list[tuple[float, int]]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: capped.append((f, d)))
        return capped

    return install


def test_gpu_memory_fraction_caps_the_current_cuda_device(fake_cuda):
    capped = fake_cuda(available=True)

    limit_gpu_memory(0.25)
    limit_gpu_memory(0.0)  # 0: no cap

    assert capped == [(0.25, 0)]


def test_gpu_memory_fraction_is_a_no_op_without_cuda(fake_cuda):
    capped = fake_cuda(available=False)

    limit_gpu_memory(0.25)

    assert capped == []


def test_one_worker_on_cuda_caps_fedsims_own_process(fake_cuda):
    capped = fake_cuda(available=True)

    with workers_module.client_workers(state_app, 1, gpus=1, gpu_memory_fraction=0.5) as pool:
        assert pool is None  # in process
    with workers_module.client_workers(state_app, 1, gpus=0, gpu_memory_fraction=0.5):
        pass  # the clients train on the CPU: nothing to cap

    assert capped == [(0.5, 0)]


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_gpu_memory_fraction_outside_0_1_is_a_one_line_error(value, tiny_config):
    with pytest.raises(ConfigError, match=r"config key 'gpu-memory-fraction' must be in \[0, 1\]") as err:
        tiny_config(gpu_memory_fraction=value)
    assert "\n" not in str(err.value)


def test_gpu_memory_fraction_takes_0_to_1():
    assert RunConfig().gpu_memory_fraction == 0.0  # no cap by default
    assert RunConfig.from_mapping({"gpu-memory-fraction": 1}).gpu_memory_fraction == 1.0
    assert RunConfig.from_mapping({"gpu-memory-fraction": 0.3}).gpu_memory_fraction == 0.3


def test_fedsim_run_gpu_memory_fraction_flag_is_the_config_key(tmp_path, capsys):
    code = cli.main(["run", "--gpu-memory-fraction", "2", "--output", str(tmp_path / "run"), "--quiet"])

    err = capsys.readouterr().err.strip()
    assert code == ExitCode.USAGE and "config key 'gpu-memory-fraction'" in err and "\n" not in err


def test_auto_stays_in_process_for_a_small_run() -> None:
    assert worker_count("auto", clients_per_round=100, run_examples=AUTO_MIN_EXAMPLES - 1) == 1
    assert worker_count("auto", clients_per_round=100, run_examples=AUTO_MIN_EXAMPLES) == min(available_cores(), 100)
    assert worker_count("2", clients_per_round=100, run_examples=10) == 2  # a count is a count


def test_planned_workers_weighs_the_run() -> None:
    small = RunConfig(num_clients=20, clients_per_round=10, rounds=2, synthetic_max_samples=50)
    assert estimated_run_examples(small, load_federation(small)) <= 2 * 10 * 50
    assert planned_workers(small) == 1
    big = small.replace(rounds=1000, synthetic_max_samples=0)
    assert estimated_run_examples(big, load_federation(big)) >= AUTO_MIN_EXAMPLES
    assert planned_workers(big) == min(available_cores(), 10)
    assert planned_workers(big.replace(workers="1")) == 1
