"""Client-level central DP (DP-FedAvg, McMahan et al. 2018): Poisson sampling, the strategy wrapper
that clips, noises and averages, and the RDP accountant of ε (docs/privacy.md). Distributed DP
(`DistributedDP`): the same sampling, division and accounting, the clipping and the noise shares
done on the devices before SecAgg+ masks their updates (`shared.secagg.client`).

The clipping and the noise are Flower's own functions (through `shared.flower_compat`); the
accounting is Google's `dp-accounting` (the `server` extra), imported where a DP run needs it.
Flower's `DifferentialPrivacyServerSideFixedClipping` divides by the cohort that replied and its
accountant knows no Poisson sampling; DP-FedAvg divides by the expected cohort, so that one
client's contribution to the release is at most C / (qN) whoever else was sampled or replied.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Sequence
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedserver.events import RoundEvent, Row
from fedserver.strategies import restore_strategy_state, strategy_state
from shared.flower_compat.dp import add_gaussian_noise_inplace, compute_clip_model_update
from shared.flower_compat.strategy import sampling_from
from shared import messages as keys
from shared.config import ConfigError, RunConfig
from shared.errors import ExitCode, FedserverError
from shared.logs import quieter

INSTALL_HINT = "pip install 'flowerbed[server]'"


class BudgetSpent(FedserverError, RuntimeError):
    """A release would take ε past `dp-target-epsilon`."""

    exit_code = ExitCode.FAILED


def poisson_cohort(nodes: Iterable[int], sample_rate: float, rng: random.Random | Any = random) -> list[int]:
    """Each node, independently, with probability `sample_rate` (so the cohort's size varies,
    and may be 0). Draws from the run's `random` stream by default, in node-id order."""
    return [node for node in sorted(nodes) if rng.random() < sample_rate]


@dataclass
class PoissonAccountant:
    """ε of `releases` Poisson-sampled Gaussian releases (rate q, noise multiplier z) at `delta`, by RDP.

    A release composed with another noise multiplier (distributed DP: the one its surviving
    clients' noise shares achieved) keeps it in `achieved`; every other release, and any release
    to come that `epsilon(n)` and `would_exceed` look ahead to, is at `noise_multiplier`.
    """

    sample_rate: float  # q
    noise_multiplier: float  # z
    delta: float
    releases: int = 0
    achieved: list[float] = field(default_factory=list)  # z of each release composed at another z

    @classmethod
    def for_config(cls, cfg: RunConfig) -> PoissonAccountant:
        _dp_accounting()  # a missing extra fails before the first round, not after it
        return cls(cfg.clients_per_round / cfg.num_clients, cfg.dp_noise_multiplier, cfg.dp_delta)

    def epsilon(self, releases: int | None = None) -> float:
        """ε after `releases` releases (default: those composed so far; any beyond them at z)."""
        count = self.releases if releases is None else releases
        if count == 0:
            return 0.0
        dp_accounting = _dp_accounting()
        accountant = dp_accounting.rdp.RdpAccountant()
        others = Counter(self.achieved) if count >= self.releases else Counter()
        at_z = count - sum(others.values())
        with quieter("absl", logging.ERROR):  # it warns, each round, of RDP orders it leaves out (the bound holds)
            for noise_multiplier, times in [(self.noise_multiplier, at_z), *others.items()]:
                if times > 0:
                    event = dp_accounting.GaussianDpEvent(noise_multiplier)
                    accountant.compose(dp_accounting.PoissonSampledDpEvent(self.sample_rate, event), times)
            return float(accountant.get_epsilon(self.delta))

    def would_exceed(self, target: float) -> bool:
        """Whether one more release (at z) takes ε past `target` (0 = no target)."""
        return target > 0 and self.epsilon(self.releases + 1) > target

    def compose(self, noise_multiplier: float | None = None) -> None:
        """One more release, at z or at the `noise_multiplier` it achieved."""
        self.releases += 1
        if noise_multiplier is not None and noise_multiplier != self.noise_multiplier:
            self.achieved.append(float(noise_multiplier))

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (state.json): the releases composed, q and z (and the z achieved
        by any release at another)."""
        state: dict[str, Any] = {
            "releases": self.releases, "sample_rate": self.sample_rate, "noise_multiplier": self.noise_multiplier,
        }  # fmt: skip
        if self.achieved:
            state["achieved"] = list(self.achieved)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Put back what `state()` returned; a checkpoint of another q or z is refused."""
        if (state["sample_rate"], state["noise_multiplier"]) != (self.sample_rate, self.noise_multiplier):
            raise ConfigError(
                f"the checkpoint's privacy accountant has q {state['sample_rate']}, z {state['noise_multiplier']}, "
                f"not q {self.sample_rate}, z {self.noise_multiplier}"
            )
        self.releases = int(state["releases"])
        self.achieved = [float(z) for z in state.get("achieved", [])]


