"""A run directory's `summary.json` and `curves.png`, derived from its rounds' rows.

Both are written by round-event subscribers (`fedserver.events`): a deployment's ServerApp
subscribes `RunReport`; fedsim subscribes the summary and draws the plot in a child process
(`simulations.plotter`), with the same drawing code. Both are derived from every committed
round, so a resumed run's files describe the whole run, and a resume that adds no round
rewrites them with the same content.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedserver.events import RoundEvent, Row
from shared.config import RunConfig
from shared.files import atomic_write_bytes, atomic_write_text

SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
REDRAW_SECONDS = 10.0  # a long run's plot is redrawn at most this often while it runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOG = logging.getLogger("flowerbed.report")
Summary = dict[str, float | int | str | None]  # the content of summary.json


def summarize(rows: list[Row], target_accuracy: float, evaluated_on: str | None = None) -> Summary:
    """`summary.json`: final and best accuracy, final loss, the first round at the target, and
    `wall_seconds`, the time spent in all rounds (those before a resume included).

    The final accuracy and loss are those of the last evaluated round (`final_accuracy_round`;
    the last round unless the run was interrupted between evaluations); `evaluated_on` says
    what they were measured on. Under DP, `epsilon` is the ε spent by the last round (None without
    DP) and `stopped` says why the run ended before its `rounds` (None when it did not stop so).
    """
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    reached = [int(r["round"]) for r in evaluated if 0 < target_accuracy <= r["accuracy"]]
    last = evaluated[-1] if evaluated else {}
    return {
        "rounds": len(rows),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("eval_loss"),
        "best_accuracy": max(r["accuracy"] for r in evaluated) if evaluated else None,
        "wall_seconds": round(sum(r.get("seconds") or 0.0 for r in rows), 3),
        "rounds_to_target": reached[0] if reached else None,
        "final_accuracy_round": int(last["round"]) if last else None,
        "evaluated_rounds": len(evaluated),
        "evaluated_on": evaluated_on,
        "epsilon": rows[-1].get("epsilon") if rows else None,
        "stopped": rows[-1].get("stopped") if rows else None,
    }


def write_summary(path: Path, summary: Summary) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def run_title(cfg: RunConfig) -> str:
    """What ran, for the plot's title."""
    clients = f"{cfg.clients_per_round} of {cfg.num_clients} clients a round"
    return f"{cfg.dataset} · {cfg.model} · {cfg.strategy} · {clients}"


def plot_curves(rows: list[Row], path: Path, title: str = "") -> None:
    """`curves.png`: accuracy and loss per round, side by side."""
    atomic_write_bytes(path, draw_curves(rows, title))


def draw_curves(rows: list[Row], title: str = "") -> bytes:
    """The PNG of `plot_curves`."""
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def curves_figure(rows: list[Row], title: str = "") -> Figure:
    """Accuracy (left) and losses (right) per round. Accuracy is drawn on 0..1, so a change of
    1 % looks like one, and rounds are whole numbers on the x axes. A curve joins the rounds that
    have its value: with `eval-every`, the evaluated ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(*_measured(rows, "accuracy"), marker=".")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="test accuracy", ylim=(0.0, 1.0))
    for key, label in (("train_loss", "train"), ("eval_loss", "eval")):
        ax_loss.plot(*_measured(rows, key), marker=".", label=label)
    ax_loss.set(xlabel="round", ylabel="loss", title="loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _measured(rows: list[Row], key: str) -> tuple[list[float], list[float]]:
    """The rounds that have a value of `key`, and those values."""
    measured = [r for r in rows if r.get(key) is not None]
    return [r["round"] for r in measured], [r[key] for r in measured]


class Curves:
    """`curves.png` kept current as rows come: redrawn at most every `REDRAW_SECONDS`, and
    once more by `close()` with every row."""

    def __init__(self, path: Path, title: str, rows: Iterable[Row] = ()) -> None:
        self.path = path
        self.title = title
        self.rows = list(rows)
        self.drawn_at = time.monotonic()
        self.stale = False

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.stale = True
        if time.monotonic() - self.drawn_at >= REDRAW_SECONDS:
            self.close()

    def close(self) -> None:
        """Draw every row, if any came since the last drawing."""
        if self.stale:
            plot_curves(self.rows, self.path, self.title)
            self.drawn_at, self.stale = time.monotonic(), False


class RunReport:
    """A round-event subscriber keeping `summary.json` and `curves.png` of `run_dir` current.

    A plot that cannot be drawn is a warning: it never stops the run.
    """

    def __init__(
        self, run_dir: Path, cfg: RunConfig, rows: Iterable[Row] = (), evaluated_on: str | None = None
    ) -> None:
        self.summary_path = run_dir / SUMMARY_FILE
        self.target_accuracy = cfg.target_accuracy
        self.evaluated_on = evaluated_on
        self.rows = list(rows)
        self.curves = Curves(run_dir / CURVES_FILE, run_title(cfg), self.rows)

    def __call__(self, event: RoundEvent) -> None:
        row = event.row()
        self.rows.append(row)
        write_summary(self.summary_path, summarize(self.rows, self.target_accuracy, self.evaluated_on))
        with self._plot_failure_warned():
            self.curves.add(row)

    def close(self) -> None:
        """Draw the final plot."""
        with self._plot_failure_warned():
            self.curves.close()

    @contextlib.contextmanager
    def _plot_failure_warned(self) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # matplotlib's and the file system's errors alike: the run goes on
            LOG.warning("could not draw %s: %s", self.curves.path, err)
