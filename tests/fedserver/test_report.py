"""Round events and a run directory's summary.json and curves.png, in a deployment's ServerApp."""

import json
import logging

from fedclient.app import app as client_app
from fedserver import report
from fedserver.app import app as server_app
from fedserver.app import run_federation
from fedserver.events import RoundEvent
from fedserver.report import Curves, RunReport, summarize
from simulations.grid import InProcessGrid, server_context, simulation_node_config


def grid_for(cfg) -> InProcessGrid:
    return InProcessGrid(client_app, cfg.num_clients, cfg.to_mapping(), simulation_node_config(cfg.num_clients))


def test_each_round_is_reported_to_every_subscriber_in_order(tiny_config):
    cfg = tiny_config(rounds=3)
    first: list[RoundEvent] = []
    second: list[RoundEvent] = []

    result = run_federation(grid_for(cfg), cfg, on_round=[first.append, second.append])

    assert [e.round for e in first] == [1, 2, 3] and first == second
    assert all(e.rounds == 3 and e.accuracy is not None and e.seconds > 0 for e in first)
    assert [e.row() for e in first] == result.history


def test_a_subscriber_that_returns_true_stops_the_run_after_that_round(tiny_config):
    cfg = tiny_config(rounds=5)
    seen: list[int] = []

    result = run_federation(grid_for(cfg), cfg, on_round=[lambda e: e.round == 2, lambda e: seen.append(e.round)])

    assert len(result.history) == 2 and seen == [1, 2]  # every subscriber still sees the last round


def test_a_deployed_server_app_leaves_a_summary_and_a_plot_in_its_run_dir(tmp_path, tiny_config):
    cfg = tiny_config(rounds=2, run_dir=str(tmp_path / "run"))

    server_app(grid_for(cfg), server_context(cfg.to_mapping()))

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == summarize(rows, cfg.target_accuracy, "federated: all 6 clients' held-out data")
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_wall_seconds_counts_every_round_before_and_after_a_resume():
    rows = [{"round": 1, "accuracy": 0.5, "seconds": 1.5}, {"round": 2, "accuracy": 0.6, "seconds": 2.25}]

    assert summarize(rows, target_accuracy=0.0)["wall_seconds"] == 3.75


def test_rounds_between_evaluations_leave_the_final_and_best_scores_to_the_evaluated_ones():
    rows = [
        {"round": 1, "train_loss": 0.9, "eval_loss": None, "accuracy": None, "seconds": 1.0},
        {"round": 2, "train_loss": 0.8, "eval_loss": 0.7, "accuracy": 0.6, "seconds": 1.0},
        {"round": 3, "train_loss": 0.7, "eval_loss": None, "accuracy": None, "seconds": 1.0},
    ]  # a run interrupted after round 3, evaluated every 2nd round

    summary = summarize(rows, target_accuracy=0.5, evaluated_on="central test set (25 examples)")

    assert summary["rounds"] == 3 and summary["evaluated_rounds"] == 1
    assert (summary["final_accuracy"], summary["final_loss"], summary["final_accuracy_round"]) == (0.6, 0.7, 2)
    assert summary["best_accuracy"] == 0.6 and summary["rounds_to_target"] == 2
    assert summary["evaluated_on"] == "central test set (25 examples)"
    assert summarize(rows[:1], target_accuracy=0.5)["final_accuracy"] is None


def test_the_curves_join_the_evaluated_rounds():
    rows = [_row(1), {**_row(2), "accuracy": None, "eval_loss": None}, _row(3)]

    ax_acc, ax_loss = report.curves_figure(rows).axes

    assert list(ax_acc.lines[0].get_xdata()) == [1, 3]
    train, evaluation = ax_loss.lines
    assert list(train.get_xdata()) == [1, 2, 3] and list(evaluation.get_xdata()) == [1, 3]


def test_a_plot_that_cannot_be_drawn_is_a_warning_and_the_summary_is_kept(tmp_path, tiny_config, monkeypatch, caplog):
    monkeypatch.setattr(report, "REDRAW_SECONDS", 0.0)
    (tmp_path / "curves.png").mkdir()  # a directory where the plot should go
    subscriber = RunReport(tmp_path, tiny_config(), rows=[])

    with caplog.at_level(logging.WARNING):
        subscriber(RoundEvent(1, 2, train_loss=1.0, eval_loss=1.0, accuracy=0.5, seconds=0.1))
        subscriber.close()

    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1
    assert f"could not draw {tmp_path / 'curves.png'}" in caplog.text


def test_the_plot_title_says_what_ran(tiny_config):
    title = report.run_title(tiny_config(strategy="fedadam"))

    assert title == "synthetic · mlp · fedadam · 4 of 6 clients a round"


def test_a_long_run_is_redrawn_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "REDRAW_SECONDS", 0.0)
    curves = Curves(tmp_path / "curves.png", "run")

    curves.add(_row(1))
    first = (tmp_path / "curves.png").read_bytes()
    curves.add(_row(2))

    assert first[:4] == b"\x89PNG" and (tmp_path / "curves.png").read_bytes() != first


def test_between_redraws_the_plot_waits_for_close(tmp_path):
    curves = Curves(tmp_path / "curves.png", "run")  # REDRAW_SECONDS have not passed

    curves.add(_row(1))
    drawn_early = (tmp_path / "curves.png").exists()
    curves.close()

    assert not drawn_early and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _row(round_: int) -> dict:
    return RoundEvent(round_, 4, train_loss=1.0 / round_, eval_loss=1.2 / round_, accuracy=0.2 * round_, seconds=0.1).row()


def test_the_accuracy_axis_spans_zero_to_one_and_rounds_are_whole():
    rows = [{"round": r, "train_loss": 1.0 / r, "eval_loss": 1.1 / r, "accuracy": 0.96 + r / 1000} for r in (1, 2, 3, 4)]

    fig = report.curves_figure(rows, "synthetic · mlp")

    ax_acc, ax_loss = fig.axes
    assert ax_acc.get_ylim() == (0.0, 1.0)  # 0.961..0.964 is not zoomed into a dramatic climb
    for ax in (ax_acc, ax_loss):
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert fig.get_suptitle() == "synthetic · mlp"
