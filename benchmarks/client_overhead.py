#!/usr/bin/env python
"""Where fedsim's per-client time goes, against a bare PyTorch loop, in one process.

    .venv/bin/python benchmarks/client_overhead.py [--repeats 15] [--data MNIST.npz]
                                                   [--threads 1 2 [--models 2nn cnn] [--no-steps]]

Workload: benchmarks/simulation_speed.py's (MNIST 2NN, 600 examples a client, E = 1, B = 10,
SGD lr 0.1, 1 torch thread). Each step below is timed `--repeats` times, round-robin, in CPU
time of this thread, and the median and the fastest printed in ms per client (on a busy machine
the fastest is the less disturbed):

  floor             the bare loop of simulation_speed.py's floor on one materialized client
  task.train        shared.task.train on the same tensors (the loop the ClientApp runs)
  ClientApp call    fedclient.app's train handler on a message, as fedsim's grid calls it:
                    partition, model load, task.train, packing the reply
  partition         materializing one client's partition (fedclient.app.ClientRuntime.node_data)
  update handling   packing a reply (to_arrayrecord), screening it (validate_update) and
                    reading its arrays as FedAvg does

Then, with `--threads`, a device's training round at each torch thread count: fedclient.app's
ClientApp training a deployed node (its own NPZ of 600 examples, `data-path` in its node config)
on the 2NN and on the CNN (`--models`), in wall time, the thread counts taking turns.

Reads `--data` (default ../shared/datasets/mnist.npz) where it exists, else random MNIST-shaped data.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, RecordDict  # noqa: E402

import fedclient.app as client  # noqa: E402
from shared import messages as keys  # noqa: E402
from shared import task  # noqa: E402
from shared.data.federation import data_spec  # noqa: E402
from shared.recipe import model_from_config  # noqa: E402
from shared.weights import to_arrayrecord, validate_update  # noqa: E402
from simulation_speed import MNIST_NPZ, bare_local_training, run_config, write_stand_in  # noqa: E402
from simulations.grid import FIRST_NODE_ID, InProcessGrid, simulation_node_config  # noqa: E402

CLIENTS = 100
DEVICE_EXAMPLES = 600  # a deployed node's own data: one MNIST IID client's share


def steps(data_path: str) -> dict[str, Callable[[], object]]:
    """The timed steps, each a no-argument callable doing the work for one client."""
    cfg = run_config(data_path, CLIENTS, 1)
    grid = InProcessGrid(client.app, cfg.num_clients, cfg.to_mapping(), simulation_node_config(cfg.num_clients))
    model = model_from_config(cfg, data_spec(cfg))
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    arrays = to_arrayrecord(global_weights)
    contexts = [grid.context(FIRST_NODE_ID + k) for k in range(CLIENTS)]
    data = client.runtimes.get(contexts[0]).node_data(contexts[0])
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train).long()
    calls = itertools.count(1)

    def floor() -> None:
        model.load_state_dict(global_weights)
        bare_local_training(model, x, y, cfg, seed=1)

    def train() -> None:
        model.load_state_dict(global_weights)
        task.train(model, x, y, epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, device="cpu", seed=1)

    def client_app() -> None:
        call = next(calls)
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: call})})
        message = grid.create_message(content, "train", FIRST_NODE_ID + call % CLIENTS, str(call))
        grid.push_messages([message])
        client.app(message, contexts[call % CLIENTS])

    def partition() -> None:
        context = contexts[next(calls) % CLIENTS]
        client.runtimes.get(context).node_data(context)

    def update_handling() -> None:
        reply = to_arrayrecord(model.state_dict())
        validate_update(arrays, reply)
        [array.numpy() for array in reply.values()]

    return {"floor": floor, "task.train": train, "ClientApp call": client_app,
            "partition": partition, "update handling": update_handling}  # fmt: skip


def device_round(data_path: str, model: str, own_data: Path) -> Callable[[], object]:
    """One training message to a deployed node (its own `own_data`), through fedclient's ClientApp.

    `torch-threads = 0` leaves the process's thread count as the caller set it."""
    cfg = run_config(data_path, CLIENTS, 1).replace(model=model, torch_threads=0)
    with np.load(data_path) as mnist:
        np.savez(own_data, x=mnist["x_train"][:DEVICE_EXAMPLES], y=mnist["y_train"][:DEVICE_EXAMPLES])
    node = {"data-path": str(own_data), "device": "cpu"}
    recipe = cfg.replace(data_path="").to_mapping()  # a device reads only its own data
    grid = InProcessGrid(client.make_client_app(), 1, recipe, lambda _: node)
    arrays = to_arrayrecord(model_from_config(cfg, data_spec(cfg)).state_dict())
    calls = itertools.count(1)

    def train() -> None:
        call = next(calls)
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: call})})
        (reply,) = grid.send_and_receive([grid.create_message(content, "train", FIRST_NODE_ID, str(call))])
        assert not reply.has_error(), reply.error.reason

    return train