def _dp_accounting() -> Any:
    try:
        import dp_accounting
        import dp_accounting.rdp
    except ImportError:
        raise ConfigError(f"dp needs the dp-accounting package: {INSTALL_HINT}") from None
    return dp_accounting


class CentralDP(Strategy):
    """DP-FedAvg around `strategy` (one of the averaging ones).

    `configure_train` asks every node of the grid it is shown (the ServerApp shows it the Poisson
    cohort). `aggregate_train` clips each reply's update to `clipping_norm`, sums the clipped
    updates with equal weights, adds N(0, (z C)^2) to the sum, divides by `expected_cohort` (qN)
    and hands `strategy` one reply holding the noised model, so a server optimizer (FedAdam, ...)
    steps on it; each noised aggregate is one release for `accountant`, also when the round is
    then retried.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        clipping_norm: float,
        noise_multiplier: float,
        expected_cohort: float,
        accountant: PoissonAccountant,
        target_epsilon: float = 0.0,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.clipping_norm = clipping_norm
        self.noise_multiplier = noise_multiplier
        self.expected_cohort = expected_cohort
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.current_arrays = ArrayRecord()

    @classmethod
    def for_config(cls, strategy: Strategy, cfg: RunConfig) -> CentralDP:
        """`strategy` wrapped as `cfg`'s `dp-*` keys say, the expected cohort qN = `clients-per-round`."""
        return cls(
            strategy,
            clipping_norm=cfg.dp_clipping_norm,
            noise_multiplier=cfg.dp_noise_multiplier,
            expected_cohort=cfg.clients_per_round,
            accountant=PoissonAccountant.for_config(cfg),
            target_epsilon=cfg.dp_target_epsilon,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = arrays
        cohort = len(list(grid.get_node_ids()))
        with sampling_from(self.strategy, cohort):  # built with fraction_train = 1: all of them
            return list(self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.check_budget()
        current = self.current_arrays.to_numpy_ndarrays()
        noised = central_dp_mean(
            current,
            [reply.content[keys.ARRAYS].to_numpy_ndarrays() for reply in replies],
            clipping_norm=self.clipping_norm,
            noise_multiplier=self.noise_multiplier,
            expected_cohort=self.expected_cohort,
        )
        self.accountant.compose()
        return self._hand_on(server_round, noised, _train_metrics(replies))

    def _hand_on(
        self, server_round: int, model: Sequence[np.ndarray], metrics: MetricRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate of one reply holding `model` (named as the current
        arrays) and `metrics`: a server optimizer steps on the noised model."""
        arrays = ArrayRecord(
            {name: Array(np.ascontiguousarray(value)) for name, value in zip(self.current_arrays, model, strict=True)}
        )
        reply = Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), 0, MessageType.TRAIN)
        return self.strategy.aggregate_train(server_round, [reply])

    def check_budget(self) -> None:
        """BudgetSpent where one more release would take ε past the target."""
        if self.accountant.would_exceed(self.target_epsilon):
            raise BudgetSpent(f"a further release would take ε past dp-target-epsilon {self.target_epsilon:g}")

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def state(self) -> dict[str, np.ndarray]:
        """The wrapped strategy's state (the accountant is kept apart: a retried round keeps its releases)."""
        return strategy_state(self.strategy)

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        restore_strategy_state(self.strategy, state)


class DistributedDP(CentralDP):
    """Distributed DP around `strategy`: each client clipped its update and added its share of
    the noise, N(0, (zC)^2 / m), on its device before masking (`shared.secagg.client`), and
    weighed 1; `aggregate_train` gets the one secure reply holding their unweighted mean over
    the k clients in the sum (its `num-examples` = k), turns it into their sum over the expected
    cohort m, current + (mean - current) k / m, as central DP divides, and composes one release
    at the noise multiplier their shares achieved, z sqrt(k / m) (the noise on the sum has std
    zC sqrt(k / m), the sensitivity is C)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        (reply,) = list(replies)
        self.check_budget()
        summed = int(reply.content[keys.METRICS][keys.NUM_EXAMPLES])
        current = self.current_arrays.to_numpy_ndarrays()
        mean = reply.content[keys.ARRAYS].to_numpy_ndarrays()
        scale = summed / self.expected_cohort
        model = [
            (np.asarray(before, np.float64) + (np.asarray(after, np.float64) - before) * scale).astype(before.dtype)
            for before, after in zip(current, mean, strict=True)
        ]
        self.accountant.compose(self.achieved_noise_multiplier(summed))
        metrics = MetricRecord({**reply.content[keys.METRICS], keys.NUM_EXAMPLES: max(1, summed)})
        return self._hand_on(server_round, model, metrics)

    def achieved_noise_multiplier(self, summed: int) -> float:
        """z sqrt(k / m): the noise std on the sum of k clients' shares, over C."""
        return self.noise_multiplier * math.sqrt(summed / self.expected_cohort)

    def compose_failed_attempt(self, threshold: int) -> None:
        """A secure attempt that failed after its cohort was sampled: composed as a release at the
        least noise any sum it decoded can hold, z sqrt(min(t, m) / m) (t clients at least are in a
        decoded sum; one failed earlier released nothing), so a retry with a fresh cohort never makes
        an unaccounted release. The next attempt checks the budget before its cohort trains."""
        self.accountant.compose(self.achieved_noise_multiplier(min(threshold, self.expected_cohort)))


def central_dp_mean(
    current: Sequence[np.ndarray],
    updates: Sequence[Sequence[np.ndarray]],
    *,
    clipping_norm: float,
    noise_multiplier: float,
    expected_cohort: float,
) -> list[np.ndarray]:
    """`current` + (Σ clip(update - current, C) + N(0, (zC)^2)) / expected_cohort, in `current`'s dtypes.

    Computed in float64; with no update at all it is `current` plus the noise alone.
    """
    base = [np.asarray(array, dtype=np.float64) for array in current]
    total = [np.zeros_like(array) for array in base]
    for update in updates:
        clipped = [np.asarray(array, dtype=np.float64) for array in update]
        if all(np.array_equal(model, before) for model, before in zip(clipped, base, strict=True)):
            continue  # an unchanged model adds nothing (and Flower's clipping divides by its norm, 0)
        compute_clip_model_update(clipped, base, clipping_norm)  # clipped = base + clip(Δ)
        for summed, model, before in zip(total, clipped, base, strict=True):
            summed += model - before
    add_gaussian_noise_inplace(total, noise_multiplier * clipping_norm)
    return [
        (before + summed / expected_cohort).astype(array.dtype)
        for before, summed, array in zip(base, total, current, strict=True)
    ]


def _train_metrics(replies: list[Message]) -> MetricRecord:
    """The replies' training loss weighted by examples, and their examples (at least 1, so the
    wrapped strategy can weigh the one reply it gets)."""
    counts = [int(reply.content[keys.METRICS][keys.NUM_EXAMPLES]) for reply in replies]
    metrics: dict[str, float | int] = {keys.NUM_EXAMPLES: max(1, sum(counts))}
    if replies:
        losses = [float(reply.content[keys.METRICS][keys.TRAIN_LOSS]) for reply in replies]
        metrics[keys.TRAIN_LOSS] = sum(c * loss for c, loss in zip(counts, losses, strict=True)) / sum(counts)
    return MetricRecord(metrics)


@dataclass(frozen=True)
class PrivateRoundEvent(RoundEvent):
    """A round of a DP run: also ε spent after it, and why the run stops after it (None: it goes on)."""

    epsilon: float = 0.0
    stopped: str | None = None

    def row(self) -> Row:
        """The round's line of `metrics.jsonl`, with `epsilon` (and `stopped` where the run stops)."""
        row = super().row()
        if self.stopped is None:
            del row["stopped"]
        return row


def budget_stop(accountant: PoissonAccountant, cfg: RunConfig, server_round: int) -> str | None:
    """Why the run stops after `server_round`: the next release would pass `dp-target-epsilon`."""
    if server_round >= cfg.rounds or not accountant.would_exceed(cfg.dp_target_epsilon):
        return None
    following = accountant.epsilon(accountant.releases + 1)
    return f"dp-target-epsilon {cfg.dp_target_epsilon:g}: round {server_round + 1} would reach epsilon {following:.4g}"
