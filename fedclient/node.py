"""`fedclient start`: an edge node, as Flower's own SuperNode running this project's ClientApp.

Two supervised children: `flower-supernode` (TLS, node authentication, the device's node config)
and, with `isolation = "warm"`, the warm worker (fedclient/worker.py), linked by a per-start secret
and certificate. The supervisor learns the SuperNode's state from its output, through the markers
of `shared.flower_compat.supernode_log` (Flower exposes nothing structured): refusals become
one-line errors, a lost server is explained, a crashed child restarted. It imports neither Flower
nor PyTorch. How it behaves: docs/deploy.md, docs/security.md, docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from fedclient.policy import DevicePolicy
from shared.config import Scalar, toml_value
from shared.errors import ExitCode, FedclientError
from shared.files import write_secret
from shared.flower_compat.supernode_log import (
    ABANDONED_TASK,
    ACTIVATION_REFUSED,
    BAD_KEY,
    CONNECTED,
    CONNECTION_FAILED,
    EXIT_CODE,
    NOT_TLS,
    ONLINE_WINDOW,
    PORT_TAKEN,
    RETRYING,
    UNTRUSTED_CERTIFICATE,
)
from shared.node_config import CERTIFICATE, DATA_PATH, DEVICE, ENROLLMENT_CA, SIGNING_KEY
from shared.processes import free_port, spawn, stop_tree

ISOLATIONS = ("warm", "subprocess")
STOP_GRACE = 5.0  # seconds a child gets to exit on SIGTERM before SIGKILL
MAX_BACKOFF = 30.0  # longest pause before restarting a child
STABLE_SECONDS = 60.0  # a child up this long has its restart pause reset
CONNECT_TIMEOUT = 5.0  # seconds one check that the server accepts connections may take
# A 2004 refusal (ACTIVATION_REFUSED) in a node's first REFUSAL_GRACE s is tried again every
# REFUSAL_RETRY s before it counts: the server still counts a node that stopped uncleanly online for
# ONLINE_WINDOW s, and a daemon registers node keys a moment after its port opens. A TLS failure
# (wrong CA) counts at once: waiting does not change a certificate.
RETRYABLE_REFUSALS = (ACTIVATION_REFUSED,)
REFUSAL_GRACE = ONLINE_WINDOW + 15.0
REFUSAL_RETRY = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
HINTS = {
    ACTIVATION_REFUSED: "is this node's public key registered on the server (its PKI's clients/*.pub)? "
    "Or is another fedclient already running with this key?",
    UNTRUSTED_CERTIFICATE: "--ca must be the CA certificate (ca.pem) of the server's PKI",
    BAD_KEY: "--key must be this node's private key (clients/NAME.key)",
    NOT_TLS: "is --server the Fleet API port of fedserver (its --address), "
    "or does a proxy without TLS sit there?",
}


class NodeError(FedclientError, RuntimeError):
    """The node cannot start (bad arguments or files); the message is one line."""


class NodeRefused(NodeError):
    """The server refused this node (unregistered key, wrong CA, ...); the message is one line."""

    exit_code = ExitCode.FAILED


@dataclass(frozen=True)
class NodeOptions:
    server: str
    ca: Path
    key: Path
    data: Path
    device: str = "auto"
    isolation: str = "warm"
    runtime_port: int = 0  # the SuperNode's local Runtime API port; 0 = any free one
    client_app: str = ""  # for tests: MODULE:ATTR run instead of the installed ClientApp (warm only)
    trust_server_code: bool = False  # run the ClientApp the server's FAB names (Flower's behaviour)
    refusal_grace: float = REFUSAL_GRACE  # seconds a code-2004 refusal is retried after the first start
    policy: DevicePolicy = DevicePolicy()  # what the owner allows a server to ask (fedclient/policy.py)
    enrollment_cert: Path | None = None  # this device's enrollment certificate: it signs its SecAgg keys
    enrollment_ca: Path | None = None  # the federation's enrollment CA: SecAgg peers must be signed by it


def check_inputs(options: NodeOptions) -> None:
    """Every file exists, the data path can be passed in Flower's node config, the flags go
    together (subprocess isolation runs server code), `--server` is HOST:PORT, and the data can be
    trained on (read once here, its summary printed: a device refused every round says so nowhere)."""
    for flag, path in (("--ca", options.ca), ("--key", options.key), ("--data", options.data)):
        if not path.exists():
            raise NodeError(f"{flag} {path} does not exist")
    if '"' in str(options.data.resolve()):
        raise NodeError(f"--data {options.data}: a path with a double quote cannot be passed to Flower")
    if options.isolation not in ISOLATIONS:
        raise NodeError(f"--isolation must be one of {', '.join(ISOLATIONS)}, got {options.isolation!r}")
    if not 0 <= options.refusal_grace < float("inf"):
        raise NodeError(f"--refusal-grace must be a number of seconds, 0 or more, got {options.refusal_grace}")
    if options.client_app and options.isolation != "warm":
        raise NodeError("--client-app needs --isolation warm (the worker loads it)")
    if options.isolation == "subprocess" and not options.trust_server_code:
        raise NodeError(
            "--isolation subprocess runs the code the server sends (Flower's flwr-clientapp installs "
            "each run's FAB): add --trust-server-code, or use --isolation warm"
        )
    split_address(options.server)
    _say(f"data {options.data}: {check_data(options.data)}")


DATA_CHECK_SECONDS = 600.0  # a device's whole file, read once; past it, the file does not end (a FIFO, say)


def check_data(data: Path) -> str:
    """The summary of the data at `data`, read by a child (`python -m fedclient.datacheck`: this
    supervisor does not keep numpy and the readers in memory); NodeError with the child's one-line
    reason where no run could train on it."""
    return _run_child(["fedclient.datacheck", str(data)], "--data refused", DATA_CHECK_SECONDS)


def _run_child(module_args: list[str], failure: str, timeout: float) -> str:
    """`python -m MODULE ARGS...` to its end; its output, or NodeError(`failure`: its last error line)."""
    argv = [sys.executable, "-m", *module_args]
    try:
        done = subprocess.run(argv, env=node_env(), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise NodeError(f"{failure}: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise NodeError(f"{failure}: {why}")
    return done.stdout.strip()


def split_address(server: str) -> tuple[str, int]:
    """HOST and PORT of `server` ("HOST:PORT", "[IPv6]:PORT"); NodeError if it is not one."""
    host, _, port = server.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeError(f"--server must be HOST:PORT (the server's Fleet API address), got {server!r}")
    return host, int(port)


def supernode_argv(options: NodeOptions, runtime_port: int, credentials: RuntimeCredentials | None = None) -> list[str]:
    """The `flower-supernode` command line for `options`; `credentials`: the Runtime API's secret and certificate."""
    return [
        _executable("flower-supernode"),
        "--superlink", options.server,
        "--root-certificates", str(options.ca.resolve()),
        "--auth-supernode-private-key", str(options.key.resolve()),
        "--node-config", node_config(options),
        "--isolation", "process" if options.isolation == "warm" else "subprocess",
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
        *(credentials.supernode_args() if credentials is not None else []),
    ]  # fmt: skip


