"""Devices on a real deployment on 127.0.0.1: a key a device made itself, restarts, the code a
device agrees to run, who may take its tasks, and a server that cannot be reached.

One federation for the module: `fedserver start` with two devices, `client-1` (a key from
`fedserver init`) and `pi` (a key from `fedclient keygen`, only its .pub copied to the server).
A round needs one reply and waits at most ROUND_TIMEOUT s, so rounds go on while a device is down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fedclient.node import CONNECTED
from fedserver.checkpoints import read_metrics
from fedserver.control import ControlClient
from fedserver.state import StateDir
from shared.device_errors import MESSAGES, DeviceCode
from shared.flower_compat.runtime import AcquireTaskRequest, RuntimeHttpClient, RuntimeVersionHttpInterceptor, TaskType
from shared.pki import write_local_certificate
from shared.processes import free_port
from tests.runtime_stand_in import StandInRuntimeApi

pytestmark = pytest.mark.e2e

SAMPLES = 100  # per device
ROUND_TIMEOUT = 10


@dataclass
class Federation:
    work: Path
    address: str
    runtime_port: int  # client-1's SuperNode Runtime API
    keys: dict[str, Path]  # device name -> its private key
    data: dict[str, Path]
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)  # device -> times started

    @property
    def pki(self) -> Path:
        return self.work / "pki"

    @property
    def state(self) -> StateDir:
        return StateDir(self.work / "state")

    def start_device(self, e2e, name: str, *extra: str) -> str:
        """Start (again) fedclient `name`; returns the name of its log."""
        self.starts[name] = self.starts.get(name, 0) + 1
        log = f"{name}-{self.starts[name]}"
        self.nodes[name] = e2e.start_fedclient(log, self.address, self.pki, self.keys[name], self.data[name], *extra)
        return log

    def rounds(self) -> int:
        return len(read_metrics(self.state.run_dir))


@pytest.fixture(scope="module")
def federation(tmp_path_factory, e2e) -> Federation:
    work = tmp_path_factory.mktemp("devices")
    assert e2e.run_cli(["fedserver.cli", "init", str(work / "pki"), "--clients", "1"]).returncode == 0
    device = work / "device"  # what the device "pi" keeps: its own key pair
    made = e2e.run_cli(["fedclient.cli", "keygen", "pi", "--dir", str(device)])
    assert made.returncode == 0, made.stderr
    shutil.copy(device / "pi.pub", work / "pki" / "clients" / "pi.pub")  # only the public key leaves it
    parts, server_data = e2e.write_partitions(work, 2, SAMPLES)
    config = work / "run.toml"
    config.write_text(e2e.run_toml(server_data, 2, 500, min_replies=1, round_timeout=ROUND_TIMEOUT))
    fed = Federation(
        work, f"127.0.0.1:{free_port()}", free_port(),
        keys={"client-1": work / "pki" / "clients" / "client-1.key", "pi": device / "pi.key"},
        data={"client-1": parts[0], "pi": parts[1]},
    )  # fmt: skip
    e2e.start_daemon("devices-fedserver", fed.pki, config, fed.state, fed.address)
    fed.start_device(e2e, "client-1", "--runtime-port", str(fed.runtime_port))
    fed.start_device(e2e, "pi")
    return fed


def test_a_device_with_a_key_it_made_itself_joins_and_trains(federation: Federation, e2e):
    e2e.wait_until(lambda: federation.rounds() >= 2, 240, f"2 rounds (see {e2e.logs})")

    assert e2e.node_id("pi-1") and e2e.node_id("client-1-1")
    assert all(node.poll() is None for node in federation.nodes.values())


def test_a_device_stopped_cleanly_and_restarted_at_once_rejoins_at_once(federation: Federation, e2e):
    # Prepare: a clean stop (SIGTERM, as Ctrl-C or systemd do)
    federation.nodes["pi"].send_signal(signal.SIGTERM)
    assert federation.nodes["pi"].wait(timeout=30) == 0

    # Execute: start it again at once
    log = federation.start_device(e2e, "pi")

    # Assert: accepted well within Flower's 60 s online window: the clean stop deactivated the node
    e2e.wait_until(lambda: CONNECTED in e2e.log(log), 40, "the restarted device to join")
    assert "trying again" not in e2e.log(log)
    done = federation.rounds()
    e2e.wait_until(lambda: federation.rounds() >= done + 2, 120, "2 more rounds")


def test_a_device_killed_and_restarted_at_once_waits_out_the_online_window_and_rejoins(federation: Federation, e2e):
    # Prepare: a crash (SIGKILL: the SuperNode dies with fedclient and never says goodbye)
    federation.nodes["pi"].send_signal(signal.SIGKILL)
    federation.nodes["pi"].wait(timeout=30)

    # Execute
    log = federation.start_device(e2e, "pi")

    # Assert: it says why it waits, then joins; it is not told its key is unregistered
    e2e.wait_until(lambda: CONNECTED in e2e.log(log), 120, "the restarted device to join")
    output = e2e.log(log)
    assert "online for 60 s after a stop that was not clean" in output
    assert "cannot join" not in output and federation.nodes["pi"].poll() is None


EVIL_SERVER = """
import json, time
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    while len(nodes) < 2:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=120)
    result = {r.metadata.src_node_id: r.error.reason if r.has_error() else "ran" for r in replies}
    Path(context.run_config["out"]).write_text(json.dumps(result))
