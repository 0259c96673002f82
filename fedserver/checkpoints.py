"""The run directory: what the ServerApp commits after every round, and what a restart reads back.

Each file is written atomically and `state.json`, the commit point, last, so that a crash loses
no round and repeats none; checkpoints older than `keep-checkpoints` rounds are pruned. The files
and their order: docs/reliability.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy

from fedserver.events import Row
from shared.config import RunConfig
from shared.errors import FedserverError
from shared.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import torch

METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoints"
# Keys that may change between a run and its resumption without changing its results so far.
# Evaluation keys qualify because evaluation sampling leaves the training stream untouched.
RESUMABLE_CHANGES = frozenset(
    {"rounds", "run-dir", "target-accuracy", "stop-at-target", "round-timeout", "eval-clients", "eval-every",
     "node-wait-timeout", "keep-checkpoints", "workers", "gpu-memory-fraction", "dp-target-epsilon"}
)  # fmt: skip



class CheckpointError(FedserverError, RuntimeError):
    """A run directory's checkpoint is unreadable, corrupt or from another configuration."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run after `round` exactly as if it had not stopped."""

    round: int
    weights: dict[str, torch.Tensor]
    strategy_state: dict[str, np.ndarray]
    random_state: Any  # Python's `random.getstate()`: Flower samples nodes from it
    history: list[Row]
    privacy: dict[str, Any] | None = None  # the DP accountant's state (fedserver.privacy); None without DP


class RunDirectory:
    """A run's files; see the module docstring for what is written when."""

    def __init__(self, path: str | Path, keep: int = 0) -> None:
        """`keep`: how many of the last rounds' checkpoints to keep; 0 = all."""
        self.path = Path(path)
        self.keep = keep
        self.path.mkdir(parents=True, exist_ok=True)

    def save(self, checkpoint: Checkpoint, config: dict[str, Any]) -> None:
        from shared.weights import save_safetensors  # torch: see `_read_tensors`

        n = checkpoint.round
        save_safetensors(checkpoint.weights, self._weights_file(n))
        atomic_write_bytes(self._strategy_file(n), safetensors.numpy.save(checkpoint.strategy_state))
        save_safetensors(checkpoint.weights, self.path / MODEL_FILE)
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in checkpoint.history))
        state = {"round": n, "random_state": _jsonable(checkpoint.random_state), "config": config}
        if checkpoint.privacy is not None:
            state["privacy"] = checkpoint.privacy
        atomic_write_text(self.path / STATE_FILE, json.dumps(state) + "\n")
        if self.keep:
            self._prune(oldest_kept=n - self.keep + 1)

    def load(self, config: dict[str, Any]) -> Checkpoint | None:
        """The last committed round, or None for a new run; refuses another run's checkpoint."""
        state_file = self.path / STATE_FILE
        if not state_file.exists():
            return None
        state = _read_json(state_file)
        try:
            n, saved_config, random_state = int(state["round"]), state["config"], _random_state(state["random_state"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{state_file} is corrupt: {err}") from None
        _check_same_run(saved_config, config, state_file)
        return Checkpoint(
            round=n,
            weights=_read_tensors(self._weights_file(n)),
            strategy_state=_read_arrays(self._strategy_file(n)),
            random_state=random_state,
            history=read_metrics(self.path)[:n],
            privacy=state.get("privacy"),
        )

    def history(self) -> list[Row]:
        """The rows of the committed rounds, without loading weights (none for a new run)."""
        state_file = self.path / STATE_FILE
        if not state_file.exists():
            return []
        try:
            committed = int(_read_json(state_file)["round"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{state_file} is corrupt: {err}") from None
        return read_metrics(self.path)[:committed]

    def checkpoint_rounds(self) -> list[int]:
        """The rounds whose global weights are kept in `checkpoints/`, in order."""
        return sorted(n for n in (_round_of(f) for f in (self.path / CHECKPOINT_DIR).glob("round-*.safetensors")) if n)

    def _prune(self, oldest_kept: int) -> None:
        for n in self.checkpoint_rounds():
            if n < oldest_kept:
                self._weights_file(n).unlink(missing_ok=True)
                self._strategy_file(n).unlink(missing_ok=True)

    def _weights_file(self, n: int) -> Path:
        return self.path / CHECKPOINT_DIR / f"round-{n}.safetensors"

    def _strategy_file(self, n: int) -> Path:
        return self.path / CHECKPOINT_DIR / f"strategy-{n}.safetensors"


def _round_of(path: Path) -> int | None:
    """N of `round-N.safetensors`; None for another name."""
    number = path.name.removeprefix("round-").removesuffix(".safetensors")
    return int(number) if number.isdigit() else None


def read_metrics(path: str | Path) -> list[Row]:
    """The rounds recorded in a run directory (an empty list before the first round); a
    corrupt file is a CheckpointError (the file is written atomically, so never half)."""
    file = Path(path) / METRICS_FILE
    if not file.exists():
        return []
    try:
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is corrupt: {err}") from None


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each key a resume may not change (all but
    RESUMABLE_CHANGES) that differs; a key added to RunConfig after the run was saved ran with its default."""
    saved = {**RunConfig().to_mapping(), **saved}
    keys = sorted((set(saved) | set(current)) - RESUMABLE_CHANGES)
    return [(key, saved.get(key), current.get(key)) for key in keys if saved.get(key) != current.get(key)]


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], state_file: Path) -> None:
    for key, old, new in config_changes(saved, current)[:1]:
        raise CheckpointError(
            f"{state_file} belongs to a run with {key} = {old!r}, not {new!r}; "
            "resume it with its own config or start a new run directory"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    # Imported here: `fedserver status` and the daemon read metrics without loading torch.
    from shared.weights import load_safetensors

    try:
        return load_safetensors(path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is missing or corrupt: {err}") from None


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load(path.read_bytes())
    except Exception as err:
        raise CheckpointError(f"{path} is missing or corrupt: {err}") from None


def _jsonable(random_state: Any) -> list[Any]:
    version, internal, gauss_next = random_state
    return [version, list(internal), gauss_next]


def _random_state(saved: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss_next = saved
    return (int(version), tuple(int(x) for x in internal), gauss_next)
