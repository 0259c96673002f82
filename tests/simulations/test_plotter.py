"""The plotting child of a fedsim run, and the progress bar."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from fedserver.events import RoundEvent
from simulations.plotter import LivePlot, PlotError
from simulations.report import ProgressBar


def _event(round_: int, rounds: int = 4) -> RoundEvent:
    return RoundEvent(round_, rounds, train_loss=1.0 / round_, eval_loss=1.2 / round_, accuracy=0.5, seconds=0.1)


def _plotters_of(path: Path) -> list[str]:
    """The command lines of running processes that plot to `path` (Linux's /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"simulations.plotter" in args and str(path).encode() in args:
            found.append(cmdline.parent.name)
    return found


def test_the_final_plot_is_drawn_when_the_rows_end(tmp_path: Path):
    plot = LivePlot(tmp_path / "curves.png", "run", rows=[_event(1).row()])
    plot(_event(2))
    plot.close()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temporary file left


def test_a_failing_plot_names_the_file_and_the_cause(tmp_path: Path):
    taken = tmp_path / "curves.png"
    taken.mkdir()  # a directory where the plot should go
    plot = LivePlot(taken, "run", rows=[_event(1).row()])
    with pytest.raises(PlotError, match=r"curves.png \(exit code 1\): .*Error"):
        plot.close()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="lists processes through Linux's /proc")
def test_a_cancelled_plot_stops_its_process_and_draws_nothing(tmp_path: Path):
    plot = LivePlot(tmp_path / "curves.png", "run", rows=[_event(1).row()])
    deadline = time.monotonic() + 30  # until the child has exec'd (before, it shows the parent's command)
    while not _plotters_of(tmp_path / "curves.png") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _plotters_of(tmp_path / "curves.png")  # the check below can see the process

    plot.cancel()

    assert _plotters_of(tmp_path / "curves.png") == []
    assert not (tmp_path / "curves.png").exists()


def test_the_progress_bar_shows_the_round_and_latest_metrics():
    stream = io.StringIO()
    bar = ProgressBar(stream=stream, width=8)
    bar(_event(1))
    bar(_event(2))
    assert stream.getvalue().splitlines()[-1].startswith("[####....] round 2/4 | acc 0.5000 | loss 0.6000")
    assert stream.getvalue().rstrip().endswith("0.2s")


def test_between_evaluations_the_progress_bar_shows_the_last_scores_and_their_round():
    stream = io.StringIO()
    bar = ProgressBar(stream=stream, width=8)
    bar(_event(1))
    bar(RoundEvent(2, 4, train_loss=0.25, eval_loss=None, accuracy=None, seconds=0.1))

    assert "| acc 0.5000 | loss 1.2000 (round 1) | train 0.2500 |" in stream.getvalue().splitlines()[-1]
