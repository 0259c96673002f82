"""The run directory: what the ServerApp writes after every round, each file atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shared.files import atomic_write_text
from shared.weights import save_safetensors

METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"


class RunDirectory:
    """`metrics.jsonl` (a line per round) and `model.safetensors` (the latest global model)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_round(self, history: list[dict[str, float | None]], state_dict: dict[str, torch.Tensor]) -> None:
        """Record a completed round: the model first, so the metrics never name a lost model."""
        save_safetensors(state_dict, self.path / MODEL_FILE)
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in history))


def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """The rounds recorded in a run directory (an empty list before the first round)."""
    file = Path(path) / METRICS_FILE
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
