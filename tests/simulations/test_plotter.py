"""The plotting child of a fedsim run, and the progress bar."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from simulations import plotter
from simulations.plotter import LivePlot, PlotError
from simulations.report import ProgressBar


def _row(round_: int) -> dict:
    return {"round": round_, "train_loss": 1.0 / round_, "eval_loss": 1.2 / round_, "accuracy": 0.5, "seconds": 0.1}


def test_the_final_plot_is_drawn_when_the_rows_end(tmp_path: Path):
    plot = LivePlot(tmp_path / "curves.png", "run", rows=[_row(1)])
    plot.add(_row(2))
    plot.close()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]  # no temporary file left


def test_a_failing_plot_names_the_file_and_the_cause(tmp_path: Path):
    taken = tmp_path / "curves.png"
    taken.mkdir()  # a directory where the plot should go
    plot = LivePlot(taken, "run", rows=[_row(1)])
    with pytest.raises(PlotError, match=r"curves.png \(exit code 1\): .*Error"):
        plot.close()


def test_a_cancelled_plot_stops_its_process_and_draws_nothing(tmp_path: Path):
    plot = LivePlot(tmp_path / "curves.png", "run", rows=[_row(1)])
    plot.cancel()
    assert plot._child.poll() is not None
    assert not (tmp_path / "curves.png").exists()


def test_a_long_run_is_redrawn_while_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    drawn: list[int] = []
    monkeypatch.setattr(plotter, "REDRAW_SECONDS", 0.0)
    monkeypatch.setattr(plotter, "plot_curves", lambda rows, path, title: drawn.append(len(rows)))
    monkeypatch.setattr(plotter, "draw_curves", lambda rows, title: b"")
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(_row(r)) + "\n" for r in (1, 2, 3))))
    plotter._serve(tmp_path / "curves.png", "run")
    assert drawn == [1, 2, 3, 3]  # after each row, then the final plot


def test_the_progress_bar_shows_the_round_and_latest_metrics():
    stream = io.StringIO()
    bar = ProgressBar(4, stream=stream, width=8)
    bar(_row(1))
    bar(_row(2))
    assert stream.getvalue().splitlines()[-1].startswith("[####....] round 2/4 | acc 0.5000 | loss 0.6000")
    assert stream.getvalue().rstrip().endswith("0.2s")
