"""Secure aggregation through fedsim: the same ServerApp and ClientApp, the sum only."""

import pytest

from shared.config import ConfigError, RunConfig
from shared.weights import load_safetensors
from simulations.engine import run_simulation

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
