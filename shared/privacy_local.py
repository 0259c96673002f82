"""Sample-level DP-SGD on devices (`dp = "local-sgd"`): its settings, its batch sampling, its accounting.

A client trains with Poisson-sampled batches (each example in each step with probability
q = min(1, B/n)) for E * ceil(n/B) steps, each example's gradient clipped to C and Gaussian noise
of standard deviation z*C added to each step's sum (Opacus, in `shared.task.train`). Each step is
then the sampled Gaussian mechanism, and a client's sample-level ε composes over every step of
every round it took part in. `SampleLevelLedger` keeps that per node from what the server knows
(the run's B, E, z and each reply's `num-examples`, the client's n) and reports the worst node's ε,
by `dp-accounting`'s RDP accountant, imported on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

STATE_VERSION = 1


@dataclass(frozen=True)
class SampleLevelDp:
    """Per-example clipping norm C and noise multiplier z (noise std z*C on each step's summed gradient)."""

    clipping_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"sample-level DP needs a clipping norm > 0, got {self.clipping_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"sample-level DP needs a noise multiplier >= 0, got {self.noise_multiplier}")


def sampling(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(q, steps): the Poisson sampling rate min(1, B/n) and the number of steps E * ceil(n/B)."""
    if num_examples < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"n, batch size and epochs must be >= 1, got {num_examples}, {batch_size}, {epochs}")
    return min(1.0, batch_size / num_examples), epochs * -(-num_examples // batch_size)


# One client round as the ledger keys it: (n, batch size, epochs, noise multiplier).
_Round = tuple[int, int, int, float]


class SampleLevelLedger:
    """Each node's sample-level privacy loss over the rounds it trained in; ε is the worst node's.

    `record` once per accepted reply of a round; `epsilon(delta)` composes, per node, every
    recorded round's E * ceil(n/B) steps of the Poisson-sampled Gaussian mechanism (RDP).
    ε is a function of a node's rounds alone: nodes with the same rounds (the same n, as many
    times) share one computation, so a round of many nodes of one size costs a few.
    """

    def __init__(self, *, noise_multiplier: float, batch_size: int, epochs: int) -> None:
        self.noise_multiplier, self.batch_size, self.epochs = float(noise_multiplier), int(batch_size), int(epochs)
        self._rounds: dict[int, dict[_Round, int]] = {}  # node id -> round kind -> how many rounds
        self._epsilons: dict[tuple[tuple[tuple[_Round, int], ...], float], float] = {}  # (rounds, delta) -> ε

    def record(self, node_id: int, num_examples: int, *, epochs: int | None = None) -> None:
        """One round of `node_id` on `num_examples` examples (its n), `epochs` local epochs (the run's by default)."""
        local_epochs = self.epochs if epochs is None else int(epochs)
        sampling(num_examples, self.batch_size, local_epochs)  # checks the values
        kind = (int(num_examples), self.batch_size, local_epochs, self.noise_multiplier)
        rounds = self._rounds.setdefault(int(node_id), {})
        rounds[kind] = rounds.get(kind, 0) + 1

    def node_epsilon(self, node_id: int, delta: float) -> float:
        """The sample-level ε of one node at `delta`; 0 for a node that never trained, inf where z is 0."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        rounds = self._rounds.get(int(node_id), {})
        key = (tuple(sorted(rounds.items())), float(delta))
        if key not in self._epsilons:
            self._epsilons[key] = _epsilon(rounds, delta)
        return self._epsilons[key]

    def epsilon(self, delta: float) -> float:
        """The worst node's sample-level ε at `delta` (0 before any round)."""
        return max((self.node_epsilon(node, delta) for node in self._rounds), default=0.0)

    def state(self) -> dict[str, Any]:
        """A JSON-ready snapshot for a checkpoint; `from_state` reads it back."""
        return {
            "version": STATE_VERSION,
            "noise_multiplier": self.noise_multiplier,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "nodes": {
                str(node): [[*kind, count] for kind, count in sorted(rounds.items())]
                for node, rounds in sorted(self._rounds.items())
            },
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SampleLevelLedger:
        """The ledger `state()` saved: settings and every node's rounds."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown sample-level ledger state version {state.get('version')!r}")
        ledger = cls(noise_multiplier=state["noise_multiplier"], batch_size=state["batch_size"], epochs=state["epochs"])
        for node, rounds in state["nodes"].items():
            ledger._rounds[int(node)] = {
                (int(n), int(b), int(e), float(z)): int(count) for n, b, e, z, count in rounds
            }
        return ledger


def _epsilon(rounds: dict[_Round, int], delta: float) -> float:
    """ε at `delta` of the composition of `rounds` (kind -> count) of Poisson-sampled Gaussian steps."""
    if not rounds:
        return 0.0
    if any(z == 0 for _, _, _, z in rounds):
        return math.inf
    try:
        import dp_accounting  # noqa: PLC0415 (the server's accounting only; devices never import it)
        from dp_accounting.rdp import RdpAccountant  # noqa: PLC0415
    except ImportError as err:
        raise ImportError("sample-level DP accounting needs dp-accounting: pip install 'flowerbed[server]'") from err
    accountant = RdpAccountant()
    for (n, batch_size, epochs, z), count in rounds.items():
        q, steps = sampling(n, batch_size, epochs)
        step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps), count)
    return float(accountant.get_epsilon(delta))
