"""The warm worker runs the installed ClientApp and refuses a FAB naming another; with
--trust-server-code it loads the ClientApp from the task's FAB, and swaps it when the FAB changes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab

from fedclient import worker

from fedserver.staging import stage_app
from shared.config import RunConfig
from shared.flower_compat import ErrorCode, SubStatus, set_task_identity

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: loading an app rewrites sys.modules and sys.path.
SCRIPT = """
import hashlib, json, sys, types
from pathlib import Path
from flwr.supercore.fab import Fab
from fedclient import worker

loaded = worker.LoadedApp(trust_server_code=True)
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


def _fab(directory: Path, client_app: str = "fedclient.app:app", rounds: int = 1) -> Fab:
    """A FAB of Flowerbed's app, as a daemon stages it, naming `client_app`."""
    app = stage_app(directory, RunConfig(rounds=rounds))
    manifest = app / "pyproject.toml"
    manifest.write_text(manifest.read_text().replace('clientapp = "fedclient.app:app"', f'clientapp = "{client_app}"'))
    content = build_fab_from_disk(app)
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


RUN = types.SimpleNamespace(fab_id="flowerbed/flowerbed", fab_version="0.0.0")


def test_by_default_the_worker_runs_the_installed_clientapp_without_installing_the_fab(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    loaded = worker.LoadedApp()

    app = worker._client_app(loaded, RUN, _fab(tmp_path / "app"))

    assert app is sys.modules["fedclient.app"].app
    assert sys.modules["fedclient.app"].__file__ == str(REPO / "fedclient" / "app.py")
    assert not (tmp_path / "home").exists()  # the FAB's code was never installed


def test_by_default_a_fab_naming_another_clientapp_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fab = _fab(tmp_path / "app", client_app="fedclient.evil:app")

    refused = r"names the ClientApp 'fedclient.evil:app'.*--trust-server-code"
    with pytest.raises(worker.ForeignClientAppError, match=refused):
        worker._client_app(worker.LoadedApp(), RUN, fab)
    assert not (tmp_path / "home").exists()


def test_a_refused_fab_gets_an_error_reply_that_names_the_reason(tmp_path, monkeypatch):
    # Prepare: a task whose FAB names other code, pulled from a stand-in Runtime API
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fab = _fab(tmp_path / "app", client_app="fedclient.evil:app")

    def pull_task_input(_client: object) -> tuple[Message, Context, object, Fab]:
        set_task_identity(task_id=1, run_id=1, node_id=1)  # as the real one does, from the task
        message = Message(RecordDict(), dst_node_id=1, message_type="train")
        return message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), RUN, fab

    monkeypatch.setattr(worker, "pull_task_input", pull_task_input)
    outcome = worker.TaskOutcome()

    # Execute
    worker._execute(object(), worker.LoadedApp(), outcome)  # type: ignore[arg-type]

    # Assert
    assert outcome.status == SubStatus.FAILED and "fedclient.evil:app" in outcome.details
    assert outcome.reply is not None and outcome.reply.has_error()
    assert outcome.reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION


def test_a_fab_that_is_not_a_fab_is_refused(tmp_path):
    with pytest.raises(worker.ForeignClientAppError, match="names no ClientApp that can be read"):
        worker._client_app(worker.LoadedApp(), RUN, Fab("a" * 64, b"not a FAB", {}))


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


@pytest.mark.parametrize("trust_server_code", [False, True])
def test_a_client_app_override_is_served_for_every_fab_without_installing_it(tmp_path, monkeypatch, trust_server_code):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.syspath_prepend(str(REPO))
    loaded = worker.LoadedApp(override="tests.e2e.faulty_client:app", trust_server_code=trust_server_code)
    fabs = [_fab(tmp_path / f"app-{rounds}", rounds=rounds) for rounds in (1, 2)]

    apps = [worker._client_app(loaded, RUN, fab) for fab in fabs]

    assert apps[0] is apps[1] is sys.modules["tests.e2e.faulty_client"].app
    assert not (tmp_path / "home").exists()
