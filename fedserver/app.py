"""The ServerApp: config -> data spec -> model -> strategy -> rounds, each round recorded.

It drives the strategy's public `configure_*` / `aggregate_*` methods itself rather than
calling `Strategy.start`, because a platform round does more than Flower's loop: a quorum of
screened replies, a checkpoint of every round in the run directory, a round event to each
subscriber (`fedserver.events`), and stopping at a target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedserver.checkpoints import Checkpoint, RunDirectory
from fedserver.cohort import (
    cohort_size, collect_replies, enough_replies, nodes_to_wait_for, reply_timeout, responsive_first, sample_cohort,
    wait_for_nodes,
)  # fmt: skip
from fedserver.events import EventLog, RoundCallback, RoundEvent, Row, notify
from fedserver.grid_wrapper import GridWrapper
from fedserver.node_ledger import NodeLedger
from fedserver.polling import fast_polling
from fedserver.privacy import (
    BudgetSpent,
    CentralDP,
    DistributedDP,
    PrivateRoundEvent,
    budget_stop,
    poisson_cohort,
)
from fedserver.report import RunReport
from fedserver.strategies import (
    build_strategy,
    quorum,
    restore_strategy_state,
    screen_evaluation_replies,
    screen_replies,
    strategy_state,
)
from shared import messages as keys
from shared import task
from shared.config import RunConfig
from shared.data.federation import Federation, data_spec, load_federation, save_run_tokenizer
from shared.data.shipping import tokenizer_entries
from shared.device_errors import REFUSAL_CHARS, describe_error, log_safe
from shared.errors import ExitCode, FedserverError
from shared.flower_compat.strategy import sampling_from
from shared.privacy_local import SampleLevelLedger
from shared.recipe import model_from_config
from shared.secagg import EarlyClose, SecAggError, SecAggSettings, as_mean_reply, secure_train_round
from shared.weights import InvalidUpdate, to_arrayrecord, to_state_dict, validate_update

app = ServerApp()

LOG = logging.getLogger("flowerbed.server")
NODE_POLL_SECONDS = 1.0  # while waiting for nodes to connect, as Flower's own sampling does
StateDict = dict[str, torch.Tensor]
AggregateT = TypeVar("AggregateT")


class RoundFailed(FedserverError, RuntimeError):
    """A round could not gather a quorum of valid replies; nothing of it was aggregated."""

    exit_code = ExitCode.FAILED


@dataclass
class RunResult:
    """The metrics of each completed round and the final global weights."""

    history: list[Row] = field(default_factory=list)
    arrays: ArrayRecord | None = None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config; with `run-dir`, keep its summary and plot."""
    cfg = RunConfig.from_mapping(context.run_config)
    federation = server_federation(cfg)
    if not cfg.run_dir:
        run_federation(fast_polling(grid, max_reply_bytes=cfg.max_reply_bytes), cfg, federation=federation)
        return
    rows = RunDirectory(cfg.run_dir).history()
    report = RunReport(Path(cfg.run_dir), cfg, rows=rows, evaluated_on=evaluated_on(cfg, federation))
    events = EventLog(Path(cfg.run_dir), rows, cfg.rounds)  # what the daemon follows
    try:
        grid = fast_polling(grid, max_reply_bytes=cfg.max_reply_bytes)
        run_federation(grid, cfg, on_round=[report, events], federation=federation)
    finally:
        report.close()
        events.close()


