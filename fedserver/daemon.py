"""`fedserver start` / `fedserver stop`: the SuperLink daemon of a deployment.

`start` runs in the foreground, as a systemd `Type=simple` service expects: it checks the PKI,
the run config (the ServerApp's model and data built once, in a child) and the address before
anything starts, stages the app, runs Flower's SuperLink with its own SuperExec, registers the
node keys, submits the run and follows its round events into its log, `daemon.json` and the
dashboard; SIGTERM, SIGINT or SIGHUP stop the run and every process it started. A SuperLink that
a killed daemon left (STATE/superlink.pid) is stopped by the next start or stop. Steps, files and
signals in full: docs/deploy.md.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from fedserver.addresses import AddressError, is_loopback, parse_address
from fedserver.checkpoints import STATE_FILE, CheckpointError, config_changes
from fedserver.control import ControlClient, ControlError, RunInfo, load_public_key
from fedserver.dashboard import DEFAULT_ADDRESS as DEFAULT_DASHBOARD
from fedserver.dashboard import Dashboard, DashboardError, RunModel, run_summary
from fedserver.events import EVENTS_FILE, EventFollower, Record
from fedserver.logs import copy_lines, rotating_handler
from fedserver.staging import stage_app
from fedserver.state import DEFAULT_ADDRESS, DaemonError, DaemonInfo, StateDir, make_private, private_files
from fedserver.status import refresh_live
from shared.config import TEXT_MODELS, ConfigError, RunConfig, load_config
from shared.files import write_secret
from shared.flower_compat.superlink import IN_MEMORY_DATABASE
from shared.flower_compat.supernode_log import EXIT_CODE  # flwr_exit's marker, the SuperLink's as the SuperNode's
from shared.pki import PkiError
from shared.processes import (
    bind_error, die_with_parent, record_process, recorded_process, spawn, stop_pid, stop_trees, wait_for_port,
)  # fmt: skip

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each stops the daemon and all it started
STOP_GRACE = 10.0  # seconds the SuperLink gets to exit on SIGTERM before SIGKILL
READY_TIMEOUT = 60.0  # seconds the SuperLink gets to start listening
POLL_SECONDS = 1.0  # how often the daemon looks at the run and the metrics
STATUS_EVERY = 5  # polls between two Control API queries
LOG_DRAIN_TIMEOUT = 5.0  # seconds the SuperLink's last output gets to reach superlink.log
WILDCARD_HOSTS = ("0.0.0.0", "::")
# Where the SuperLink keeps runs, nodes and messages. "sqlite": STATE/state.db, which outlives
# the daemon. "memory": Flower's in-memory state, about 4 CPU-seconds a round cheaper for the
# MNIST 2NN here (Flower 1.41 stores every message object in its SQL state); a restarted
# daemon then forgets earlier runs and node ids (keys are registered again at start, and
# SuperNodes refused with their old id are restarted by fedclient).
DATABASES = ("sqlite", "memory")

LOG = logging.getLogger("fedserver")


@dataclass(frozen=True)
class Pki:
    """The files of a `fedserver init` directory that the daemon uses."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_keys: tuple[Path, ...]  # public keys, clients/*.pub
    client_keys_dir: Path

    @classmethod
    def load(cls, directory: Path) -> Pki:
        """Check every file is there; a missing one is a one-line error naming it."""
        directory = Path(directory).resolve()
        if not directory.is_dir():
            raise PkiError(f"PKI directory {directory} does not exist (run 'fedserver init {directory}' first)")
        ca, cert, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
        for path in (ca, cert, key):
            if not path.is_file():
                raise PkiError(f"missing certificate file {path}")
        clients = directory / "clients"
        return cls(ca, cert, key, tuple(sorted(clients.glob("*.pub"))), clients)


@dataclass(frozen=True)
class StartOptions:
    pki_dir: Path
    config: Path
    address: str = DEFAULT_ADDRESS
    state_dir: Path = StateDir.DEFAULT
    database: str = "sqlite"  # or "memory": Flower's in-memory state, see DATABASES
    control_address: str | None = None  # the user's consent to a Control API off 127.0.0.1 (= address)
    dashboard: str | None = DEFAULT_DASHBOARD  # [HOST:]PORT of the dashboard; None: no dashboard
    dashboard_token_file: Path | None = None  # needed for a dashboard off 127.0.0.1
    dashboard_names: Path | None = None  # the operator's names for node ids, shown on the dashboard
    fleet_front: bool = True  # idle devices' pulls answered by fedserver.fleet_front; False: Flower's app alone


