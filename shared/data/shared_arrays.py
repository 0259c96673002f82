"""Arrays saved once to a directory and memory-mapped, read-only, by every process that opens it.

This is how fedsim's workers get their dataset (`shared.data.federation.shared_source`):
the engine reads the file once and saves the arrays its federation is built from, and each
worker maps them instead of reading and decoding the file again. A mapped file's pages are
the operating system's page cache: one copy, whatever the number of processes, and only the
pages a worker's clients touch are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.files import atomic_write_text

MANIFEST = "arrays.json"  # {"arrays": [names], "meta": {...}}; each array is NAME.npy beside it


@dataclass(frozen=True, eq=False)
class ArraySet:
    """Named arrays (none of dtype object) and the JSON facts that go with them (class names, a vocabulary)."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def save_arrays(arrays: ArraySet, directory: Path) -> None:
    """Write each array as `NAME.npy` in `directory`, then the manifest naming them."""
    for name, array in arrays.arrays.items():
        np.save(directory / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
    manifest = {"arrays": list(arrays.arrays), "meta": arrays.meta}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, ensure_ascii=False))


def open_arrays(directory: Path) -> ArraySet:
    """The arrays `save_arrays` wrote to `directory`, memory-mapped read-only."""
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    arrays = {
        name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False).view(np.ndarray)
        for name in manifest["arrays"]
    }  # plain ndarray views: they keep the mapping open, and what is cut from them is never a memmap
    return ArraySet(arrays, manifest["meta"])