def run_federation(
    grid: Grid, cfg: RunConfig, on_round: Sequence[RoundCallback] = (), federation: Federation | None = None
) -> RunResult:
    """Every round of `cfg` on `grid`, resuming after the last round committed in `run-dir`.

    After each committed round every `on_round` subscriber gets its `RoundEvent`; the run stops
    there if one of them returns True. `federation`: the run's data where this process holds it
    (fedsim's), else `server_federation`'s. The run's tokenizer is saved in `run-dir` first.
    """
    federation = federation or server_federation(cfg)
    model = model_from_config(cfg, data_spec(cfg, federation=federation))
    save_run_tokenizer(cfg, federation)
    central_test = _central_test(cfg, federation)
    strategy = build_strategy(cfg, federated_evaluation=central_test is None)
    local_dp = SampleLevelLedger(noise_multiplier=cfg.dp_noise_multiplier, batch_size=cfg.batch_size,
                                 epochs=cfg.local_epochs) if cfg.dp == "local-sgd" else None  # fmt: skip
    accountant = None
    if cfg.dp in ("central", "distributed"):  # distributed: the devices clip and noise, the server divides
        strategy = (DistributedDP if cfg.dp == "distributed" else CentralDP).for_config(strategy, cfg)
        accountant = strategy.accountant
    run_dir = RunDirectory(cfg.run_dir, keep=cfg.keep_checkpoints) if cfg.run_dir else None
    resumed = run_dir.load(cfg.to_mapping()) if run_dir else None
    ledger = NodeLedger.read(run_dir.path) if run_dir else NodeLedger()
    result = RunResult(arrays=to_arrayrecord(model.state_dict()))
    if resumed is not None:
        result = RunResult(history=list(resumed.history), arrays=to_arrayrecord(resumed.weights))
        restore_strategy_state(strategy, resumed.strategy_state)
        if accountant is not None and resumed.privacy is not None:
            accountant.load_state(resumed.privacy)
        if local_dp is not None and resumed.privacy is not None:
            local_dp = SampleLevelLedger.from_state(resumed.privacy)
        LOG.info("resuming %s after round %d", cfg.run_dir, resumed.round)
    # Flower samples from the run's `random` stream
    with global_random(cfg.seed, resumed.random_state if resumed else None), _ledger_kept(ledger, run_dir):
        for server_round in range(len(result.history) + 1, cfg.rounds + 1):
            if result.history and reached_target(cfg, result.history[-1]):
                break
            if accountant is not None and accountant.would_exceed(cfg.dp_target_epsilon):
                LOG.info("round %d not run: it would take epsilon past dp-target-epsilon", server_round)
                break
            started = time.perf_counter()
            weights, train_metrics = _train_round(
                strategy, grid, cfg, server_round, result.arrays, model.state_dict(), ledger, local_dp
            )
            result.arrays = to_arrayrecord(weights)
            eval_metrics = _evaluate(strategy, grid, cfg, server_round, result.arrays, model, central_test, ledger)
            event = _round_event(cfg, server_round, train_metrics, eval_metrics, time.perf_counter() - started)
            event = dataclasses.replace(event, replies=ledger.take_replies())
            if accountant is not None:
                stopped = budget_stop(accountant, cfg, server_round)
                event = PrivateRoundEvent(**vars(event), epsilon=accountant.epsilon(), stopped=stopped)
            elif local_dp is not None:  # the worst client's sample-level epsilon
                event = PrivateRoundEvent(**vars(event), epsilon=local_dp.epsilon(cfg.dp_delta))
            result.history.append(event.row())
            if run_dir is not None:
                privacy = accountant.state() if accountant else local_dp.state() if local_dp else None
                state = strategy_state(strategy)
                checkpoint = Checkpoint(server_round, weights, state, random.getstate(), result.history, privacy)
                run_dir.save(checkpoint, cfg.to_mapping())
                ledger.save(run_dir.path)
            if notify(on_round, event) or (isinstance(event, PrivateRoundEvent) and event.stopped):
                break
    return result


@contextlib.contextmanager
def _ledger_kept(ledger: NodeLedger, run_dir: RunDirectory | None) -> Iterator[None]:
    """Saves `ledger` in `run_dir` also when a round fails the run: what the nodes did to it."""
    try:
        yield
    except RoundFailed:
        if run_dir is not None:
            ledger.save(run_dir.path)
        raise


def reached_target(cfg: RunConfig, row: Row) -> bool:
    """Whether the round's accuracy meets `target-accuracy` and the run should stop there."""
    accuracy = row["accuracy"]
    return cfg.stop_at_target and cfg.target_accuracy > 0 and accuracy is not None and accuracy >= cfg.target_accuracy


