"""`fedserver start/status/stop` without a SuperLink: checks that fail before anything starts,
addresses, the state directory, and status/stop of a daemon that is not running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fedserver import daemon, logs
from fedserver.cli import EXIT_NOT_RUNNING, main
from fedserver.control import ControlClient, NodeInfo, RunInfo
from fedserver.node_ledger import NODES_FILE, NodeLedger, NodeRecord
from fedserver.state import DaemonInfo, StateDir
from shared.files import write_secret
from shared.pki import init_pki
from shared.processes import free_port, is_alive, port_in_use, record_process, spawn, stop_tree


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

    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(tmp_path / "s"),
                 "--address", f"127.0.0.1:{free_port()}"])  # fmt: skip

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

    code = main(["start", "--pki", str(pki), "--config", str(bad), "--state-dir", str(tmp_path / "s"),
                 "--address", f"127.0.0.1:{free_port()}"])  # fmt: skip

    assert code == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_a_config_the_server_cannot_use_is_told_before_a_busy_address(tmp_path, capsys, pki):
    bad = tmp_path / "bad.toml"
    bad.write_text('dataset = "csv"\nnum-clients = 2\nclients-per-round = 2\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"

        code = main(["start", "--pki", str(pki), "--config", str(bad), "--state-dir", str(tmp_path / "s"),
                     "--address", address])  # fmt: skip

    assert code == 2
    assert "'data-path' is not set" in _error_line(capsys)


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

    def serve(options, state, pki, cfg, stop, *_model) -> int:
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
                        "--address", f"127.0.0.1:{free_port()}", "--dashboard", "0"])  # fmt: skip

        # Assert
        assert status == EXIT_NOT_RUNNING and "not running" in out
        assert stop == 0 and "no fedserver running" in out
        assert other.poll() is None  # never signalled
        assert started == 0 and [s.root for s in calls] == [state.root]
        assert not state.pid_file.exists()  # the daemon's own, removed when it ended
    finally:
        other.kill()
        other.wait()


def _saved_run(state: StateDir, run_toml: Path) -> None:
    """state.json as the ServerApp commits it after round 1 of `run_toml`'s run."""
    state.create()
    cfg = daemon.run_config(run_toml, state)
    (state.run_dir / "state.json").write_text(json.dumps({"round": 1, "random_state": [], "config": cfg.to_mapping()}))


def _start(pki, run_toml, state: StateDir, monkeypatch) -> tuple[int, list[StateDir]]:
    """`fedserver start` on a free port, as a user runs it, serving with a stand-in: its exit code,
    and the state directories the stand-in was asked to serve (none where start refused)."""
    calls: list[StateDir] = []
    monkeypatch.setattr(daemon, "_serve", _serve_stand_in(calls))
    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state.root),
                 "--address", f"127.0.0.1:{free_port()}", "--dashboard", "0"])  # fmt: skip
    return code, calls


def test_a_restart_with_a_changed_key_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch, pki, run_toml):
    state = StateDir(tmp_path / "state")
    _saved_run(state, run_toml)
    run_toml.write_text(run_toml.read_text().replace("clients-per-round = 2", "clients-per-round = 1"))

    code, calls = _start(pki, run_toml, state, monkeypatch)

    assert code == 2 and calls == []
    error = _error_line(capsys)
    assert "holds a run with other settings (clients-per-round = 2, now 1)" in error
    assert "--state-dir" in error and "old values" in error


def test_an_unreadable_commit_point_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch, pki, run_toml):
    state = StateDir(tmp_path / "state")
    state.create()
    (state.run_dir / "state.json").write_text('{"round": 1')  # cut short

    code, calls = _start(pki, run_toml, state, monkeypatch)

    assert code == 2 and calls == []
    assert "state.json is unreadable" in _error_line(capsys)


def test_a_restart_that_only_adds_rounds_resumes(tmp_path, monkeypatch, pki, run_toml):
    state = StateDir(tmp_path / "state")
    _saved_run(state, run_toml)
    run_toml.write_text(run_toml.read_text().replace("rounds = 2", "rounds = 5"))

    code, calls = _start(pki, run_toml, state, monkeypatch)

    assert code == 0 and len(calls) == 1