def check_enrollment(options: NodeOptions) -> None:
    """`--enrollment-cert` and `--enrollment-ca` come together, and name files."""
    given = [(flag, path) for flag, path in (("--enrollment-cert", options.enrollment_cert),
                                             ("--enrollment-ca", options.enrollment_ca)) if path is not None]  # fmt: skip
    if len(given) == 1:
        raise NodeError(f"{given[0][0]} needs the other of --enrollment-cert and --enrollment-ca")
    for flag, path in given:
        if not path.is_file():
            raise NodeError(f"{flag} {path} is not a file")


def node_config(options: NodeOptions) -> str:
    """The SuperNode's `--node-config`: the device's own settings, which a server cannot change:
    its data, its device, its policy (`policy-KEY`) and its secure-aggregation credentials."""
    entries: dict[str, Scalar] = {DATA_PATH: str(options.data.resolve()), DEVICE: options.device}
    entries.update(options.policy.to_node_config())
    if options.enrollment_cert is not None and options.enrollment_ca is not None:
        entries[SIGNING_KEY] = str(options.key.resolve())
        entries[CERTIFICATE] = str(options.enrollment_cert.resolve())
        entries[ENROLLMENT_CA] = str(options.enrollment_ca.resolve())
    return " ".join(f"{key}={toml_value(value)}" for key, value in entries.items())


