"""File helpers shared by the readers and the tokenizers: gzip sniffing, clear errors, atomic writes."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from shared.data.errors import DataError
from shared.files import atomic_write_text

_GZIP_MAGIC = b"\x1f\x8b"
# What a truncated or corrupt (possibly gzipped) file raises while being read.
_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _describe(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole file, gunzipped when it starts with the gzip magic (whatever its suffix)."""
    path = Path(path)
    try:
        if _is_gzip(path):
            return gzip.decompress(path.read_bytes())
        return path.read_bytes()
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read: {_describe(exc)}") from exc


@contextmanager
def open_text(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """A UTF-8 text stream over a plain or gzipped file.

    Errors raised while the caller reads (truncated gzip, bad UTF-8) come back as DataError too.
    """
    path = Path(path)
    try:
        opener = gzip.open if _is_gzip(path) else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            yield f
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read: {_describe(exc)}") from exc


def read_json(path: str | os.PathLike[str]) -> Any:
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON: {exc}") from exc


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename it over: readers never see half a file."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))
