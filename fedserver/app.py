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

from fedserver.checkpoints import Checkpoint, RunDirectory
from fedserver.polling import fast_polling
from fedserver.strategies import (
    build_strategy,
    quorum,
    restore_strategy_state,
    sampling_from,
    screen_replies,
    strategy_state,
)
from shared import messages as keys
from shared import task
from shared.config import RunConfig
from shared.data.federation import data_spec, load_federation
from shared.errors import ExitCode, FedserverError
from shared.recipe import model_from_config
from shared.secagg import SecAggError, SecAggSettings, as_mean_reply, secure_train_round
from shared.weights import to_arrayrecord, to_state_dict

app = ServerApp()

ROUND_LOGGER = logging.getLogger("flowerbed.rounds")
LOG = logging.getLogger("flowerbed.server")
NODE_POLL_SECONDS = 1.0  # while waiting for nodes to connect, as Flower's own sampling does


class RoundFailed(FedserverError, RuntimeError):
    """A round could not gather a quorum of valid replies; nothing of it was aggregated."""

    exit_code = ExitCode.FAILED


@dataclass
class RunResult:
    """The metrics of each completed round and the final global weights."""

    history: list[dict[str, float | None]] = field(default_factory=list)
    arrays: ArrayRecord | None = None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    run_federation(fast_polling(grid), RunConfig.from_mapping(context.run_config))


def run_federation(grid: Grid, cfg: RunConfig) -> RunResult:
    """Every round of `cfg` on `grid`, resuming after the last round committed in `run-dir`."""
    model = model_from_config(cfg, data_spec(cfg))
    central_test = _central_test(cfg)
    strategy = build_strategy(cfg, federated_evaluation=central_test is None)
    run_dir = RunDirectory(cfg.run_dir) if cfg.run_dir else None
    resumed = run_dir.load(cfg.to_mapping()) if run_dir else None
    result = RunResult(arrays=to_arrayrecord(model.state_dict()))
    if resumed is not None:
        result = RunResult(history=list(resumed.history), arrays=to_arrayrecord(resumed.weights))
        restore_strategy_state(strategy, resumed.strategy_state)
        LOG.info("resuming %s after round %d", cfg.run_dir, resumed.round)
    with global_random(cfg.seed, resumed.random_state if resumed else None):  # Flower samples from it
        for server_round in range(len(result.history) + 1, cfg.rounds + 1):
            if result.history and reached_target(cfg, result.history[-1]):
                break
            started = time.perf_counter()
            new_arrays, train_metrics = _train_round(strategy, grid, cfg, server_round, result.arrays)
            # Server optimizers compute in float64: the global model keeps the model's own dtypes.
            weights = to_state_dict(new_arrays, like=model.state_dict())
            result.arrays = to_arrayrecord(weights)
            eval_metrics = _evaluate(strategy, grid, cfg, server_round, result.arrays, model, central_test)
            row = _round_row(server_round, train_metrics, eval_metrics, time.perf_counter() - started)
            result.history.append(row)
            if run_dir is not None:
                state = strategy_state(strategy)
                run_dir.save(Checkpoint(server_round, weights, state, random.getstate(), result.history), cfg.to_mapping())
            ROUND_LOGGER.info("round %d/%d %s", server_round, cfg.rounds, row, extra={"round_row": row})
    return result


def reached_target(cfg: RunConfig, row: dict[str, float | None]) -> bool:
    """Whether the round's accuracy meets `target-accuracy` and the run should stop there."""
    accuracy = row["accuracy"]
    return cfg.stop_at_target and cfg.target_accuracy > 0 and accuracy is not None and accuracy >= cfg.target_accuracy


@contextlib.contextmanager
def global_random(seed: int, state: object | None = None) -> Iterator[None]:
    """Python's `random` seeded for the run (or put back to a checkpoint's state), restored after."""
    saved = random.getstate()
    if state is None:
        random.seed(seed)
    else:
        random.setstate(state)
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
    """One training round; below quorum it is retried with freshly sampled clients."""
    for attempt in range(cfg.round_retries + 1):
        with sampling_from(strategy, connected_nodes(grid, cfg, server_round)):
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        messages = apply_stragglers(messages, cfg, server_round)
        if cfg.secure_aggregation:
            return _secure_round(strategy, grid, cfg, server_round, messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        valid = screen_replies(replies, arrays, cfg)
        needed = quorum(cfg, len(messages))
        if len(valid) >= needed:
            new_arrays, metrics = strategy.aggregate_train(server_round, valid)
            return (new_arrays if new_arrays is not None else arrays), metrics
        LOG.warning(
            "round %d: %d valid replies of %d sent, quorum %d (attempt %d of %d)",
            server_round, len(valid), len(messages), needed, attempt + 1, cfg.round_retries + 1,
        )  # fmt: skip
    raise RoundFailed(
        f"round {server_round}: fewer than {needed} valid replies after {cfg.round_retries + 1} attempts"
        f"{_first_error(replies)}; nothing was aggregated"
    )


def connected_nodes(grid: Grid, cfg: RunConfig, server_round: int) -> int:
    """How many nodes a round samples from: all `num-clients` as soon as they are connected, else,
    after `round-timeout` s, those connected then (a node that is gone must not stall the run)."""
    deadline = time.monotonic() + cfg.round_timeout
    while (count := len(list(grid.get_node_ids()))) < cfg.num_clients and time.monotonic() < deadline:
        time.sleep(NODE_POLL_SECONDS)
    if count < cfg.num_clients:
        LOG.warning(
            "round %d: %d of %d nodes connected after %g s; sampling from those",
            server_round, count, cfg.num_clients, cfg.round_timeout,
        )  # fmt: skip
    return count


def _secure_round(
    strategy: Strategy, grid: Grid, cfg: RunConfig, server_round: int, messages: list[Message]
) -> tuple[ArrayRecord, MetricRecord | None]:
    """SecAgg+: the strategy aggregates one reply holding the unmasked weighted mean, never a
    client's own update (so per-client update checks cannot apply; the clipping range bounds it)."""
    settings = SecAggSettings.from_mapping(cfg.to_mapping())
    try:
        aggregate = secure_train_round(grid, messages, settings, timeout=cfg.round_timeout)
    except SecAggError as err:
        raise RoundFailed(f"round {server_round}: {err}; nothing was aggregated") from err
    needed = quorum(cfg, len(messages))
    if len(aggregate.survivors.masked) < needed:
        raise RoundFailed(f"round {server_round}: {len(aggregate.survivors.masked)} clients in the sum, quorum {needed}")
    new_arrays, metrics = strategy.aggregate_train(server_round, [as_mean_reply(aggregate, messages[0])])
    return new_arrays, metrics


def _first_error(replies: list[Message]) -> str:
    failed = [r for r in replies if r.has_error()]
    return f" (node {failed[0].metadata.src_node_id}: {failed[0].error.reason})" if failed else ""


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
    with sampling_from(strategy, connected_nodes(grid, cfg, server_round)):
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    if replies and all(r.has_error() for r in replies):
        raise RoundFailed(f"round {server_round}: every evaluation failed{_first_error(replies)}")
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
