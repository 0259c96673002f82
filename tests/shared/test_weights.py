"""Tests for shared.weights: ArrayRecord transport, update validation, safetensors files."""

from __future__ import annotations

import os

import pytest
import torch
from flwr.app import Array

from shared.weights import (
    InvalidUpdate,
    load_safetensors,
    save_safetensors,
    to_arrayrecord,
    to_state_dict,
    validate_update,
)


def _state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Keys deliberately out of alphabetical order; includes an integer buffer."""
    g = torch.Generator().manual_seed(0)
    return {
        "z.weight": torch.randn(3, 4, generator=g).to(dtype),
        "a.bias": torch.randn(4, generator=g).to(dtype),
        "m.count": torch.tensor(7, dtype=torch.int64),
    }


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


# --- ArrayRecord transport ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_and_keeps_key_order(dtype):
    # Prepare
    state = _state(dtype)

    # Execute
    restored = to_state_dict(to_arrayrecord(state), like=state)

    # Assert
    assert list(restored) == list(state)
    for key, tensor in state.items():
        assert restored[key].dtype == tensor.dtype
        assert torch.equal(restored[key], tensor)


def test_record_is_packed_one_flat_array_per_dtype():
    # Prepare
    state = _state()

    # Execute
    record = to_arrayrecord(state)

    # Assert: z.weight then a.bias in float32, m.count in int64
    assert list(record) == ["float32", "int64"]
    expected = torch.cat([state["z.weight"].flatten(), state["a.bias"]]).numpy()
    assert tuple(record["float32"].shape) == (16,)
    assert (record["float32"].numpy() == expected).all()
    assert record["int64"].numpy().tolist() == [7]


def test_bf16_travels_as_float32():
    # Prepare
    state = _state(torch.bfloat16)

    # Execute
    record = to_arrayrecord(state)
    restored = to_state_dict(record, like={**state, "z.weight": state["z.weight"].float()})

    # Assert
    assert record["float32"].dtype == "float32"
    assert restored["z.weight"].dtype == torch.float32
    assert torch.equal(restored["z.weight"], state["z.weight"].float())
    assert restored["a.bias"].dtype == torch.bfloat16  # cast back to the dtype of `like`


def test_non_contiguous_tensor_round_trips():
    # Prepare
    state = {"t": torch.arange(12.0).reshape(3, 4).T}  # (4, 3), Fortran-ordered view

    # Execute
    restored = to_state_dict(to_arrayrecord(state), like=state)

    # Assert
    assert torch.equal(restored["t"], state["t"])


def test_restored_tensors_are_writable_copies():
    # Prepare
    state = _state()
    record = to_arrayrecord(state)

    # Execute
    restored = to_state_dict(record, like=state)
    restored["z.weight"].add_(1.0)

    # Assert: the record is unaffected
    assert not torch.equal(to_state_dict(record, like=state)["z.weight"], restored["z.weight"])


@pytest.mark.parametrize(
    ("like", "message"),
    [
        ({"z.weight": torch.zeros(3, 5), "a.bias": torch.zeros(4), "m.count": torch.tensor(0)}, r"float32 weights: shape \(16,\) != expected \(19,\)"),
        ({"z.weight": torch.zeros(3, 4), "a.bias": torch.zeros(4)}, r"unexpected weights of dtype\(s\) \['int64'\]"),
        ({**_state(), "b": torch.zeros(2, dtype=torch.float64)}, r"missing weights of dtype\(s\) \['float64'\]"),
    ],
    ids=["too-few-values", "extra-dtype", "missing-dtype"],
)
def test_unpacking_into_another_model_is_refused(like, message):
    # Execute / Assert
    with pytest.raises(InvalidUpdate, match=message):
        to_state_dict(to_arrayrecord(_state()), like=like)


def test_a_wider_aggregate_is_cast_back():
    # Prepare: as FedAvg returns an int64 counter, averaged into float64
    record = to_arrayrecord(_state())
    record["int64"] = Array.from_numpy_ndarray(record["int64"].numpy() * 1.0)

    # Execute
    restored = to_state_dict(record, like=_state())

    # Assert
    assert restored["m.count"].dtype == torch.int64 and int(restored["m.count"]) == 7


# --- validate_update ----------------------------------------------------------------


def _drop(state):
    del state["a.bias"]


def _add(state):
    state["extra.weight"] = torch.zeros(2)


def _retype(state):
    state["z.weight"] = state["z.weight"].double()


def _drop_counter(state):
    del state["m.count"]


def _nan(state):
    state["a.bias"][1] = float("nan")


def _inf(state):
    state["a.bias"][2] = float("-inf")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop, r"float32 weights: shape \(12,\) != expected \(16,\)"),
        (_add, r"float32 weights: shape \(18,\) != expected \(16,\)"),
        (_retype, r"unexpected weights of dtype\(s\) \['float64'\]"),
        (_drop_counter, r"missing weights of dtype\(s\) \['int64'\]"),
        (_nan, r"float32 weights: non-finite values \(1 NaN, 0 Inf\)"),
        (_inf, r"float32 weights: non-finite values \(0 NaN, 1 Inf\)"),
    ],
    ids=["fewer-values", "more-values", "dtype", "missing-dtype", "nan", "inf"],
)
@pytest.mark.parametrize("as_record", [True, False], ids=["record", "state_dict"])
def test_rejects_bad_update_with_its_reason(corrupt, message, as_record):
    # Prepare
    reference = _state()
    update = _copy(reference)
    corrupt(update)
    convert = to_arrayrecord if as_record else (lambda s: s)

    # Execute / Assert
    with pytest.raises(InvalidUpdate, match=message):
        validate_update(convert(reference), convert(update))


def test_norm_bound_is_enforced():
    # Prepare: a (3, 4) displacement of norm exactly 5 in one tensor
    reference = _state()
    update = _copy(reference)
    update["z.weight"][0, 0] += 3.0
    update["z.weight"][1, 2] += 4.0
    update["m.count"] += 1000  # integer counters are not part of the norm

    # Execute / Assert
    validate_update(to_arrayrecord(reference), to_arrayrecord(update), max_norm=5.001)
    with pytest.raises(InvalidUpdate, match=r"= 5(\.0+)?\b.*max_norm 4\.9"):
        validate_update(to_arrayrecord(reference), to_arrayrecord(update), max_norm=4.9)


def test_accepts_valid_update():
    # Prepare
    reference = _state()
    update = _copy(reference)
    update["z.weight"] += 0.01

    # Execute / Assert: no exception
    validate_update(to_arrayrecord(reference), to_arrayrecord(update), max_norm=1.0)
    validate_update(reference, to_arrayrecord(update))


def test_bf16_reference_compares_transported_dtype():
    # Prepare
    reference = _state(torch.bfloat16)
    good = to_arrayrecord(_copy(reference))  # carried as float32
    bad = to_arrayrecord(_state(torch.float16))

    # Execute / Assert
    validate_update(reference, good)
    with pytest.raises(InvalidUpdate, match=r"missing weights of dtype\(s\) \['float32'\]"):
        validate_update(reference, bad)


def test_invalid_update_is_a_value_error():
    assert issubclass(InvalidUpdate, ValueError)


def test_corrupt_array_bytes_are_rejected():
    # Prepare
    reference = to_arrayrecord(_state())
    update = to_arrayrecord(_state())
    update["float32"].data = update["float32"].data[:-4]  # truncated payload

    # Execute / Assert
    with pytest.raises(InvalidUpdate, match=r"float32 weights: cannot decode"):
        validate_update(reference, update)


# --- safetensors --------------------------------------------------------------------


def test_safetensors_round_trip_with_bf16_and_order(tmp_path):
    # Prepare
    state = _state(torch.bfloat16)
    path = tmp_path / "model.safetensors"

    # Execute
    save_safetensors(state, path)
    loaded = load_safetensors(path)

    # Assert
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    # Prepare
    path = tmp_path / "model.safetensors"
    save_safetensors(_state(), path)
    old = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)

    # Execute
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(_state(torch.float16), path)

    # Assert
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["model.safetensors"]
