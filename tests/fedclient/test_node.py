"""`fedclient start`: the SuperNode command line, refusals as one-line errors, restarts."""

from __future__ import annotations

import dataclasses
import io
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedclient import cli, node
from fedclient.node import Child, NodeOptions, NodeRefused, OutputWatcher, supernode_argv
from shared.processes import free_port

# What flower-supernode prints when the SuperLink refuses an unregistered key (Flower 1.41).
REFUSED = """\
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[code: 2004] Failed to activate SuperNode.
The SuperNode could not establish a connection to the SuperLink.
"""


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("ca.pem", "client-1.key", "data.npz")}
    for path in paths.values():
        path.write_bytes(b"x")
    return paths


def test_the_supernode_runs_with_tls_node_auth_and_the_node_config(files):
    options = NodeOptions("10.0.0.5:9092", files["ca.pem"], files["client-1.key"], files["data.npz"], "cpu")

    argv = supernode_argv(options, runtime_port=9400)

    assert Path(argv[0]).name == "flower-supernode" and "--insecure" not in argv
    assert argv[argv.index("--superlink") + 1] == "10.0.0.5:9092"
    assert argv[argv.index("--root-certificates") + 1] == str(files["ca.pem"])
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(files["client-1.key"])
    assert argv[argv.index("--node-config") + 1] == f'data-path="{files["data.npz"]}" device="cpu"'
    assert argv[argv.index("--isolation") + 1] == "process"  # the warm worker runs the ClientApp
    assert argv[argv.index("--port") + 1] == "9400"
    assert "--max-retries" not in argv  # Flower's default: retry a lost SuperLink forever


def test_subprocess_isolation_is_flowers_default(files):
    options = NodeOptions("h:1", files["ca.pem"], files["client-1.key"], files["data.npz"], isolation="subprocess")

    argv = supernode_argv(options, runtime_port=9400)

    assert argv[argv.index("--isolation") + 1] == "subprocess"


def test_subprocess_isolation_runs_server_code_so_it_needs_trust_server_code(files):
    options = NodeOptions("h:1", files["ca.pem"], files["client-1.key"], files["data.npz"], isolation="subprocess")

    with pytest.raises(node.NodeError, match="--isolation subprocess runs the code the server sends.*--trust-server"):
        node.check_inputs(options)
    node.check_inputs(dataclasses.replace(options, trust_server_code=True))


@pytest.mark.parametrize("server", ["h", "h:", ":9092", "h:port", "h:70000", "h:0"])
def test_a_server_address_without_host_and_port_is_a_one_line_error(files, server):
    options = NodeOptions(server, files["ca.pem"], files["client-1.key"], files["data.npz"])

    with pytest.raises(node.NodeError, match=r"--server must be HOST:PORT"):
        node.check_inputs(options)


def test_an_ipv6_server_address_is_split_into_host_and_port():
    assert node.split_address("[::1]:9092") == ("::1", 9092)


def test_a_closed_port_is_reported_as_refused():
    assert node.unreachable_reason("127.0.0.1", free_port()) == "connection refused"


def test_a_supernode_that_lost_its_server_is_explained_with_the_address_and_reason(capsys):
    # Prepare: Flower's retry line, which names neither
    server = f"127.0.0.1:{free_port()}"
    lost = b"WARNING :   Connection attempt failed, retrying in 2.31 seconds\n"
    watcher = OutputWatcher(io.BytesIO(lost), io.BytesIO(), server)

    # Execute
    watcher.run()

    # Assert
    assert f"cannot reach the server at {server}: connection refused" in capsys.readouterr().out


def test_the_runtime_api_secret_is_random_private_to_its_user_and_removed(files):
    # Execute
    with node.runtime_secret("warm") as first, node.runtime_secret("warm") as second:
        modes = [stat.S_IMODE(path.stat().st_mode) for path in (first, second)]
        contents = [path.read_text() for path in (first, second)]
    with node.runtime_secret("subprocess") as none:
        pass

    # Assert
    assert modes == [0o600, 0o600]
    assert contents[0] != contents[1] and len(contents[0]) >= 64
    assert not first.exists() and not second.exists()
    assert none is None  # Flower ignores the secret in subprocess isolation


