"""fedsim end to end: outputs, every strategy, determinism, stopping, errors."""

import json
import multiprocessing

import numpy as np
import pytest
from shared import task
from shared.config import STRATEGIES, ConfigError, RunConfig
from shared.weights import load_safetensors
from simulations import cli
from simulations.engine import run_simulation

def test_a_tiny_run_writes_every_output(tmp_path, tiny_config):
    result = run_simulation(tiny_config(rounds=3, target_accuracy=0.05), tmp_path / "run", progress=False)

    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"round", "train_loss", "eval_loss", "accuracy", "seconds"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["rounds"] == 3 and summary["rounds_to_target"] == 1
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rows)
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert RunConfig.from_mapping(__import__("tomllib").loads((out / "config.toml").read_text())).rounds == 3
    assert set(load_safetensors(out / "model.safetensors")) == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}


def test_the_default_federation_learns(tmp_path):
    cfg = RunConfig().replace(rounds=8, synthetic_max_samples=300)

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert result.summary["final_accuracy"] > 0.3  # 10 classes: chance is about 0.1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_builds_and_runs_a_round(tmp_path, strategy, tiny_config):
    cfg = tiny_config(strategy=strategy, rounds=1, proximal_mu=0.1)
    result = run_simulation(cfg, tmp_path / strategy, progress=False)

    assert result.summary["rounds"] == 1
    assert 0.0 <= result.summary["final_accuracy"] <= 1.0


def test_same_config_and_seed_give_bit_identical_weights(tmp_path, tiny_config):
    first = run_simulation(tiny_config(seed=3), tmp_path / "a", progress=False)
    second = run_simulation(tiny_config(seed=3), tmp_path / "b", progress=False)
    other = run_simulation(tiny_config(seed=4), tmp_path / "c", progress=False)

    a, b, c = (load_safetensors(r.output / "model.safetensors") for r in (first, second, other))
    assert all(a[k].equal(b[k]) for k in a)
    assert not all(a[k].equal(c[k]) for k in a)


def test_stop_at_target_ends_the_run_early(tmp_path, tiny_config):
    cfg = tiny_config(rounds=5, target_accuracy=0.01, stop_at_target=True)
    result = run_simulation(cfg, tmp_path / "r", progress=False)
    assert result.summary["rounds"] == 1 and result.summary["rounds_to_target"] == 1


def test_a_resume_keeps_the_summary_true(tmp_path, tiny_config):
    out = tmp_path / "r"
    run_simulation(tiny_config(rounds=2), out, progress=False)
    before = (out / "summary.json").read_text()

    run_simulation(tiny_config(rounds=2), out, progress=False, resume=True)  # adds no round
    unchanged = (out / "summary.json").read_text()
    extended = run_simulation(tiny_config(rounds=3), out, progress=False, resume=True)

    seconds = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert unchanged == before
    assert extended.summary["rounds"] == 3
    assert extended.summary["wall_seconds"] == round(sum(seconds), 3) > json.loads(before)["wall_seconds"]


def test_a_plot_that_cannot_be_drawn_is_one_warning_and_the_run_is_kept(tmp_path, tiny_config, caplog):
    out = tmp_path / "r"
    (out / "curves.png").mkdir(parents=True)  # a directory where the plot should go

    result = run_simulation(tiny_config(rounds=1), out, progress=False)

    assert result.summary["rounds"] == 1 and json.loads((out / "summary.json").read_text()) == result.summary
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "could not draw" in warnings[0] and "\n" not in warnings[0]


def test_ctrl_c_stops_cleanly_and_keeps_what_was_written(tmp_path, monkeypatch, tiny_config):
    real_train = task.train
    calls = []

    def train_then_interrupt(*args, **kwargs):  # Ctrl-C arrives during round 2's local training
        calls.append(1)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(task, "train", train_then_interrupt)

    result = run_simulation(tiny_config(rounds=5), tmp_path / "r", progress=False)

    assert result.interrupted
    assert result.summary["rounds"] == 1
    assert (tmp_path / "r" / "curves.png").exists() and (tmp_path / "r" / "model.safetensors").exists()


def test_ctrl_c_while_this_process_serves_its_share_stops_every_worker(tmp_path, monkeypatch, tiny_config):
    real_train = task.train  # patched here only: the worker processes import their own
    calls = []

    def train_then_interrupt(*args, **kwargs):  # Ctrl-C arrives during this process's training
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(task, "train", train_then_interrupt)

    result = run_simulation(tiny_config(rounds=5, workers="2"), tmp_path / "r", progress=False)

    assert result.interrupted and result.summary["rounds"] < 5
    assert not multiprocessing.active_children()  # the worker process was stopped with the run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "strategy=fedfoo"], "'strategy' is 'fedfoo'; allowed"),
        (["--set", "num-clients=5", "--set", "clients-per-round=6"], "'clients-per-round' (6) is more than"),
        (
            ["--set", "partition=natural", "--set", "num-clients=5", "--set", "clients-per-round=8"],
            "the natural split of 'synthetic' has 5 clients, fewer than clients-per-round (8)",
        ),
        (["--set", "dataset=mnist", "--set", "data-path=/nonexistent/mnist.npz"], "data-path /nonexistent/mnist.npz does not exist"),
        (["--set", "rounds=2", "--set", "local-epoch=3"], "unknown config key 'local-epoch'. Did you mean 'local-epochs'"),
        (["--set", "dataset=csv", "--set", "data-path=/dev/null"], "/dev/null: empty file"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = cli.main(["run", *args, "--output", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_strategy_in_config_is_a_config_error():
    with pytest.raises(ConfigError, match="fedfoo"):
        RunConfig.from_mapping({"strategy": "fedfoo"})


def test_an_empty_partition_is_a_one_line_data_error(tmp_path, capsys):
    path = tmp_path / "five.npz"
    np.savez(path, x=np.zeros((5, 3), np.float32), y=np.arange(5) % 2)

    code = cli.main(["run", "--set", "dataset=npz", "--set", f'data-path="{path}"', "--set", "num-clients=10",
                     "--set", "clients-per-round=2", "--output", str(tmp_path / "out")])  # fmt: skip

    assert code == 2
    assert "cannot split 5 samples among 10 clients" in capsys.readouterr().err
