"""Flower's strategies by name, and the platform's rules around them: quorum, the screening of
replies, and the server-optimizer state a checkpoint must keep (`StatefulStrategy`)."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from shared import messages as keys
from shared.config import ConfigError, RunConfig
from shared.device_errors import REFUSAL_CHARS, REPLY_TOO_LARGE, describe_error, log_safe
from shared.weights import InvalidUpdate, validate_update

LOG = logging.getLogger("flowerbed.server")


@runtime_checkable
class StatefulStrategy(Protocol):
    """A strategy whose state between rounds a checkpoint keeps, so that a resumed run is exact."""

    def state(self) -> dict[str, np.ndarray]:
        """The state between rounds as named arrays (empty before the first aggregation)."""

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Put back what `state()` returned."""


class _ServerMoments:
    """`state()` / `load_state()` of Flower's FedOpt family: the moments `m_t` and `v_t`
    (parameter name -> array), which FedAdam, FedYogi and FedAdagrad update every round.

    Each stateful Flower strategy gets a subclass one level below it, rather than one function
    reading attributes of any strategy by name, so that the names of Flower's attributes are
    used only by the class that inherits them, and a strategy that keeps state must say so.
    """

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None

    def state(self) -> dict[str, np.ndarray]:
        return {**_flatten("m_t", self.m_t or {}), **_flatten("v_t", self.v_t or {})}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m_t = _unflatten("m_t", state) or None
        self.v_t = _unflatten("v_t", state) or None


class CheckpointedFedAdam(_ServerMoments, FedAdam):
    """FedAdam whose moments a checkpoint keeps."""


class CheckpointedFedYogi(_ServerMoments, FedYogi):
    """FedYogi whose moments a checkpoint keeps."""


class CheckpointedFedAdagrad(_ServerMoments, FedAdagrad):
    """FedAdagrad whose moments a checkpoint keeps."""


class CheckpointedFedAvgM(FedAvgM):
    """FedAvgM whose server momentum (a list of arrays, one per parameter) a checkpoint keeps.

    Its `current_arrays` need no keeping: they must equal the committed global weights, which
    `configure_train` hands it when they are None. `load_state` forgets them, so that after a
    resume, or a failed attempt rolled back (`fedserver.app`), they are those weights again
    (tests/fedserver/test_reliability.py checks both).
    """

    def state(self) -> dict[str, np.ndarray]:
        return _flatten("momentum_vector", dict(enumerate(self.momentum_vector or [])))

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        by_index = _unflatten("momentum_vector", state)
        self.momentum_vector = [by_index[i] for i in sorted(by_index, key=int)] or None
        self.current_arrays = None


def _set(argument: str, value: float) -> dict[str, float]:
    # 0.0 in the config leaves Flower's own default of `argument` (server-lr, server-momentum).
    return {argument: value} if value > 0 else {}


def _server_lr(cfg: RunConfig) -> dict[str, float]:
    return _set("eta", cfg.server_lr)


def _fedavgm(cfg: RunConfig) -> dict[str, float]:
    return {**_set("server_learning_rate", cfg.server_lr), **_set("server_momentum", cfg.server_momentum)}


# Strategy name -> (Flower class, its own keyword arguments from the config).
STRATEGIES: dict[str, tuple[type[Strategy], Callable[[RunConfig], dict[str, Any]]]] = {
    "fedavg": (FedAvg, lambda cfg: {}),
    "fedprox": (FedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}),
    "fedadam": (CheckpointedFedAdam, _server_lr),
    "fedyogi": (CheckpointedFedYogi, _server_lr),
    "fedadagrad": (CheckpointedFedAdagrad, _server_lr),
    "fedavgm": (CheckpointedFedAvgM, _fedavgm),
    "fedmedian": (FedMedian, lambda cfg: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda cfg: {"beta": cfg.trim_beta}),
    "krum": (Krum, lambda cfg: {"num_malicious_nodes": cfg.num_malicious}),
    "multikrum": (
        MultiKrum,
        lambda cfg: {
            "num_malicious_nodes": cfg.num_malicious,
            "num_nodes_to_select": max(1, cfg.clients_per_round - cfg.num_malicious),
        },
    ),
    "bulyan": (Bulyan, lambda cfg: {"num_malicious_nodes": cfg.num_malicious}),
}


def build_strategy(cfg: RunConfig, *, federated_evaluation: bool) -> Strategy:
    """Flower's strategy for `cfg.strategy`, training every node of the round's cohort it is shown
    (`clients-per-round` and `over-select`'s share, or with `dp = "central"` or `"distributed"`
    the Poisson cohort: the ServerApp samples it, fedserver/cohort.py and fedserver/privacy.py).

    With `federated_evaluation` it evaluates on every node it is shown: the ServerApp shows it
    only the round's evaluation cohort (`eval-clients`, `fedserver.app`).
    """
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{cfg.strategy}'; allowed: {', '.join(STRATEGIES)}")
    cls, own_kwargs = STRATEGIES[cfg.strategy]
    return cls(
        fraction_train=1.0,
        min_train_nodes=cfg.clients_per_round,
        fraction_evaluate=1.0 if federated_evaluation else 0.0,
        min_evaluate_nodes=1 if federated_evaluation else 0,
        min_available_nodes=cfg.num_clients,
        **own_kwargs(cfg),
    )


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The strategy's state between rounds (empty for a stateless strategy)."""
    return strategy.state() if isinstance(strategy, StatefulStrategy) else {}


def restore_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    """Put back what `strategy_state` saved (nothing to do for a stateless strategy)."""
    if isinstance(strategy, StatefulStrategy):
        strategy.load_state(state)


