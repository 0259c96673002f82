"""benchmarks/dashboard_overhead.py at a tiny size, run as a user runs it: both runs go, the dashboard
is polled, the ratios print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_one_tiny_repetition_runs_both_and_prints_the_ratios():
    argv = [sys.executable, str(REPO / "benchmarks" / "dashboard_overhead.py"), "--repeats", "1", "--rounds", "2",
            "--poll-seconds", "0.2", "--set", "num-clients=6", "--set", "clients-per-round=3"]  # fmt: skip

    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)

    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["repeats"] == 1 and result["rounds"] == 2
    assert all(result[key] > 0 for key in ("wall_ratio", "cpu_ratio", "rounds_ratio", "dashboard_cpu_share_of_wall"))
    assert lines[0].startswith("repeat 1: without wall") and " requests" in lines[0]
