"""The warm worker loads the ClientApp from the task's FAB, and swaps it when the FAB changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab

from fedclient import worker

from fedserver.staging import stage_app
from shared.config import RunConfig

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: loading an app rewrites sys.modules and sys.path.
SCRIPT = """
import hashlib, json, sys, types
from pathlib import Path
from flwr.supercore.fab import Fab
from fedclient import worker

loaded = worker.LoadedApp()
run = types.SimpleNamespace(fab_id="flowerbed/flowerbed", fab_version=sys.argv[1])
for path in sys.argv[2:]:
    content = Path(path).read_bytes()
    app = worker._client_app(loaded, run, Fab(hashlib.sha256(content).hexdigest(), content, {}))
    again = worker._client_app(loaded, run, Fab(hashlib.sha256(content).hexdigest(), content, {}))
    print(json.dumps({
        "app": type(app).__name__, "same": app is again, "directory": str(loaded.directory),
        "clientapp": sys.modules["fedclient.app"].__file__, "shared": sys.modules["shared.config"].__file__,
        "sys_path": sys.path,
    }))
"""


def test_the_worker_imports_the_fabs_clientapp_and_swaps_it_for_a_new_fab(tmp_path):
    # Prepare: two FABs of the same app with different run configs
    fabs = []
    for rounds in (1, 2):
        app = stage_app(tmp_path / f"app-{rounds}", RunConfig(rounds=rounds))
        fabs.append(tmp_path / f"app-{rounds}.fab")
        fabs[-1].write_bytes(build_fab_from_disk(app))
    version = (tmp_path / "app-1" / "pyproject.toml").read_text().split('version = "')[1].split('"')[0]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, version, *map(str, fabs)], env=env, capture_output=True, text=True, timeout=120
    )

    # Assert
    assert result.returncode == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))
    for loaded in (first, second):
        assert loaded["app"] == "ClientApp" and loaded["same"]
        assert loaded["clientapp"] == str(Path(loaded["directory"]) / "fedclient" / "app.py")
        assert loaded["shared"] == str(Path(loaded["directory"]) / "shared" / "config.py")
    assert first["directory"] != second["directory"]
    assert first["directory"] not in second["sys_path"]


def test_a_client_app_override_is_served_for_every_fab_without_installing_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.syspath_prepend(str(REPO))
    loaded = worker.LoadedApp(override="tests.e2e.faulty_client:app")
    run = types.SimpleNamespace(fab_id="flowerbed/flowerbed", fab_version="0.0.0")

    apps = [worker._client_app(loaded, run, Fab(digest, b"not a FAB", {})) for digest in ("a" * 64, "b" * 64)]

    assert apps[0] is apps[1] is sys.modules["tests.e2e.faulty_client"].app
    assert not (tmp_path / "home").exists()