def listen_address(options: StartOptions) -> tuple[str, int]:
    """Where the SuperLink listens, from --address; a one-line AddressError where that would expose
    its Control API without --control-address saying so (Flower 1.41 serves the Fleet, Control and
    Runtime APIs on one port, so the Control API cannot stay on 127.0.0.1 apart from the Fleet API)."""
    host, port = parse_address(options.address)
    if options.control_address is not None:
        if parse_address(options.control_address, "--control-address") != (host, port):
            raise AddressError(
                f"--control-address {options.control_address} must be --address {options.address} or left out: "
                "Flower 1.41 serves the Control API on the Fleet API's port"
            )
    elif not is_loopback(host):
        raise AddressError(
            f"--address {options.address} would expose the Control API too (whoever reaches it runs code here; "
            "Flower 1.41 serves it on the Fleet API's port): keep --address on 127.0.0.1 behind a TLS proxy "
            f"(docs/deploy.md), or add --control-address {options.address} to expose it knowingly"
        )
    return host, port


def _check_bindable(address: str, host: str, port: int) -> None:
    err = bind_error(host, port)
    if err is None:
        return
    if err.errno == errno.EADDRINUSE:
        raise DaemonError(f"address {address} is already in use")
    raise AddressError(f"cannot listen on {address}: {err.strerror or err} (is {host} an address of this machine?)")


def local_address(host: str, port: int) -> str:
    """Where this machine reaches a SuperLink bound to `host` (its certificate covers 127.0.0.1)."""
    host = _connect_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start(options: StartOptions) -> int:
    """Run the daemon until SIGTERM/SIGINT; 0 after a requested stop, 1 if the SuperLink died."""
    state = StateDir(options.state_dir)
    host, port = listen_address(options)
    model = RunModel("deployment")
    dashboard = _dashboard(options, model)  # its flags and files, checked before anything starts
    pki = Pki.load(options.pki_dir)
    cfg = run_config(options.config, state)
    check_resumable(state, cfg)
    check_server_app(cfg)  # the whole config before the machine's state: a busy port may free up
    model.run = run_summary(cfg)
    _check_not_running(state)
    stale = stop_stale_superlink(state)  # a killed daemon's, first: it may hold the port
    _check_bindable(options.address, host, port)
    with private_files(), state.locked(), _logging_to(state.log), _stop_on_signals() as stop, _pid_file(state):
        if stale is not None:
            LOG.warning("stopped SuperLink pid %d and its processes, left running by a fedserver that was killed", stale)
        with _serving(dashboard):
            return _serve(options, state, pki, cfg, stop, model)


def _dashboard(options: StartOptions, model: RunModel) -> Dashboard | None:
    """The dashboard the options ask for, not started (None for none); a bad flag or file is a
    one-line DashboardError."""
    if options.dashboard is None:
        return None
    return Dashboard.for_flags(model, options.dashboard, options.dashboard_token_file, options.dashboard_names)


@contextmanager
def _serving(dashboard: Dashboard | None) -> Iterator[None]:
    """The dashboard served for the block; one it cannot serve (a busy port, no prometheus-client) is
    a warning line, and the daemon goes on without it."""
    try:
        if dashboard is not None:
            LOG.info("dashboard on %s", dashboard.start())
    except DashboardError as err:
        LOG.warning("no dashboard: %s", err)
        dashboard = None
    try:
        yield
    finally:
        if dashboard is not None:
            dashboard.stop()


def check_server_app(cfg: RunConfig) -> None:
    """What the ServerApp builds first, built once in a child process: the model, the data it
    needs and the central test set, so that a config it cannot use is refused before anything
    starts (its DataError or ConfigError, naming the key). In a child, so that the daemon holds
    neither torch nor the data for its whole life. A text run's tokenizer must need no device's
    text: every device would refuse a `fitted` one."""
    if cfg.dataset in TEXT_MODELS and cfg.tokenizer == "fitted":
        raise ConfigError(
            f"dataset '{cfg.dataset}' with tokenizer 'fitted' runs in fedsim only (that vocabulary is fitted on "
            'every client\'s text): a deployment sets tokenizer = "bytes", or "file" with tokenizer-path'
        )
    spawn_context = multiprocessing.get_context("spawn")
    # The child dies with the daemon, whatever stops it while the child builds (it and the
    # resource tracker it holds open would otherwise outlive it, ~300 MB each).
    with ProcessPoolExecutor(1, spawn_context, initializer=die_with_parent, initargs=(os.getpid(),)) as child:
        child.submit(_build_server_inputs, cfg.replace(run_dir="")).result()  # run-dir: a tokenizer would go there


