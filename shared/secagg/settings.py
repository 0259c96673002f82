"""What a secure aggregation round is run with, and the errors it raises.

`SecAggSettings` maps to the run-config keys `secagg-threshold`, `secagg-neighbours`,
`secagg-clipping-range`, `secagg-quantization-range` (plus the switch `secure-aggregation`);
`from_mapping` reads them where present, with these defaults where not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from shared.errors import ExitCode, FlowerbedError

# Strategies whose aggregate of one reply holding the weighted mean (weight = total examples)
# equals their aggregate of the individual replies. Median, trimmed mean, Krum and Bulyan need
# every individual update, which secure aggregation exists to hide.
COMPATIBLE_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")

# Run-config key -> SecAggSettings field.
CONFIG_KEYS: dict[str, str] = {
    "secagg-threshold": "threshold",
    "secagg-neighbours": "neighbours",
    "secagg-clipping-range": "clipping_range",
    "secagg-quantization-range": "quantization_range",
    "secagg-modulus-bits": "modulus_bits",
    "secagg-metric-clipping-range": "metric_clipping_range",
}
SWITCH_KEY = "secure-aggregation"  # bool run-config key: a client then refuses plaintext training

# Device-owned node-config keys (a server cannot set node config): with all three a device signs
# its SecAgg keys and verifies every peer's against the enrollment CA; with none it does neither.
from shared.node_config import CERTIFICATE, ENROLLMENT_CA, SIGNING_KEY  # noqa: E402 - named once, there
ENROLLMENT_KEYS = (SIGNING_KEY, CERTIFICATE, ENROLLMENT_CA)


class SecAggError(FlowerbedError, RuntimeError):
    """Secure aggregation cannot complete; nothing was aggregated."""

    exit_code = ExitCode.FAILED


class SecAggIntegrityError(SecAggError):
    """A protocol message failed authentication or was replayed, redirected or duplicated."""


class SecAggUnverifiedPeer(SecAggIntegrityError):
    """A peer's keys are not signed by a device enrolled with this device's enrollment CA."""


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters (Bell et al., CCS 2020).

    threshold: shares needed to rebuild a client's secrets (t); every client and every
        dropped client's neighbourhood needs t survivors. Must be a strict majority of a
        neighbourhood (2t > neighbours + 1), so no minority of it can unmask anyone.
    neighbours: degree k of the random k-regular (Harary ring) graph over a round's clients;
        each client masks with, and shares its secrets among, its k neighbours (even; a
        round of n <= k + 1 clients uses the complete graph).
    clipping_range: each element of a client's update (new weights - received weights) is
        clipped to [-c, c] before quantization.
    quantization_range: Q levels over [-c, c]: step = 2c / (Q - 1), rounding to nearest.
    modulus_bits: m, arithmetic is modulo 2^m (uint64 for m > 32, else uint32). The total
        example count W of a round must satisfy W * (Q - 1) < 2^m.
    metric_clipping_range: reply metrics (e.g. train loss) are clipped to [-r, r] and
        quantized with Q levels, then averaged securely like the weights.
    """

    threshold: int = 5
    neighbours: int = 8
    clipping_range: float = 8.0
    quantization_range: int = 1 << 24
    modulus_bits: int = 64
    metric_clipping_range: float = 1000.0

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> SecAggSettings:
        """Settings from hyphenated run-config keys (`CONFIG_KEYS`); absent keys keep defaults."""
        types = {f.name: type(getattr(cls, f.name)) for f in fields(cls)}
        kwargs = {name: types[name](config[key]) for key, name in CONFIG_KEYS.items() if key in config}
        return cls(**kwargs)

    @property
    def step(self) -> float:
        """The quantization step of update elements: 2c / (Q - 1)."""
        return 2 * self.clipping_range / (self.quantization_range - 1)

    @property
    def metric_step(self) -> float:
        return 2 * self.metric_clipping_range / (self.quantization_range - 1)

    @property
    def dtype(self) -> np.dtype:
        """The unsigned integer type vectors are held in (arithmetic wraps in it; 2^m divides)."""
        return np.dtype(np.uint64 if self.modulus_bits > 32 else np.uint32)

    @property
    def max_total_examples(self) -> int:
        """The largest total example count W a round can sum without wrapping modulo 2^m."""
        return ((1 << self.modulus_bits) - 1) // (self.quantization_range - 1)

    def degree(self, num_clients: int) -> int:
        """The neighbour-graph degree for a round of `num_clients`."""
        return min(self.neighbours, num_clients - 1)

    def error_bound(self) -> float:
        """Largest |secure mean - plaintext mean| per element, for updates within [-c, c].

        Each client's quantized update element is within step/2 of the true one (rounding to
        nearest); the weighted mean of n such elements is a convex combination of them, so its
        error is also within step/2 = c / (Q - 1). The weighted sum's error is within W * step/2.
        Integer arithmetic modulo 2^m adds no error while W * (Q - 1) < 2^m.
        """
        return self.step / 2


def check_run(settings: SecAggSettings, strategy: str, clients_per_round: int) -> None:
    """Raise ValueError unless a run with secure aggregation can work at all (for config validation)."""
    if strategy not in COMPATIBLE_STRATEGIES:
        raise ValueError(
            f"strategy '{strategy}' needs every client's update and cannot run with secure aggregation; "
            f"use one of {', '.join(COMPATIBLE_STRATEGIES)}"
        )
    if clients_per_round < settings.threshold:
        raise ValueError(
            f"secure aggregation needs at least secagg-threshold = {settings.threshold} clients a round, "
            f"clients-per-round is {clients_per_round}"
        )


def _check(s: SecAggSettings) -> None:
    def fail(message: str) -> None:
        raise ValueError(f"secure aggregation settings: {message}")

    if not 1 <= s.modulus_bits <= 64:
        fail(f"modulus-bits must be in [1, 64], got {s.modulus_bits}")
    if not 2 <= s.quantization_range <= (1 << 53):
        fail(f"quantization-range must be in [2, 2^53], got {s.quantization_range}")
    if s.quantization_range - 1 >= (1 << s.modulus_bits):
        fail(f"quantization-range {s.quantization_range} does not fit modulo 2^{s.modulus_bits}")
    for name in ("clipping_range", "metric_clipping_range"):
        value = getattr(s, name)
        if not (math.isfinite(value) and value > 0):
            fail(f"{name.replace('_', '-')} must be a positive number, got {value}")
    if s.neighbours < 2 or s.neighbours % 2:
        fail(f"neighbours must be even and >= 2 (a ring k/2 to each side), got {s.neighbours}")
    if s.threshold < 2:
        fail(f"threshold must be >= 2, got {s.threshold}")
    if s.threshold > s.neighbours + 1:
        fail(f"threshold {s.threshold} is more than a neighbourhood ({s.neighbours} neighbours + self)")
    if 2 * s.threshold <= s.neighbours + 1:
        fail(
            f"threshold {s.threshold} must be a strict majority of a neighbourhood of "
            f"{s.neighbours + 1} (>= {(s.neighbours + 1) // 2 + 1})"
        )
