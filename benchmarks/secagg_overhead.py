#!/usr/bin/env python
"""What does secure aggregation cost? One FedAvg round three ways, side by side in one process.

    .venv/bin/python benchmarks/secagg_overhead.py [--repeats 3] [--quick] [--no-training] [--workload N:HIDDEN]

Systems, all over the same in-process Grid (simulations.grid.InProcessGrid):

  plaintext  Flower's FedAvg (Message API): configure_train, send_and_receive, aggregate_train;
  ours       shared.secagg: secure_train_round + as_mean_reply + the same FedAvg.aggregate_train
             (threshold 5, 8 neighbours, clip 8, Q = 2^24, m = 64; and m = 32 with Q = 2^16);
  flower     Flower's legacy SecAgg+: flwr.server.workflow.SecAggPlusWorkflow (9 shares,
             threshold 5, clip 8, Q = 2^22, modulus 2^32) driven directly with a LegacyContext,
             clients flwr.client.ClientApp(client_fn, mods=[flwr.client.mod.secaggplus_mod]).

Workloads: 20 clients x 1,088,310 parameters (MLP 784-1000-300-10) and 100 clients x 199,210
(the 2NN, 784-200-200-10), every client of the grid taking part (`--workload 20:1000,300` runs one
given workload instead). Two client behaviours:
  protocol  the train handler returns the received weights + a constant (no training): the
            round is pure protocol and transport, the harshest ratio for secure aggregation;
  training  fedclient.app.train itself (MNIST IID, 600 examples a client, E = 1, B = 10, SGD 0.1,
            1 torch thread): a real round. Skipped with --no-training.

Each system first runs one warm-up round; then the systems take turns, `--repeats` rounds each,
so that load from elsewhere on the machine falls on all alike. Reported: the median wall time
and the median CPU time of this process (steadier on a shared machine; every system here is
single-threaded), each with its ratio to plaintext's; the bytes each client uploads in a round
(arrays and byte strings); and "max |err|", the largest per-element difference of the round's
new global weights from the plaintext round's.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import logging  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from shared.flower_compat.messages import set_message_id  # noqa: E402
from shared.secagg import SecAggSettings, as_mean_reply, secagg_mod, secure_train_round  # noqa: E402
from shared.weights import to_arrayrecord  # noqa: E402
from simulations.grid import InProcessGrid, server_context  # noqa: E402

MNIST = REPO.parent / "shared" / "datasets" / "mnist.npz"
EXAMPLES = 600  # the protocol-mode clients' count (MNIST IID: 60,000 / 100)
NUM_PARTITIONS = 100  # training mode: MNIST split in 100; the first n partitions take part
OURS = {
    "ours m=64": SecAggSettings(threshold=5, neighbours=8, clipping_range=8.0, quantization_range=1 << 24, modulus_bits=64),
    "ours m=32": SecAggSettings(threshold=5, neighbours=8, clipping_range=8.0, quantization_range=1 << 16, modulus_bits=32),
}
LEGACY = {"num_shares": 9, "reconstruction_threshold": 5, "clipping_range": 8.0, "quantization_range": 1 << 22}


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    hidden: str


WORKLOADS = (
    Workload("20 clients x 1.09M params (MLP 784-1000-300-10)", 20, "1000,300"),
    Workload("100 clients x 199k params (2NN 784-200-200-10)", 100, "200,200"),
)


@dataclass
class Cell:
    seconds: list[float]  # wall
    cpu: list[float]  # this process's CPU time: what the round costs, whatever else the machine runs
    upload: float  # bytes a client uploads in the round (mean)
    arrays: dict[str, np.ndarray]


# ----------------------------------------------------------------------------- clients


def mlp_arrays(hidden: str) -> dict[str, np.ndarray]:
    """An MLP's weights as shared.models.mlp names and shapes them (input 784, 10 classes)."""
    sizes = [784, *(int(h) for h in hidden.split(",")), 10]
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        bound = 1 / np.sqrt(fan_in)
        arrays[f"layers.{2 * i}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        arrays[f"layers.{2 * i}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return arrays


def protocol_train(msg: Message, context: Context) -> Message:
    """No training: the received weights plus a per-client constant, 600 examples."""
    step = np.float32(1e-3 * (int(context.node_config["partition-id"]) + 1))
    arrays = ArrayRecord({k: Array(v.numpy() + step) for k, v in msg.content["arrays"].items()})
    metrics = MetricRecord({"num-examples": EXAMPLES, "train_loss": 0.0})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def message_api_app(train: Callable, secure: bool) -> ClientApp:
    app = ClientApp(mods=[secagg_mod] if secure else [])
    app.train()(train)
    return app


def legacy_app(train: Callable, names: list[str]) -> ClientApp:
    """Flower's legacy client: a NumPyClient whose fit runs the same train handler."""
    from flwr.client import ClientApp as LegacyClientApp
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

    class Client(NumPyClient):
        def __init__(self, context: Context) -> None:
            self.context = context

        def fit(self, parameters, config):  # noqa: ANN001, ANN201 - Flower's NumPyClient signature
            content = RecordDict(
                {"arrays": ArrayRecord({n: Array(np.asarray(p)) for n, p in zip(names, parameters)}),
                 "config": ConfigRecord({**config, "server-round": 1})}
            )  # fmt: skip
            msg = Message(content, self.context.node_id, "train")
            set_message_id(msg, "legacy")
            reply = train(msg, self.context)
            arrays = [a.numpy() for a in reply.content["arrays"].values()]
            return arrays, int(reply.content["metrics"]["num-examples"]), {}

    return LegacyClientApp(client_fn=lambda context: Client(context).to_client(), mods=[secaggplus_mod])


class CountingGrid(InProcessGrid):
    """Counts the bytes of arrays and byte strings the clients send back.

    With `private_configs`, each message gets its own copy of its ConfigRecords, as it would
    after serialization: Flower's legacy SecAgg+ sends one ConfigRecord object to every node
    and its client mod pops entries from it, which in one process would reach the next node.
    """

    uploaded = 0
    private_configs = False

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if self.private_configs:
            for message in messages:
                message.content = RecordDict(
                    {k: ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v for k, v in message.content.items()}
                )
        replies = super().send_and_receive(messages, timeout=timeout)
        self.uploaded += sum(_payload_bytes(r) for r in replies if r.has_content())
        return replies


def _payload_bytes(message: Message) -> int:
    total = 0
    for record in message.content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                values = value if isinstance(value, list) else [value]
                total += sum(len(v) for v in values if isinstance(v, bytes))
    return total


# ----------------------------------------------------------------------------- rounds


def plaintext_round(grid: InProcessGrid, arrays: ArrayRecord, n: int) -> ArrayRecord:
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages, timeout=3600)
    return strategy.aggregate_train(1, replies)[0]