def worker_argv(options: NodeOptions, runtime_port: int, credentials: RuntimeCredentials | None = None) -> list[str]:
    """The warm worker's command line: which ClientApp it runs, the Runtime API's secret and certificate."""
    argv = [sys.executable, "-m", "fedclient.worker", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    if options.client_app:
        argv += ["--client-app", options.client_app]
    if options.trust_server_code:
        argv.append("--trust-server-code")
    return [*argv, *credentials.worker_args()] if credentials is not None else argv


@dataclass(frozen=True)
class RuntimeCredentials:
    """How the SuperNode and the warm worker of one start prove themselves to each other, as files
    in a directory only this user can open (0700)."""

    secret: Path  # the SuperExec secret (0600): the worker's proof to the SuperNode
    certificate: Path  # self-signed for 127.0.0.1: the SuperNode's proof to the worker
    key: Path  # the certificate's private key (0600), the SuperNode's alone

    def supernode_args(self) -> list[str]:
        """Flower's SuperExec authentication, and TLS on the Runtime API with this start's certificate."""
        return [
            "--superexec-auth-secret-file", str(self.secret),
            "--ssl-certfile", str(self.certificate),
            "--ssl-keyfile", str(self.key),
            "--ssl-ca-certfile", str(self.certificate),
        ]  # fmt: skip

    def worker_args(self) -> list[str]:
        return ["--auth-secret-file", str(self.secret), "--runtime-certificate", str(self.certificate)]


@contextmanager
def runtime_credentials(isolation: str) -> Iterator[RuntimeCredentials | None]:
    """A new directory (0700) holding a random SuperExec secret and a new certificate for the Runtime
    API with its key, each readable by this user only (0600); removed at the end.

    None in `"subprocess"` isolation, where Flower's SuperNode ignores the secret.
    """
    if isolation != "warm":
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="fedclient-"))  # mode 0700
    try:
        names = ("superexec.secret", "runtime.pem", "runtime.key")
        credentials = RuntimeCredentials(*(directory / name for name in names))
        write_secret(credentials.secret)
        _make_certificate(credentials)
        yield credentials
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _make_certificate(credentials: RuntimeCredentials) -> None:
    """Write the certificate and its key in a child process: this supervisor never imports cryptography."""
    argv = ["fedclient.localcert", str(credentials.certificate), str(credentials.key)]
    _run_child(argv, "cannot make the certificate of the SuperNode's Runtime API", 120.0)


def wait_for_server(server: str, stop: threading.Event) -> bool:
    """Wait until `server` accepts TCP connections (True) or `stop` is set (False).

    Each failed try is reported with the address and the reason, then tried again after a
    pause that doubles up to MAX_BACKOFF s: a device may start before its server.
    """
    host, port = split_address(server)
    pause = 1.0
    while not stop.is_set():
        reason = unreachable_reason(host, port)
        if reason is None:
            return True
        _say(f"cannot reach the server at {server}: {reason}; trying again in {pause:.0f} s "
             f"(is fedserver running there, and is {port} its Fleet API port?)")  # fmt: skip
        stop.wait(pause)
        pause = min(pause * 2, MAX_BACKOFF)
    return False