def _build_server_inputs(cfg: RunConfig) -> None:
    from fedserver.app import evaluated_on
    from shared.data.federation import data_spec
    from shared.recipe import model_from_config

    model_from_config(cfg, data_spec(cfg))
    evaluated_on(cfg)


def run_config(path: Path, state: StateDir) -> RunConfig:
    """RUN.toml with `run-dir` in the state directory and a relative `data-path` made absolute."""
    cfg = load_config(path)
    data_path = str(Path(cfg.data_path).expanduser().resolve()) if cfg.data_path else ""
    return cfg.replace(run_dir=str(state.run_dir), data_path=data_path)


def check_resumable(state: StateDir, cfg: RunConfig) -> None:
    """Refuse, before anything starts, a config the state directory's run cannot resume with (the
    ServerApp would refuse it only once the run is submitted): every differing key in one line."""
    state_file = state.run_dir / STATE_FILE
    if not state_file.is_file():
        return
    try:
        changed = config_changes(json.loads(state_file.read_text(encoding="utf-8"))["config"], cfg.to_mapping())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{state_file} is unreadable ({err}): give --state-dir a new directory") from None
    if changed:
        differences = "; ".join(f"{key} = {old!r}, now {new!r}" for key, old, new in changed)
        raise ConfigError(
            f"{state.root} holds a run with other settings ({differences}): give --state-dir a new directory "
            "for a new run, or put back the old values to resume it"
        )


def _serve(
    options: StartOptions, state: StateDir, pki: Pki, cfg: RunConfig, stop: threading.Event, model: RunModel
) -> int:
    host, port = parse_address(options.address)
    make_private(stage_app(state.app, cfg))  # copied with the sources' modes
    write_secret(state.superexec_secret)
    LOG.info("starting the SuperLink on %s (state in %s)", options.address, state.root)
    argv = superlink_argv(pki, host, port, state, in_memory=options.database == "memory", front=options.fleet_front)
    output, sink = os.pipe()  # the SuperLink's and the SuperExec's output, to superlink.log
    superlink = spawn(argv, env=flower_env(state), stdout=sink)
    processes = [superlink]
    log_copy = copy_lines(os.fdopen(output, "rb"), state.superlink_log)
    record_process(state.superlink_pid, superlink.pid)
    try:
        if not wait_for_port(_connect_host(host), port, READY_TIMEOUT, alive=superlink):
            raise DaemonError(f"the SuperLink did not start: {_last_error(state.superlink_log)}")
        address = local_address(host, port)
        superexec = superexec_argv(pki, address, state, superlink.pid)
        processes.insert(0, spawn(superexec, env=flower_env(state), stdout=sink))
        with ControlClient(address, pki.ca) as control:
            run_id = _submit(control, pki, state)
            info = DaemonInfo(os.getpid(), options.address, address, str(pki.ca), run_id, cfg.rounds)
            info.write(state.info)
            model.daemon.update(state_dir=str(state.root), running=True, pid=info.pid, address=info.address,
                                run_id=run_id, rounds=cfg.rounds)  # fmt: skip
            return _watch(control, processes, info, state, stop, model)
    except DaemonError as err:
        LOG.error("%s", err)
        raise
    finally:
        os.close(sink)  # superlink.log's copy ends once the processes holding the pipe have ended
        LOG.info("stopping the SuperLink")
        stop_trees(processes, STOP_GRACE)
        state.superlink_pid.unlink(missing_ok=True)
        state.superexec_secret.unlink(missing_ok=True)
        log_copy.join(LOG_DRAIN_TIMEOUT)
        LOG.info("stopped")