def secure_round(grid: InProcessGrid, arrays: ArrayRecord, n: int, settings: SecAggSettings) -> ArrayRecord:
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    aggregate = secure_train_round(grid, messages, settings, timeout=3600)
    return strategy.aggregate_train(1, [as_mean_reply(aggregate, messages[0])])[0]


def legacy_round(grid: InProcessGrid, arrays: ArrayRecord, n: int) -> ArrayRecord:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import SecAggPlusWorkflow

    from shared.flower_compat.stock_flower import (
        MAIN_CONFIGS_RECORD,
        MAIN_PARAMS_RECORD,
        GridClientProxy,
        WorkflowKey,
        arrayrecord_to_parameters,
        parameters_to_arrayrecord,
    )

    manager = SimpleClientManager()
    for node in grid.get_node_ids():
        manager.register(GridClientProxy(node, grid, grid.run.run_id))
    strategy = LegacyFedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0)
    context = LegacyContext(server_context({}), ServerConfig(num_rounds=1), strategy, manager)
    parameters = ndarrays_to_parameters([a.numpy() for a in arrays.values()])
    context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(parameters, keep_input=True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    SecAggPlusWorkflow(**LEGACY, max_weight=float(EXAMPLES), timeout=3600)(grid, context)
    result = arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return ArrayRecord({name: Array(a) for name, a in zip(arrays.keys(), parameters_to_ndarrays(result))})


# ----------------------------------------------------------------------------- driver


def measure(systems: dict[str, tuple[CountingGrid, Callable[[CountingGrid], ArrayRecord]]], n: int, repeats: int) -> dict[str, Cell]:
    """Time each system's round `repeats` times, interleaved, so that load from elsewhere on the
    machine falls on all of them alike; one warm-up round each first (imports, caches)."""
    for grid, one_round in systems.values():
        one_round(grid)
        grid.uploaded = 0
    seconds: dict[str, list[float]] = {label: [] for label in systems}
    cpu: dict[str, list[float]] = {label: [] for label in systems}
    results: dict[str, ArrayRecord] = {}
    for _ in range(repeats):
        for label, (grid, one_round) in systems.items():
            gc.collect()
            started, started_cpu = time.perf_counter(), time.process_time()
            results[label] = one_round(grid)
            seconds[label].append(time.perf_counter() - started)
            cpu[label].append(time.process_time() - started_cpu)
    return {
        label: Cell(seconds[label], cpu[label], grid.uploaded / (repeats * n), {k: v.numpy() for k, v in results[label].items()})
        for label, (grid, _) in systems.items()
    }


def run_workload(workload: Workload, mode: str, repeats: int, data: Path | None) -> dict[str, Cell]:
    n = workload.clients
    arrays_np = mlp_arrays(workload.hidden)
    arrays = to_arrayrecord({k: torch.from_numpy(v) for k, v in arrays_np.items()})  # packed, as the ServerApp sends
    train, run_config = protocol_train, {}
    if mode == "training":
        from fedclient.app import train as fedclient_train
        from shared.config import RunConfig

        cfg = RunConfig(
            dataset="mnist", data_path=str(data), partition="iid", model="mlp", hidden=workload.hidden,
            num_clients=NUM_PARTITIONS, clients_per_round=n, rounds=1, local_epochs=1, batch_size=10,
            lr=0.1, seed=0, device="cpu", torch_threads=1,
        )  # fmt: skip
        train, run_config = fedclient_train, cfg.to_mapping()
    partitions = NUM_PARTITIONS if mode == "training" else n

    def grid_for(app: ClientApp, private_configs: bool = False) -> CountingGrid:
        grid = CountingGrid(app, n, run_config, lambda pid: {"partition-id": pid, "num-partitions": partitions})
        grid.private_configs = private_configs
        return grid

    systems = {"plaintext": (grid_for(message_api_app(train, False)), lambda g: plaintext_round(g, arrays, n))}
    for label, settings in OURS.items():
        systems[label] = (grid_for(message_api_app(train, True)), lambda g, s=settings: secure_round(g, arrays, n, s))
    legacy = grid_for(legacy_app(train, list(arrays)), private_configs=True)
    systems["flower SecAgg+"] = (legacy, lambda g: legacy_round(g, arrays, n))
    return measure(systems, n, repeats)


def mnist_path(tmp: Path) -> Path:
    if MNIST.exists():
        return MNIST
    path = tmp / "mnist-stand-in.npz"  # same shapes and dtypes; timings do not depend on the pixels
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60_000, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=60_000).astype(np.uint8)
    np.savez(path, x_train=x, y_train=y, x_test=x[:10_000], y_test=y[:10_000])
    return path