def unreachable_reason(host: str, port: int) -> str | None:
    """Why a TCP connection to `host`:`port` fails (e.g. "connection refused"), or None if it opens."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except socket.gaierror as err:
        return f"cannot resolve {host} ({err.strerror or err})"
    except TimeoutError:
        return f"no answer within {CONNECT_TIMEOUT:.0f} s"
    except OSError as err:
        return (err.strerror or str(err)).lower()
    return None


def node_env() -> dict[str, str]:
    """Telemetry and update checks off; this environment's tools first on PATH (SuperExec is found there)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
    }


@dataclass
class Child:
    """One supervised process: how to start it, and its restart pause."""

    name: str
    argv: list[str]
    pipe_output: bool = False
    server: str = ""  # the SuperNode's SuperLink: named, with the reason, when it cannot be reached
    process: subprocess.Popen[bytes] | None = None
    watcher: OutputWatcher | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float = 0.0
    first_started: float | None = None
    refused: bool = False  # refused since its first start (fedclient said why it tries again)
    refusal_grace: float = REFUSAL_GRACE

    def start(self) -> None:
        stdout = subprocess.PIPE if self.pipe_output else None
        self.process = spawn(self.argv, env=node_env(), stdout=stdout, die_with_parent=True)
        self.started = time.monotonic()
        self.first_started = self.first_started or self.started
        if self.pipe_output:
            self.watcher = OutputWatcher(self.process.stdout, sys.stdout.buffer, self.server)  # type: ignore[arg-type]
            self.watcher.start()

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def schedule_restart(self) -> float:
        """Plan the next start; returns the pause."""
        if time.monotonic() - self.started > STABLE_SECONDS:
            self.backoff = 1.0
        pause, self.backoff = self.backoff, min(self.backoff * 2, MAX_BACKOFF)
        self.restart_at = time.monotonic() + pause
        self.process = None
        self.first_started = None  # a restarted server may register keys late again: a new grace
        self.refused = False
        return pause

    def may_retry_refusal(self, reason: str) -> bool:
        """Whether a refusal for `reason` comes within the grace period after the first start."""
        retryable = any(marker in reason for marker in RETRYABLE_REFUSALS)
        return retryable and time.monotonic() - (self.first_started or 0.0) < self.refusal_grace

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_tree(self.process, STOP_GRACE)
        if self.watcher is not None:
            self.watcher.join(timeout=2)


class OutputWatcher(threading.Thread):
    """Copies a child's output through and remembers whether it connected, and why it failed."""

    def __init__(self, source: IO[bytes], sink: IO[bytes], server: str = "") -> None:
        super().__init__(daemon=True)
        self.source, self.sink, self.server = source, sink, server
        self.connected = False
        self.abandoned_task = threading.Event()  # set when the SuperNode dropped a message of a stopped run
        self.port_taken = False  # another process held the Runtime API's port (PORT_TAKEN)
        self.lines: list[str] = []  # the last 40, colour codes removed

    def run(self) -> None:
        for raw in iter(self.source.readline, b""):
            self.sink.write(raw)
            self.sink.flush()
            line = _ANSI.sub("", raw.decode(errors="replace")).strip()
            self.connected = self.connected or CONNECTED in line
            self.port_taken = self.port_taken or PORT_TAKEN in line
            if ABANDONED_TASK in line:
                self.abandoned_task.set()
            if RETRYING in line and self.server:
                self._say_why_unreachable()
            self.lines = (self.lines + [line])[-40:]

    def _say_why_unreachable(self) -> None:
        """Flower's retry line names neither the server nor the reason: say both, when TCP shows one."""
        reason = unreachable_reason(*split_address(self.server))
        if reason is not None:
            _say(f"cannot reach the server at {self.server}: {reason}; the SuperNode keeps trying")

    def refusal(self) -> str:
        """Flower's reason for giving up, from its exit message."""
        reason = _line_after(self.lines, CONNECTION_FAILED)
        reason = reason or _line_after(self.lines, EXIT_CODE, offset=0) or "see its output above"
        hint = next((h for key, h in HINTS.items() if key in " ".join(self.lines)), "")
        return f"{reason} ({hint})" if hint else reason


