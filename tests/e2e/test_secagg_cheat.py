"""A device that cheats in secure aggregation, deployed: four `fedclient start` over TLS in a
SecAgg+ run (threshold 2 of each neighbourhood of 3), one of them running
`examples.secagg_cheat:app`, which breaks a different stage each round. The run completes every
round without it, names it each time, and learns."""

from __future__ import annotations

import pytest

from examples.secagg_cheat import FAULTS
from fedserver.checkpoints import read_metrics
from fedserver.state import StateDir
from shared.processes import free_port

pytestmark = pytest.mark.e2e

CLIENTS, SAMPLES = 4, 150
SECAGG = {"secure_aggregation": True, "secagg_threshold": 2, "secagg_neighbours": 2, "round_timeout": 60}


def test_a_device_cheating_at_every_secure_stage_cannot_stop_the_run(tmp_path, e2e):
    # Prepare
    pki = tmp_path / "pki"
    assert e2e.run_cli(["fedserver.cli", "init", str(pki), "--clients", str(CLIENTS)]).returncode == 0
    parts, server_data = e2e.write_partitions(tmp_path, CLIENTS, SAMPLES)
    config = tmp_path / "run.toml"
    config.write_text(e2e.run_toml(server_data, CLIENTS, len(FAULTS), **SECAGG))
    state, address = StateDir(tmp_path / "state"), f"127.0.0.1:{free_port()}"

    # Execute: client-1 cheats
    e2e.start_daemon("cheat-server", pki, config, state, address)
    for k, part in enumerate(parts, start=1):
        cheat = ["--client-app", "examples.secagg_cheat:app"] if k == 1 else []
        e2e.start_fedclient(f"cheat-client-{k}", address, pki, pki / "clients" / f"client-{k}.key", part, *cheat)
    e2e.wait_until(lambda: len(read_metrics(state.run_dir)) >= len(FAULTS), 400, f"{len(FAULTS)} rounds ({e2e.logs})")

    # Assert: the cheat is named in every round, nobody else; the run learned
    cheat = e2e.node_id("cheat-client-1")
    run_id = str(e2e.status(state)["run_id"])
    log = e2e.run_cli_raw(["flwr", "log", run_id, "--show"], env=e2e.env(FLWR_HOME=str(state.flwr_home))).stdout
    dropped = [line for line in log.splitlines() if "dropped out of the secure round" in line]
    assert len(dropped) == len(FAULTS) and all(f"node {cheat}: " in line for line in dropped), dropped
    rows = read_metrics(state.run_dir)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] and max(r["accuracy"] for r in rows[1:]) > rows[0]["accuracy"]
