"""`fedclient start`: the SuperNode command line, refusals as one-line errors, restarts."""

from __future__ import annotations

import dataclasses
import io
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
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
    np.savez(paths["data.npz"], x=np.zeros((2, 3)), y=np.arange(2))  # data that `check_inputs` accepts
    return paths


def test_the_supernode_runs_with_tls_node_auth_and_the_node_config(files):
    options = NodeOptions("10.0.0.5:9092", files["ca.pem"], files["client-1.key"], files["data.npz"], "cpu")

    argv = supernode_argv(options, runtime_port=9400)

    assert Path(argv[0]).name == "flower-supernode" and "--insecure" not in argv
    assert argv[argv.index("--superlink") + 1] == "10.0.0.5:9092"
    assert argv[argv.index("--root-certificates") + 1] == str(files["ca.pem"])
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(files["client-1.key"])
    assert argv[argv.index("--node-config") + 1].startswith(f'data-path="{files["data.npz"]}" device="cpu" policy-')
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


def test_the_runtime_api_credentials_are_new_each_start_private_to_its_user_and_removed(files):
    # Execute
    with node.runtime_credentials("warm") as first, node.runtime_credentials("warm") as second:
        starts = (first, second)
        directories = {credentials.secret.parent for credentials in starts}
        modes = [stat.S_IMODE(path.stat().st_mode) for c in starts for path in (c.secret.parent, c.secret, c.key)]
        secrets = [credentials.secret.read_text() for credentials in starts]
        certificates = [credentials.certificate.read_text() for credentials in starts]
        keys_apart = all(c.certificate.parent == c.key.parent == c.secret.parent for c in starts)
    with node.runtime_credentials("subprocess") as none:
        pass

    # Assert: one directory per start, only its user can open it or read the secret and the key
    assert len(directories) == 2 and keys_apart
    assert modes == [0o700, 0o600, 0o600] * 2
    assert secrets[0] != secrets[1] and len(secrets[0]) >= 64
    assert certificates[0] != certificates[1] and all(c.startswith("-----BEGIN CERTIFICATE-----") for c in certificates)
    assert not any(directory.exists() for directory in directories)
    assert none is None  # Flower ignores the secret in subprocess isolation


def test_the_supernode_proves_itself_with_the_certificate_and_the_worker_with_the_secret(files, tmp_path):
    options = NodeOptions("h:1", files["ca.pem"], files["client-1.key"], files["data.npz"])
    credentials = node.RuntimeCredentials(tmp_path / "s.secret", tmp_path / "runtime.pem", tmp_path / "runtime.key")

    supernode, worker = supernode_argv(options, 9400, credentials), node.worker_argv(options, 9400, credentials)

    assert supernode[supernode.index("--superexec-auth-secret-file") + 1] == str(credentials.secret)
    assert supernode[supernode.index("--ssl-certfile") + 1] == str(credentials.certificate)
    assert supernode[supernode.index("--ssl-keyfile") + 1] == str(credentials.key)
    assert supernode[supernode.index("--ssl-ca-certfile") + 1] == str(credentials.certificate)  # self-signed
    assert worker[worker.index("--auth-secret-file") + 1] == str(credentials.secret)
    assert worker[worker.index("--runtime-certificate") + 1] == str(credentials.certificate)
    assert str(credentials.key) not in worker  # the worker trusts the certificate; only the SuperNode has its key
    assert "--trust-server-code" not in worker
    trusting = dataclasses.replace(options, trust_server_code=True)
    assert "--trust-server-code" in node.worker_argv(trusting, 9400, credentials)


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


def _supervise_for(child: Child, seconds: float) -> None:
    """Start `child` and supervise it (restarts included) for `seconds`, then stop it."""
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    child.start()
    node._supervise([child], "h:1", stop)
    child.stop()


def test_a_supernode_that_had_connected_is_restarted(tmp_path, monkeypatch, capsys):
    # Prepare: a "SuperNode" that connects, then exits at once; restart pauses shortened
    starts = tmp_path / "starts"
    child = _script_child(
        tmp_path, f"open({str(starts)!r}, 'a').write('x')\nprint('SuperNode ID: 7', flush=True)\nraise SystemExit(1)\n"
    )
    monkeypatch.setattr(Child, "schedule_restart", _quick_restart)

    # Execute
    _supervise_for(child, 4.0)

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