def _line_after(lines: list[str], marker: str, offset: int = 1) -> str:
    for i, line in enumerate(lines):
        if marker in line and i + offset < len(lines):
            return lines[i + offset]
    return ""


def run_node(options: NodeOptions) -> int:
    """Run the node until SIGTERM/SIGINT (0), or until the server refuses it (NodeError)."""
    check_inputs(options)
    check_enrollment(options)
    _say("policy: " + "; ".join(options.policy.describe_short()))
    port = options.runtime_port or free_port()
    stop = _stop_on_signals()
    if not wait_for_server(options.server, stop):
        return 0
    with runtime_credentials(options.isolation) as credentials:
        supernode = supernode_argv(options, port, credentials)
        children = [Child("flower-supernode", supernode, pipe_output=True, server=options.server,
                          refusal_grace=options.refusal_grace)]  # fmt: skip
        if options.isolation == "warm":
            children.append(Child("worker", worker_argv(options, port, credentials)))
        try:
            for child in children:
                child.start()
            _supervise(children, options.server, stop)
        finally:
            for child in reversed(children):
                child.stop()
    return 0


def _supervise(children: list[Child], server: str, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        for child in children:
            if child.process is None:
                if time.monotonic() >= child.restart_at:
                    child.start()
                continue
            code = child.exited()
            if code is not None:
                _restart_or_give_up(child, code, server)
        _renew_worker_on_abandoned_task(children)


def _renew_worker_on_abandoned_task(children: list[Child]) -> None:
    """Restart the warm worker (children[1]) when the SuperNode dropped a task (ABANDONED_TASK): Flower
    leaves that task unfinished, and a worker that took it would wait up to 2 h for its input."""
    watcher = children[0].watcher
    if watcher is None or not watcher.abandoned_task.is_set():
        return
    watcher.abandoned_task.clear()
    for worker in children[1:]:
        if worker.process is not None:
            _say("the SuperNode dropped a message of a stopped run; restarting the worker, which may wait for it")
            worker.stop()
            worker.start()


def _restart_or_give_up(child: Child, code: int, server: str) -> None:
    """Restart an exited child, unless it is a SuperNode the server keeps refusing."""
    watcher = child.watcher
    if watcher is not None and code != 0:
        watcher.join(timeout=2)  # its last lines say why it exited
    if watcher is not None and watcher.port_taken:
        pause = child.schedule_restart()
        _say(f"{child.name} could not serve its Runtime API: another process holds its port (the worker takes "
             f"no task from it); restarting it in {pause:.0f} s")  # fmt: skip
        return
    if watcher is not None and not watcher.connected and code != 0:
        reason = watcher.refusal()
        if not child.may_retry_refusal(reason):
            raise NodeRefused(f"cannot join {server}: {reason}")
        child.restart_at, child.process = time.monotonic() + REFUSAL_RETRY, None
        _say(_refusal_note(reason, child.refused, child.refusal_grace))
        child.refused = True
        return
    pause = child.schedule_restart()
    _say(f"{child.name} exited with code {code}; restarting it in {pause:.0f} s")


def _refusal_note(reason: str, waiting: bool, grace: float) -> str:
    """What fedclient says about a refusal it will try again: why at first, then only that it still is."""
    code = ACTIVATION_REFUSED if ACTIVATION_REFUSED in reason else reason
    if waiting:
        return f"still refused {code}; trying again in {REFUSAL_RETRY:.0f} s"
    return (
        f"refused {code}: the server still counts this node online for {ONLINE_WINDOW:.0f} s after a stop that "
        "was not clean, is still registering node keys, or does not know this key; trying again every "
        f"{REFUSAL_RETRY:.0f} s for up to {grace:.0f} s"
    )


def _stop_on_signals() -> threading.Event:
    event = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return event


def _say(text: str) -> None:
    print(f"fedclient: {text}", flush=True)


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