def test_the_state_directory_and_its_files_are_private(tmp_path, monkeypatch, pki, run_toml):
    # Prepare: a state directory an earlier version left readable by all
    state = StateDir(tmp_path / "state")
    state.run_dir.mkdir(parents=True)
    state.root.chmod(0o755)
    (state.run_dir / "metrics.jsonl").write_text("")
    (state.run_dir / "metrics.jsonl").chmod(0o644)

    # Execute
    code, _ = _start(pki, run_toml, state, monkeypatch)

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
        ("fl.example.org:443", "fl.example.org", 443, "fl.example.org:443"),
        ("[::1]:9092", "::1", 9092, "[::1]:9092"),
    ],
)
def test_addresses(address, host, port, local):
    assert daemon.parse_address(address) == (host, port)
    assert daemon.local_address(host, port) == local


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("9092", "invalid --address '9092'"),
        ("host:", "invalid --address"),
        ("host:http", "invalid --address"),
        ("127.0.0.1:99999", "port from 1 to 65535"),
        ("127.0.0.1:0", "port from 1 to 65535"),
        ("::1:9092", "IPv6 as [HOST]:PORT"),
        ("[nonsense]:9092", "invalid --address"),
        ("two words:9092", "invalid --address"),
        (":9092", "has no host: give 127.0.0.1:9092 for this machine only, 0.0.0.0:9092 for every interface"),
    ],
)
def test_bad_addresses_are_one_line_errors_exit_2_before_anything_starts(tmp_path, capsys, pki, run_toml, address, says):
    state = tmp_path / "state"

    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--address", address, "--state-dir", str(state)])

    assert code == 2
    assert says in _error_line(capsys)
    assert not state.exists()


@pytest.mark.parametrize(
    ("address", "control", "says"),
    [
        ("0.0.0.0:9092", None, "--address 0.0.0.0:9092 would expose the Control API too"),
        ("[::]:9092", None, "would expose the Control API too"),
        ("0.0.0.0:9092", "127.0.0.1:9092", "--control-address 127.0.0.1:9092 must be --address 0.0.0.0:9092"),
        ("127.0.0.1:9092", "127.0.0.1:9093", "must be --address 127.0.0.1:9092 or left out"),
        ("127.0.0.1:9092", "127.0.0.1:99999", "invalid --control-address"),
    ],
)
def test_the_control_api_leaves_127_0_0_1_only_with_control_address(tmp_path, capsys, pki, run_toml, address, control, says):
    state = tmp_path / "state"
    extra = ["--control-address", control] if control else []

    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--address", address, "--state-dir", str(state), *extra])

    assert code == 2
    assert says in _error_line(capsys)
    assert not state.exists()


def test_an_address_this_machine_cannot_listen_on_is_a_one_line_error_exit_2(tmp_path, capsys, pki, run_toml):
    address = "no-such-host.invalid:9092"

    code = main(["start", "--pki", str(pki), "--config", str(run_toml), "--address", address,
                 "--control-address", address, "--state-dir", str(tmp_path / "state")])  # fmt: skip

    assert code == 2
    assert "cannot listen on no-such-host.invalid:9092" in _error_line(capsys)


@pytest.mark.parametrize(
    ("address", "control"),
    [("127.0.0.1:9092", None), ("localhost:9092", None), ("[::1]:9092", None), ("0.0.0.0:9092", "0.0.0.0:9092")],
)
def test_a_local_address_or_a_consented_control_address_is_accepted(address, control):
    options = daemon.StartOptions(Path("pki"), Path("run.toml"), address, control_address=control)

    assert daemon.listen_address(options) == daemon.parse_address(address)


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