def test_the_supervisor_imports_neither_flower_nor_torch():
    # (its Flower markers and ONLINE_WINDOW are checked against Flower by tests/shared/test_flower_compat.py)
    imports = "import sys, fedclient.cli; print(sorted({'flwr', 'torch', 'cryptography'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, check=True).stdout

    assert loaded == "[]\n"  # a device runs `fedclient start` for days: each would cost it memory


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("iris.csv", "a,label\n1,setosa\n2,virginica\n", "text class labels (e.g. 'setosa') are mapped to ids"),
        ("x.npz", "a text file\n", "not an npz (zip) archive"),
        ("empty.csv", "", "empty file"),
        ("nan.csv", "a,label\n1,0\nnan,1\n", "line 3, column 'a': 'nan' is not a finite number"),
        ("data.bin", "x", "unknown data format"),
    ],
)
def test_data_no_run_could_train_on_is_refused_before_the_node_starts(files, tmp_path, name, content, problem):
    # Prepare
    data = tmp_path / name
    data.write_text(content)
    options = NodeOptions("h:1", files["ca.pem"], files["client-1.key"], data)

    # Execute
    with pytest.raises(node.NodeError) as refused:
        node.check_inputs(options)

    # Assert: one line, naming the file and the problem (and its line)
    message = str(refused.value)
    assert message.startswith(f"--data refused: {data}: ") and problem in message and "\n" not in message


def test_data_that_can_be_trained_on_is_summarised(files, capsys):
    node.check_inputs(NodeOptions("h:1", files["ca.pem"], files["client-1.key"], files["data.npz"]))

    assert capsys.readouterr().out == f"fedclient: data {files['data.npz']}: 2 examples, 3 features, labels 0..1\n"


def test_fedclient_start_with_nan_in_its_data_exits_2_with_one_line(files, tmp_path, capsys):
    # Prepare
    data = tmp_path / "d.csv"
    data.write_text("a,b,label\n1,2,0\n3,inf,1\n")
    argv = ["start", "--server", "h:1", "--ca", str(files["ca.pem"]), "--key", str(files["client-1.key"])]

    # Execute
    code = cli.main([*argv, "--data", str(data)])

    # Assert
    assert code == 2
    expected = f"fedclient: error: --data refused: {data}: line 3, column 'b': 'inf' is not a finite number\n"
    assert capsys.readouterr().err == expected


def test_the_data_is_checked_without_numpy_in_the_supervisor(files):
    check = f"import sys; from fedclient import node; node.check_data(node.Path({str(files['data.npz'])!r}))"
    loaded = subprocess.run(
        [sys.executable, "-c", f"{check}; print('numpy' in sys.modules)"], capture_output=True, text=True, check=True
    ).stdout

    assert loaded == "False\n"  # the child read the data; this process stays small


def test_a_supernode_whose_runtime_port_another_process_holds_is_restarted_not_refused(tmp_path, monkeypatch, capsys):
    # Prepare: a "SuperNode" that never connects because uvicorn cannot bind its port (Flower 1.41's lines)
    starts = tmp_path / "starts"
    taken = "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 9400): address already in use"
    body = f"open({str(starts)!r}, 'a').write('x')\nprint({taken!r}, flush=True)\nraise SystemExit(1)\n"
    child = _script_child(tmp_path, body)
    monkeypatch.setattr(Child, "schedule_restart", _quick_restart)

    # Execute: no NodeRefused
    _supervise_for(child, 3.0)

    # Assert
    assert len(starts.read_text()) >= 2
    assert "could not serve its Runtime API: another process holds its port" in capsys.readouterr().out


def test_a_port_that_does_not_speak_tls_gets_a_hint_naming_the_fleet_api_port():
    # Prepare: what flower-supernode prints when --server is a port without TLS (a plain proxy, another service)
    refused = "Failed to initialize the connection to the SuperLink.\n[SSL: WRONG_VERSION_NUMBER] wrong version number\n"
    watcher = OutputWatcher(io.BytesIO(refused.encode()), io.BytesIO())

    # Execute
    watcher.run()

    # Assert
    reason = watcher.refusal()
    assert reason.startswith("[SSL: WRONG_VERSION_NUMBER]")
    assert "is --server the Fleet API port of fedserver" in reason and "proxy without TLS" in reason
