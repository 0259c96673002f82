"""Secure aggregation through fedsim: the same ServerApp and ClientApp, the sum only."""

from collections.abc import Callable

import pytest
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

import fedclient.app
from fedserver.app import run_federation
from shared import messages as keys
from shared.config import ConfigError, RunConfig
from shared.secagg import protocol as p
from shared.secagg import secagg_mod
from shared.weights import load_safetensors
from simulations.engine import run_simulation
from simulations.grid import InProcessGrid, simulation_node_config

BASE = {"dataset": "synthetic", "num-clients": 8, "clients-per-round": 6, "rounds": 3, "hidden": "8",
        "synthetic-max-samples": 200, "vectorized": "off", "secagg-threshold": 3, "secagg-neighbours": 4}  # fmt: skip


# The per-round error is <= clip/(levels-1) = 4.8e-7 per element (tests/shared/test_secagg.py);
# over 3 rounds later local training amplifies it (measured 5e-6), and FedAdam's normalized step more (7e-4).
@pytest.mark.parametrize(("strategy", "tolerance"), [("fedavg", 2e-5), ("fedadam", 2e-3)])
def test_secure_rounds_match_plaintext_within_the_quantization_bound(tmp_path, strategy, tolerance):
    plain = RunConfig.from_mapping({**BASE, "strategy": strategy})
    secure = plain.replace(secure_aggregation=True)

    run_simulation(plain, tmp_path / "plain", progress=False)
    result = run_simulation(secure, tmp_path / "secure", progress=False)

    a = load_safetensors(tmp_path / "plain" / "model.safetensors")
    b = load_safetensors(tmp_path / "secure" / "model.safetensors")
    assert result.summary["rounds"] == 3
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < tolerance


def test_robust_strategies_refuse_secure_aggregation():
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunConfig.from_mapping({**BASE, "strategy": "krum", "secure-aggregation": True})


def once(spoil: Callable[[Message], Message]) -> Callable:
    """A mod around SecAgg's that spoils the first masked-input reply of the run, then none."""
    done: list[bool] = []

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        if not done and reply.has_content() and p.MASKED in reply.content:
            done.append(True)
            return spoil(reply)
        return reply

    return mod


def inflated_vector(reply: Message) -> Message:
    """2^40 added to the first elements of the masked vector: past any honest client's."""
    vector = reply.content[p.MASKED][p.VECTOR].numpy().copy()
    vector[:10] += vector.dtype.type(1 << 40)
    reply.content[p.MASKED][p.VECTOR] = Array(vector)
    return reply


def inflating_app(claim: int) -> ClientApp:
    """Flowerbed's ClientApp whose first training reply of the run claims `claim` examples (SecAgg weights by it)."""
    done: list[bool] = []

    def train(msg: Message, context: Context) -> Message:
        reply = fedclient.app.train(msg, context)
        if not done:
            done.append(True)
            reply.content[keys.METRICS][keys.NUM_EXAMPLES] = claim
        return reply

    app = ClientApp(mods=[secagg_mod])
    app.train()(train)
    app.evaluate()(fedclient.app.evaluate)
    return app


def with_mod(mod: Callable) -> ClientApp:
    app = ClientApp(mods=[mod, secagg_mod])
    app.train()(fedclient.app.train)
    app.evaluate()(fedclient.app.evaluate)
    return app


@pytest.mark.parametrize(
    ("app", "reason"),
    [
        (lambda: with_mod(once(inflated_vector)), "outside the clipping range ±8: a malformed masked vector"),
        (lambda: inflating_app(10**9), "the secure sum claims 1000000"),
    ],
    ids=["malformed vector", "count beyond max-client-examples"],
)
def test_a_spoiled_secure_round_is_retried_and_the_run_completes(tmp_path, client_app_reference, caplog, app, reason):
    cfg = RunConfig.from_mapping({**BASE, "secure-aggregation": True})

    result = run_simulation(cfg, tmp_path / "r", progress=False, client_app=client_app_reference(app()))

    assert any(reason in r.getMessage() and "round 1:" in r.getMessage() and "(attempt 1 of 3)" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip
    assert result.summary["rounds"] == 3
    weights = load_safetensors(tmp_path / "r" / "model.safetensors")
    assert all(bool(w.isfinite().all()) for w in weights.values())


def integer_for(stage: str, name: str) -> Callable:
    """A mod around SecAgg's by which partition 0's device answers `stage` with an integer for the list `name`."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        record = reply.content.get(p.RECORD) if reply.has_content() else None
        if context.node_config["partition-id"] == 0 and record is not None and record[p.STAGE] == stage:
            record[name] = 7
        return reply

    return mod


@pytest.mark.parametrize(("stage", "name"), [(p.SHARE_KEYS, p.DESTINATIONS), (p.UNMASK, p.SHARES)])
def test_a_client_sending_an_integer_for_a_list_is_left_out_and_the_run_learns(tiny_config, caplog, stage, name):
    cfg = tiny_config(rounds=3, clients_per_round=6, secure_aggregation=True, secagg_threshold=3, secagg_neighbours=4)
    grid = InProcessGrid(with_mod(integer_for(stage, name)), cfg.num_clients, cfg.to_mapping(),
                         simulation_node_config(cfg.num_clients))  # fmt: skip

    history = run_federation(grid, cfg).history

    assert [row["round"] for row in history] == [1, 2, 3] and history[-1]["accuracy"] > history[0]["accuracy"]
    dropped = [r.getMessage() for r in caplog.records if "dropped out of the secure round" in r.getMessage()]
    assert len(dropped) == 3 and all(f"{stage}: {name.replace('-', ' ')}: not" in m for m in dropped), dropped


def test_a_client_cheating_at_every_secure_stage_cannot_stop_the_run(tmp_path, caplog):
    # Prepare: `fedsim run --client-app examples.secagg_cheat:app`: node 1001 sends one fault a round
    from examples.secagg_cheat import FAULTS
    from simulations import cli

    args = ["--set", "dataset=synthetic", "--set", "num-clients=8", "--set", "clients-per-round=8",
            "--set", f"rounds={len(FAULTS)}", "--set", 'hidden="8"', "--set", "synthetic-max-samples=200",
            "--set", "secure-aggregation=true", "--set", "secagg-threshold=4", "--set", "secagg-neighbours=6",
            "--set", "workers=1", "--quiet"]  # fmt: skip

    # Execute
    honest = cli.main(["run", *args, "--output", str(tmp_path / "honest")])
    caplog.clear()
    cheated = cli.main(["run", *args, "--output", str(tmp_path / "cheat"), "--client-app", "examples.secagg_cheat:app"])

    # Assert: every round completed without the cheat, named in each; the accuracy within a few points
    dropped = [r.getMessage() for r in caplog.records if "dropped out of the secure round" in r.getMessage()]
    assert honest == cheated == 0
    assert len(dropped) == len(FAULTS) and all(line.startswith("node 1001: ") for line in dropped), dropped
    accuracy = {run: _summary(tmp_path / run)["final_accuracy"] for run in ("honest", "cheat")}
    assert abs(accuracy["cheat"] - accuracy["honest"]) < 0.05, accuracy


def _summary(run_dir) -> dict:
    import json

    return json.loads((run_dir / "summary.json").read_text())
