"""Resume after a crash, quorum and retries, and bad updates refused (in-process, through fedsim)."""

import faulthandler
import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import fedclient.app
import fedserver.app
from fedserver.app import RoundFailed
from fedserver.checkpoints import CheckpointError, RunDirectory
from fedserver.strategies import STRATEGIES as STRATEGY_CLASSES
from fedserver.strategies import StatefulStrategy
from shared import messages as keys
from shared import task
from shared.config import STRATEGIES
from shared.weights import load_safetensors
from simulations import cli, engine
from simulations.grid import InProcessGrid, simulation_node_config

def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interrupt_after(monkeypatch, calls_before_interrupt: int) -> None:
    """Ctrl-C (or a crash) in the middle of a round's local training."""
    real_train, calls = task.train, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_before_interrupt:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(task, "train", train)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch, strategy, tiny_config):
    cfg = tiny_config(strategy=strategy, rounds=4, server_lr=0.05, server_momentum=0.9)
    engine.run_simulation(cfg, tmp_path / "straight", progress=False)
    with monkeypatch.context() as patch:
        interrupt_after(patch, calls_before_interrupt=4 * 2 + 2)  # stops in the middle of round 3
        first = engine.run_simulation(cfg, tmp_path / "crashed", progress=False)
    assert first.interrupted and first.summary["rounds"] == 2

    resumed = engine.run_simulation(cfg, tmp_path / "crashed", progress=False, resume=True)

    straight = load_safetensors(tmp_path / "straight" / "model.safetensors")
    again = load_safetensors(tmp_path / "crashed" / "model.safetensors")
    assert resumed.summary["rounds"] == 4
    assert all(straight[k].equal(again[k]) for k in straight)
    assert [r["round"] for r in rows(tmp_path / "crashed")] == [1, 2, 3, 4]  # none lost, none repeated
    assert [r["accuracy"] for r in rows(tmp_path / "crashed")] == [r["accuracy"] for r in rows(tmp_path / "straight")]


@pytest.mark.parametrize(("keep", "kept_when_crashed", "kept_at_the_end"), [(1, [2], [4]), (3, [1, 2], [2, 3, 4]), (0, [1, 2], [1, 2, 3, 4])])
def test_keep_checkpoints_bounds_the_checkpoints_and_a_run_still_resumes(
    tmp_path, monkeypatch, tiny_config, keep, kept_when_crashed, kept_at_the_end
):
    # Prepare: a run interrupted in round 3, keeping `keep` rounds' checkpoints (0 = all)
    cfg = tiny_config(rounds=4, keep_checkpoints=keep)
    engine.run_simulation(cfg, tmp_path / "straight", progress=False)
    with monkeypatch.context() as patch:
        interrupt_after(patch, calls_before_interrupt=4 * 2 + 2)
        engine.run_simulation(cfg, tmp_path / "crashed", progress=False)
    kept = RunDirectory(tmp_path / "crashed").checkpoint_rounds()

    # Execute
    engine.run_simulation(cfg, tmp_path / "crashed", progress=False, resume=True)

    # Assert
    assert kept == kept_when_crashed
    assert RunDirectory(tmp_path / "crashed").checkpoint_rounds() == kept_at_the_end
    straight = load_safetensors(tmp_path / "straight" / "model.safetensors")
    again = load_safetensors(tmp_path / "crashed" / "model.safetensors")
    assert all(straight[k].equal(again[k]) for k in straight)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_resumes_bit_identical(tmp_path, strategy, tiny_config):
    straight = tiny_config(strategy=strategy, rounds=2, server_lr=0.05, server_momentum=0.9, proximal_mu=0.1)

    def run(cfg, run_dir):  # the ServerApp's rounds on a fresh in-process federation
        cfg = cfg.replace(run_dir=str(run_dir))
        nodes = cfg.num_clients
        grid = InProcessGrid(fedclient.app.app, nodes, cfg.to_mapping(), simulation_node_config(nodes))
        fedserver.app.run_federation(grid, cfg)

    run(straight, tmp_path / "straight")
    run(straight.replace(rounds=1), tmp_path / "resumed")
    run(straight, tmp_path / "resumed")

    expected = load_safetensors(tmp_path / "straight" / "model.safetensors")
    again = load_safetensors(tmp_path / "resumed" / "model.safetensors")
    assert all(expected[k].equal(again[k]) for k in expected)


STATEFUL = [name for name, (cls, _) in STRATEGY_CLASSES.items() if issubclass(cls, StatefulStrategy)]


def spoiling_round_2_once(monkeypatch, strategy: str, spoil) -> None:
    """The strategy's aggregate_train in round 2's first attempt is `spoil(real, self, round, replies)`."""
    cls = STRATEGY_CLASSES[strategy][0]
    real, spoiled = cls.aggregate_train, []

    def aggregate_train(self, server_round, replies):
        if server_round != 2 or spoiled:
            return real(self, server_round, replies)
        spoiled.append(server_round)
        return spoil(real, self, server_round, replies)

    monkeypatch.setattr(cls, "aggregate_train", aggregate_train)


