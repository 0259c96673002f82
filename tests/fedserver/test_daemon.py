"""`fedserver start/status/stop` without a SuperLink: checks that fail before anything starts,
addresses, the state directory, and status/stop of a daemon that is not running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedserver import daemon, logs, status
from fedserver.cli import EXIT_NOT_RUNNING, main
from fedserver.control import NodeInfo, RunInfo
from fedserver.node_ledger import NODES_FILE, NodeLedger, NodeRecord
from fedserver.state import DaemonInfo, StateDir
from shared.pki import init_pki
from shared.processes import free_port, is_alive, port_in_use, record_process, spawn


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("fedserver: error: "), err
    return err


@pytest.fixture
def pki(tmp_path):
    init_pki(tmp_path / "pki", clients=2)
    return tmp_path / "pki"


@pytest.fixture
def run_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "mnist"\nmodel = "2nn"\nnum-clients = 2\nclients-per-round = 2\nrounds = 2\n')
    return path


def test_a_port_in_use_is_a_one_line_error_before_anything_starts(tmp_path, capsys, pki, run_toml):
    # Prepare
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        state = tmp_path / "state"

        # Execute
        code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state),
                     "--address", f"127.0.0.1:{port}"])  # fmt: skip

    # Assert
    assert code == 1
    assert f"address 127.0.0.1:{port} is already in use" in _error_line(capsys)
    assert not state.exists()  # nothing was started or written


@pytest.mark.parametrize("missing", ["ca.pem", "server.pem", "server.key"])
def test_a_missing_certificate_is_a_one_line_error_naming_the_file(tmp_path, capsys, pki, run_toml, missing):
    (pki / missing).unlink()

    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(tmp_path / "s")])

    assert code == 2
    assert str(pki / missing) in _error_line(capsys)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rounds = 3\nlearning-rate = 0.1\n", "learning-rate"),
        # valid keys, but the ServerApp could not build its model: no data to take its shape from
        ('dataset = "csv"\nnum-clients = 2\nclients-per-round = 2\n', "'data-path' is not set"),
        # a vocabulary fitted on the devices' text, which the server never has
        ('dataset = "imdb"\nmodel = "transformer-classifier"\n', "tokenizer 'fitted' runs in fedsim only"),
    ],
)
def test_a_run_config_the_server_cannot_use_is_a_one_line_error_before_anything_starts(
    tmp_path, capsys, pki, text, expected
):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)

    code = main(["start", "--pki", str(pki), "--config", str(bad), "--state-dir", str(tmp_path / "s")])

    assert code == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "s").exists()


# A stand-in for a running daemon: it holds the state directory's lock and, unless told
# otherwise, has written its pid file.
HOLDER = """
import os, sys, time
from fedserver.state import StateDir
from shared.processes import record_process
state = StateDir(sys.argv[1])
with state.locked():
    if sys.argv[2] == "pid":
        record_process(state.pid_file, os.getpid())
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("pid_file", ["pid", "none"])
def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path, capsys, pki, run_toml, pid_file):
    # Prepare: a live process owns the state directory (its lock; its pid file or none)
    state = StateDir(tmp_path / "state")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(state.root), pid_file], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"

        # Execute
        code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state.root),
                     "--address", f"127.0.0.1:{free_port()}"])  # fmt: skip
    finally:
        holder.kill()
        holder.wait()

    # Assert
    assert code == 1
    error = _error_line(capsys)
    assert "already running" in error and (f"pid {holder.pid}" in error) == (pid_file == "pid")


def _serve_stand_in(calls: list[StateDir]):
    """In place of `daemon._serve`: records that start got that far, writes a file itself and
    one from a child process (as the SuperLink writes state.db)."""

    def serve(options, state, pki, cfg, stop) -> int:
        calls.append(state)
        (state.root / "own.txt").write_text("x")
        subprocess.run([sys.executable, "-c", f"open({str(state.root / 'child.txt')!r}, 'w').write('x')"], check=True)
        return 0

    return serve


