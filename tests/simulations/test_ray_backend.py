"""`backend = "ray"`: a fedsim config, or a Flower app, on Flower's own Ray simulation engine.

The runs on Ray start Ray (15 s and more of start-up): they are few, tiny, and marked e2e.
Where Ray is not installed they skip; its absence is simulated for the error it gives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from shared.config import ConfigError, load_config
from simulations import cli, ray_backend
from simulations.apps import TIMING_FILE

NUMPY_APP = Path(__file__).parent / "apps" / "numpy_app"
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install -e '.[ray]'"
)

# Every client each round (Flower's engine names its nodes at random, so a sample would differ)
# and one batch per epoch (the local shuffle, seeded by node id, then cannot change the update).
TINY = ["num-clients=4", "clients-per-round=4", "rounds=2", 'hidden=""', "synthetic-max-samples=40", "batch-size=1000"]


def fedsim(*args: str) -> int:
    return cli.main(["run", *args, "--quiet"])


def tiny(*extra: str) -> list[str]:
    return [arg for kv in [*TINY, *extra] for arg in ("--set", kv)]


@pytest.fixture
def ray_run(monkeypatch, one_ray_engine_at_a_time):
    """Flower's engine rewrites PYTHONPATH (for its actors) and its loader sys.path: put both back
    after. One Ray engine at a time (tests/conftest.py)."""
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def without_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError


@needs_ray
@pytest.mark.e2e
def test_a_config_on_ray_ends_with_the_weights_and_outputs_of_fedsim(tmp_path, ray_run):
    # Execute
    on_fedsim = fedsim(*tiny(), "--output", str(tmp_path / "fedsim"))
    on_ray = fedsim(*tiny(), "--backend", "ray", "--output", str(tmp_path / "ray"))

    # Assert
    assert (on_fedsim, on_ray) == (0, 0)
    expected = safetensors.numpy.load_file(tmp_path / "fedsim" / "model.safetensors")
    got = safetensors.numpy.load_file(tmp_path / "ray" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:  # the replies are averaged in another order: float tolerance
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7)
    for name in ("metrics.jsonl", "summary.json", "curves.png", "checkpoints/round-2.safetensors"):
        assert (tmp_path / "ray" / name).is_file(), name
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["rounds"] == 2
    assert load_config(tmp_path / "ray" / "config.toml").backend == "ray"


@needs_ray
@pytest.mark.e2e
def test_a_flower_app_on_ray_ends_with_the_hand_computed_arrays_and_keeps_the_timing(tmp_path, ray_run):
    result = tmp_path / "final.npy"

    code = fedsim("--app", str(NUMPY_APP), "--backend", "ray", "--run-config", f"step=2 result-path='{result}'",
                  "--output", str(tmp_path / "out"))  # fmt: skip

    assert code == 0
    direction = np.array([1.0, -1.0, 0.5])  # numpy_app: 3 rounds of its 4 nodes (see test_apps.py)
    np.testing.assert_allclose(np.load(result), 2.0 * 6 * 9 / 12 * direction)
    timing = json.loads((tmp_path / "out" / TIMING_FILE).read_text())
    assert (timing["backend"], timing["rounds"], timing["messages"]) == ("ray", 3, {"evaluate": 12, "train": 12})


def test_backend_ray_without_ray_is_one_line_naming_the_extra_and_exit_2(tmp_path, capsys, without_ray):
    code = fedsim(*tiny(), "--backend", "ray", "--output", str(tmp_path / "out"))

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "pip install -e '.[ray]'" in err
    assert not (tmp_path / "out").exists()


def test_an_app_on_ray_without_ray_is_the_same_error(tmp_path, capsys, without_ray, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))

    code = fedsim("--app", str(NUMPY_APP), "--backend", "ray", "--output", str(tmp_path / "out"))

    assert code == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "expected"),
    [("backend=spark", "allowed: fedsim, ray"), ("ray-cpus-per-client=0", "> 0"), ("ray-gpus-per-client=-1", ">= 0")],
)
def test_bad_ray_settings_are_config_errors(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


class NeverReplies:
    """The part of a Grid a round uses, on which a sent message is never answered."""

    def __init__(self) -> None:
        self.pulled = threading.Event()

    def get_node_ids(self) -> list[int]:
        return [1]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return ["message-1"]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulled.set()
        return []


def test_ctrl_c_ends_the_serverapps_thread_too(monkeypatch):
    # Prepare: an engine that runs the ServerApp in a thread (as Flower's) and gets Ctrl-C mid-round
    threads: list[threading.Thread] = []

    def engine(*, server_app, **_: object) -> None:
        grid = NeverReplies()
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        threads.append(threading.Thread(target=server_app, kwargs={"grid": grid, "context": context}))
        threads[0].start()
        grid.pulled.wait(timeout=30)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_backend, "run_on_ray_engine", engine)
    monkeypatch.setattr(ray_backend, "require_ray", lambda: None)

    def server_main(grid: Grid, context: Context) -> None:
        grid.send_and_receive([], timeout=3600)

    # Execute
    interrupted = ray_backend.run_on_ray(server_main, clients=None, run_config={}, num_supernodes=1)

    # Assert
    assert interrupted is True
    assert not threads[0].is_alive()


def crashing_engine(**_: object) -> None:
    """Flower's engine when no actor fits the resources: the cause, wrapped twice."""
    try:
        try:
            raise ValueError("ActorPool is empty. Stopping Simulation.")
        except ValueError as err:
            raise RuntimeError("Simulation Runtime crashed.") from err
    except RuntimeError as err:
        raise RuntimeError("An error was encountered. Ending simulation.") from err


def test_an_engine_failure_is_one_line_naming_its_first_cause(monkeypatch):
    monkeypatch.setattr(ray_backend, "run_on_ray_engine", crashing_engine)
    monkeypatch.setattr(ray_backend, "require_ray", lambda: None)

    with pytest.raises(ray_backend.RayEngineError, match=r"^Flower's Ray engine stopped: ActorPool is empty\."):
        ray_backend.run_on_ray(lambda grid, context: None, clients=None, run_config={}, num_supernodes=1)