def _flatten(prefix: str, arrays: dict[Any, np.ndarray]) -> dict[str, np.ndarray]:
    # Keys `prefix/name`: the layout checkpoints have always used.
    return {f"{prefix}/{name}": np.ascontiguousarray(value) for name, value in arrays.items()}


def _unflatten(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(f"{prefix}/")}


def quorum(cfg: RunConfig, sampled: int) -> int:
    """Valid replies a round needs: `min-replies` as a count (>= 1) or a fraction of those sampled."""
    if cfg.min_replies >= 1:
        return min(int(cfg.min_replies), sampled)
    return max(1, math.ceil(cfg.min_replies * sampled))


# What each score in a reply may be: the losses are cross-entropies, the accuracy a fraction.
SCORE_RANGES = {keys.TRAIN_LOSS: (0.0, math.inf), keys.EVAL_LOSS: (0.0, math.inf), keys.ACCURACY: (0.0, 1.0)}


class RefusedReply(ValueError):
    """A reply that fails a check of its content; the message names the check and what was wrong."""


def screen_replies(replies: list[Message], reference: ArrayRecord, cfg: RunConfig) -> list[Message]:
    """The training replies fit to aggregate; each refused one is logged with its node and reason."""
    return _screen(replies, "update", lambda content: check_train_reply(content, reference, cfg))


def screen_evaluation_replies(replies: list[Message], cfg: RunConfig) -> list[Message]:
    """The evaluation replies fit to aggregate; each refused one is logged with its node and reason."""
    return _screen(replies, "evaluation", lambda content: check_evaluate_reply(content, cfg))


def check_train_reply(content: RecordDict, reference: ArrayRecord, cfg: RunConfig) -> None:
    """Raise RefusedReply (or InvalidUpdate) unless `content` is exactly what the ClientApp's
    training sends: the weights, fitting `reference` (and within `max-update-norm` of it when
    set), and the training metrics."""
    _check_records(content, keys.TRAIN_REPLY_RECORDS)
    _check_metrics(content[keys.METRICS], keys.TRAIN_REPLY_METRICS, cfg.max_client_examples)
    validate_update(reference, content[keys.ARRAYS], max_norm=cfg.max_update_norm or None)


def check_evaluate_reply(content: RecordDict, cfg: RunConfig) -> None:
    """Raise RefusedReply unless `content` is exactly what the ClientApp's evaluation sends."""
    _check_records(content, keys.EVALUATE_REPLY_RECORDS)
    _check_metrics(content[keys.METRICS], keys.EVALUATE_REPLY_METRICS, cfg.max_client_examples)


def refused_for_size(reply: Message) -> bool:
    """Whether `reply` stands for one the deployed grid refused, uninflated, for its size
    (`max-reply-bytes`, fedserver/polling.py); its reason gives the sizes."""
    return reply.has_error() and int(reply.error.code) == REPLY_TOO_LARGE


def _screen(replies: list[Message], what: str, check: Callable[[RecordDict], None]) -> list[Message]:
    valid = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if refused_for_size(reply):
            LOG.warning("node %d: %s refused: %s", node, what, log_safe(reply.error.reason))
            continue
        if reply.has_error():
            LOG.warning("node %d: %s", node, describe_error(int(reply.error.code), reply.error.reason))
            continue
        try:
            check(reply.content)
        except (RefusedReply, InvalidUpdate) as err:
            LOG.warning("node %d: %s refused: %s", node, what, log_safe(err, REFUSAL_CHARS))
            continue
        except Exception as err:  # noqa: BLE001 - whatever a client sends must not end the run
            LOG.warning("node %d: %s refused: unreadable: %s: %s", node, what, type(err).__name__, log_safe(err))
            continue
        valid.append(reply)
    return valid


def _check_records(content: RecordDict, expected: tuple[str, ...]) -> None:
    """Exactly the records named `expected`: `arrays` an ArrayRecord, `metrics` a MetricRecord."""
    names = sorted(content)
    if names != sorted(expected):
        raise RefusedReply(f"records: {names}, expected exactly {sorted(expected)}")
    kinds = {keys.ARRAYS: ArrayRecord, keys.METRICS: MetricRecord}
    for name in expected:
        if not isinstance(content[name], kinds[name]):
            raise RefusedReply(f"records: '{name}' is a {type(content[name]).__name__}, not a {kinds[name].__name__}")


def _check_metrics(metrics: MetricRecord, expected: tuple[str, ...], max_examples: int) -> None:
    """Exactly the `expected` entries: `num-examples` an int in [1, max_examples], every other one
    a finite number in its `SCORE_RANGES`."""
    names = sorted(metrics)
    if names != sorted(expected):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise RefusedReply(f"metrics: missing {missing}, unexpected {extra}")
    count = metrics[keys.NUM_EXAMPLES]
    if not isinstance(count, int) or not 1 <= count <= max_examples:
        raise RefusedReply(
            f"{keys.NUM_EXAMPLES}: {count!r} is not an integer in [1, {max_examples}] (max-client-examples)"
        )
    for name in expected:
        if name != keys.NUM_EXAMPLES:
            _check_score(name, metrics[name])


def _check_score(name: str, value: object) -> None:
    # Within the largest float: not NaN or ±Inf, nor an int no float holds (Flower keeps any int
    # in process), which would fail the aggregation of the round's metrics.
    if not isinstance(value, int | float) or not abs(value) <= sys.float_info.max:
        raise RefusedReply(f"metric '{name}': {value!r} is not a finite number")
    low, high = SCORE_RANGES[name]
    if not low <= value <= high:
        raise RefusedReply(f"metric '{name}': {value!r} is outside [{low:g}, {high:g}]")
