"""Central DP (DP-FedAvg): Poisson sampling, clipping, noise on the sum over the expected cohort,
and ε accounted by RDP, kept across a resume and stopping a run at its target (fedserver/privacy.py)."""

from __future__ import annotations

import json
import random
import statistics
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedclient.app import app as client_app
from fedserver.app import CohortGrid, _configure_train, global_random
from fedserver.events import RoundEvent
from fedserver.privacy import (
    INSTALL_HINT,
    CentralDP,
    DistributedDP,
    PoissonAccountant,
    PrivateRoundEvent,
    central_dp_mean,
    poisson_cohort,
)
from fedserver.state import StateDir
from fedserver.status import Status, collect, render
from fedserver.strategies import build_strategy
from shared import messages as keys
from shared.config import DP_NOT_AVAILABLE, ConfigError, RunConfig
from simulations.engine import run_simulation
from simulations.grid import InProcessGrid
from simulations.report import progress_line

DP = {"dp": "central", "dp_clipping_norm": 1.0, "dp_noise_multiplier": 1.0}


def _dp(tiny_config, **changes: object) -> RunConfig:
    """The tiny federation (4 of 6 clients a round) under central DP, C = z = 1 unless changed."""
    return tiny_config(**{**DP, **changes})


def _direct_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return accountant.get_epsilon(delta)


# --- accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "z", "rounds", "delta"), [(0.01, 1.1, 100, 1e-5), (0.1, 0.8, 7, 1e-6), (0.5, 2.0, 3, 1e-5)]
)
def test_epsilon_is_dp_accountings_for_poisson_sampling(q, z, rounds, delta):
    accountant = PoissonAccountant(q, z, delta)

    for _ in range(rounds):
        accountant.compose()

    assert accountant.epsilon() == pytest.approx(_direct_epsilon(q, z, rounds, delta), rel=1e-12)
    assert accountant.epsilon() < _direct_epsilon(min(1.0, 2 * q), z, rounds, delta)  # q matters: it amplifies


def test_epsilon_from_a_config_and_before_any_release(tiny_config):
    cfg = _dp(tiny_config, dp_noise_multiplier=1.3, dp_delta=1e-6)  # 4 of 6 clients a round

    accountant = PoissonAccountant.for_config(cfg)

    assert accountant.epsilon() == 0.0
    assert accountant.epsilon(5) == pytest.approx(_direct_epsilon(4 / 6, 1.3, 5, 1e-6))


def test_without_noise_epsilon_is_infinite():
    accountant = PoissonAccountant(0.1, 0.0, 1e-5, releases=1)

    assert accountant.epsilon() == float("inf")


def test_a_missing_dp_accounting_is_one_line_naming_the_extra(tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # `import dp_accounting` raises ImportError

    with pytest.raises(ConfigError, match="flowerbed\\[server\\]") as err:
        PoissonAccountant.for_config(_dp(tiny_config))

    assert INSTALL_HINT in str(err.value) and "\n" not in str(err.value)


# --- Poisson sampling ---------------------------------------------------------------------------


def _cohort_sizes_are_poisson(sizes: list[int], n: int, q: float) -> bool:
    """Mean within 4 standard errors of qN, variance within 4 of Nq(1-q) (a binomial's)."""
    draws, var = len(sizes), n * q * (1 - q)
    mean_ok = abs(statistics.fmean(sizes) - n * q) <= 4 * (var / draws) ** 0.5
    variance_ok = abs(statistics.variance(sizes) - var) <= 4 * var * (2 / (draws - 1)) ** 0.5
    return mean_ok and variance_ok


def test_cohort_sizes_follow_poisson_sampling():
    rng = random.Random(0)

    sizes = [len(poisson_cohort(range(100), 0.3, rng)) for _ in range(200)]

    assert _cohort_sizes_are_poisson(sizes, 100, 0.3)
    assert not _cohort_sizes_are_poisson([30] * 200, 100, 0.3)  # a fixed-size sample fails the check
    assert not _cohort_sizes_are_poisson([len(poisson_cohort(range(100), 0.4, rng)) for _ in range(200)], 100, 0.3)


def test_the_server_app_samples_each_round_by_poisson(tiny_config):
    cfg = _dp(tiny_config, num_clients=40, clients_per_round=10)
    grid = InProcessGrid(client_app, cfg.num_clients, cfg.to_mapping(), lambda node: {})
    strategy = CentralDP.for_config(build_strategy(cfg, federated_evaluation=True), cfg)  # C = z = 1, qN = 10
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})

    with global_random(cfg.seed):
        cohorts = [_configure_train(strategy, grid, cfg, r, arrays) for r in range(1, 201)]

    sizes = [len(messages) for messages in cohorts]
    assert _cohort_sizes_are_poisson(sizes, 40, 0.25)
    assert all(len({m.metadata.dst_node_id for m in messages}) == len(messages) for messages in cohorts)