"""

EVIL_CLIENT = """
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.train()
def train(message: Message, context: Context) -> Message:
    Path(context.run_config["marker"], str(context.node_id)).write_text("the server's code ran here")
    return Message(RecordDict(), reply_to=message)
"""


def _other_code_app(directory: Path, out: Path, marker: Path) -> Path:
    """A Flower app whose ServerApp sends every node a train message, and whose ClientApp is its own."""
    directory.mkdir()
    (directory / "evil_server.py").write_text(EVIL_SERVER)
    (directory / "evil_client.py").write_text(EVIL_CLIENT)
    (directory / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "other"
        version = "1.0.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "other"

        [tool.flwr.app.components]
        serverapp = "evil_server:app"
        clientapp = "evil_client:app"

        [tool.flwr.app.config]
        out = "{out}"
        marker = "{marker}"
        """))
    return directory


def test_a_device_refuses_a_run_whose_fab_names_other_code_unless_it_trusts_server_code(federation, e2e):
    # Prepare: a third device that trusts server code; a run of another app submitted to the server
    out, marker = federation.work / "replies.json", federation.work / "ran"
    marker.mkdir()
    app = _other_code_app(federation.work / "other-app", out, marker)
    trusting = e2e.run_cli(["fedclient.cli", "keygen", "trusting", "--dir", str(federation.work / "trusting")])
    assert trusting.returncode == 0
    with ControlClient(federation.address, federation.pki / "ca.pem") as control:
        control.register_node(federation.work / "trusting" / "trusting.pub")
        federation.keys["trusting"] = federation.work / "trusting" / "trusting.key"
        federation.data["trusting"] = federation.data["pi"]
        federation.start_device(e2e, "trusting", "--trust-server-code")
        e2e.wait_until(lambda: CONNECTED in e2e.log("trusting-1"), 60, "the trusting device to join")

        # Execute
        control.start_run(app)
        written = e2e.wait_until(lambda: out.exists() and out.read_text(), 240, "the other run's replies")
        replies = json.loads(str(written))

    # Assert: the two devices that run only their installed ClientApp refused with the code's fixed
    # message (the name of the other code stays in their logs), and never ran the other code; the
    # one started with --trust-server-code ran it
    trusting_node = e2e.node_id("trusting-1")
    refusals = {int(node): reason for node, reason in replies.items() if int(node) != trusting_node}
    assert replies[str(trusting_node)] == "ran" and os.listdir(marker) == [str(trusting_node)]
    assert len(refusals) == 2 and all(r == MESSAGES[DeviceCode.FOREIGN_CODE] for r in refusals.values())
    assert "refused the task: the run's FAB names the ClientApp 'evil_client:app'" in e2e.log("client-1-1")


