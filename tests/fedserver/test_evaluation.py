"""Evaluation at scale: a bounded, sampled cohort, `eval-every`, and what the summary says it measured."""

import json

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

import fedclient.app
from fedserver.app import run_federation
from fedserver.grid_wrapper import GridWrapper
from shared import messages as keys
from shared import task
from shared.weights import load_safetensors
from simulations.engine import run_simulation
from simulations.grid import InProcessGrid, simulation_node_config


class Recording(GridWrapper):
    """An in-process grid that remembers the nodes of each evaluation it is asked for."""

    def __init__(self, cfg) -> None:
        nodes = cfg.num_clients
        super().__init__(InProcessGrid(fedclient.app.app, nodes, cfg.to_mapping(), simulation_node_config(nodes)))
        self.evaluations: list[list[int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.EVALUATE:
            self.evaluations.append(sorted(m.metadata.dst_node_id for m in messages))
        return super().send_and_receive(messages, timeout=timeout)


def evaluated_nodes(cfg) -> list[list[int]]:
    grid = Recording(cfg)
    run_federation(grid, cfg)
    return grid.evaluations


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir):
    return load_safetensors(run_dir / "model.safetensors")


def test_eval_clients_samples_that_many_each_round_reproducibly(tiny_config):
    cfg = tiny_config(rounds=4, eval_clients=3)

    first, again = evaluated_nodes(cfg), evaluated_nodes(cfg)

    assert [len(nodes) for nodes in first] == [3, 3, 3, 3]
    assert first == again
    assert len({tuple(nodes) for nodes in first}) > 1  # a fresh sample each round
    assert [len(nodes) for nodes in evaluated_nodes(tiny_config(rounds=1, eval_clients=-1))] == [6]
    assert [len(nodes) for nodes in evaluated_nodes(tiny_config(rounds=1))] == [6]  # the default: all of 6


def test_eval_every_evaluates_only_its_rounds_and_the_last(tmp_path, tiny_config):
    result = run_simulation(tiny_config(rounds=5, eval_every=2), tmp_path / "r", progress=False)

    metrics = rows(tmp_path / "r")
    assert [r["round"] for r in metrics if r["accuracy"] is not None] == [2, 4, 5]
    assert all(r["eval_loss"] is None and r["train_loss"] is not None for r in metrics if r["round"] in (1, 3))
    assert result.summary["final_accuracy"] == metrics[-1]["accuracy"]
    assert result.summary["evaluated_rounds"] == 3 and result.summary["final_accuracy_round"] == 5
    assert result.summary["evaluated_on"] == "federated: all 6 clients' held-out data"


def test_training_is_the_same_whatever_the_evaluation_settings(tmp_path, tiny_config):
    runs = {
        "every round, all": tiny_config(rounds=4),
        "every 3rd, all": tiny_config(rounds=4, eval_every=3),
        "every round, 2 clients": tiny_config(rounds=4, eval_clients=2),
        "every 2nd, 1 client": tiny_config(rounds=4, eval_every=2, eval_clients=1),
    }
    trained = {}
    for name, cfg in runs.items():
        run_simulation(cfg, tmp_path / name, progress=False)
        trained[name] = (weights(tmp_path / name), [r["train_loss"] for r in rows(tmp_path / name)])

    reference_weights, reference_losses = trained["every round, all"]
    for name, (state, losses) in trained.items():
        assert all(state[k].equal(reference_weights[k]) for k in state), name
        assert losses == reference_losses, name


def test_a_resume_between_evaluations_is_bit_identical(tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config(rounds=5, eval_every=2, eval_clients=3)
    run_simulation(cfg, tmp_path / "straight", progress=False)
    real_train, calls = task.train, []

    def train_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4 * 3 + 1:  # in the middle of round 4, after round 3, not evaluated
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(task, "train", train_then_crash)
        assert run_simulation(cfg, tmp_path / "crashed", progress=False).interrupted
    run_simulation(cfg, tmp_path / "crashed", progress=False, resume=True)

    straight, crashed = weights(tmp_path / "straight"), weights(tmp_path / "crashed")
    assert all(straight[k].equal(crashed[k]) for k in straight)
    assert rows(tmp_path / "crashed") == [
        {**r, "seconds": c["seconds"]} for r, c in zip(rows(tmp_path / "straight"), rows(tmp_path / "crashed"))
    ]


def test_stop_at_target_acts_on_evaluated_rounds(tmp_path, tiny_config):
    cfg = tiny_config(rounds=6, eval_every=3, target_accuracy=0.01, stop_at_target=True)

    result = run_simulation(cfg, tmp_path / "r", progress=False)

    assert result.summary["rounds"] == 3 and result.summary["rounds_to_target"] == 3


def claiming_accuracy(node: int, accuracy: float) -> ClientApp:
    """Flowerbed's ClientApp, except that `node` claims `accuracy` in each evaluation reply."""
    app = ClientApp()
    app.train()(fedclient.app.train)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        reply = fedclient.app.evaluate(msg, context)
        if context.node_id == node:
            reply.content[keys.METRICS][keys.ACCURACY] = accuracy
        return reply

    return app


def test_a_claimed_accuracy_out_of_range_neither_counts_nor_stops_the_run(
    tmp_path, client_app_reference, tiny_config, caplog
):
    # Prepare: node 1001 claims an accuracy of 1e9 in every evaluation; the target is out of honest reach
    claiming = client_app_reference(claiming_accuracy(1001, 1e9))
    cfg = tiny_config(rounds=3, target_accuracy=0.99, stop_at_target=True)

    # Execute
    result = run_simulation(cfg, tmp_path / "r", progress=False, client_app=claiming)

    # Assert
    assert result.summary["rounds"] == 3 and result.summary["rounds_to_target"] is None
    assert 0 <= result.summary["best_accuracy"] < 0.99
    assert caplog.text.count("node 1001: evaluation refused: metric 'accuracy': 1000000000.0 is outside [0, 1]") == 3


def test_a_central_test_set_is_named_with_its_size_and_scores_only_evaluated_rounds(tmp_path, tiny_config):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.normal(size=(60, 5)), y_train=rng.integers(0, 3, 60),
             x_test=rng.normal(size=(25, 5)), y_test=rng.integers(0, 3, 25))  # fmt: skip
    cfg = tiny_config(dataset="npz", data_path=str(data), synthetic_max_samples=0, rounds=3, eval_every=2)

    result = run_simulation(cfg, tmp_path / "r", progress=False)

    assert [r["accuracy"] is not None for r in rows(tmp_path / "r")] == [False, True, True]
    assert result.summary["evaluated_on"] == "central test set (25 examples)"
