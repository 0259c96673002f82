#!/usr/bin/env python
"""Where fedsim's per-client time goes, against a bare PyTorch loop, in one process.

    .venv/bin/python benchmarks/client_overhead.py [--repeats 15] [--data MNIST.npz]

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data", type=Path, default=MNIST_NPZ, help="MNIST as an NPZ (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = args.data
        if not data_path.exists():
            data_path = Path(tmp) / "mnist-stand-in.npz"
            write_stand_in(data_path)
        timed = steps(str(data_path))
        seconds: dict[str, list[float]] = {name: [] for name in timed}
        for step in timed.values():  # warm-up: imports, first optimizer, caches
            step()
        for _ in range(args.repeats):
            for name, step in timed.items():
                started = time.thread_time()
                step()
                seconds[name].append(time.thread_time() - started)
    print(f"{args.repeats} runs each, CPU ms per client ({data_path.name if args.data.exists() else 'random data'})")
    floor, fastest_floor = statistics.median(seconds["floor"]), min(seconds["floor"])
    print(f"  {'':<16} {'median':>8}   {'':>11} {'fastest':>8}")
    for name, values in seconds.items():
        median, fastest = statistics.median(values), min(values)
        print(
            f"  {name:<16} {1000 * median:8.2f}   {median / floor:5.3f}x floor"
            f" {1000 * fastest:8.2f}   {fastest / fastest_floor:5.3f}x floor"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
