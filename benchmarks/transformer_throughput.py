#!/usr/bin/env python
"""Local training speed of the transformers: one client trained through fedsim's ClientApp, and
the same batches in a plain PyTorch loop, side by side in one process.

    .venv/bin/python benchmarks/transformer_throughput.py [CONFIG ...] [--threads 1 2] [--repeats 5]
                                                          [--set key=value ...]

For each config (default: configs/imdb-transformer.toml and configs/shakespeare-charlm.toml)
and each torch thread count, the client with the most training tokens is trained for the
config's `local-epochs`:

  fedsim  a training message carrying the global weights, delivered by simulations.grid's
          InProcessGrid to fedclient.app's ClientApp: run config parsing, the client's data view,
          weight loading, shared.task.train (bucketed batches), the reply's weights;
  plain   the same model, data and batches (shared.task.batch_plan with the ClientApp's seed):
          zero_grad, forward, cross-entropy, backward, Adam step; nothing else.

The two alternate `--repeats` times (after one warm-up each) and the fastest time of each is
shown (other load on the machine only ever adds time), with tokens/s counting non-padding
tokens. Both end with the same weights (checked), so they did the same work. The ratio
fedsim / plain is the ClientApp's overhead (target <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIGS = (REPO / "configs" / "imdb-transformer.toml", REPO / "configs" / "shakespeare-charlm.toml")
SERVER_ROUND = 1


def largest_client(federation: Any) -> int:
    """The partition with the most non-padding training tokens."""
    return max(range(federation.num_clients), key=lambda k: int((federation.client(k).x_train != 0).sum()))


def fedsim_train(cfg: Any, partition_id: int, weights: dict) -> tuple[float, dict]:
    """Seconds for one training message through the ClientApp, and the reply's weights."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedclient.app import app as client_app
    from shared import messages as keys
    from shared.weights import to_arrayrecord, to_state_dict
    from simulations.grid import FIRST_NODE_ID, InProcessGrid, simulation_node_config

    grid = InProcessGrid(client_app, cfg.num_clients, cfg.to_mapping(), simulation_node_config(cfg.num_clients))
    config = ConfigRecord({keys.SERVER_ROUND: SERVER_ROUND})
    content = RecordDict({keys.ARRAYS: to_arrayrecord(weights), keys.CONFIG: config})
    message = grid.create_message(content, "train", FIRST_NODE_ID + partition_id, "bench")
    started = time.perf_counter()
    (reply,) = grid.send_and_receive([message])
    seconds = time.perf_counter() - started
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    return seconds, to_state_dict(reply.content[keys.ARRAYS], like=weights)


def plain_train(cfg: Any, partition_id: int, weights: dict, model: Any) -> tuple[float, dict]:
    """Seconds for the same local training in a bare loop over the same batches, and the weights."""
    import torch
    import torch.nn.functional as F

    from fedclient.app import client_seed
    from shared import task
    from shared.data.federation import load_federation
    from simulations.grid import FIRST_NODE_ID

    data = load_federation(cfg).client(partition_id)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    started = time.perf_counter()
    model.load_state_dict(weights)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    seed = client_seed(cfg, SERVER_ROUND, FIRST_NODE_ID + partition_id)
    shuffle = torch.Generator().manual_seed(seed)
    lengths = task.token_lengths(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout, as task.train seeds it
        for _ in range(cfg.local_epochs):
            for idx, width in task.batch_plan(len(x), cfg.batch_size, shuffle, lengths):
                xb, yb = task.gather(x, y, idx, width)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb).flatten(0, -2), yb.flatten(), ignore_index=task.IGNORE)
                loss.backward()
                opt.step()
    return time.perf_counter() - started, {k: v.detach().clone() for k, v in model.state_dict().items()}


def tokens_per_epoch(cfg: Any, partition_id: int) -> int:
    from shared.data.federation import load_federation

    return int((load_federation(cfg).client(partition_id).x_train != 0).sum())


def measure(cfg: Any, repeats: int) -> dict[str, Any]:
    import torch

    from shared.data.federation import data_spec, load_federation
    from shared.recipe import model_from_config

    if cfg.optimizer != "adam":
        raise SystemExit(f"this benchmark's plain loop uses Adam; the config says '{cfg.optimizer}'")
    torch.set_num_threads(cfg.torch_threads)
    federation = load_federation(cfg)
    partition_id = largest_client(federation)
    model = model_from_config(cfg, data_spec(cfg))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    times: dict[str, list[float]] = {"fedsim": [], "plain": []}
    for rep in range(repeats + 1):  # the first round of each is a warm-up
        t_plain, w_plain = plain_train(cfg, partition_id, weights, model)
        t_fedsim, w_fedsim = fedsim_train(cfg, partition_id, weights)
        if rep > 0:
            times["plain"].append(t_plain)
            times["fedsim"].append(t_fedsim)
    same = all(torch.allclose(w_plain[k], w_fedsim[k].to(w_plain[k].dtype), atol=1e-5) for k in w_plain)
    tokens = tokens_per_epoch(cfg, partition_id) * cfg.local_epochs
    best = {name: min(t) for name, t in times.items()}
    return {
        "client": partition_id,
        "examples": len(federation.client(partition_id).y_train),
        "tokens": tokens,
        "plain_s": best["plain"],
        "fedsim_s": best["fedsim"],
        "ratio": best["fedsim"] / best["plain"],
        "same_weights": same,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, default=list(DEFAULT_CONFIGS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    import torch

    from shared.config import load_config
    from shared.task import resolve_device

    device = resolve_device("auto")
    print(f"device {device}, torch {torch.__version__}, {os.cpu_count()} CPUs; fastest of {args.repeats}")
    print(f"{'config':<26} {'thr':>3} {'client':>7} {'tokens':>9} {'plain s':>8} {'fedsim s':>9} "
          f"{'plain tok/s':>12} {'fedsim tok/s':>13} {'ratio':>6}  same weights")  # fmt: skip
    for path in args.configs:
        for threads in args.threads:
            cfg = load_config(path, [*args.overrides, f"torch-threads={threads}"])
            r = measure(cfg, args.repeats)
            print(f"{path.name:<26} {threads:>3} {r['client']:>7} {r['tokens']:>9} {r['plain_s']:>8.2f} "
                  f"{r['fedsim_s']:>9.2f} {r['tokens'] / r['plain_s']:>12.0f} {r['tokens'] / r['fedsim_s']:>13.0f} "
                  f"{r['ratio']:>6.3f}  {r['same_weights']}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