def _submit(control: ControlClient, pki: Pki, state: StateDir) -> int:
    registered = sum(control.register_node(key) for key in pki.client_keys)
    LOG.info("node keys: %d registered now, %d already", registered, len(pki.client_keys) - registered)
    allowed = {load_public_key(key) for key in pki.client_keys}
    for node_id, name in unregister_keys(control, lambda key: key not in allowed):
        LOG.info("node %d (%s) unregistered: its key is no longer in %s", node_id, name, pki.client_keys_dir)
    for run in control.list_runs():
        if run.active:
            LOG.info("stopping run %d left %s by an earlier daemon", run.run_id, run.status)
            control.stop_run(run.run_id)
    run_id = control.start_run(state.app)
    LOG.info("run %d submitted; metrics and model go to %s", run_id, state.run_dir)
    return run_id


def unregister_keys(control: ControlClient, revoked: Callable[[bytes], bool]) -> list[tuple[int, str]]:
    """Unregister every registered node whose public key is `revoked`; their (node id, name)."""
    nodes = [node for node in control.list_nodes() if node.registered and revoked(node.public_key)]
    for node in nodes:
        control.unregister_node(node.node_id)
    return [(node.node_id, node.name) for node in nodes]


def revoke(state_dir: Path, public_key: bytes) -> list[tuple[int, str]] | None:
    """Unregister the nodes of `public_key` from the daemon running on `state_dir` at once; their
    (node id, name), or None when no daemon runs there (its next start unregisters them)."""
    state = StateDir(state_dir)
    info = DaemonInfo.read(state.info)
    if state.read_pid() is None or info is None:
        return None
    with ControlClient(info.control_address, Path(info.ca)) as control:
        return unregister_keys(control, lambda key: key == public_key)


def _watch(
    control: ControlClient, processes: list[subprocess.Popen[bytes]], info: DaemonInfo, state: StateDir,
    stop: threading.Event, model: RunModel | None = None,
) -> int:
    """Report rounds and run status until asked to stop (1 if the SuperLink or the SuperExec ends
    first); stop the run on the way out. The run's last status stays in daemon.json for `status`.

    Rounds come from the ServerApp's events file, followed by offset into `model`; those it held
    before this daemon started are taken in without being logged again."""
    model = model if model is not None else RunModel("deployment")
    events = EventFollower(state.run_dir / EVENTS_FILE)
    seen_rounds, polls = _follow(events, model, logged=None), 0
    while not stop.wait(POLL_SECONDS):
        ended = next((process for process in processes if process.poll() is not None), None)
        if ended is not None:
            name, code = Path(str(ended.args[0])).name, ended.returncode
            LOG.error("%s exited with code %s: %s", name, code, _last_error(state.superlink_log))
            replace(info, run_status="unknown", run_details=f"{name} exited with code {code}").write(state.info)
            return 1
        seen_rounds = _follow(events, model, seen_rounds)
        polls += 1
        if polls % STATUS_EVERY == 1:
            info = _report_status(control, info, state)
            refresh_live(model, control, info)
    _stop_run(control, info.run_id)
    _report_status(control, info, state)
    return 0


def _follow(events: EventFollower, model: RunModel, logged: int | None) -> int:
    """The round records appended since the last call into `model` (all of them again where the
    file started over), each round after `logged` logged (None: none); the last round seen."""
    restarted, records = events.poll()
    if restarted:
        model.reset()
    last = 0 if logged is None else logged
    for record in records:
        model.add(record)
        if logged is not None and int(record["round"]) > logged:
            _log_round(record)
        last = max(last, int(record["round"]))
    return last


def _log_round(record: Record) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("round", "rounds") and isinstance(v, float))
    LOG.info("round %s: %s", record["round"], shown)


def _report_status(control: ControlClient, info: DaemonInfo, state: StateDir) -> DaemonInfo:
    """Log a change of the run's status and record it in daemon.json; the info as recorded."""
    try:
        run = _find_run(control, info.run_id)
    except ControlError as err:
        LOG.warning("%s", err)
        return info
    status, details = (run.status, run.details) if run is not None else ("unknown", "")
    if (status, details) == (info.run_status, info.run_details):
        return info
    LOG.info("run %d: %s", info.run_id, _describe(run))
    info = replace(info, run_status=status, run_details=details)
    info.write(state.info)
    return info


def _find_run(control: ControlClient, run_id: int) -> RunInfo | None:
    return next((run for run in control.list_runs() if run.run_id == run_id), None)


def _describe(run: RunInfo | None) -> str:
    if run is None:
        return "unknown"
    return f"{run.status} ({run.details})" if run.details and run.status.endswith("failed") else run.status


