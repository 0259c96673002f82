"""The sample-level DP ledger: each node's ε over its rounds, the worst reported, state round-trips."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from shared.config import ConfigError, RunConfig
from shared.privacy_local import SampleLevelDp, SampleLevelLedger, sampling

needs_accounting = pytest.mark.skipif(importlib.util.find_spec("dp_accounting") is None, reason="needs dp-accounting")


def _direct_epsilon(n: int, batch_size: int, epochs: int, z: float, rounds: int, delta: float) -> float:
    """dp-accounting by hand: q = B/n, E*ceil(n/B) steps a round, `rounds` rounds."""
    import dp_accounting  # noqa: PLC0415
    from dp_accounting.rdp import RdpAccountant  # noqa: PLC0415

    step = dp_accounting.PoissonSampledDpEvent(batch_size / n, dp_accounting.GaussianDpEvent(z))
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, epochs * math.ceil(n / batch_size) * rounds))
    return accountant.get_epsilon(delta)


def test_sampling_is_b_over_n_and_e_times_ceil_n_over_b():
    assert sampling(100, 32, 2) == (0.32, 8)
    assert sampling(10, 32, 3) == (1.0, 3)  # a batch larger than the data is all of it, once an epoch
    with pytest.raises(ValueError, match="must be >= 1"):
        sampling(0, 32, 1)


@pytest.mark.parametrize(("clip", "z"), [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (math.nan, 1.0)])
def test_settings_refuse_what_is_no_mechanism(clip, z):
    with pytest.raises(ValueError, match="sample-level DP needs"):
        SampleLevelDp(clip, z)


@needs_accounting
def test_one_clients_epsilon_is_the_direct_dp_accounting_computation():
    # Prepare: n = 600, B = 32, E = 2, z = 1.1, 3 rounds
    ledger = SampleLevelLedger(noise_multiplier=1.1, batch_size=32, epochs=2)

    # Execute
    for _ in range(3):
        ledger.record(7, 600)

    # Assert
    assert ledger.epsilon(1e-5) == pytest.approx(_direct_epsilon(600, 32, 2, 1.1, 3, 1e-5), rel=1e-9)
    assert 0 < ledger.epsilon(1e-5) < math.inf


@needs_accounting
def test_the_worst_client_is_reported():
    # Prepare: a small client (large q) and one that trains in more rounds
    ledger = SampleLevelLedger(noise_multiplier=1.0, batch_size=16, epochs=1)

    # Execute
    ledger.record(1, 1000)
    ledger.record(2, 64)
    ledger.record(3, 1000)
    ledger.record(3, 1000)

    # Assert
    small = _direct_epsilon(64, 16, 1, 1.0, 1, 1e-5)
    assert ledger.node_epsilon(2, 1e-5) == pytest.approx(small)
    assert ledger.node_epsilon(3, 1e-5) == pytest.approx(_direct_epsilon(1000, 16, 1, 1.0, 2, 1e-5))
    assert ledger.node_epsilon(1, 1e-5) < ledger.node_epsilon(3, 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(max(ledger.node_epsilon(node, 1e-5) for node in (1, 2, 3)))


@needs_accounting
def test_a_new_round_raises_the_nodes_epsilon():
    # Prepare
    ledger = SampleLevelLedger(noise_multiplier=1.0, batch_size=16, epochs=1)
    ledger.record(1, 500)
    before = ledger.epsilon(1e-5)

    # Execute
    ledger.record(1, 500, epochs=3)  # e.g. a round whose config asked for 3 local epochs

    # Assert: one round of E = 1 and one of E = 3 are 4 * ceil(500/16) steps
    assert ledger.epsilon(1e-5) > before
    assert ledger.epsilon(1e-5) == pytest.approx(_direct_epsilon(500, 16, 4, 1.0, 1, 1e-5), rel=1e-6)


@needs_accounting
def test_nodes_with_the_same_rounds_share_one_computation(monkeypatch):
    # Prepare: count the accountant's computations
    import shared.privacy_local as privacy_local  # noqa: PLC0415

    computed = []
    real = privacy_local._epsilon
    monkeypatch.setattr(privacy_local, "_epsilon", lambda rounds, delta: computed.append(1) or real(rounds, delta))
    ledger = SampleLevelLedger(noise_multiplier=1.0, batch_size=10, epochs=1)

    # Execute: 50 nodes of one size, one round each; then one of them a second round
    for node in range(50):
        ledger.record(node, 20)
    once = ledger.epsilon(1e-5)
    ledger.record(7, 20)
    twice = ledger.epsilon(1e-5)

    # Assert: one computation per distinct history, and each node's ε is still its own
    assert len(computed) == 2
    assert once == pytest.approx(_direct_epsilon(20, 10, 1, 1.0, 1, 1e-5), rel=1e-9)
    assert twice == ledger.node_epsilon(7, 1e-5) == pytest.approx(_direct_epsilon(20, 10, 1, 1.0, 2, 1e-5), rel=1e-9)
    assert ledger.node_epsilon(8, 1e-5) == once


@needs_accounting
def test_empty_ledger_and_no_noise():
    ledger = SampleLevelLedger(noise_multiplier=0.0, batch_size=8, epochs=1)
    assert ledger.epsilon(1e-5) == 0.0
    ledger.record(1, 100)
    assert ledger.epsilon(1e-5) == math.inf
    with pytest.raises(ValueError, match="delta"):
        ledger.epsilon(0.0)


@needs_accounting
def test_state_round_trips_through_json():
    # Prepare
    ledger = SampleLevelLedger(noise_multiplier=0.9, batch_size=10, epochs=2)
    for node, n in [(1, 100), (2, 40), (1, 100), (1, 120)]:
        ledger.record(node, n)

    # Execute
    restored = SampleLevelLedger.from_state(json.loads(json.dumps(ledger.state())))
    restored.record(2, 40)
    ledger.record(2, 40)

    # Assert
    assert restored.state() == ledger.state()
    assert restored.epsilon(1e-6) == ledger.epsilon(1e-6)
    with pytest.raises(ValueError, match="version"):
        SampleLevelLedger.from_state({**ledger.state(), "version": 99})


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"model": "transformer-classifier", "dataset": "imdb"}, "positional embedding"),
        ({"vectorized": "on"}, "runs no ClientApp"),
        ({"dp-target-epsilon": 8.0}, "not enforced"),
        ({"compile": True}, "eager model"),
        ({"secure-aggregation": True}, "SecAgg\\+ sums"),
    ],
)
def test_config_refuses_what_local_sgd_cannot_train_privately(changes, refusal):
    base = {"dp": "local-sgd", "dp-clipping-norm": 1.0, "dp-noise-multiplier": 1.0}
    assert RunConfig.from_mapping(base).dp == "local-sgd"
    with pytest.raises(ConfigError, match=refusal):
        RunConfig.from_mapping({**base, **changes})