def test_an_empty_cohort_sends_nothing_and_its_round_is_still_a_release(tiny_config):
    cfg = _dp(tiny_config, dp_noise_multiplier=0.0)
    grid = InProcessGrid(client_app, cfg.num_clients, cfg.to_mapping(), lambda node: {})
    strategy = CentralDP.for_config(build_strategy(cfg, federated_evaluation=True), cfg)  # C = 1, z = 0, qN = 4
    accountant = strategy.accountant
    arrays = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})

    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), CohortGrid(grid, [])))
    new_arrays, _ = strategy.aggregate_train(1, [])

    assert messages == []
    np.testing.assert_array_equal(new_arrays["w"].numpy(), np.arange(3, dtype=np.float32))
    assert accountant.releases == 1


# --- clipping and noise -------------------------------------------------------------------------


def _reply(weights: np.ndarray, examples: int = 10) -> Message:
    arrays = ArrayRecord({"w": Array(weights.astype(np.float32))})
    metrics = MetricRecord({keys.TRAIN_LOSS: 1.0, keys.NUM_EXAMPLES: examples})
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), 1, "train")


def test_noise_on_the_aggregate_has_std_z_c_over_the_expected_cohort(tiny_config):
    cfg = _dp(tiny_config, dp_clipping_norm=2.0, dp_noise_multiplier=1.5)  # expected cohort 4
    strategy = CentralDP.for_config(build_strategy(cfg, federated_evaluation=True), cfg)
    current = np.zeros(200_000, np.float32)
    strategy.configure_train(1, ArrayRecord({"w": Array(current)}), ConfigRecord(), CohortGrid(_NoGrid(), []))
    np.random.seed(0)  # Flower's noise draws from numpy's global stream

    new_arrays, _ = strategy.aggregate_train(1, [_reply(current) for _ in range(3)])  # 3 replied: zero updates

    noise = new_arrays["w"].numpy()
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(noise.std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.02)  # not over the 3 that replied (1.0)


def test_clipping_bounds_each_clients_move_of_the_aggregate():
    current = [np.full(5, 0.5, np.float32), np.zeros((2, 3), np.float32)]
    huge = [current[0] + 1e6, current[1] - 3e5]
    small = [current[0] + 0.01, current[1]]

    alone = central_dp_mean(current, [huge], clipping_norm=2.0, noise_multiplier=0.0, expected_cohort=4)
    with_small = central_dp_mean(current, [huge, small], clipping_norm=2.0, noise_multiplier=0.0, expected_cohort=4)

    moved = np.sqrt(sum(float(((a.astype(np.float64) - c) ** 2).sum()) for a, c in zip(alone, current)))
    assert moved == pytest.approx(2.0 / 4, rel=1e-6)  # clipped to C, over the expected cohort qN
    extra = with_small[0].astype(np.float64) - alone[0]
    np.testing.assert_allclose(extra, 0.01 / 4, rtol=1e-4)  # an update within C is not clipped
    assert [a.dtype for a in alone] == [np.float32, np.float32]


class _NoGrid:
    """What `CohortGrid` wraps, where no message is sent."""

    def get_node_ids(self) -> list[int]:
        return []


# --- runs: ε in the outputs, the target, resume -------------------------------------------------