def raises_before_its_step(real, self, server_round, replies):
    raise RuntimeError("nothing aggregated")


def raises_after_its_step(real, self, server_round, replies):
    real(self, server_round, replies)
    raise RuntimeError("aggregated, then failed")


def refused_after_its_step(real, self, server_round, replies):
    arrays, metrics = real(self, server_round, replies)
    return ArrayRecord({k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}), metrics


@pytest.mark.parametrize("strategy", STATEFUL)
@pytest.mark.parametrize(
    ("spoil", "logged"),
    [(raises_after_its_step, "the strategy could not aggregate"), (refused_after_its_step, "aggregate refused")],
    ids=["the strategy raises", "the aggregate is refused"],
)
def test_a_failed_attempt_leaves_no_trace_in_the_strategy(monkeypatch, tiny_config, caplog, strategy, spoil, logged):
    # Prepare: round 2's first attempt fails once the strategy has taken its step (its moments,
    # its momentum updated); the reference run's fails before any step, drawing the same retry
    cfg = tiny_config(strategy=strategy, rounds=3, server_lr=0.05, server_momentum=0.9)

    def final_weights(spoil) -> dict[str, np.ndarray]:
        with monkeypatch.context() as patch:
            spoiling_round_2_once(patch, strategy, spoil)
            nodes = cfg.num_clients
            grid = InProcessGrid(fedclient.app.app, nodes, cfg.to_mapping(), simulation_node_config(nodes))
            arrays = fedserver.app.run_federation(grid, cfg).arrays
        return {k: v.numpy() for k, v in arrays.items()}

    # Execute
    expected = final_weights(raises_before_its_step)
    caplog.clear()
    again = final_weights(spoil)

    # Assert
    assert f"round 2: {logged}" in caplog.text and "(attempt 1 of 3)" in caplog.text
    assert expected.keys() == again.keys()
    assert all(np.array_equal(expected[k], again[k]) for k in expected)


def test_fedsim_resume_extends_a_finished_run(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", "--set", "rounds=2", "--set", "hidden=\"8\"", "--set", "num-clients=6",
                     "--set", "clients-per-round=3", "--output", str(out), "--quiet"]) == 0  # fmt: skip

    assert cli.main(["run", "--resume", str(out), "--set", "rounds=3", "--quiet"]) == 0

    assert [r["round"] for r in rows(out)] == [1, 2, 3]


def test_an_existing_run_is_never_overwritten(tmp_path, capsys, tiny_config):
    out = tmp_path / "run"
    engine.run_simulation(tiny_config(rounds=1), out, progress=False)
    before = (out / "metrics.jsonl").read_bytes()

    code = cli.main(["run", "--output", str(out), "--quiet"])

    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_a_corrupt_checkpoint_names_the_file(tmp_path, capsys, tiny_config):
    out = tmp_path / "run"
    engine.run_simulation(tiny_config(rounds=2), out, progress=False)
    (out / "checkpoints" / "round-2.safetensors").write_bytes(b"garbage")

    code = cli.main(["run", "--resume", str(out), "--set", "rounds=3", "--quiet"])

    err = capsys.readouterr().err
    assert code == 2 and "round-2.safetensors is missing or corrupt" in err


def test_a_checkpoint_from_another_config_is_refused(tmp_path, tiny_config):
    out = tmp_path / "run"
    engine.run_simulation(tiny_config(rounds=1), out, progress=False)

    with pytest.raises(CheckpointError, match="lr = 0.05, not 0.1"):
        engine.run_simulation(tiny_config(rounds=2, lr=0.1), out, progress=False, resume=True)


def test_a_run_saved_before_a_key_existed_resumes_with_its_default(tmp_path, tiny_config):
    out = tmp_path / "run"
    engine.run_simulation(tiny_config(rounds=1), out, progress=False)
    state = json.loads((out / "state.json").read_text())
    del state["config"]["data-seed"]
    (out / "state.json").write_text(json.dumps(state))

    result = engine.run_simulation(tiny_config(rounds=2), out, progress=False, resume=True)

    assert result.summary["rounds"] == 2


def test_a_resume_may_evaluate_differently_and_trains_the_same(tmp_path, tiny_config):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    engine.run_simulation(tiny_config(rounds=3), straight, progress=False)
    engine.run_simulation(tiny_config(rounds=1), resumed, progress=False)

    engine.run_simulation(tiny_config(rounds=3, eval_every=2, eval_clients=2), resumed, progress=False, resume=True)

    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def failing_nodes(monkeypatch, nodes: set[int]) -> None:
    real_train = task.train

    def train(model, *args, **kwargs):
        if kwargs["seed"] % 10_007 in nodes:  # node id is the seed's last term (fedclient.app.client_seed)
            raise RuntimeError("device unplugged")
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(task, "train", train)


