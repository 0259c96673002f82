"""benchmarks/load_test.py at a tiny size: `fedserver start` and two real `fedclient start`
complete a round, and what it measured is printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_two_fedclients_complete_a_round_and_the_figures_are_printed():
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    argv = [sys.executable, str(REPO / "benchmarks" / "load_test.py"), "--clients", "2", "--rounds", "1",
            "--samples", "20", "--batch", "2"]  # fmt: skip

    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rounds completed: 1;" in done.stdout
    assert "server peak memory" in done.stdout and "client peak memory" in done.stdout