@pytest.mark.parametrize(
    ("run_status", "details", "says"),
    [
        ("finished:completed", "", "run 42 when the daemon stopped: finished:completed, 2 of 5 rounds done"),
        ("finished:failed", "round 3: no quorum", "finished:failed (round 3: no quorum), 2 of 5 rounds done"),
    ],
)
def test_status_of_a_stopped_daemon_shows_how_its_run_ended(tmp_path, capsys, run_status, details, says):
    state = StateDir(tmp_path / "state")
    state.create()
    DaemonInfo(999999, "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 5, run_status, details).write(state.info)
    (state.run_dir / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.5}\n{"round": 2, "accuracy": 0.75}\n')

    code = main(["status", "--state-dir", str(state.root)])
    text = capsys.readouterr().out
    main(["status", "--state-dir", str(state.root), "--json"])
    snapshot = json.loads(capsys.readouterr().out)

    assert code == EXIT_NOT_RUNNING
    assert says in text and "last round 2" in text
    assert snapshot["last_run"] == {"run_id": 42, "status": run_status, "details": details, "rounds": 5}


class EndedRunControl:
    """The Control API of a SuperLink whose run 42 has ended."""

    def list_runs(self) -> list[RunInfo]:
        return [RunInfo(42, "finished:failed", "round 3: no quorum", "t1", "t2")]


class LiveProcess:
    def poll(self) -> None:
        return None


def test_the_daemon_records_how_its_run_ended_for_status(tmp_path):
    state = StateDir(tmp_path / "state")
    state.create()
    info = DaemonInfo(os.getpid(), "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 5)
    stop = threading.Event()
    stop.set()  # stopped at once: the run's status is looked at on the way out

    code = daemon._watch(EndedRunControl(), [LiveProcess()], info, state, stop)

    recorded = DaemonInfo.read(state.info)
    assert code == 0 and recorded is not None
    assert (recorded.run_status, recorded.run_details) == ("finished:failed", "round 3: no quorum")


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
    monkeypatch.setattr("fedserver.control.ControlClient", FailedRunControl)

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

    assert argv[:3] == [sys.executable, "-m", "fedserver.fleet_front"] and "--insecure" not in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(pki.resolve() / "server.pem")
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert argv[argv.index("--database") + 1].endswith(database)
    assert argv[argv.index("--host") + 1 :] == ["127.0.0.1", "--port", "9092"]
    assert daemon.flower_env(state)["FLWR_TELEMETRY_ENABLED"] == "0"


def test_without_the_fleet_front_the_superlink_is_flowers_own_command(tmp_path, pki):
    state = StateDir(tmp_path / "state")

    front = daemon.superlink_argv(daemon.Pki.load(pki), "127.0.0.1", 9092, state)
    plain = daemon.superlink_argv(daemon.Pki.load(pki), "127.0.0.1", 9092, state, front=False)

    assert Path(plain[0]).name == "flower-superlink" and plain[1:] == front[3:]


def test_the_serverapps_task_goes_only_to_the_daemons_own_superexec(tmp_path, pki):
    state = StateDir(tmp_path / "state")
    state.create()

    superlink = daemon.superlink_argv(daemon.Pki.load(pki), "127.0.0.1", 9092, state)
    superexec = daemon.superexec_argv(daemon.Pki.load(pki), "127.0.0.1:9092", state, 4242)
    write_secret(state.superexec_secret)
    first = state.superexec_secret.read_text()
    write_secret(state.superexec_secret)

    assert superlink[superlink.index("--isolation") + 1] == "process"  # no SuperExec of its own
    for argv in (superlink, superexec):
        assert argv[argv.index("--superexec-auth-secret-file") + 1] == str(state.superexec_secret)
    assert Path(superexec[0]).name == "flower-superexec" and "--insecure" not in superexec
    assert superexec[superexec.index("--runtime-api-address") + 1] == "127.0.0.1:9092"
    assert superexec[superexec.index("--parent-pid") + 1] == "4242"  # it ends with the SuperLink
    assert state.superexec_secret.stat().st_mode & 0o777 == 0o600
    assert len(first) == 64 and state.superexec_secret.read_text() != first  # a new one each start


@pytest.mark.e2e
def test_a_local_process_without_the_secret_cannot_take_the_serverapps_task(tmp_path, pki, run_toml):
    from shared.flower_compat.runtime import (
        AcquireTaskRequest,
        RuntimeHttpClient,
        RuntimeVersionHttpInterceptor,
        TaskType,
    )

    state, address = StateDir(tmp_path / "state"), f"127.0.0.1:{free_port()}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    argv = [sys.executable, "-m", "fedserver.cli", "start", "--pki", str(pki), "--config", str(run_toml),
            "--state-dir", str(state.root), "--address", address, "--dashboard", "0"]  # fmt: skip
    with open(tmp_path / "daemon.log", "wb") as log:
        server = spawn(argv, env=env, stdout=log)
    try:
        # Execute: once the daemon's ServerApp runs (it waits for devices), an unsigned request
        run = _wait_for(lambda: _our_run(state, pki), timeout=180)
        client = RuntimeHttpClient(
            f"https://{address}", interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")], verify=False
        )
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
        client.close()
        secret_mode = state.superexec_secret.stat().st_mode & 0o777
    finally:
        stop_tree(server, grace=30)

    # Assert
    assert run.status == "running", (tmp_path / "daemon.log").read_text()
    assert refused.value.response.status_code == 401
    assert secret_mode == 0o600 and not state.superexec_secret.exists()
    assert server.returncode == 0


def _our_run(state: StateDir, pki: Path) -> RunInfo | None:
    info = DaemonInfo.read(state.info)
    if info is None:
        return None
    with ControlClient(info.control_address, pki / "ca.pem") as control:
        run = next(run for run in control.list_runs() if run.run_id == info.run_id)
    return run if run.status == "running" else None


def _wait_for(probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout} s")


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
    monkeypatch.setattr("fedserver.control.ControlClient", FailedRunControl)

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


# Runs `fedserver start` as its child, as a subreaper (so that whatever the daemon leaves behind
# becomes this wrapper's child), SIGTERMs it after argv[1] seconds or, for "check", once its
# config check's child runs, for "superexec", once its SuperExec runs; then prints the pids of
# whatever outlives it and kills them.
SUBREAPER = """
import ctypes, os, signal, subprocess, sys, time
from shared.processes import descendants
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
daemon = subprocess.Popen(sys.argv[2:])
deadline = time.monotonic() + 60
def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().decode(errors="replace")
    except OSError:  # it ended between the listing and the read
        return ""
def running(name):
    return any(name in cmdline(pid) for pid in descendants(daemon.pid))
if sys.argv[1] in ("check", "superexec"):
    name = "spawn_main" if sys.argv[1] == "check" else "flower-superexec"
    while not running(name) and daemon.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
else:
    time.sleep(float(sys.argv[1]))
daemon.send_signal(signal.SIGTERM)
daemon.wait(timeout=60)
def reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
deadline = time.monotonic() + 10
while descendants(os.getpid()) and time.monotonic() < deadline:
    reap()
    time.sleep(0.05)
reap()
survivors = sorted(descendants(os.getpid()))
for pid in survivors:
    os.kill(pid, signal.SIGKILL)
print(survivors, flush=True)
"""


def _survivors_of_a_sigterm(tmp_path: Path, pki: Path, run_toml: Path, when: str) -> str:
    daemon_argv = [sys.executable, "-m", "fedserver.cli", "start", "--pki", str(pki), "--config", str(run_toml),
                   "--state-dir", str(tmp_path / "state"), "--address", f"127.0.0.1:{free_port()}", "--dashboard", "0"]  # fmt: skip
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SUBREAPER, when, *daemon_argv], env=env, capture_output=True, timeout=120, check=True
    )
    return done.stdout.decode().strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal and subreapers are Linux's")
def test_a_sigterm_during_the_config_check_leaves_no_process(tmp_path, pki, run_toml):
    assert _survivors_of_a_sigterm(tmp_path, pki, run_toml, "check") == "[]"


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal and subreapers are Linux's")
@pytest.mark.parametrize("when", ["0.2", "1", "2", "5", "superexec"])
def test_a_sigterm_at_any_point_of_start_up_leaves_no_process(tmp_path, pki, run_toml, when):
    assert _survivors_of_a_sigterm(tmp_path, pki, run_toml, when) == "[]"
