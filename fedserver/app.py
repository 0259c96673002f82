"""The ServerApp: config -> data spec -> model -> strategy -> rounds, each round recorded.

It drives the strategy's public `configure_*` / `aggregate_*` methods itself rather than
calling `Strategy.start`, because a platform round does more than Flower's loop: stragglers,
a record of every round in the run directory, a progress event, and stopping at a target.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedserver.checkpoints import RunDirectory
from fedserver.strategies import build_strategy
from shared import messages as keys
from shared import task
from shared.config import RunConfig
from shared.data.federation import data_spec, load_federation
from shared.recipe import model_from_config
from shared.weights import to_arrayrecord, to_state_dict

app = ServerApp()

ROUND_LOGGER = logging.getLogger("flowerbed.rounds")


class RoundFailed(RuntimeError):
    """No client of a round produced a usable reply."""


@dataclass
class RunResult:
    """The metrics of each completed round and the final global weights."""

    history: list[dict[str, float | None]] = field(default_factory=list)
    arrays: ArrayRecord | None = None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    run_federation(grid, RunConfig.from_mapping(context.run_config))


def run_federation(grid: Grid, cfg: RunConfig) -> RunResult:
    """Every round of `cfg` on `grid`; each completed round is logged and recorded at once."""
    spec = data_spec(cfg)
    model = model_from_config(cfg, spec)
    central_test = _central_test(cfg)
    strategy = build_strategy(cfg, federated_evaluation=central_test is None)
    run_dir = RunDirectory(cfg.run_dir) if cfg.run_dir else None
    result = RunResult(arrays=to_arrayrecord(model.state_dict()))
    with seeded_global_random(cfg.seed):  # Flower's node sampling draws from `random`
        for server_round in range(1, cfg.rounds + 1):
            started = time.perf_counter()
            result.arrays, train_metrics = _train_round(strategy, grid, cfg, server_round, result.arrays)
            eval_metrics = _evaluate(strategy, grid, cfg, server_round, result.arrays, model, central_test)
            row = _round_row(server_round, train_metrics, eval_metrics, time.perf_counter() - started)
            result.history.append(row)
            if run_dir is not None:
                run_dir.write_round(result.history, to_state_dict(result.arrays, like=model.state_dict()))
            ROUND_LOGGER.info("round %d/%d %s", server_round, cfg.rounds, row, extra={"round_row": row})
            if reached_target(cfg, row):
                break
    return result


def reached_target(cfg: RunConfig, row: dict[str, float | None]) -> bool:
    """Whether the round's accuracy meets `target-accuracy` and the run should stop there."""
    accuracy = row["accuracy"]
    return cfg.stop_at_target and cfg.target_accuracy > 0 and accuracy is not None and accuracy >= cfg.target_accuracy


@contextlib.contextmanager
def seeded_global_random(seed: int) -> Iterator[None]:
    """Seed Python's `random` for the run and put its state back afterwards."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


def _central_test(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """The held-out test set where the dataset has one and this server can read it."""
    if cfg.dataset == "synthetic" or not (cfg.data_path or cfg.dataset == "fashion-mnist"):
        return None
    return load_federation(cfg).central_test


def _train_round(
    strategy: Strategy, grid: Grid, cfg: RunConfig, server_round: int, arrays: ArrayRecord
) -> tuple[ArrayRecord, MetricRecord | None]:
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    messages = apply_stragglers(messages, cfg, server_round)
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    _raise_if_all_failed(replies, server_round)
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    return (new_arrays if new_arrays is not None else arrays), metrics


def apply_stragglers(messages: list[Message], cfg: RunConfig, server_round: int) -> list[Message]:
    """Make `stragglers` of the sampled clients do uniform 1..E epochs (Li et al. 2020).

    FedProx keeps their partial work; every other strategy drops them, as FedAvg does there.
    """
    if cfg.stragglers == 0 or not messages:
        return messages
    rng = np.random.default_rng([cfg.seed, server_round])
    slow = set(rng.choice(len(messages), size=int(round(cfg.stragglers * len(messages))), replace=False))
    if cfg.strategy != "fedprox":
        return [m for i, m in enumerate(messages) if i not in slow]
    out = []
    for i, message in enumerate(messages):
        if i in slow:
            epochs = int(rng.integers(1, cfg.local_epochs + 1))
            message = _with_config(message, {keys.LOCAL_EPOCHS: epochs})
        out.append(message)
    return out


def _with_config(message: Message, changes: dict[str, int]) -> Message:
    """A copy of a training message whose config has `changes` (the content is shared)."""
    content = message.content
    config = ConfigRecord({**content[keys.CONFIG], **changes})
    new_content = RecordDict({keys.ARRAYS: content[keys.ARRAYS], keys.CONFIG: config})
    return Message(new_content, message.metadata.dst_node_id, message.metadata.message_type)


def _raise_if_all_failed(replies: list[Message], server_round: int) -> None:
    errors = [r for r in replies if r.has_error()]
    if errors and len(errors) == len(replies):
        first = errors[0]
        raise RoundFailed(
            f"round {server_round}: all {len(replies)} clients failed; node "
            f"{first.metadata.src_node_id}: {first.error.reason}"
        )


def _evaluate(
    strategy: Strategy,
    grid: Grid,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    model: torch.nn.Module,
    central_test: tuple[np.ndarray, np.ndarray] | None,
) -> MetricRecord | None:
    if central_test is not None:
        model.load_state_dict(to_state_dict(arrays, like=model.state_dict()))
        res = task.evaluate(model, *central_test, batch_size=cfg.eval_batch_size, device=cfg.device)
        return MetricRecord({keys.EVAL_LOSS: res.loss, keys.ACCURACY: res.accuracy})
    messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    _raise_if_all_failed(replies, server_round)
    return strategy.aggregate_evaluate(server_round, replies)


def _round_row(
    server_round: int, train: MetricRecord | None, evaluation: MetricRecord | None, seconds: float
) -> dict[str, float | None]:
    def metric(record: MetricRecord | None, key: str) -> float | None:
        return float(record[key]) if record is not None and key in record else None

    return {
        "round": server_round,
        "train_loss": metric(train, keys.TRAIN_LOSS),
        "eval_loss": metric(evaluation, keys.EVAL_LOSS),
        "accuracy": metric(evaluation, keys.ACCURACY),
        "seconds": round(seconds, 4),
    }