def test_a_dp_run_reports_epsilon_each_round(tiny_config, tmp_path):
    cfg = _dp(tiny_config, rounds=3)

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [_direct_epsilon(4 / 6, 1.0, n, 1e-5) for n in (1, 2, 3)]
    assert [row["epsilon"] for row in rows] == pytest.approx(expected)
    assert result.summary["epsilon"] == pytest.approx(expected[-1]) and result.summary["stopped"] is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epsilon"] == pytest.approx(expected[-1])


def test_a_run_without_dp_has_no_epsilon(tiny_config, tmp_path):
    result = run_simulation(tiny_config(), tmp_path / "run", progress=False)

    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "epsilon" not in rows and result.summary["epsilon"] is None


def test_the_target_epsilon_stops_the_run_before_a_round_would_pass_it(tiny_config, tmp_path):
    after_2, after_3 = _direct_epsilon(4 / 6, 1.0, 2, 1e-5), _direct_epsilon(4 / 6, 1.0, 3, 1e-5)
    cfg = _dp(tiny_config, rounds=6, dp_target_epsilon=float(after_2 + after_3) / 2)

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    assert result.summary["rounds"] == 2
    assert result.summary["epsilon"] == pytest.approx(after_2) and result.summary["epsilon"] <= cfg.dp_target_epsilon
    assert "dp-target-epsilon" in result.summary["stopped"] and "round 3" in result.summary["stopped"]
    resumed = run_simulation(cfg, tmp_path / "run", progress=False, resume=True)  # nothing more to spend
    assert resumed.summary["rounds"] == 2


def test_a_resumed_run_ends_with_the_epsilon_of_an_uninterrupted_one(tiny_config, tmp_path):
    cfg = _dp(tiny_config, rounds=3)
    whole = run_simulation(cfg, tmp_path / "whole", progress=False)

    run_simulation(cfg.replace(rounds=2), tmp_path / "parts", progress=False)  # stopped after round 2
    resumed = run_simulation(cfg, tmp_path / "parts", progress=False, resume=True)

    assert resumed.summary["rounds"] == 3
    assert resumed.summary["epsilon"] == whole.summary["epsilon"] == pytest.approx(_direct_epsilon(4 / 6, 1.0, 3, 1e-5))
    state = json.loads((tmp_path / "parts" / "state.json").read_text())
    assert state["privacy"]["releases"] == 3


def test_epsilon_shows_in_the_progress_bar_and_in_fedserver_status():
    event = PrivateRoundEvent(
        round=2, rounds=5, train_loss=0.5, eval_loss=0.6, accuracy=0.7, seconds=1.0, epsilon=1.2345,
        stopped="dp-target-epsilon 2: round 3 would reach epsilon 2.1",
    )  # fmt: skip

    line = progress_line(event, elapsed=2.0)
    shown = render(Status(state_dir="/tmp/s", running=False, rounds_completed=2, last_metrics=event.row()))

    assert "eps 1.23" in line
    assert "epsilon 1.234" in shown and "the run stopped: dp-target-epsilon 2" in shown
    plain = RoundEvent(round=2, rounds=5, train_loss=0.5, eval_loss=0.6, accuracy=0.7, seconds=1.0)
    assert "eps" not in progress_line(plain, elapsed=2.0) and "stopped" not in plain.row()


def test_fedserver_status_shows_the_epsilon_of_the_last_round(tmp_path):
    state = StateDir(tmp_path / "state")
    state.create()
    (state.run_dir / "metrics.jsonl").write_text(
        '{"round": 1, "accuracy": 0.5, "seconds": 2.0, "epsilon": 0.75}\n'
        '{"round": 2, "accuracy": 0.6, "seconds": 2.0, "epsilon": 1.125}\n'
    )

    shown = render(collect(state.root))

    assert "last round 2" in shown and "epsilon 1.125" in shown and "epsilon 0.75" not in shown


