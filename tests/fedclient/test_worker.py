"""The warm worker runs the installed ClientApp and refuses a FAB naming another; with
--trust-server-code it loads the ClientApp from the task's FAB, and swaps it when the FAB changes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab

from fedclient import worker

from fedserver.staging import stage_app
from shared.config import RunConfig
from shared.device_errors import MESSAGES, DeviceCode
from shared.flower_compat.runs import set_task_identity
from shared.flower_compat.runtime import SubStatus
from shared.pki import write_local_certificate
from shared.processes import free_port
from tests.runtime_stand_in import TOKEN, StandInRuntimeApi

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


def test_a_refused_fab_gets_an_error_reply_with_its_code_and_fixed_message(tmp_path, monkeypatch, caplog):
    # Prepare: a task whose FAB names other code, pulled from a stand-in Runtime API
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    fab = _fab(tmp_path / "app", client_app="fedclient.evil:app")

    def pull_task_input(_client: object, _object_retry: tuple[float, float]) -> tuple[Message, Context, object, Fab]:
        set_task_identity(task_id=1, run_id=1, node_id=1)  # as the real one does, from the task
        message = Message(RecordDict(), dst_node_id=1, message_type="train")
        return message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), RUN, fab

    monkeypatch.setattr(worker, "pull_task_input", pull_task_input)
    outcome = worker.TaskOutcome()

    # Execute
    worker._execute(object(), worker.LoadedApp(), outcome)  # type: ignore[arg-type]

    # Assert: the server learns the code; the name of the other code stays in the device's log
    assert outcome.status == SubStatus.FAILED and outcome.details == MESSAGES[DeviceCode.FOREIGN_CODE]
    assert outcome.reply is not None and outcome.reply.has_error()
    assert outcome.reply.error.code == DeviceCode.FOREIGN_CODE
    assert outcome.reply.error.reason == MESSAGES[DeviceCode.FOREIGN_CODE]
    assert "names the ClientApp 'fedclient.evil:app'" in caplog.text


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


def test_a_clientapp_failure_is_replied_as_a_code_without_its_text(monkeypatch, caplog):
    # Prepare: a ClientApp whose exception names the device's data
    def pull_task_input(_client: object, _object_retry: tuple[float, float]) -> tuple[Message, Context, object, Fab]:
        set_task_identity(task_id=1, run_id=1, node_id=1)
        message = Message(RecordDict(), dst_node_id=1, message_type="train")
        return message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), RUN, None

    def failing_app(message: Message, context: Context) -> Message:
        raise ValueError("/home/me/private.npz: row 42 has label 'x'")

    monkeypatch.setattr(worker, "pull_task_input", pull_task_input)
    monkeypatch.setattr(worker, "_client_app", lambda *_args: failing_app)
    outcome = worker.TaskOutcome()

    # Execute
    worker._execute(object(), worker.LoadedApp(), outcome)  # type: ignore[arg-type]

    # Assert: the server gets FAILED and its fixed message; the detail is in the device's log only
    assert outcome.reply is not None and outcome.reply.error.code == DeviceCode.FAILED
    assert outcome.reply.error.reason == outcome.details == MESSAGES[DeviceCode.FAILED]
    assert "row 42" in caplog.text


# --- who answers on the Runtime API port -------------------------------------------------------


def _certificate(directory: Path) -> tuple[Path, Path]:
    directory.mkdir()
    pem, key = directory / "runtime.pem", directory / "runtime.key"
    write_local_certificate(pem, key)
    return pem, key


@pytest.fixture
def own_certificate(tmp_path) -> tuple[Path, Path]:
    """The certificate this node's SuperNode presents, and the key only it has."""
    return _certificate(tmp_path / "own")


@pytest.fixture
def impostor(request, tmp_path) -> Iterator[StandInRuntimeApi]:
    """A process holding the port: TLS with a certificate of its own, or plain HTTP."""
    server = StandInRuntimeApi(_certificate(tmp_path / "other") if request.param == "another certificate" else None)
    yield server
    server.stop()


def _poll(address: str, certificate: Path, report: worker.LinkReport) -> str:
    client = worker.RuntimeLink(address, certificate.read_bytes()).client(retry=False)
    try:
        return worker.poll(client, report)
    finally:
        client.close()


def test_the_worker_takes_a_task_from_the_supernode_that_presents_its_certificate(own_certificate):
    supernode = StandInRuntimeApi(own_certificate)
    report = worker.LinkReport(supernode.address, failing="unanswered")
    try:
        token = _poll(supernode.address, own_certificate[0], report)
    finally:
        supernode.stop()

    assert token == TOKEN and supernode.requests == ["/v1/runtime/acquire-task"]
    assert report.failing == ""


@pytest.mark.parametrize("impostor", ["another certificate", "plain HTTP"], indirect=True)
def test_the_worker_takes_no_task_from_an_endpoint_without_its_supernodes_certificate(
    own_certificate, impostor, caplog
):
    report = worker.LinkReport(impostor.address)

    token = _poll(impostor.address, own_certificate[0], report)

    assert token == "" and report.failing == "unverified"
    assert impostor.requests == []  # the handshake failed before any request, signed or not, was sent
    assert f"the Runtime API at {impostor.address} did not prove to be this node's SuperNode" in caplog.text


@pytest.mark.parametrize("impostor", ["another certificate"], indirect=True)
def test_serving_an_impostor_runs_no_task_says_so_once_and_keeps_polling(own_certificate, impostor, monkeypatch, caplog):
    # Prepare: the worker's loop, stopped after 5 polls; a run_task that records
    ran: list[str] = []
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(worker.time, "sleep", sleep)
    monkeypatch.setattr(worker, "run_task", lambda _link, token, _loaded: ran.append(token))
    monkeypatch.setattr(worker, "warm_imports", lambda: None)
    link = worker.RuntimeLink(impostor.address, own_certificate[0].read_bytes())

    # Execute
    with pytest.raises(KeyboardInterrupt):
        worker.serve(link, poll_interval=0.01)

    # Assert: five polls, no task, one line
    assert ran == [] and impostor.requests == []
    assert caplog.text.count("did not prove to be this node's SuperNode") == 1
    assert "taking no task" in caplog.text


def test_a_port_nothing_listens_on_is_said_once_as_not_answering(own_certificate, caplog):
    address = f"127.0.0.1:{free_port()}"
    report = worker.LinkReport(address)

    tokens = [_poll(address, own_certificate[0], report) for _ in range(3)]

    assert tokens == ["", "", ""] and report.failing == "unanswered"
    assert caplog.text.count("does not answer") == 1


def test_a_worker_without_its_supernodes_certificate_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "runtime.pem"

    with pytest.raises(SystemExit) as exited:
        worker.main(["--runtime-api-address", "127.0.0.1:1", "--runtime-certificate", str(missing)])

    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"--runtime-certificate {missing}: No such file or directory")