def test_a_stale_pid_file_neither_blocks_start_nor_reads_as_running(tmp_path, capsys, monkeypatch, pki, run_toml):
    # Prepare: the pid file names a live process, but not the one that wrote it (a reused pid)
    state = StateDir(tmp_path / "state")
    state.create()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    calls: list[StateDir] = []
    monkeypatch.setattr(daemon, "_serve", _serve_stand_in(calls))
    try:
        state.pid_file.write_text(f"{other.pid} 1\n")

        # Execute
        status = main(["status", "--state-dir", str(state.root)])
        stop = main(["stop", "--state-dir", str(state.root), "--timeout", "0.5"])
        out = capsys.readouterr().out
        started = main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state.root),
                        "--address", f"127.0.0.1:{free_port()}"])  # fmt: skip

        # Assert
        assert status == EXIT_NOT_RUNNING and "not running" in out
        assert stop == 0 and "no fedserver running" in out
        assert other.poll() is None  # never signalled
        assert started == 0 and [s.root for s in calls] == [state.root]
        assert not state.pid_file.exists()  # the daemon's own, removed when it ended
    finally:
        other.kill()
        other.wait()


def test_the_state_directory_and_its_files_are_private(tmp_path, monkeypatch, pki, run_toml):
    # Prepare: a state directory an earlier version left readable by all
    state = StateDir(tmp_path / "state")
    state.run_dir.mkdir(parents=True)
    state.root.chmod(0o755)
    (state.run_dir / "metrics.jsonl").write_text("")
    (state.run_dir / "metrics.jsonl").chmod(0o644)
    monkeypatch.setattr(daemon, "_serve", _serve_stand_in([]))

    # Execute
    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state.root),
                 "--address", f"127.0.0.1:{free_port()}"])  # fmt: skip

    # Assert
    assert code == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (state.root, *state.root.rglob("*"))}
    assert modes["state"] == modes["run"] == modes["flwr-home"] == 0o700
    for name in ("own.txt", "child.txt", "fedserver.log", "fedserver.lock", "metrics.jsonl"):
        assert modes[name] == 0o600, name


def test_run_config_puts_the_run_dir_in_the_state_dir_and_makes_data_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text('dataset = "mnist"\ndata-path = "data/mnist.npz"\nrun-dir = "/elsewhere"\n')

    cfg = daemon.run_config(tmp_path / "run.toml", StateDir("st"))

    assert cfg.run_dir == str(tmp_path / "st" / "run")
    assert cfg.data_path == str(tmp_path / "data" / "mnist.npz")


@pytest.mark.parametrize(
    ("address", "host", "port", "local"),
    [
        ("127.0.0.1:9092", "127.0.0.1", 9092, "127.0.0.1:9092"),
        ("0.0.0.0:9092", "0.0.0.0", 9092, "127.0.0.1:9092"),
        (":9092", "0.0.0.0", 9092, "127.0.0.1:9092"),
        ("fl.example.org:443", "fl.example.org", 443, "fl.example.org:443"),
        ("[::1]:9092", "::1", 9092, "[::1]:9092"),
    ],
)
def test_addresses(address, host, port, local):
    assert daemon.parse_address(address) == (host, port)
    assert daemon.local_address(host, port) == local


@pytest.mark.parametrize("address", ["9092", "host:", "host:http", "host:70000"])
def test_bad_addresses_are_one_line_errors(tmp_path, capsys, pki, run_toml, address):
    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--address", address])

    assert code == 1
    assert "invalid address" in _error_line(capsys)


def test_status_of_a_stopped_daemon_shows_the_last_metrics_and_exits_3(tmp_path, capsys):
    # Prepare: what a daemon leaves behind
    state = StateDir(tmp_path / "state")
    state.create()
    DaemonInfo(999999, "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 5).write(state.info)
    (state.run_dir / "metrics.jsonl").write_text(
        '{"round": 1, "accuracy": 0.5, "seconds": 2.0}\n{"round": 2, "accuracy": 0.75, "seconds": 2.0}\n'
    )

    # Execute
    text_code = main(["status", "--state-dir", str(state.root)])
    text = capsys.readouterr().out
    json_code = main(["status", "--state-dir", str(state.root), "--json"])
    snapshot = json.loads(capsys.readouterr().out)

    # Assert
    assert text_code == json_code == EXIT_NOT_RUNNING
    assert "not running" in text and "last round 2" in text and "accuracy 0.75" in text
    assert snapshot["running"] is False and snapshot["run_id"] == 42
    assert snapshot["rounds_completed"] == 2 and snapshot["last_metrics"]["accuracy"] == 0.75
    assert (state.flwr_home / "config.toml").read_text().count('"127.0.0.1:9092"') == 1


class FailedRunControl:
    """The Control API of a SuperLink whose run 42 failed."""

    def __init__(self, address: str, ca: Path) -> None:
        pass

    def __enter__(self) -> FailedRunControl:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def list_runs(self) -> list[RunInfo]:
        return [RunInfo(42, "finished:failed", "round 2: fewer than 2 valid replies", "t1", "t2")]

    def list_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(7, "client-1", "online", "t0")]