def test_a_server_optimizer_steps_on_the_noised_average(tiny_config, tmp_path):
    cfg = _dp(tiny_config, strategy="fedadam", rounds=2)

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    assert result.summary["rounds"] == 2
    assert result.summary["epsilon"] == pytest.approx(_direct_epsilon(4 / 6, 1.0, 2, 1e-5))


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dp": "laplace"}, "config key 'dp' is 'laplace'; allowed: none, central, distributed, local-sgd"),
        ({"dp": "central"}, "'dp-clipping-norm' must be > 0"),
        ({**DP, "dp_noise_multiplier": -1.0}, "'dp-noise-multiplier' must be >= 0"),
        ({**DP, "dp_delta": 0.0}, "'dp-delta' must be in (0, 1)"),
        ({**DP, "dp_delta": 1.0}, "'dp-delta' must be in (0, 1)"),
        ({**DP, "dp_target_epsilon": -1.0}, "'dp-target-epsilon' must be >= 0"),
        ({**DP, "dp_noise_multiplier": 0.0, "dp_target_epsilon": 3.0}, "needs 'dp-noise-multiplier' > 0"),
        ({**DP, "strategy": "fedmedian"}, "strategy 'fedmedian': its aggregate is not a sum"),
        ({**DP, "strategy": "krum"}, "strategy 'krum': its aggregate is not a sum"),
        ({**DP, "strategy": "bulyan"}, "strategy 'bulyan': its aggregate is not a sum"),
        ({**DP, "secure_aggregation": True}, "with secure-aggregation"),
    ],
)
def test_bad_dp_keys_are_one_line_errors(tiny_config, changes, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**changes)

    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_dp_mode_is_available():
    assert DP_NOT_AVAILABLE == ()  # a mode added later and refused until done is named there


def test_dp_keys_default_to_no_dp_and_server_optimizers_take_central_dp(tiny_config):
    assert RunConfig().dp == "none" and RunConfig().dp_delta == 1e-5 and RunConfig().dp_target_epsilon == 0.0
    for strategy in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        assert _dp(tiny_config, strategy=strategy).dp == "central"


# --- sample-level DP-SGD on the devices: the server's ledger of each client's ε ----------------------


def test_a_local_sgd_run_reports_the_worst_clients_epsilon_and_a_resume_keeps_it(tiny_config, tmp_path):
    # Prepare: every client in every round (`dp = "local-sgd"`: each trains with Opacus)
    pytest.importorskip("opacus")
    from shared.privacy_local import SampleLevelLedger

    cfg = tiny_config(dp="local-sgd", dp_clipping_norm=1.0, dp_noise_multiplier=1.0, rounds=3, clients_per_round=6)

    # Execute
    whole = run_simulation(cfg, tmp_path / "whole", progress=False)
    run_simulation(cfg.replace(rounds=2), tmp_path / "parts", progress=False)
    resumed = run_simulation(cfg, tmp_path / "parts", progress=False, resume=True)

    # Assert: ε rises each round, is the ledger's worst client's, and survives the resume
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"] == whole.summary["epsilon"]
    ledger = SampleLevelLedger.from_state(json.loads((tmp_path / "whole" / "state.json").read_text())["privacy"])
    assert ledger.epsilon(cfg.dp_delta) == pytest.approx(whole.summary["epsilon"])
    assert resumed.summary["epsilon"] == pytest.approx(whole.summary["epsilon"])


# --- distributed DP: noise shares added on the devices, summed by SecAgg+ ---------------------------

DISTRIBUTED = {"dp": "distributed", "secure_aggregation": True, "secagg_threshold": 3, "secagg_neighbours": 4}


def test_a_distributed_dp_run_reports_the_epsilon_of_its_secure_rounds(tiny_config, tmp_path):
    # Prepare: every one of the 6 clients in every round (q = 1), so the sum holds m = 6 noise shares
    cfg = _dp(tiny_config, **DISTRIBUTED, rounds=3, clients_per_round=6)

    # Execute
    result = run_simulation(cfg, tmp_path / "run", progress=False)

    # Assert: no client dropped, so each round is a release at z, as dp-accounting computes it
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [_direct_epsilon(1.0, 1.0, n, 1e-5) for n in (1, 2, 3)]
    assert [row["epsilon"] for row in rows] == pytest.approx(expected)
    assert result.summary["epsilon"] == pytest.approx(expected[-1])
    state = json.loads((tmp_path / "run" / "state.json").read_text())["privacy"]
    assert state["releases"] == 3 and "achieved" not in state