def time_threads(data_path: str, models: list[str], threads: list[int], repeats: int, work: Path) -> None:
    """Print a device's training round per model and thread count: median and fastest wall seconds."""
    print(f"\ndevice training round ({DEVICE_EXAMPLES} examples, E = 1, B = 10), wall s, {repeats} runs each")
    print(f"  {'model':<6} {'threads':>7} {'median':>8} {'fastest':>8}")
    for model in models:
        train = device_round(data_path, model, work / f"device-{model}.npz")
        seconds: dict[int, list[float]] = {n: [] for n in threads}
        for n in threads:  # warm-up: the model, the data, the first step at this count
            torch.set_num_threads(n)
            train()
        for _, n in itertools.product(range(repeats), threads):
            torch.set_num_threads(n)
            started = time.perf_counter()
            train()
            seconds[n].append(time.perf_counter() - started)
        for n, values in seconds.items():
            print(f"  {model:<6} {n:>7} {statistics.median(values):8.3f} {min(values):8.3f}", flush=True)


def time_steps(data_path: str, repeats: int) -> dict[str, list[float]]:
    """Each step's CPU seconds of this thread, `repeats` times, round-robin after a warm-up."""
    torch.set_num_threads(1)
    timed = steps(data_path)
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for step in timed.values():  # warm-up: imports, first optimizer, caches
        step()
    for _ in range(repeats):
        for name, step in timed.items():
            started = time.thread_time()
            step()
            seconds[name].append(time.thread_time() - started)
    return seconds


def print_steps(seconds: dict[str, list[float]], repeats: int, source: str) -> None:
    print(f"{repeats} runs each, CPU ms per client ({source})")
    floor, fastest_floor = statistics.median(seconds["floor"]), min(seconds["floor"])
    print(f"  {'':<16} {'median':>8}   {'':>11} {'fastest':>8}")
    for name, values in seconds.items():
        median, fastest = statistics.median(values), min(values)
        print(
            f"  {name:<16} {1000 * median:8.2f}   {median / floor:5.3f}x floor"
            f" {1000 * fastest:8.2f}   {fastest / fastest_floor:5.3f}x floor"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data", type=Path, default=MNIST_NPZ, help="MNIST as an NPZ (default: %(default)s)")
    parser.add_argument("--threads", type=int, nargs="*", default=[], help="time a device's round at these counts")
    parser.add_argument("--models", nargs="+", default=["2nn", "cnn"], help="the models of --threads")
    parser.add_argument("--no-steps", action="store_true", help="only the --threads table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = args.data
        if not data_path.exists():
            data_path = Path(tmp) / "mnist-stand-in.npz"
            write_stand_in(data_path)
        if not args.no_steps:
            seconds = time_steps(str(data_path), args.repeats)
            print_steps(seconds, args.repeats, data_path.name if args.data.exists() else "random data")
        if args.threads:
            time_threads(str(data_path), args.models, args.threads, args.repeats, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