def report(workload: Workload, mode: str, cells: dict[str, Cell]) -> None:
    base_wall = statistics.median(cells["plaintext"].seconds)
    base_cpu = statistics.median(cells["plaintext"].cpu)
    print(f"\n{workload.name}, {mode}")
    print(f"  {'system':<15} {'wall s':>8} {'x plain':>8} {'cpu s':>8} {'x plain':>8} {'up/client':>10} {'max |err|':>9}")
    for label, cell in cells.items():
        wall, cpu = statistics.median(cell.seconds), statistics.median(cell.cpu)
        err = max(float(np.abs(cell.arrays[k].astype(np.float64) - cells["plaintext"].arrays[k]).max()) for k in cell.arrays)
        print(
            f"  {label:<15} {wall:>8.3f} {wall / base_wall:>8.2f} {cpu:>8.3f} {cpu / base_cpu:>8.2f} "
            f"{cell.upload / 1e6:>8.2f}MB {err:>9.2e}"
        )


def parse_workload(text: str) -> Workload:
    """`--workload CLIENTS:HIDDEN`: that many clients training an MLP of those hidden sizes."""
    clients, _, hidden = text.partition(":")
    if not clients.isdigit() or not hidden:
        raise argparse.ArgumentTypeError(f"expected CLIENTS:HIDDEN (e.g. 20:1000,300), got {text!r}")
    return Workload(f"{clients} clients x MLP 784-{hidden.replace(',', '-')}-10", int(clients), hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, protocol mode only")
    parser.add_argument("--no-training", action="store_true", help="protocol mode only")
    parser.add_argument("--workload", type=parse_workload, help="CLIENTS:HIDDEN, e.g. 20:1000,300, instead of both")
    args = parser.parse_args()
    workloads = [args.workload] if args.workload else WORKLOADS
    repeats = 1 if args.quick else args.repeats
    modes = ["protocol"] if args.quick or args.no_training else ["protocol", "training"]
    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}, numpy {np.__version__}; "
          f"median of {repeats} round(s) after a warm-up")  # fmt: skip
    print(f"ours bound per element (m=64): {OURS['ours m=64'].error_bound():.2e}; (m=32): {OURS['ours m=32'].error_bound():.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        data = mnist_path(Path(tmp)) if "training" in modes else None
        if data is not None and data != MNIST:
            print(f"({MNIST} not found: training on a random stand-in of the same shapes)")
        for mode in modes:
            for workload in workloads:
                report(workload, mode, run_workload(workload, mode, repeats, data))


if __name__ == "__main__":
    main()
