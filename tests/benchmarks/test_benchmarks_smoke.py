"""Every script in benchmarks/ runs at a tiny size in the suite, so that a rename or a changed
signature breaks a test rather than a benchmark nobody runs. Each script runs as a user runs it:
a fresh interpreter, its own flags. Other smoke tests (one for each script a test file runs)
may live anywhere under tests/; the last test here fails for a script that has none."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.simulations.test_text_federations import imdb_subset

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
TIMEOUT = 900  # seconds a tiny run may take on a loaded 2-core machine; a hang fails instead of blocking


def run_script(name: str, *args: str, cwd: Path = REPO) -> str:
    """Run benchmarks/NAME with `args`; its stdout, once it exits 0."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_centralized_baseline(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text('dataset = "synthetic"\nnum-clients = 4\nclients-per-round = 2\nsynthetic-max-samples = 40\n')

    out = run_script("centralized_baseline.py", str(config), "--epochs", "2")

    assert "epoch 2: train loss" in out and "test accuracy" in out


@pytest.mark.e2e
def test_client_overhead():
    out = run_script("client_overhead.py", "--repeats", "1", "--threads", "1", "2", "--models", "2nn")

    assert "ClientApp call" in out
    assert "  2nn          1 " in out and "  2nn          2 " in out


@pytest.mark.e2e
def test_deployment_latency():
    # Each system's start-up is most of its time; one round of one client runs every step of it.
    out = run_script("deployment_latency.py", "--rounds", "1", "--clients", "1", "--samples", "20")

    for system in ("stock", "flowerbed ", "flowerbed, --db memory"):
        assert any(line.startswith(system) for line in out.splitlines()), out


@pytest.mark.e2e
def test_hostile_model():
    # An honest MLP under the policy's limit, a hostile one over it: refused with the policy, built without.
    out = run_script("hostile_model.py", "--honest", "4", "--hidden", "64", "--max-parameters", "10000")

    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[:3] for row in rows] == [["4", "policy", "trained"], ["64", "policy", "error"], ["64", "none", "error"]]


@pytest.mark.e2e
@pytest.mark.skipif(
    not (shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")), reason="needs nginx"
)
def test_proxy_memory():
    out = run_script("proxy_memory.py", "--mib", "1")

    assert "through nginx:" in out and "straight to it:" in out


@pytest.mark.e2e
def test_secagg_overhead():
    out = run_script("secagg_overhead.py", "--quick", "--workload", "10:8")

    for system in ("plaintext", "ours m=64", "ours m=32", "flower SecAgg+"):
        assert f"  {system}" in out, out


@pytest.mark.e2e
def test_transformer_throughput(dataset, tmp_path):
    # 500 of IMDB's reviews: the script reads its data once for each system and repeat
    imdb = imdb_subset(dataset("imdb.jsonl.gz"), tmp_path, per_label={"train": 200, "test": 50})
    tiny = ["num-clients=8", "max-len=16", "vocab-size=200", "d-model=8", "min-client-size=1"]

    out = run_script(
        "transformer_throughput.py", str(REPO / "configs" / "imdb-transformer.toml"), "--threads", "1",
        "--repeats", "1", "--set", f"data-path={imdb}", *[arg for key in tiny for arg in ("--set", key)],
    )  # fmt: skip

    assert "imdb-transformer.toml" in out and out.rstrip().endswith("True")  # same weights both ways


@pytest.mark.e2e
def test_simulation_speed():
    # Without ../shared's MNIST the script trains on its stand-in; the floor and fedsim must agree.
    out = run_script(
        "simulation_speed.py", "--quick", "--per-round", "4", "--systems", "floor,fedsim", "--workers", "1", "--repeat", "1"
    )

    assert "floor: plain PyTorch loop" in out and "fedsim workers=1" in out
    assert "(identical; same clients sampled" in out


def test_app_speed():
    out = run_script(
        "app_speed.py", "--num-supernodes", "4", "--systems", "fedsim", "--workers", "1", "--repeat", "1",
        "--run-config", "num-server-rounds=1",
    )  # fmt: skip

    assert "fedsim --app --workers 1" in out and "ERROR" not in out


def test_every_benchmark_script_has_a_smoke_test():
    """A script counts as covered where a test file under tests/ names it outside a comment."""
    scripts = sorted(path.name for path in BENCHMARKS.glob("*.py"))
    code = [
        line
        for path in (REPO / "tests").rglob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith("#")
    ]

    uncovered = [name for name in scripts if not any(name in line for line in code)]

    assert not uncovered, f"benchmarks without a smoke test under tests/: {', '.join(uncovered)}"