def test_status_of_a_failed_run_gives_its_reason_and_exits_1(tmp_path, capsys, monkeypatch):
    # Prepare: a running daemon (this process) whose run failed
    state = StateDir(tmp_path / "state")
    state.create()
    DaemonInfo(os.getpid(), "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 5).write(state.info)
    record_process(state.pid_file, os.getpid())
    monkeypatch.setattr(status, "ControlClient", FailedRunControl)

    # Execute
    text_code = main(["status", "--state-dir", str(state.root)])
    text = capsys.readouterr().out
    json_code = main(["status", "--state-dir", str(state.root), "--json"])
    snapshot = json.loads(capsys.readouterr().out)

    # Assert
    assert text_code == json_code == 1
    assert "run 42 failed: round 2: fewer than 2 valid replies" in text
    assert snapshot["error"] == "run 42 failed: round 2: fewer than 2 valid replies"
    assert snapshot["running"] is True and snapshot["connected_nodes"] == 1


class NodesControl:
    """The Control API of a SuperLink with three nodes: key b"a", key b"b", and one unregistered."""

    def __init__(self) -> None:
        self.unregistered: list[int] = []

    def list_nodes(self) -> list[NodeInfo]:
        return [
            NodeInfo(1, "client-1", "online", "t0", b"a"),
            NodeInfo(2, "client-2", "offline", "t0", b"b"),
            NodeInfo(3, "client-3", "unregistered", "t0", b"c"),
        ]

    def unregister_node(self, node_id: int) -> None:
        self.unregistered.append(node_id)


def test_start_unregisters_the_nodes_whose_key_is_gone():
    control = NodesControl()

    revoked = daemon.unregister_keys(control, lambda key: key not in {b"a"})

    assert revoked == [(2, "client-2")] and control.unregistered == [2]


def test_the_superlink_log_is_rotated_by_size(tmp_path):
    # Prepare: 40 lines of 10 bytes, files of at most 100 bytes, 2 old ones kept
    reader, writer = os.pipe()
    with os.fdopen(writer, "wb") as stream:
        stream.write(b"".join(b"line %04d\n" % k for k in range(40)))

    # Execute
    with os.fdopen(reader, "rb") as stream:
        logs.copy_lines(stream, tmp_path / "superlink.log", max_bytes=100, backups=2).join(5)

    # Assert
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["superlink.log", "superlink.log.1", "superlink.log.2"]
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())
    assert (tmp_path / "superlink.log").read_text().splitlines()[-1] == "line 0039"


def test_stop_without_a_daemon_says_so(tmp_path, capsys):
    code = main(["stop", "--state-dir", str(tmp_path)])

    assert code == 0
    assert "no fedserver running" in capsys.readouterr().out


def test_stop_terminates_the_daemon_from_its_pid_file(tmp_path, capsys):
    # Prepare: a stand-in daemon that ignores SIGTERM, so stop must escalate
    state = StateDir(tmp_path)
    ignoring = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    stand_in = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE)
    assert stand_in.stdout.readline() == b"ready\n"
    record_process(state.pid_file, stand_in.pid)

    # Execute
    code = main(["stop", "--state-dir", str(tmp_path), "--timeout", "0.5"])

    # Assert
    assert code == 0
    assert stand_in.wait(timeout=5) == -9
    assert "stopped" in capsys.readouterr().out


@pytest.mark.parametrize(("in_memory", "database"), [(False, "state.db"), (True, ":flwr-in-memory:")])
def test_the_superlink_runs_with_tls_node_auth_and_no_dependency_installation(tmp_path, pki, in_memory, database):
    state = StateDir(tmp_path / "state")

    argv = daemon.superlink_argv(daemon.Pki.load(pki), "127.0.0.1", 9092, state, in_memory=in_memory)

    assert Path(argv[0]).name == "flower-superlink" and "--insecure" not in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(pki.resolve() / "server.pem")
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert argv[argv.index("--database") + 1].endswith(database)
    assert argv[argv.index("--host") + 1 :] == ["127.0.0.1", "--port", "9092"]
    assert daemon.flower_env(state)["FLWR_TELEMETRY_ENABLED"] == "0"


