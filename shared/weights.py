"""Model weights across the wire and on disk: state_dict <-> ArrayRecord, an update's validation,
safetensors.

On the wire the whole state_dict is packed, one flat Array per dtype, so that a message is a few
objects through the SuperLink rather than two per tensor (docs/architecture.md#weights-on-the-wire);
the receiver unpacks with its own model (``like``). bf16 travels as float32, exactly, and is cast back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from shared.errors import ExitCode, FlowerbedError
from shared.files import atomic_write_bytes
from shared.flower_compat.messages import npy_array, npy_view

_NORM_CHUNK = 1 << 16  # elements per chunk: cache-sized, and short float32 sums stay accurate
_KEY_ORDER = "flowerbed.key_order"  # safetensors metadata entry; the format itself sorts keys

Weights = ArrayRecord | Mapping[str, torch.Tensor]


class InvalidUpdate(FlowerbedError, ValueError):
    """A client update that does not fit the reference model or is out of bounds."""

    exit_code = ExitCode.FAILED


def to_arrayrecord(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack a state_dict: one flat Array per transported dtype, values in key order."""
    return ArrayRecord({name: npy_array(parts) for name, parts in _grouped(state_dict).items()})


def to_state_dict(record: ArrayRecord, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unpack ``record`` into tensors with the keys, shapes and dtypes of ``like``.

    Raises InvalidUpdate if the record does not hold exactly the values ``like`` needs. Values
    are cast to ``like``'s dtypes: an aggregate may be wider than what was sent (FedAvg
    averages an int64 counter into float64).
    """
    flats, layout = _numpy_arrays(record), _layout(like)
    totals: dict[str, int] = {}
    for name, count in layout:
        totals[name] = totals.get(name, 0) + count
    _check_keys(totals, flats)
    for name, total in totals.items():
        if flats[name].shape != (total,):
            raise InvalidUpdate(f"{name} weights: shape {flats[name].shape} != expected ({total},)")
    offsets = dict.fromkeys(flats, 0)
    out: dict[str, torch.Tensor] = {}
    for (key, reference), (name, count) in zip(like.items(), layout, strict=True):
        values = flats[name][offsets[name] : offsets[name] + count]
        offsets[name] += count
        out[key] = torch.from_numpy(values.copy()).reshape(reference.shape).to(reference.dtype)  # copy: views are read-only
    return out


def validate_update(reference: Weights, update: Weights, max_norm: float | None = None) -> None:
    """Raise InvalidUpdate unless ``update`` matches ``reference`` in dtypes and sizes, is
    finite, and ||update - reference||_2 <= ``max_norm`` (when given).

    Both are compared packed (a state_dict is packed first), so dtypes are compared as
    transported (bf16 counts as float32). The norm is taken over floating-point values only:
    integer buffers such as BatchNorm's ``num_batches_tracked`` are counters, not weights.
    """
    ref, upd = _numpy_arrays(reference), _numpy_arrays(update)
    _check_keys(ref, upd)
    sq_norm = 0.0
    for key, r in ref.items():
        u = upd[key]
        _check_tensor(key, r, u)
        if max_norm is not None and np.issubdtype(r.dtype, np.floating):
            sq_norm += _squared_distance(u, r)
    norm = np.sqrt(sq_norm)
    if max_norm is not None and not norm <= max_norm:
        raise InvalidUpdate(f"update norm ||update - reference|| = {norm:.6g} exceeds max_norm {max_norm:.6g}")


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``state_dict`` to ``path`` atomically (temp file in the same dir, fsync, rename).

    The key order is kept in the file's metadata so ``load_safetensors`` restores it.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = safetensors_bytes(tensors, metadata={_KEY_ORDER: json.dumps(list(tensors))})
    atomic_write_bytes(path, data)


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file into a CPU state_dict, in the order it was saved."""
    with safe_open(path, framework="pt") as f:
        order = (f.metadata() or {}).get(_KEY_ORDER)
        keys = json.loads(order) if order else list(f.keys())
        return {k: f.get_tensor(k) for k in keys}


def _packed(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Flat (numel,) arrays by transported dtype name, each tensor's values in key order."""
    return {name: np.concatenate(parts) for name, parts in _grouped(state_dict).items()}


def _grouped(state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[np.ndarray]]:
    """Each tensor's values, flat (views where they can be), by transported dtype name, in key order."""
    groups: dict[str, list[np.ndarray]] = {}
    for tensor in state_dict.values():
        values = _transport_numpy(tensor)
        groups.setdefault(values.dtype.name, []).append(values.reshape(-1))
    return groups


def _layout(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """Each tensor's transported dtype name and value count, in key order."""
    return [(_transport_numpy(torch.empty(0, dtype=t.dtype)).dtype.name, t.numel()) for t in state_dict.values()]


def _transport_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The numpy form a tensor travels as: bf16 widened to float32, otherwise a view when on CPU."""
    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def _numpy_arrays(weights: Weights) -> dict[str, np.ndarray]:
    if isinstance(weights, ArrayRecord):
        out = {}
        for key, array in weights.items():
            try:
                out[key] = npy_view(array)
            except ValueError as e:
                raise InvalidUpdate(f"{key} weights: cannot decode array: {e}") from e
        return out
    return _packed(weights)


def _check_keys(ref: Mapping[str, object], upd: Mapping[str, object]) -> None:
    missing = [k for k in ref if k not in upd]
    if missing:
        raise InvalidUpdate(f"missing weights of dtype(s) {missing}")
    extra = [k for k in upd if k not in ref]
    if extra:
        raise InvalidUpdate(f"unexpected weights of dtype(s) {extra}")


def _check_tensor(key: str, ref: np.ndarray, upd: np.ndarray) -> None:
    if upd.shape != ref.shape:
        raise InvalidUpdate(f"{key} weights: shape {upd.shape} != expected {ref.shape}")
    if upd.dtype != ref.dtype:
        raise InvalidUpdate(f"{key} weights: dtype {upd.dtype} != expected {ref.dtype}")
    if np.issubdtype(upd.dtype, np.inexact) and not np.isfinite(upd).all():
        n_nan = int(np.isnan(upd).sum())
        n_inf = int(np.isinf(upd).sum())
        raise InvalidUpdate(f"{key} weights: non-finite values ({n_nan} NaN, {n_inf} Inf)")


def _squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||^2 in cache-sized chunks, each summed in (at least) float32, totalled in float64."""
    a, b = a.ravel(), b.ravel()  # (numel,); views unless Fortran-ordered
    dtype = np.result_type(a.dtype, np.float32)
    total = 0.0
    for i in range(0, a.size, _NORM_CHUNK):
        d = np.subtract(a[i : i + _NORM_CHUNK], b[i : i + _NORM_CHUNK], dtype=dtype)  # (chunk,)
        total += float(np.dot(d, d))
    return total
