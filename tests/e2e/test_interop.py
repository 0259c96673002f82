"""The project as a plain Flower app: `flwr run .` on a stock `flower-superlink` with stock
`flower-supernode`s, each given its partition in its node config (insecure, on 127.0.0.1).

It runs in a copy of the project, so that nothing `flwr run` writes lands in the checkout
(Flower 1.41 rewrites a pyproject.toml that still has a legacy `[tool.flwr.federations]` table).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.processes import free_port, wait_for_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
NODES = 3
CONNECTION = "e2e"
PROJECT = ("pyproject.toml", "fedserver", "fedclient", "shared")  # what `flwr run .` packs and runs


def _copy_project(target: Path) -> Path:
    target.mkdir()
    for name in PROJECT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def _flwr(e2e, home: Path, *args: str, timeout: float = 120, cwd: Path = REPO) -> str:
    result = e2e.run_cli_raw(["flwr", *args], env=e2e.env(FLWR_HOME=str(home)), timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _small_mnist_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (400, 28, 28), dtype=np.uint8), rng.integers(0, 10, 400)
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    return path


def test_flwr_run_dot_on_stock_superlink_and_supernodes(e2e, tmp_path):
    # Prepare: a stock SuperLink (no dependency installation: this machine may be offline)
    home, port = tmp_path / "flwr-home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = e2e.env(FLWR_HOME=str(home))
    superlink = e2e.start("stock-superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                              str(port), "--disable-runtime-dependency-installation"], env)  # fmt: skip
    assert wait_for_port("127.0.0.1", port, 60, alive=superlink), e2e.log("stock-superlink")
    for k in range(NODES):
        argv = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port())]
        e2e.start(f"stock-supernode-{k}", [*argv, "--node-config", f"partition-id={k} num-partitions={NODES}"], env)

    # Execute: the project's pyproject as it is, but for the federation's size and a small NPZ
    # with a test split (so the server evaluates, and a round is one message per node)
    project = _copy_project(tmp_path / "project")
    data = _small_mnist_npz(tmp_path / "mnist-small.npz")
    overrides = f'dataset="mnist" data-path="{data}" num-clients={NODES} clients-per-round={NODES} rounds=1'
    output = _flwr(e2e, home, "run", ".", CONNECTION, "--run-config", overrides, "--format", "json", cwd=project)
    started = json.loads(output[output.index("{") :])  # after Flower's migration notice
    assert started["success"], started

    # Assert
    def finished() -> dict | None:
        runs = json.loads(_flwr(e2e, home, "ls", CONNECTION, "--format", "json"))["runs"]
        run = next(r for r in runs if r["run-id"] == started["run-id"])
        return run if run["status"].startswith("finished") else None

    run = e2e.wait_until(finished, 150, "the run to finish", every=3)
    assert run["status"] == "finished:completed", run