def test_a_local_process_without_the_secret_cannot_take_the_devices_tasks(federation: Federation):
    client = RuntimeHttpClient(  # TLS, as the SuperNode serves it, without checking its certificate
        f"https://127.0.0.1:{federation.runtime_port}",
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        verify=False,
    )

    with pytest.raises(httpx.HTTPStatusError) as refused:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    client.close()

    assert refused.value.response.status_code == 401


def test_a_server_that_cannot_be_reached_is_reported_with_its_address_and_reason(federation: Federation, e2e):
    # Prepare: a port nothing listens on
    wrong = f"127.0.0.1:{free_port()}"
    argv = [*e2e.python, "fedclient.cli", "start", "--server", wrong, "--ca", str(federation.pki / "ca.pem")]
    argv += ["--key", str(federation.keys["client-1"]), "--data", str(federation.data["client-1"])]

    # Execute: long enough for two tries
    device = e2e.start("wrong-port", argv)
    e2e.wait_until(lambda: "trying again in 2 s" in e2e.log("wrong-port"), 30, "a second try")
    device.send_signal(signal.SIGTERM)

    # Assert: each try names the address and the reason; a stop during the wait is clean
    assert device.wait(timeout=30) == 0
    assert f"cannot reach the server at {wrong}: connection refused; trying again in 1 s" in e2e.log("wrong-port")


# --- who answers the worker on the Runtime API port --------------------------------------------

REFUSED_ENDPOINT = "did not prove to be this node's SuperNode"
COMPLETED = "message completed"  # the worker's line for each task it ran


def _hold_port(port: int, certificate: tuple[Path, Path], timeout: float = 30) -> StandInRuntimeApi:
    """Bind `port` as soon as it is free."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return StandInRuntimeApi(certificate, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _child_named(parent: int, name: str) -> int:
    """The pid of `parent`'s child process whose command line holds `name`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if ppid == parent and name in command:
            return int(stat.parent.name)
    raise AssertionError(f"no child {name} of {parent}")


def test_a_supernode_restart_while_another_process_holds_its_port_gives_that_process_no_task(
    federation: Federation, e2e, tmp_path
):
    # Prepare: client-1 trains; another local process with a certificate of its own
    log = "client-1-1"
    e2e.wait_until(lambda: COMPLETED in e2e.log(log), 120, "client-1 to run a task")
    certificate = (tmp_path / "impostor.pem", tmp_path / "impostor.key")
    write_local_certificate(*certificate)
    supernode = _child_named(federation.nodes["client-1"].pid, "flower-supernode")

    # Execute: the SuperNode stops and the other process takes its port before it is restarted
    os.kill(supernode, signal.SIGTERM)
    impostor = _hold_port(federation.runtime_port, certificate)
    try:
        e2e.wait_until(lambda: REFUSED_ENDPOINT in e2e.log(log), 30, "the worker to refuse the port's new holder")
        e2e.wait_until(lambda: "another process holds its port" in e2e.log(log), 60, "a restart to find the port held")
    finally:
        impostor.stop()

    # Assert: the worker reached the impostor but sent it nothing (the handshake failed), said so
    # once, and fedclient kept going; with its port back, the SuperNode's tasks run again
    assert impostor.connections >= 1 and impostor.requests == []
    assert e2e.log(log).count(REFUSED_ENDPOINT) == 1
    done = e2e.log(log).count(COMPLETED)
    e2e.wait_until(lambda: e2e.log(log).count(COMPLETED) > done, 120, "client-1 to run a task again")
    assert federation.nodes["client-1"].poll() is None