@contextlib.contextmanager
def global_random(seed: int, state: object | None = None) -> Iterator[None]:
    """Python's `random` seeded for the run (or put back to a checkpoint's state), restored after."""
    with random_untouched():
        if state is None:
            random.seed(seed)
        else:
            random.setstate(state)
        yield


@contextlib.contextmanager
def random_untouched() -> Iterator[None]:
    """Python's `random` left after the block as it was before, whatever the block draws."""
    saved = random.getstate()
    try:
        yield
    finally:
        random.setstate(saved)


def evaluated_on(cfg: RunConfig, federation: Federation | None = None) -> str:
    """What the accuracy of `cfg`'s rounds is measured on (a line of `summary.json`)."""
    central_test = _central_test(cfg, federation or server_federation(cfg))
    if central_test is not None:
        return f"central test set ({len(central_test[1])} examples)"
    cohort, registered = cfg.eval_cohort(cfg.num_clients), cfg.num_clients
    if cohort == registered:
        return f"federated: all {registered} clients' held-out data"
    return f"federated: {cohort} of {registered} clients' held-out data, sampled for each evaluation"


def server_federation(cfg: RunConfig) -> Federation | None:
    """The run's data where this server can read it (a file, or Fashion-MNIST's system copy), else None."""
    if cfg.dataset == "synthetic" or not (cfg.data_path or cfg.dataset == "fashion-mnist"):
        return None
    return load_federation(cfg)


