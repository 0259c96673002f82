#!/usr/bin/env python
"""The centralized baseline of a federation: the same model and data, trained in one place.

    .venv/bin/python benchmarks/centralized_baseline.py configs/imdb-transformer.toml [--epochs 3] [--set key=value ...]

Every client's training data is pooled and trained on with plain `shared.task.train` (the
config's model, batch size, optimizer, lr, seed, torch-threads), one epoch at a time; after each
epoch the model is scored on the federation's test data: the central test set where the
dataset has one, else every client's held-out data pooled (for Shakespeare: every test window
of every role, the same number federated evaluation reports). Prints one line per epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pooled(cfg: object) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """All clients' training data, and the test data federated evaluation would score."""
    from shared.data.federation import load_federation

    federation = load_federation(cfg)
    clients = [federation.client(k) for k in range(federation.num_clients)]
    train = (np.concatenate([c.x_train for c in clients]), np.concatenate([c.y_train for c in clients]))
    if federation.central_test is not None:
        return train, federation.central_test
    return train, (np.concatenate([c.x_test for c in clients]), np.concatenate([c.y_test for c in clients]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    import torch

    from shared import task
    from shared.config import load_config
    from shared.data.federation import data_spec
    from shared.recipe import model_from_config

    cfg = load_config(args.config, args.overrides)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    started = time.perf_counter()
    (x, y), (x_test, y_test) = pooled(cfg)
    model = model_from_config(cfg, data_spec(cfg))
    print(f"{args.config.name}: {len(x)} training examples, {len(x_test)} test examples, "
          f"loaded in {time.perf_counter() - started:.1f} s, torch threads {torch.get_num_threads()}")  # fmt: skip
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        fit = task.train(model, x, y, epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                         device=cfg.device, seed=cfg.seed + epoch)  # fmt: skip
        t1 = time.perf_counter()
        res = task.evaluate(model, x_test, y_test, batch_size=cfg.eval_batch_size, device=cfg.device)
        t2 = time.perf_counter()
        print(f"epoch {epoch}: train loss {fit.loss:.4f} ({t1 - t0:.1f} s) | test accuracy {res.accuracy:.4f} "
              f"loss {res.loss:.4f} over {res.num_examples} labels ({t2 - t1:.1f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
