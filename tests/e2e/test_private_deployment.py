"""Distributed differential privacy deployed: `fedserver start` with `dp = "distributed"` and
secure aggregation, three `fedclient start` over TLS; each device clips its update and adds its
share of the noise before masking, and the server accounts epsilon every round."""

from __future__ import annotations

import pytest

from fedserver.checkpoints import read_metrics
from fedserver.state import StateDir
from shared.processes import free_port
from tests.e2e.conftest import rounds_told

pytestmark = pytest.mark.e2e

CLIENTS, ROUNDS = 3, 2
PRIVATE = {"secure_aggregation": True, "secagg_threshold": 2, "secagg_neighbours": 2, "dp": "distributed",
           "dp_clipping_norm": 1.0, "dp_noise_multiplier": 0.5, "round_timeout": 60}  # fmt: skip


def test_a_deployment_with_distributed_dp_reports_epsilon_every_round(tmp_path, e2e):
    # Prepare
    pki = tmp_path / "pki"
    assert e2e.run_cli(["fedserver.cli", "init", str(pki), "--clients", str(CLIENTS)]).returncode == 0
    parts, server_data = e2e.write_partitions(tmp_path, CLIENTS, 100)
    config = tmp_path / "run.toml"
    config.write_text(e2e.run_toml(server_data, CLIENTS, ROUNDS, **PRIVATE))
    state, address = StateDir(tmp_path / "state"), f"127.0.0.1:{free_port()}"

    # Execute
    e2e.start_daemon("private-server", pki, config, state, address)
    for k, part in enumerate(parts, start=1):
        e2e.start_fedclient(f"private-client-{k}", address, pki, pki / "clients" / f"client-{k}.key", part)
    e2e.wait_until(lambda: len(read_metrics(state.run_dir)) >= ROUNDS, 300, f"{ROUNDS} private rounds ({e2e.logs})")

    # Assert: epsilon rises with each round's release, and fedserver status shows the last once
    # the round is told (events.jsonl, which it reads, tells a round after metrics.jsonl has it)
    rows = read_metrics(state.run_dir)
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] < float("inf")
    e2e.wait_until(lambda: rounds_told(state) >= ROUNDS, 30, f"events.jsonl to tell {ROUNDS} rounds")
    assert e2e.status(state)["last_metrics"]["epsilon"] == rows[-1]["epsilon"]
