"""benchmarks/dp_tradeoff.py at a tiny size: both lines run, are saved, read back and drawn."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MNIST = REPO.parent / "shared" / "datasets" / "mnist.npz"  # the preset's data-path
NEEDS = ("dp_accounting", "opacus", "matplotlib")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not MNIST.exists(), reason=f"needs MNIST at {MNIST}"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDS), reason=f"needs {', '.join(NEEDS)}"),
]


def _benchmark():  # noqa: ANN202 - the script, as a module
    spec = importlib.util.spec_from_file_location("dp_tradeoff", REPO / "benchmarks" / "dp_tradeoff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dp_tradeoff", module)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_sweep_runs_both_modes_saves_and_reads_them_back(tmp_path, capsys):
    # Prepare: one private run per mode, 1 round of 3 clients; the sample-level line with its own lr
    bench = _benchmark()
    out = tmp_path / "dp.png"
    tiny = ["--rounds", "1", "--per-round", "3", "--epsilons", "4", "--jobs", "2", "--workers", "1", "--out", str(out)]

    # Execute
    assert bench.main([*tiny, "--sample-set", "lr=0.2"]) == 0
    first = capsys.readouterr().out
    saved = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    out.unlink()
    assert bench.main([*tiny, "--reuse", "central,local-sgd"]) == 0  # nothing runs: both lines read back
    again = capsys.readouterr().out

    # Assert: each line ran at its own settings, under its target, and is drawn again from the file
    assert set(saved) == {"central", "local-sgd"}
    for mode, line in saved.items():
        (run,) = line["runs"]
        assert run["mode"] == mode and run["rounds"] == 1 and run["target"] == 4.0
        assert 0 <= run["final"] <= 1 and 0 < run["achieved"] <= 4.0 + 1e-6 and run["z"] > 0
        assert math.isfinite(run["no_amplification"]) and run["no_amplification"] > run["achieved"]
    assert "lr=0.2" in saved["local-sgd"]["overrides"] and "lr=0.2" not in saved["central"]["overrides"]
    assert "dp=local-sgd" in saved["local-sgd"]["runs"][0]["command"]
    assert out.exists() and out.stat().st_size > 0
    table = [row for row in first.splitlines() if row.startswith("| central") or row.startswith("| local-sgd")]
    assert len(table) == 2 and all(row in again for row in table)
    assert "fedsim run" not in again


def test_reusing_a_mode_missing_from_the_results_is_a_one_line_error(tmp_path):
    # Prepare
    bench = _benchmark()
    results = tmp_path / "r.json"
    results.write_text("{}", encoding="utf-8")

    # Execute, Assert
    with pytest.raises(SystemExit, match="--reuse central: no central runs in"):
        bench.main(["--modes", "central", "--reuse", "central", "--results", str(results), "--out", str(tmp_path / "p.png")])