def _stop_run(control: ControlClient, run_id: int) -> None:
    try:
        run = _find_run(control, run_id)
        if run is not None and run.active:
            control.stop_run(run_id)
            LOG.info("run %d stopped", run_id)
    except ControlError as err:
        LOG.warning("could not stop run %d: %s", run_id, err)


def stop(state_dir: Path, timeout: float = 30.0) -> bool:
    """SIGTERM the daemon of `state_dir`, wait up to `timeout` s, then SIGKILL it and its tree.

    False if it was not running. A SuperLink left by a killed daemon is stopped too (True).
    """
    state = StateDir(state_dir)
    pid = state.read_pid()  # None for a stale pid file, or one whose pid now names another process
    if pid is None:
        return stop_stale_superlink(state, timeout) is not None
    return stop_pid(pid, grace=timeout)


def stop_stale_superlink(state: StateDir, grace: float = STOP_GRACE) -> int | None:
    """Stop the SuperLink (and its tree) a daemon that died without stopping it left; its pid, or None."""
    pid = recorded_process(state.superlink_pid)
    if pid is None:
        return None
    stop_pid(pid, grace=grace)
    state.superlink_pid.unlink(missing_ok=True)
    return pid


def superlink_argv(
    pki: Pki, host: str, port: int, state: StateDir, in_memory: bool = False, front: bool = True
) -> list[str]:
    """Flower's SuperLink with the daemon's options; behind `fedserver.fleet_front` unless `front` is False."""
    command = [sys.executable, "-m", "fedserver.fleet_front"] if front else [_sibling_executable("flower-superlink")]
    return [
        *command,
        "--ssl-ca-certfile", str(pki.ca),
        "--ssl-certfile", str(pki.server_cert),
        "--ssl-keyfile", str(pki.server_key),
        "--enable-supernode-auth",
        "--database", IN_MEMORY_DATABASE if in_memory else str(state.database),
        "--disable-runtime-dependency-installation",
        "--isolation", "process",  # the ServerApp's task goes to the daemon's own SuperExec ...
        "--superexec-auth-secret-file", str(state.superexec_secret),  # ... alone
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def superexec_argv(pki: Pki, address: str, state: StateDir, superlink_pid: int) -> list[str]:
    """Flower's SuperExec for the SuperLink at `address` (this machine's address of it): it takes the
    ServerApp's task, signing with the state directory's secret, and ends with the SuperLink."""
    return [
        _sibling_executable("flower-superexec"),
        "--runtime-api-address", address,
        "--root-certificates", str(pki.ca),
        "--superexec-auth-secret-file", str(state.superexec_secret),
        "--parent-pid", str(superlink_pid),
    ]  # fmt: skip


def flower_env(state: StateDir) -> dict[str, str]:
    """Telemetry and update checks off, Flower's home in the state dir, this env's tools first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(state.flwr_home),
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }


def _sibling_executable(name: str) -> str:
    """A console script of this Python environment (the SuperLink spawns flower-superexec the same way)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def _last_error(log_file: Path) -> str:
    """The last line of the SuperLink's log that says what went wrong, for a one-line error."""
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"see {log_file}"
    errors = [line for line in lines if "error" in line.lower() or EXIT_CODE.lower() in line.lower()]
    last = (errors or lines or [f"see {log_file}"])[-1]
    return f"{last} (see {log_file})"


def _check_not_running(state: StateDir) -> None:
    pid = state.read_pid()
    if pid is not None and pid != os.getpid():
        raise DaemonError(f"a fedserver (pid {pid}) is already running with state directory {state.root}")


@contextmanager
def _pid_file(state: StateDir) -> Iterator[None]:
    record_process(state.pid_file, os.getpid())
    try:
        yield
    finally:
        if state.read_pid() == os.getpid():
            state.pid_file.unlink(missing_ok=True)


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM, SIGINT (Ctrl-C) or SIGHUP (its terminal closed); the previous
    handlers are back afterwards."""
    event = threading.Event()

    def handler(signum: int, _frame: FrameType | None) -> None:
        LOG.info("got %s", signal.Signals(signum).name)
        event.set()

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield event
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def _logging_to(log_file: Path) -> Iterator[None]:
    """The daemon's log to `log_file` (rotated) and stdout while it runs."""
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = (rotating_handler(log_file), logging.StreamHandler(sys.stdout))
    for handler in handlers:
        handler.setFormatter(formatter)
        LOG.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            LOG.removeHandler(handler)
            handler.close()
