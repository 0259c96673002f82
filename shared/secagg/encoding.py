"""Updates as fixed-point integer vectors: clip, quantize, weight by the example count.

A client's vector is n * [q(x - r), 1, q_m(metrics)], x its new weights, r those it received, n
its example count, q(v) = round((clip(v, -c, c) + c) / step) in [0, Q - 1]; summed modulo 2^m it
holds sum_i n_i q(...) and the total count W exactly while W (Q - 1) < 2^m (both sides check).
Rounding to nearest bounds each element's error by step/2 and keeps runs reproducible; Flower's
quantization is not used (stochastic rounding on numpy's global RNG, an int32 cast that overflows).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from flwr.app import ArrayRecord

from shared.flower_compat.messages import npy_view
from shared.secagg.settings import SecAggError, SecAggIntegrityError, SecAggSettings


RANGE_TOLERANCE = 1e-9  # relative: float64 rounding of the decoded mean, far below one quantization step


@dataclass(frozen=True)
class Layout:
    """Where each tensor and metric sits in the vector: tensors in record order, the count, metrics."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    metric_keys: tuple[str, ...] = ()

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]
        return tuple(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist())

    @property
    def count_index(self) -> int:
        return self.offsets[-1]

    @property
    def length(self) -> int:
        return self.count_index + 1 + len(self.metric_keys)

    def with_metrics(self, metric_keys: tuple[str, ...]) -> Layout:
        return Layout(self.names, self.shapes, self.dtypes, metric_keys)


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays by name, in order (read-only views where possible)."""
    return {name: npy_view(array) for name, array in record.items()}


def layout_of(arrays: Mapping[str, np.ndarray]) -> Layout:
    names = tuple(arrays)
    return Layout(names, tuple(a.shape for a in arrays.values()), tuple(a.dtype.str for a in arrays.values()))


def encode(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    weight: int,
    metrics: Mapping[str, float],
    layout: Layout,
    settings: SecAggSettings,
) -> np.ndarray:
    """The client's weighted, quantized vector (before masks), of `settings.dtype`."""
    _check_update(update, layout)
    if not 0 <= weight <= settings.max_total_examples:
        raise SecAggError(
            f"example count {weight} is outside [0, {settings.max_total_examples}] "
            f"(W (Q - 1) must stay below 2^{settings.modulus_bits})"
        )
    vector = np.empty(layout.length, dtype=settings.dtype)
    for i, name in enumerate(layout.names):
        start, stop = layout.offsets[i], layout.offsets[i + 1]
        delta = np.subtract(update[name], reference[name], dtype=np.float64).ravel()
        _quantize_into(vector[start:stop], delta, settings.clipping_range, settings.step, what=f"tensor {name!r}")
    vector[layout.count_index] = 1
    values = np.array([float(metrics[key]) for key in layout.metric_keys], dtype=np.float64)
    _quantize_into(vector[layout.count_index + 1 :], values, settings.metric_clipping_range, settings.metric_step, "metrics")
    np.multiply(vector, vector.dtype.type(weight), out=vector)
    return vector


def decode(
    total: np.ndarray, reference: Mapping[str, np.ndarray], layout: Layout, settings: SecAggSettings
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int, dict[str, float]]:
    """(weighted sum, weighted mean, total count, mean metrics) from the unmasked sum vector."""
    count = int(total[layout.count_index])
    if count == 0:
        raise SecAggError("the surviving clients hold no examples: nothing to average")
    if count > settings.max_total_examples:
        raise SecAggError(
            f"{count} examples in all: more than {settings.max_total_examples}, the sum may have "
            f"wrapped modulo 2^{settings.modulus_bits} (lower quantization-range)"
        )
    sums: dict[str, np.ndarray] = {}
    means: dict[str, np.ndarray] = {}
    for i, name in enumerate(layout.names):
        start, stop = layout.offsets[i], layout.offsets[i + 1]
        delta_sum = total[start:stop].astype(np.float64)
        delta_sum *= settings.step
        delta_sum -= count * settings.clipping_range  # sum_i n_i (x_i - r), shape (numel,)
        ref = np.asarray(reference[name], dtype=np.float64).ravel()
        dtype, shape = np.dtype(layout.dtypes[i]), layout.shapes[i]
        delta_mean = _within(delta_sum / count, settings.clipping_range, f"tensor {name!r}")
        sums[name] = _restore(delta_sum + count * ref, dtype, shape)
        means[name] = _restore(delta_mean + ref, dtype, shape)
    metric_sums = total[layout.count_index + 1 :].astype(np.float64) * settings.metric_step
    metric_sums -= count * settings.metric_clipping_range
    metric_means = _within(metric_sums / count, settings.metric_clipping_range, "metrics")
    metrics = {key: float(value) for key, value in zip(layout.metric_keys, metric_means, strict=True)}
    return sums, means, count, metrics


def _within(mean: np.ndarray, clip: float, what: str) -> np.ndarray:
    """`mean`, a weighted mean of values clipped to [-clip, clip], if it lies there: honest vectors
    cannot decode outside it (up to float rounding), a malformed one almost surely does."""
    if mean.size and not np.abs(mean).max() <= clip * (1 + RANGE_TOLERANCE):
        raise SecAggIntegrityError(
            f"{what}: the decoded mean reaches {np.abs(mean).max():.6g}, outside the clipping range ±{clip:g}: "
            "a malformed masked vector spoiled the sum"
        )
    return mean


def _quantize_into(out: np.ndarray, values: np.ndarray, clip: float, step: float, what: str) -> None:
    """out = round((clip(values, -clip, clip) + clip) / step), values float64 and overwritten."""
    if not np.isfinite(values).all():
        raise SecAggError(f"{what}: non-finite values cannot be aggregated")
    np.clip(values, -clip, clip, out=values)
    values += clip
    values *= 1.0 / step
    np.rint(values, out=values)
    out[...] = values


def _restore(values: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not np.issubdtype(dtype, np.inexact):
        values = np.rint(values)
    return values.astype(dtype).reshape(shape)


def _check_update(update: Mapping[str, np.ndarray], layout: Layout) -> None:
    if set(update) != set(layout.names):
        missing = sorted(set(layout.names) - set(update))
        extra = sorted(set(update) - set(layout.names))
        raise SecAggError(f"update tensors differ from those received: missing {missing}, extra {extra}")
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if update[name].shape != shape:
            raise SecAggError(f"tensor {name!r}: shape {update[name].shape} != received {shape}")


def reduce_modulo(vector: np.ndarray, modulus_bits: int) -> None:
    """vector mod 2^m, in place (the dtype's own wrap-around is mod 2^64 or 2^32, which 2^m divides)."""
    if modulus_bits < vector.dtype.itemsize * 8:
        np.bitwise_and(vector, vector.dtype.type((1 << modulus_bits) - 1), out=vector)
