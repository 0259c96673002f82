"""benchmarks/dp_tradeoff.py: a tiny sweep runs both lines, saves and reads them back (e2e); its calibration and results file."""

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

needs_accounting = pytest.mark.skipif(importlib.util.find_spec("dp_accounting") is None, reason="needs dp-accounting")


def _benchmark():  # noqa: ANN202 - the script, as a module
    spec = importlib.util.spec_from_file_location("dp_tradeoff", REPO / "benchmarks" / "dp_tradeoff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dp_tradeoff", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
@pytest.mark.skipif(not MNIST.exists(), reason=f"needs MNIST at {MNIST}")
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDS), reason=f"needs {', '.join(NEEDS)}")
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


@needs_accounting
def test_sample_level_z_is_the_smallest_that_keeps_the_busiest_client_under_the_target():
    # Prepare: 20 examples, B = 20, E = 1 (q = 1, one step a round), 100 rounds of 100 of 3,000
    bench = _benchmark()
    k = bench.busiest_client_rounds(100, 1 / 30, 3000)

    # Execute
    z = bench.calibrate(lambda z: bench.sample_epsilon(z, k, 1.0, 1, 1e-5), 4.0)

    # Assert: K is where fewer than half a client is expected to pass; z is tight to 0.1 %
    assert k == 11
    assert bench.sample_epsilon(z, k, 1.0, 1, 1e-5) <= 4.0 < bench.sample_epsilon(z / 1.001, k, 1.0, 1, 1e-5)


def test_results_round_trip_with_the_twins_infinite_target(tmp_path):
    # Prepare
    bench = _benchmark()
    runs = [bench.Run("local-sgd", 4.0, 3.84, 4.0, 3.99, 0.65, 0.67, 100, 12.5, "fedsim run x"),
            bench.Run("local-sgd", math.inf, 0.0, math.inf, math.inf, 0.92, 0.92, 100, None, "fedsim run y")]  # fmt: skip
    line = bench.Line("local-sgd", ["lr=1.0"], None, "header", "title", 1e-5, runs)
    path = tmp_path / "r.json"

    # Execute
    bench.save_results(path, [line])
    back = bench.load_line(path, "local-sgd")

    # Assert: standard JSON (no Infinity), and the same runs back
    assert "Infinity" not in path.read_text(encoding="utf-8")
    assert back.runs == runs and (back.header, back.title, back.delta, back.overrides) == ("header", "title", 1e-5, ["lr=1.0"])
    assert [run.private for run in back.runs] == [True, False]