def test_a_round_completes_from_the_others_when_the_quorum_holds(tmp_path, monkeypatch, tiny_config):
    monkeypatch.setattr(fedclient.app, "client_seed", lambda cfg, rnd, node: node)
    failing_nodes(monkeypatch, {1001, 1002})

    result = engine.run_simulation(tiny_config(rounds=3, min_replies=0.25), tmp_path / "r", progress=False)

    assert result.summary["rounds"] == 3


def test_a_node_that_is_gone_for_good_does_not_stall_the_run(tmp_path, monkeypatch, tiny_config, caplog):
    # Node 1001 never connects: Flower's own sampling would wait for all 6 nodes without end.
    faulthandler.dump_traceback_later(120, exit=True)  # a regression hangs: fail the run, not CI's clock
    monkeypatch.setattr(fedserver.app, "NODE_POLL_SECONDS", 0.05)
    everyone = InProcessGrid.get_node_ids
    monkeypatch.setattr(InProcessGrid, "get_node_ids", lambda grid: [n for n in everyone(grid) if n != 1001])
    cfg = tiny_config(rounds=2, clients_per_round=6, node_wait_timeout=0.5, min_replies=0.5)

    try:
        result = engine.run_simulation(cfg, tmp_path / "r", progress=False)
    finally:
        faulthandler.cancel_dump_traceback_later()

    assert result.summary["rounds"] == 2
    assert "round 1: 5 of 6 nodes connected after 0.5 s; sampling from those" in caplog.text


def test_a_retried_round_samples_around_the_node_that_failed_it(tmp_path, monkeypatch, tiny_config, caplog):
    # 6 of 7 nodes a round and every reply needed: node 1001 fails each attempt it is in, so only a
    # retry that leaves it out can complete (a killed device stays connected for Flower's online window).
    monkeypatch.setattr(fedclient.app, "client_seed", lambda cfg, rnd, node: node)
    failing_nodes(monkeypatch, {1001})
    cfg = tiny_config(rounds=4, num_clients=7, clients_per_round=6, min_replies=6, round_retries=1)

    result = engine.run_simulation(cfg, tmp_path / "r", progress=False)

    assert result.summary["rounds"] == 4
    assert "(attempt 1 of 2)" in caplog.text  # 1001 was in a first cohort, and the retry went around it


def test_below_quorum_the_round_is_retried_then_the_run_stops_clearly(tmp_path, monkeypatch, tiny_config):
    monkeypatch.setattr(fedclient.app, "client_seed", lambda cfg, rnd, node: node)
    failing_nodes(monkeypatch, set(range(1001, 1007)))  # every client

    with pytest.raises(RoundFailed, match=r"round 1: fewer than 4 valid replies after 3 attempts \(node \d+: failed the task: code 100 \(the device failed to do the task \(details in the device's log\)\)\); nothing was aggregated"):
        engine.run_simulation(tiny_config(rounds=2, min_replies=4), tmp_path / "r", progress=False)

    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def corrupting_client_app(kind: str, bad_nodes: set[int]) -> ClientApp:
    """The real ClientApp, except that `bad_nodes` send a NaN, wrong-shape or huge update."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = fedclient.app.train(msg, context)
        if context.node_id not in bad_nodes:
            return reply
        arrays = reply.content[keys.ARRAYS]
        name = next(iter(arrays))
        value = arrays[name].numpy()
        bad = {"nan": np.full_like(value, np.nan), "shape": value[:-1], "huge": value + 1e6}[kind]
        arrays[name] = Array(np.ascontiguousarray(bad))
        return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: reply.content[keys.METRICS]}), reply_to=msg)

    app.evaluate()(fedclient.app.evaluate)
    return app


@pytest.mark.parametrize("kind", ["nan", "shape", "huge"])
def test_bad_updates_are_refused_and_the_model_stays_finite_and_learns(
    tmp_path, client_app_reference, kind, caplog, tiny_config
):
    result = engine.run_simulation(
        tiny_config(rounds=6, num_clients=6, clients_per_round=6, max_update_norm=100.0, min_replies=2),
        tmp_path / "r",
        progress=False,
        client_app=client_app_reference(corrupting_client_app(kind, bad_nodes={1001, 1002})),
    )

    weights = load_safetensors(tmp_path / "r" / "model.safetensors")
    history = rows(tmp_path / "r")
    assert all(bool(w.isfinite().all()) for w in weights.values())
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert not math.isnan(result.summary["final_accuracy"])
    assert any("node 1001: update refused" in r.getMessage() for r in caplog.records)
