"""A run's summary, plot and progress line, all derived from its `metrics.jsonl` rows."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from shared.files import atomic_write_bytes, atomic_write_text

Row = dict[str, float | None]


def summarize(rows: list[Row], target_accuracy: float, wall_seconds: float) -> dict[str, float | int | None]:
    """`summary.json`: final and best accuracy, final loss, and the first round at the target."""
    accuracies = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    reached = [int(r["round"]) for r in rows if target_accuracy > 0 and (r.get("accuracy") or 0) >= target_accuracy]
    last = rows[-1] if rows else {}
    return {
        "rounds": len(rows),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("eval_loss"),
        "best_accuracy": max(accuracies) if accuracies else None,
        "wall_seconds": round(wall_seconds, 3),
        "rounds_to_target": reached[0] if reached else None,
    }


def write_summary(path: Path, summary: dict[str, float | int | None]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def plot_curves(rows: list[Row], path: Path, title: str = "") -> None:
    """`curves.png`: accuracy and loss per round, side by side."""
    atomic_write_bytes(path, draw_curves(rows, title))


def draw_curves(rows: list[Row], title: str = "") -> bytes:
    """The PNG of `plot_curves`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, [_nan(r.get("accuracy")) for r in rows], marker=".")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="test accuracy")
    for key, label in (("train_loss", "train"), ("eval_loss", "eval")):
        ax_loss.plot(rounds, [_nan(r.get(key)) for r in rows], marker=".", label=label)
    ax_loss.set(xlabel="round", ylabel="loss", title="loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


class RoundRowHandler(logging.Handler):
    """Hands the row of each end-of-round record (`extra={"round_row": row}`) to callbacks."""

    def __init__(self, callbacks: Iterable[Callable[[Row], None]]) -> None:
        super().__init__(level=logging.INFO)
        self.callbacks = list(callbacks)

    def emit(self, record: logging.LogRecord) -> None:
        row = getattr(record, "round_row", None)
        if row is not None:
            for callback in self.callbacks:
                callback(row)


class ProgressBar:
    """Draws a progress bar with the latest metrics, a row at a time."""

    def __init__(self, total_rounds: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total = total_rounds
        self.stream = stream
        self.width = width
        self.elapsed = 0.0

    def __call__(self, row: Row) -> None:
        self.elapsed += row["seconds"] or 0.0
        self.stream.write(progress_line(row, self.total, self.elapsed, self.width))
        self.stream.write("\r" if self.stream.isatty() and row["round"] < self.total else "\n")
        self.stream.flush()


def progress_line(row: Row, total: int, elapsed: float, width: int = 30) -> str:
    done = int(row["round"])
    filled = int(width * done / total)
    parts = [f"[{'#' * filled}{'.' * (width - filled)}] round {done}/{total}"]
    for key, label in (("accuracy", "acc"), ("eval_loss", "loss"), ("train_loss", "train")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.4f}")
    parts.append(f"{elapsed:.1f}s")
    return " | ".join(parts)
