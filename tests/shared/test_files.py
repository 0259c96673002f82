"""shared/files.py: atomic writes are durable, the rename included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import files


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """What each os.fsync call synced, in order: 'dir:PATH' for a directory, 'file:PATH' else."""
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("dir:" if os.path.isdir(target) else "file:") + target)
        real_fsync(fd)

    def replace(src, dst) -> None:
        real_replace(src, dst)
        calls.append(f"replace:{dst}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the synced files")
def test_the_directory_is_fsynced_after_the_rename(tmp_path, synced):
    target = tmp_path / "state.json"

    files.atomic_write_text(target, "{}")

    assert target.read_text() == "{}"
    assert synced[-2:] == [f"replace:{target}", f"dir:{tmp_path}"]
    assert synced[0].startswith(f"file:{tmp_path}/.state.json.")  # the data first


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the synced files")
def test_a_new_folder_is_fsynced_in_its_parent(tmp_path, synced):
    files.atomic_write_bytes(tmp_path / "checkpoints" / "round-1.safetensors", b"x")

    assert f"dir:{tmp_path}" in synced
    assert synced[-1] == f"dir:{tmp_path / 'checkpoints'}"
