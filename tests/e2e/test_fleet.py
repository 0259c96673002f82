"""benchmarks/fleet.py at small scale: a real `fedserver start` (TLS, node authentication, SQLite)
and emulated devices on Flower's SuperNode connection code; every round closes and no reply is
lost; over-selection, the reply deadline and sampling from the connected devices, with devices
that drop mid-round and devices that leave."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, e2e_env

pytestmark = pytest.mark.e2e
FLEET = REPO / "benchmarks" / "fleet.py"
# Devices pull every second instead of Flower's 3 s, and the server's idle cost is not measured
# (before round 1, which waits for every device): both only add waiting to these runs.
QUICK = ("--poll", "1", "--idle", "0")


def fleet(work: Path, *args: str, timeout: float = 300) -> dict:
    """Run the emulator to its end; its JSON line (the last line it prints)."""
    argv = [sys.executable, str(FLEET), "--keep", str(work), "--timeout", str(timeout - 60), *QUICK, *args]
    done = subprocess.run(argv, env=e2e_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    return json.loads(lines[-1])


def late_nodes(work: Path) -> set[int]:
    """The node ids the ServerApp's log names as late (`flwr log`, saved by the emulator)."""
    log = (work / "serverapp.log").read_text()
    named = re.findall(r"late, discarded: nodes ([\d, ]+)", log)
    return {int(node) for group in named for node in group.split(", ")}


def test_a_fleet_of_twenty_devices_completes_every_round_through_a_crash_and_loses_no_reply(tmp_path):
    # one device held back for 2 s of idle polling before round 1 (a later --idle wins); the
    # server's whole tree SIGKILLed after round 1 and started again on its state
    work = tmp_path / "w"
    result = fleet(work, "--devices", "20", "--per-round", "5", "--rounds", "2", "--idle", "2", "--kill-after", "1")

    assert result["status"] == "completed", result
    assert result["rounds_completed"] == 2 and result["lost_replies"] == 0
    assert result["accepted"] == [5, 5] and result["pushed"] == [5, 5]
    assert result["round_overhead_s"] is not None and result["server_peak_mb"] > 0
    assert result["idle_server_cpu_s_per_s"] is not None
    assert result["resume_s"] is not None  # round 2 committed after the crash, by the restarted daemon
    rows = [json.loads(line) for line in (work / "state" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]  # resumed: no round lost or repeated


def test_a_secure_fleet_sums_every_enrolled_devices_update(tmp_path):
    result = fleet(tmp_path / "w", "--devices", "12", "--per-round", "6", "--rounds", "2", "--secure")

    assert result["status"] == "completed", result
    assert result["rounds_completed"] == 2 and result["lost_replies"] == 0
    assert result["accepted"] == [6, 6] and result["device_errors"] == 0


def test_over_selected_rounds_close_at_clients_per_round_while_devices_drop_and_leave(tmp_path):
    # 4 a round of 20, sampled 6; a device drops half of its tasks mid-round, and leaves after
    # half of its replies for longer than the test: later rounds sample from those still connected
    # (waiting for all 20 would stall until --timeout). Two rounds in three have fewer than 4
    # replies and close at the deadline; a device that answers does so within about 2 s.
    work = tmp_path / "w"
    result = fleet(work, "--devices", "20", "--per-round", "4", "--rounds", "3", "--over-select", "0.5",
                   "--dropout", "0.5", "--reconnect", "0.5", "--away", "900", "--reply-deadline", "10")  # fmt: skip

    assert result["status"] == "completed", result
    assert result["rounds_completed"] == 3 and result["lost_replies"] == 0
    assert result["dropped"] > 0 and result["departures"] > 0
    assert all(accepted <= 4 for accepted in result["accepted"])
    assert late_nodes(work), "no late node named in the ServerApp's log"


def test_past_the_reply_deadline_a_round_closes_with_the_replies_it_has(tmp_path):
    # Without over-selection a dropped device would hold its round for round-timeout (300 s),
    # past the emulator's own --timeout (240 s): the run completes only if the deadline closes it.
    work = tmp_path / "w"
    result = fleet(work, "--devices", "12", "--per-round", "4", "--rounds", "2", "--dropout", "0.5",
                   "--reply-deadline", "8", "--round-timeout", "300")  # fmt: skip

    assert result["status"] == "completed", result
    assert result["dropped"] > 0 and result["lost_replies"] == 0
    assert min(result["accepted"]) < 4
    assert late_nodes(work)