def test_the_supernode_and_the_worker_share_the_secret_and_the_worker_runs_installed_code(files, tmp_path):
    options = NodeOptions("h:1", files["ca.pem"], files["client-1.key"], files["data.npz"])
    secret = tmp_path / "s.secret"

    supernode, worker = supernode_argv(options, 9400, secret), node.worker_argv(options, 9400, secret)

    assert supernode[supernode.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert worker[worker.index("--auth-secret-file") + 1] == str(secret)
    assert "--trust-server-code" not in worker
    trusting = dataclasses.replace(options, trust_server_code=True)
    assert "--trust-server-code" in node.worker_argv(trusting, 9400, secret)


def test_a_missing_file_is_a_one_line_error_exit_2(tmp_path, capsys):
    code = cli.main(["start", "--server", "h:1", "--ca", str(tmp_path / "ca.pem"), "--key", "k", "--data", "d"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedclient: error: --ca ")


def test_a_refusal_is_read_from_flowers_exit_message():
    watcher = OutputWatcher(io.BytesIO(REFUSED.encode()), io.BytesIO())
    watcher.run()

    assert not watcher.connected
    reason = watcher.refusal()
    assert reason.startswith("[code: 2004] Failed to activate SuperNode.")
    assert "registered" in reason  # the hint


def _script_child(tmp_path: Path, body: str, refusal_grace: float = node.REFUSAL_GRACE) -> Child:
    script = tmp_path / "fake_supernode.py"
    script.write_text(body)
    return Child("flower-supernode", [sys.executable, str(script)], pipe_output=True, refusal_grace=refusal_grace)


def test_a_supernode_refused_before_it_connected_is_retried_then_stops_the_node(tmp_path, monkeypatch, capsys):
    # Prepare: the server keeps refusing; the grace period shortened (fedclient start --refusal-grace)
    monkeypatch.setattr(node, "REFUSAL_RETRY", 0.1)
    starts = tmp_path / "starts"
    child = _script_child(
        tmp_path,
        f"import sys\nopen({str(starts)!r}, 'a').write('x')\nsys.stdout.write({REFUSED!r})\nsys.exit(1)\n",
        refusal_grace=3.0,
    )
    child.start()

    # Execute, assert
    with pytest.raises(NodeRefused, match=r"cannot join h:1: \[code: 2004\]"):
        node._supervise([child], "h:1", threading.Event())
    assert len(starts.read_text()) >= 2  # it tried again: the server may not have registered keys yet
    out = capsys.readouterr().out
    assert out.count("online for 60 s after a stop that was not clean") == 1  # says why it waits, once
    assert "still refused [code: 2004]; trying again" in out
    assert "for up to 3 s" in out


def test_a_tls_refusal_stops_the_node_at_once(tmp_path):
    refused = "Failed to initialize the connection to the SuperLink.\n[SSL: CERTIFICATE_VERIFY_FAILED] x\n"
    child = _script_child(tmp_path, f"import sys\nsys.stdout.write({refused!r})\nsys.exit(1)\n")
    child.start()

    with pytest.raises(NodeRefused, match="CERTIFICATE_VERIFY_FAILED.*--ca must be"):
        node._supervise([child], "h:1", threading.Event())


def test_a_supernode_that_had_connected_is_restarted(tmp_path, monkeypatch, capsys):
    # Prepare: a "SuperNode" that connects, then exits at once; restart pauses shortened
    starts = tmp_path / "starts"
    child = _script_child(
        tmp_path, f"open({str(starts)!r}, 'a').write('x')\nprint('SuperNode ID: 7', flush=True)\nraise SystemExit(1)\n"
    )
    monkeypatch.setattr(Child, "schedule_restart", _quick_restart)
    stop = threading.Event()
    threading.Timer(4.0, stop.set).start()

    # Execute
    child.start()
    node._supervise([child], "h:1", stop)
    child.stop()

    # Assert
    assert len(starts.read_text()) >= 2
    assert "restarting it" in capsys.readouterr().out


def _quick_restart(self: Child) -> float:
    self.restart_at = 0.0
    self.process = None
    return 0.0


def test_a_test_client_app_goes_to_the_warm_worker_only(files):
    options = NodeOptions("h:1", files["ca.pem"], files["client-1.key"], files["data.npz"], client_app="m:app")

    argv = node.worker_argv(options, 9400)
    assert argv[argv.index("--client-app") + 1] == "m:app"
    with pytest.raises(node.NodeError, match="--client-app needs --isolation warm"):
        node.check_inputs(NodeOptions("h:1", files["ca.pem"], files["client-1.key"], files["data.npz"],
                                      isolation="subprocess", client_app="m:app", trust_server_code=True))  # fmt: skip


def test_the_worker_is_restarted_when_the_supernode_drops_a_message_of_a_stopped_run(tmp_path, capsys):
    # Prepare: a "SuperNode" that logs Flower 1.41's line for a dropped message, and a "worker"
    supernode = _script_child(
        tmp_path, "import time\nprint('INFO :  Run ID 5 is not in `RUNNING` status. Ignoring message ab12.', flush=True)\n"
        "time.sleep(30)\n",
    )  # fmt: skip
    worker = Child("worker", [sys.executable, "-c", "import time; time.sleep(30)"])
    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()
    supernode.start()
    worker.start()
    first = worker.process.pid

    # Execute
    node._supervise([supernode, worker], "h:1", stop)

    # Assert: a new worker, once
    assert worker.process.pid != first and worker.exited() is None
    assert capsys.readouterr().out.count("restarting the worker") == 1
    worker.stop()
    supernode.stop()


@pytest.mark.parametrize("grace", ["-1", "nan", "inf"])
def test_a_refusal_grace_that_is_not_seconds_is_a_one_line_error_exit_2(files, grace, capsys):
    argv = ["start", "--server", "h:1", "--ca", str(files["ca.pem"]), "--key", str(files["client-1.key"])]

    code = cli.main([*argv, "--data", str(files["data.npz"]), "--refusal-grace", grace])

    assert code == 2
    expected = f"fedclient: error: --refusal-grace must be a number of seconds, 0 or more, got {float(grace)}\n"
    assert capsys.readouterr().err == expected


def test_the_online_window_is_flowers_and_the_supervisor_imports_neither_flower_nor_torch():
    from shared.flower_compat import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    imports = "import sys, fedclient.cli; print(sorted({'flwr', 'torch', 'cryptography'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, check=True).stdout

    assert node.ONLINE_WINDOW == HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
    assert loaded == "[]\n"  # a device runs `fedclient start` for days: each would cost it memory
