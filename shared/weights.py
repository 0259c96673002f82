"""Model weights across the wire and on disk.

Transport convention: Flower arrays are numpy arrays, and numpy has no
bfloat16, so bf16 tensors travel as float32 (exact: every bf16 value is a
float32 value) and are cast back with ``to_state_dict(record, like=...)``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from shared.files import atomic_write_bytes

_NORM_CHUNK = 1 << 16  # elements per chunk: cache-sized, and short float32 sums stay accurate
_KEY_ORDER = "flowerbed.key_order"  # safetensors metadata entry; the format itself sorts keys

Weights = ArrayRecord | Mapping[str, torch.Tensor]


class InvalidUpdate(ValueError):
    """A client update that does not fit the reference model or is out of bounds."""


def to_arrayrecord(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Serialize a state_dict, in key order, with bf16 carried as float32."""
    record = ArrayRecord()
    for key, tensor in state_dict.items():
        record[key] = Array.from_numpy_ndarray(_transport_numpy(tensor))
    return record


def to_state_dict(record: ArrayRecord, like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Deserialize ``record`` in key order; with ``like``, cast each tensor to the dtype of ``like[key]``.

    Keys and shapes are not checked here; that is ``validate_update``'s job.
    """
    out: dict[str, torch.Tensor] = {}
    for key, array in record.items():
        tensor = torch.from_numpy(_numpy_view(array).copy())  # copy: the view is read-only
        if like is not None and key in like:
            tensor = tensor.to(like[key].dtype)
        out[key] = tensor
    return out


def validate_update(reference: Weights, update: Weights, max_norm: float | None = None) -> None:
    """Raise InvalidUpdate unless ``update`` matches ``reference`` in keys, shapes and dtypes,
    is finite, and ||update - reference||_2 <= ``max_norm`` (when given).

    Dtypes are compared as transported (bf16 counts as float32). The norm is
    taken over floating-point tensors only: integer buffers such as BatchNorm's
    ``num_batches_tracked`` are counters, not weights.
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


def _transport_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The numpy form a tensor travels as: bf16 widened to float32, otherwise a view when on CPU."""
    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def _numpy_view(array: Array) -> np.ndarray:
    """Read-only ndarray over ``array.data`` without copying (parses the .npy header)."""
    if array.stype != SType.NUMPY:
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    buf = io.BytesIO(array.data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:  # rare header versions: let numpy decode (one copy)
        return array.numpy()
    if dtype.hasobject:
        raise ValueError(f"object arrays are not allowed (dtype {dtype})")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=buf.tell())  # (numel,)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _numpy_arrays(weights: Weights) -> dict[str, np.ndarray]:
    if isinstance(weights, ArrayRecord):
        out = {}
        for key, array in weights.items():
            try:
                out[key] = _numpy_view(array)
            except ValueError as e:
                raise InvalidUpdate(f"tensor {key!r}: cannot decode array: {e}") from e
        return out
    return {key: _transport_numpy(t) for key, t in weights.items()}


def _check_keys(ref: Mapping[str, np.ndarray], upd: Mapping[str, np.ndarray]) -> None:
    missing = [k for k in ref if k not in upd]
    if missing:
        raise InvalidUpdate(f"missing tensor(s): {missing}")
    extra = [k for k in upd if k not in ref]
    if extra:
        raise InvalidUpdate(f"unexpected extra tensor(s): {extra}")


def _check_tensor(key: str, ref: np.ndarray, upd: np.ndarray) -> None:
    if upd.shape != ref.shape:
        raise InvalidUpdate(f"tensor {key!r}: shape {upd.shape} != expected {ref.shape}")
    if upd.dtype != ref.dtype:
        raise InvalidUpdate(f"tensor {key!r}: dtype {upd.dtype} != expected {ref.dtype}")
    if np.issubdtype(upd.dtype, np.inexact) and not np.isfinite(upd).all():
        n_nan = int(np.isnan(upd).sum())
        n_inf = int(np.isinf(upd).sum())
        raise InvalidUpdate(f"tensor {key!r}: non-finite values ({n_nan} NaN, {n_inf} Inf)")


def _squared_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b||^2 in cache-sized chunks, each summed in (at least) float32, totalled in float64."""
    a, b = a.ravel(), b.ravel()  # (numel,); views unless Fortran-ordered
    dtype = np.result_type(a.dtype, np.float32)
    total = 0.0
    for i in range(0, a.size, _NORM_CHUNK):
        d = np.subtract(a[i : i + _NORM_CHUNK], b[i : i + _NORM_CHUNK], dtype=dtype)  # (chunk,)
        total += float(np.dot(d, d))
    return total