def test_a_distributed_dp_run_with_poisson_cohorts_accounts_each_rounds_shares(tiny_config, tmp_path):
    cfg = _dp(tiny_config, **DISTRIBUTED, rounds=3)  # q = 4/6: the cohort's size varies around m = 4

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    state = json.loads((tmp_path / "run" / "state.json").read_text())["privacy"]
    accountant = PoissonAccountant(4 / 6, 1.0, 1e-5)
    accountant.load_state(state)
    assert state["releases"] == 3 and all(z in {(k / 4) ** 0.5 for k in range(3, 7)} for z in accountant.achieved)
    assert result.summary["epsilon"] == pytest.approx(accountant.epsilon())


def test_a_dropout_lowers_the_achieved_noise_multiplier_and_raises_epsilon():
    strategy = DistributedDP(
        build_strategy(RunConfig(), federated_evaluation=True), clipping_norm=1.0, noise_multiplier=1.2,
        expected_cohort=4, accountant=PoissonAccountant(0.1, 1.2, 1e-5),
    )  # fmt: skip
    full, dropped = PoissonAccountant(0.1, 1.2, 1e-5), strategy.accountant

    assert strategy.achieved_noise_multiplier(4) == pytest.approx(1.2)
    assert strategy.achieved_noise_multiplier(3) == pytest.approx(1.2 * (3 / 4) ** 0.5)  # 3 shares of 4 summed
    for _ in range(5):
        full.compose()
    for k in (4, 3, 4, 4, 2):
        dropped.compose(strategy.achieved_noise_multiplier(k))

    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    direct = RdpAccountant()
    for k in (4, 3, 4, 4, 2):
        direct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2 * (k / 4) ** 0.5)))
    assert dropped.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert dropped.epsilon() > full.epsilon() == pytest.approx(_direct_epsilon(0.1, 1.2, 5, 1e-5))
    restored = PoissonAccountant(0.1, 1.2, 1e-5)
    restored.load_state(json.loads(json.dumps(dropped.state())))  # state.json keeps each achieved z
    assert restored.epsilon() == pytest.approx(dropped.epsilon())


def test_a_failed_secure_attempt_is_composed_at_the_least_noise_a_sum_could_hold():
    strategy = DistributedDP(
        build_strategy(RunConfig(), federated_evaluation=True), clipping_norm=1.0, noise_multiplier=2.0,
        expected_cohort=8, accountant=PoissonAccountant(0.1, 2.0, 1e-5),
    )  # fmt: skip

    strategy.compose_failed_attempt(threshold=2)

    assert strategy.accountant.releases == 1 and strategy.accountant.achieved == [pytest.approx(2.0 * 0.5)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({**DP, "dp": "distributed"}, "dp 'distributed' needs secure-aggregation = true"),
        ({**DP, **DISTRIBUTED, "strategy": "fedmedian"}, "strategy 'fedmedian': its aggregate is not a sum"),
        ({**DP, **DISTRIBUTED, "dp_clipping_norm": 0.0}, "'dp-clipping-norm' must be > 0 with dp 'distributed'"),
    ],
)
def test_bad_distributed_dp_keys_are_one_line_errors(tiny_config, changes, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**changes)

    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_target_epsilon_stops_a_distributed_dp_run(tiny_config, tmp_path):
    target = float(_direct_epsilon(1.0, 1.0, 2, 1e-5) + _direct_epsilon(1.0, 1.0, 3, 1e-5)) / 2
    cfg = _dp(tiny_config, **DISTRIBUTED, rounds=4, clients_per_round=6, dp_target_epsilon=target)

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["stopped"].startswith("dp-target-epsilon")
    assert result.summary["epsilon"] == pytest.approx(_direct_epsilon(1.0, 1.0, 2, 1e-5))
    assert result.summary["epsilon"] < target and "round 3" in result.summary["stopped"]