def _central_test(cfg: RunConfig, federation: Federation | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The held-out test set where the dataset has one and this server holds the data."""
    if cfg.dataset == "synthetic" or federation is None:
        return None
    return federation.central_test


def _train_round(
    strategy: Strategy,
    grid: Grid,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    like: StateDict,
    ledger: NodeLedger,
    local_dp: SampleLevelLedger | None = None,
) -> tuple[StateDict, MetricRecord | None]:
    """One training round: the new global weights (checked, with `like`'s dtypes) and the metrics.
    An attempt that fails (below quorum, a secure round stopped, an aggregate refused) is retried
    with freshly sampled clients (preferring those that did not fail an earlier attempt), the
    strategy's state put back as it was before the round, so a
    failed attempt leaves no trace (FedAdam's moments, FedAvgM's momentum, would count it).
    Screened replies are counted in `ledger`; under `dp = "local-sgd"` every client that trained,
    in any attempt, in `local_dp` (its update was released, whatever became of it)."""
    attempts, before = cfg.round_retries + 1, strategy_state(strategy)
    silent: set[int] = set()
    for attempt in range(1, attempts + 1):
        messages = _configure_train(strategy, grid, cfg, server_round, arrays, avoid=silent)
        if cfg.secure_aggregation:
            aggregate = functools.partial(_secure_attempt, ledger=ledger)
        else:
            aggregate = functools.partial(_plain_attempt, ledger=ledger, local_dp=local_dp)
        try:
            new_arrays, metrics = aggregate(strategy, grid, cfg, server_round, messages, arrays)
            return checked_aggregate(arrays, new_arrays, like, cfg), metrics
        except AttemptFailed as err:
            restore_strategy_state(strategy, before)
            failure = err
            silent |= err.silent
            LOG.warning("round %d: %s%s (attempt %d of %d)", server_round, err, err.detail, attempt, attempts)
    raise RoundFailed(
        f"round {server_round}: {failure} after {attempts} attempts{failure.detail}; nothing was aggregated"
    )


def _configure_train(
    strategy: Strategy, grid: Grid, cfg: RunConfig, server_round: int, arrays: ArrayRecord, avoid: Collection[int] = ()
) -> list[Message]:
    """The round's training messages: `clients-per-round` and `over-select`'s share of the nodes
    connected now (not those in `avoid` where enough others are), or under central DP each connected
    node independently with probability q = `clients-per-round` / `num-clients` (Poisson sampling,
    what its accountant assumes), from the run's `random` stream; the strategy is shown that cohort only."""
    connected = connected_nodes(grid, cfg, server_round)
    config = ConfigRecord(tokenizer_entries(cfg))  # the run's tokenizer, where it ships one
    if isinstance(strategy, CentralDP):
        cohort = poisson_cohort(connected, strategy.accountant.sample_rate)
        return list(strategy.configure_train(server_round, arrays, config, CohortGrid(grid, cohort)))
    size = cohort_size(cfg, len(connected))
    cohort = sample_cohort(responsive_first(connected, avoid, size), size)
    with random_untouched(), sampling_from(strategy, len(cohort)):  # the stream drew the cohort, not the strategy
        return list(strategy.configure_train(server_round, arrays, config, CohortGrid(grid, cohort)))


class AttemptFailed(Exception):
    """One attempt at a training round gave nothing to commit; `detail` names a client's error."""

    def __init__(self, reason: str, detail: str = "", silent: Collection[int] = ()) -> None:
        super().__init__(reason)
        self.detail = detail
        self.silent = frozenset(silent)  # the nodes sampled that gave no valid reply


def _plain_attempt(
    strategy: Strategy,
    grid: Grid,
    cfg: RunConfig,
    server_round: int,
    messages: list[Message],
    arrays: ArrayRecord,
    *,
    ledger: NodeLedger,
    local_dp: SampleLevelLedger | None = None,
) -> tuple[ArrayRecord, MetricRecord | None]:
    # A Poisson cohort (central DP) has no size to close at: it waits for every sampled node.
    enough = None if isinstance(strategy, CentralDP) else enough_replies(cfg.clients_per_round)
    replies = collect_replies(grid, messages, reply_timeout(cfg), enough, server_round)
    valid = screen_replies(replies, arrays, cfg)
    ledger.record(server_round, replies, valid, sent=messages)
    if local_dp is not None:
        _record_local_dp(local_dp, replies)
    # Central DP: a sampled client that drops is a smaller cohort, never a retry with others
    # (whether to retry would depend on the first cohort's replies, which ε does not account).
    needed = 0 if isinstance(strategy, CentralDP) else quorum(cfg, min(len(messages), cfg.clients_per_round))
    if len(valid) < needed:
        answered = {reply.metadata.src_node_id for reply in valid}
        silent = {message.metadata.dst_node_id for message in messages} - answered
        raise AttemptFailed(f"fewer than {needed} valid replies", _first_error(replies), silent)
    new_arrays, metrics = _aggregated(lambda: strategy.aggregate_train(server_round, valid))
    return (new_arrays if new_arrays is not None else arrays), metrics


def _record_local_dp(local_dp: SampleLevelLedger, replies: list[Message]) -> None:
    """Each client that replied with a training count trained with DP-SGD on that many examples
    (refused replies too: the client released its update)."""
    for reply in replies:
        metrics = reply.content.get(keys.METRICS) if reply.has_content() else None
        count = metrics.get(keys.NUM_EXAMPLES) if isinstance(metrics, MetricRecord) else None
        if isinstance(count, int) and count >= 1:
            local_dp.record(reply.metadata.src_node_id, count)


def _secure_attempt(
    strategy: Strategy,
    grid: Grid,
    cfg: RunConfig,
    server_round: int,
    messages: list[Message],
    arrays: ArrayRecord,
    *,
    ledger: NodeLedger,
) -> tuple[ArrayRecord, MetricRecord | None]:
    """SecAgg+: the strategy aggregates one reply holding the unmasked weighted mean, never a
    client's own update (so per-client update checks cannot apply; the clipping range bounds it,
    and the total count must be one a reply could claim for each client in the sum).

    Under distributed DP each client weighs 1 (the count must be the clients summed), no quorum
    applies (as for central DP), and an attempt that fails after sampling is composed as a release
    (`DistributedDP.compose_failed_attempt`), the budget checked before any client trains."""
    settings = SecAggSettings.from_mapping(cfg.to_mapping())
    distributed_dp = strategy if isinstance(strategy, DistributedDP) else None
    if distributed_dp is not None:
        try:
            distributed_dp.check_budget()  # before any client trains: the round, and so the run, fails
        except BudgetSpent as err:
            raise AttemptFailed(str(err)) from err
    try:
        aggregate = secure_train_round(
            grid, messages, settings, timeout=cfg.round_timeout,
            on_error=functools.partial(ledger.record_error, server_round),
            early=_early_close(grid, cfg, server_round, poisson=distributed_dp is not None),
        )  # fmt: skip
        ledger.record_accepted(aggregate.survivors.masked)
        for node, why in aggregate.failures.items():
            LOG.warning("node %d: dropped out of the secure round: %s", node, log_safe(why, REFUSAL_CHARS))
        summed = len(aggregate.survivors.masked)
        needed = 0 if distributed_dp is not None else quorum(cfg, min(len(messages), cfg.clients_per_round))
        if summed < needed:
            raise AttemptFailed(f"{summed} clients in the secure sum, fewer than {needed}")
        if distributed_dp is not None and aggregate.num_examples != summed:
            raise AttemptFailed(
                f"the secure sum counts {aggregate.num_examples} from {summed} clients: "
                "under distributed DP each weighs 1"
            )
        if not summed <= aggregate.num_examples <= summed * cfg.max_client_examples:
            raise AttemptFailed(
                f"the secure sum claims {aggregate.num_examples} examples from {summed} clients, "
                f"outside [1, {cfg.max_client_examples}] (max-client-examples) each"
            )
    except (SecAggError, AttemptFailed) as err:
        if distributed_dp is not None and messages:
            distributed_dp.compose_failed_attempt(settings.threshold)
        if isinstance(err, AttemptFailed):
            raise
        raise AttemptFailed(str(err)) from err
    return _aggregated(lambda: strategy.aggregate_train(server_round, [as_mean_reply(aggregate, messages[0])]))


def _aggregated(aggregate: Callable[[], AggregateT]) -> AggregateT:
    """The strategy's aggregate of screened replies; anything it raises fails the attempt, not the run."""
    try:
        return aggregate()
    except Exception as err:  # noqa: BLE001 - Flower's own checks (InconsistentMessageReplies) and arithmetic
        raise AttemptFailed(f"the strategy could not aggregate: {type(err).__name__}: {err}") from err


def checked_aggregate(previous: ArrayRecord, new: ArrayRecord, like: StateDict, cfg: RunConfig) -> StateDict:
    """`new` as weights with `like`'s dtypes (server optimizers compute in float64), if finite and,
    with `max-update-norm`, no further than that from `previous`; else AttemptFailed."""
    try:
        weights = to_state_dict(new, like=like)
        validate_update(previous, weights, max_norm=cfg.max_update_norm or None)
    except InvalidUpdate as err:
        raise AttemptFailed(f"aggregate refused: {err}") from err
    return weights


def _early_close(grid: Grid, cfg: RunConfig, server_round: int, *, poisson: bool) -> EarlyClose:
    """A secure round's cohort rule: its masked-input stage closes at `clients-per-round` vectors (not
    a Poisson cohort's), each stage before unmasking waits at most `reply-deadline` s."""

    def collect(messages: list[Message], timeout: float | None, enough: Callable | None) -> list[Message]:
        return collect_replies(grid, messages, timeout, enough, server_round)

    deadline = reply_timeout(cfg) if cfg.reply_deadline > 0 else None
    return EarlyClose(collect, wanted=None if poisson else cfg.clients_per_round, stage_timeout=deadline)


def connected_nodes(grid: Grid, cfg: RunConfig, server_round: int) -> list[int]:
    """The nodes a round samples from, those connected once enough are (`fedserver.cohort`: the first
    round waits for `num-clients`, later ones for a cohort), or after `node-wait-timeout` s."""
    return wait_for_nodes(grid, nodes_to_wait_for(cfg, server_round), cfg.node_wait_timeout, server_round, NODE_POLL_SECONDS)


def _first_error(replies: list[Message]) -> str:
    failed = [r for r in replies if r.has_error()]
    return f" (node {failed[0].metadata.src_node_id}: {describe_error(int(failed[0].error.code), failed[0].error.reason)})" if failed else ""


def _evaluate(
    strategy: Strategy,
    grid: Grid,
    cfg: RunConfig,
    server_round: int,
    arrays: ArrayRecord,
    model: torch.nn.Module,
    central_test: tuple[np.ndarray, np.ndarray] | None,
    ledger: NodeLedger,
) -> MetricRecord | None:
    """The round's scores: on the central test set where there is one, else on the held-out
    data of a sampled cohort of clients (its replies counted in `ledger`); None for a round
    that `eval-every` skips."""
    if central_test is None:
        return _federated_evaluation(strategy, grid, cfg, server_round, arrays, ledger)
    if not cfg.evaluates(server_round):
        return None
    model.load_state_dict(to_state_dict(arrays, like=model.state_dict()))
    res = task.evaluate(model, *central_test, batch_size=cfg.eval_batch_size, device=cfg.device)
    return MetricRecord({keys.EVAL_LOSS: res.loss, keys.ACCURACY: res.accuracy})


def _federated_evaluation(
    strategy: Strategy, grid: Grid, cfg: RunConfig, server_round: int, arrays: ArrayRecord, ledger: NodeLedger
) -> MetricRecord | None:
    """Every round, evaluated or not, orders all connected nodes at random from the run's stream;
    an evaluation asks the first `eval-clients` of them. So the stream the training rounds sample
    from is the same whatever `eval-clients` and `eval-every` are, and a resume continues it."""
    evaluated = cfg.evaluates(server_round)
    if evaluated:
        connected_nodes(grid, cfg, server_round)  # in a deployment, wait for the nodes as training does
    nodes = list(grid.get_node_ids())
    order = random.sample(nodes, len(nodes))
    if not evaluated:
        return None
    cohort = order[: cfg.eval_cohort(len(order))]
    sampler = strategy.strategy if isinstance(strategy, CentralDP) else strategy
    with random_untouched(), sampling_from(sampler, len(cohort)):  # the strategy draws from the cohort only
        config = ConfigRecord(tokenizer_entries(cfg))
        messages = strategy.configure_evaluate(server_round, arrays, config, CohortGrid(grid, cohort))
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    valid = screen_evaluation_replies(replies, cfg)
    ledger.record(server_round, replies, valid, sent=messages)
    needed = quorum(cfg, len(messages))
    try:
        if len(valid) < needed:
            raise AttemptFailed(f"fewer than {needed} valid evaluation replies", _first_error(replies))
        return _aggregated(lambda: strategy.aggregate_evaluate(server_round, valid))
    except AttemptFailed as err:
        raise RoundFailed(f"round {server_round}: {err}{err.detail}") from err


class CohortGrid(GridWrapper):
    """`grid` as a strategy's sampling sees it: with only the nodes of `cohort` connected."""

    def __init__(self, grid: Grid, cohort: list[int]) -> None:
        super().__init__(grid)
        self.cohort = cohort

    def get_node_ids(self) -> list[int]:
        return list(self.cohort)


def _round_event(
    cfg: RunConfig, server_round: int, train: MetricRecord | None, evaluation: MetricRecord | None, seconds: float
) -> RoundEvent:
    def metric(record: MetricRecord | None, key: str) -> float | None:
        return float(record[key]) if record is not None and key in record else None

    return RoundEvent(
        round=server_round,
        rounds=cfg.rounds,
        train_loss=metric(train, keys.TRAIN_LOSS),
        eval_loss=metric(evaluation, keys.EVAL_LOSS),
        accuracy=metric(evaluation, keys.ACCURACY),
        seconds=round(seconds, 4),
    )