# A stand-in for a SuperLink whose daemon was SIGKILLed: it holds a port, and has a child (as
# the SuperLink has its SuperExec and ServerApp).
ORPHAN = """
import socket, subprocess, sys, time
sock = socket.socket()
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def _orphan_superlink(state: StateDir, port: int) -> tuple[subprocess.Popen[bytes], int]:
    orphan = spawn([sys.executable, "-c", ORPHAN, str(port)], stdout=subprocess.PIPE)
    child = int(orphan.stdout.readline())
    state.create()
    record_process(state.superlink_pid, orphan.pid)
    return orphan, child


def test_stop_stale_superlink_frees_the_port_and_stops_its_children(tmp_path):
    state, port = StateDir(tmp_path), free_port()
    orphan, child = _orphan_superlink(state, port)
    assert port_in_use("127.0.0.1", port)

    stopped = daemon.stop_stale_superlink(state, grace=2)

    assert stopped == orphan.pid and orphan.wait(timeout=5) is not None
    assert not port_in_use("127.0.0.1", port)
    assert not state.superlink_pid.exists()
    assert wait_until_dead(child)
    assert daemon.stop_stale_superlink(state) is None


def test_stop_also_stops_a_superlink_left_by_a_killed_daemon(tmp_path, capsys):
    state = StateDir(tmp_path)
    orphan, _child = _orphan_superlink(state, free_port())
    state.pid_file.write_text("999999999\n")  # the killed daemon's pid

    code = main(["stop", "--state-dir", str(tmp_path), "--timeout", "2"])

    assert code == 0 and "stopped" in capsys.readouterr().out
    assert orphan.wait(timeout=5) is not None


def wait_until_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not is_alive(pid)


def _devices_state(tmp_path: Path, pid: int) -> StateDir:
    """A state directory whose run's node 7 refused two rounds and failed one, and node 8 did not."""
    state = StateDir(tmp_path / "state")
    state.create()
    DaemonInfo(pid, "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 5).write(state.info)
    (state.run_dir / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.5, "seconds": 2.0}\n')
    troubled = NodeRecord(accepted=1, rounds_refused=2, rounds_failed=1, last_code=110, last_round=3)
    NodeLedger({7: troubled, 8: NodeRecord(accepted=6)}).save(state.run_dir)
    return state


def test_status_lists_the_devices_that_refused_or_failed_a_task(tmp_path, capsys):
    # Prepare
    state = _devices_state(tmp_path, 999999)

    # Execute
    main(["status", "--state-dir", str(state.root)])
    text = capsys.readouterr().out
    main(["status", "--state-dir", str(state.root), "--json"])
    snapshot = json.loads(capsys.readouterr().out)

    # Assert
    assert (
        "  devices that refused or failed a task:\n"
        "    node 7: last error code 110 (refused by the device's policy: secure aggregation is required) "
        "in round 3; rounds refused 2, failed 1\n"
        "  last round 1"
    ) in text
    assert "node 8" not in text
    assert [(d["node_id"], d["last_code"], d["rounds_refused"], d["rounds_failed"], d["accepted"])
            for d in snapshot["devices"]] == [(7, 110, 2, 1, 1), (8, None, 0, 0, 6)]  # fmt: skip
    assert snapshot["devices"][0]["last_message"] == "refused by the device's policy: secure aggregation is required"


def test_status_names_a_troubled_device_by_its_node_name_while_the_daemon_runs(tmp_path, capsys, monkeypatch):
    # Prepare: a running daemon (this process) whose SuperLink knows node 7 as client-1
    state = _devices_state(tmp_path, os.getpid())
    record_process(state.pid_file, os.getpid())
    monkeypatch.setattr(status, "ControlClient", FailedRunControl)

    # Execute
    main(["status", "--state-dir", str(state.root)])

    # Assert
    assert "    node 7 (client-1): last error code 110 (" in capsys.readouterr().out


def test_status_without_a_ledger_lists_no_devices(tmp_path, capsys):
    # Prepare: a run directory from before nodes.json, or one whose rounds saw no error
    state = _devices_state(tmp_path, 999999)
    (state.run_dir / NODES_FILE).unlink()

    # Execute
    main(["status", "--state-dir", str(state.root)])
    text = capsys.readouterr().out
    main(["status", "--state-dir", str(state.root), "--json"])

    # Assert
    assert "devices" not in text and json.loads(capsys.readouterr().out)["devices"] == []
