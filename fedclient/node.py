"""`fedclient start`: an edge node, as Flower's own SuperNode running this project's ClientApp.

The node is two processes, supervised from here:

- `flower-supernode` with TLS (`--root-certificates`), node authentication
  (`--auth-supernode-private-key`) and the node config the ClientApp reads (`data-path`,
  `device`). Flower's defaults retry a lost SuperLink forever, so a server restart is
  survived by reconnecting;
- with `isolation = "warm"` (the default), the SuperNode runs with `--isolation process` and
  `python -m fedclient.worker` runs every message in one long-lived process (see
  fedclient/worker.py); with `"subprocess"`, Flower's default, a fresh `flwr-clientapp`
  process runs each message.

Which code runs: the warm worker runs the ClientApp installed on this device and refuses a run
whose FAB names another; `trust_server_code` (`--trust-server-code`) makes it run the FAB's
code, as Flower does. `"subprocess"` isolation always runs the FAB's code (Flower's
`flwr-clientapp` installs it), so it needs `trust_server_code`.

Who may take this node's tasks: the SuperNode's local Runtime API listens on 127.0.0.1, where
every local user can reach it. In warm isolation fedclient writes a random secret to a new
file only its user can read (0600) and gives it to both the SuperNode
(`--superexec-auth-secret-file`, Flower's SuperExec authentication) and the worker: a request
for a task without a signature made with that secret is refused, and every other Runtime API
call needs the token a task hands out. Flower ignores the secret in `"subprocess"` isolation.

Before the SuperNode starts, fedclient checks that the server's address accepts connections;
while it does not, it says why (refused, no such host, timed out) and tries again after a
growing pause. A SuperNode that exits before it ever connected was refused (unregistered key,
wrong CA, bad key file): that is a one-line error and exit status 1. Flower's refusal of an
unregistered key (code 2004) is also its refusal of a key whose node it still counts online: a
node that stopped without saying so (a crash, SIGKILL, power loss) stays online on the server
for ONLINE_WINDOW s after its last heartbeat. So a 2004 is retried for REFUSAL_GRACE s (the
online window and a margin) before it counts, saying so; a daemon that registers keys just
after its port opens is covered by the same wait. A clean stop (SIGTERM, SIGINT) lets the
SuperNode deactivate its node on the server, so a restart at once is accepted at once.
One that exits after it had connected, or a worker that exits, is restarted after a growing
pause. SIGTERM or SIGINT stops both; a fedclient killed outright (SIGKILL, OOM) takes both with
it (the kernel's parent-death signal, Linux), so no orphan keeps training as this node.
"""

from __future__ import annotations

import os
import re
import secrets
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

from shared.errors import ExitCode, FedclientError
from shared.processes import free_port, spawn, stop_tree

ISOLATIONS = ("warm", "subprocess")
STOP_GRACE = 5.0  # seconds a child gets to exit on SIGTERM before SIGKILL
MAX_BACKOFF = 30.0  # longest pause before restarting a child
STABLE_SECONDS = 60.0  # a child up this long has its restart pause reset
CONNECT_TIMEOUT = 5.0  # seconds one check that the server accepts connections may take
# A node that stopped uncleanly stays online on the SuperLink this long after its last
# heartbeat (Flower 1.41: HEARTBEAT_PATIENCE 2 x HEARTBEAT_DEFAULT_INTERVAL 30 s, checked against
# Flower's constants by tests/fedclient/test_node.py: this supervisor does not import Flower, which
# would add about 50 MB to a device), and activating it again is refused with code 2004, as an
# unregistered key is; a daemon also registers node keys a moment after its port opens. So a
# 2004 in a node's first REFUSAL_GRACE s is tried again every REFUSAL_RETRY s before it counts.
# A TLS failure (wrong CA) counts at once: waiting does not change a certificate.
ONLINE_WINDOW = 60.0
RETRYABLE_REFUSALS = ("[code: 2004]",)
REFUSAL_GRACE = ONLINE_WINDOW + 15.0
REFUSAL_RETRY = 5.0
CONNECTED = "SuperNode ID:"  # what flower-supernode logs once the SuperLink accepted it
RETRYING = "Connection attempt failed, retrying"  # what it logs, without the address, when it lost the SuperLink
# What flower-supernode logs when it drops a message whose run was stopped while it was being
# received (e.g. the server restarted mid-round). Flower 1.41 then leaves the task it created
# for that message unfinished, and a worker that took the task waits for its input for up to
# Flower's PULL_MAX_TIME (2 h): the worker is restarted instead.
ABANDONED_TASK = "is not in `RUNNING` status. Ignoring message"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
HINTS = {
    "[code: 2004]": "is this node's public key registered on the server (its PKI's clients/*.pub)? "
    "Or is another fedclient already running with this key?",
    "CERTIFICATE_VERIFY_FAILED": "--ca must be the CA certificate (ca.pem) of the server's PKI",
    "private key": "--key must be this node's private key (clients/NAME.key)",
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


def check_inputs(options: NodeOptions) -> None:
    """Every file exists, the data path can be passed in Flower's node config, the flags go
    together (subprocess isolation runs server code) and `--server` is HOST:PORT."""
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


def split_address(server: str) -> tuple[str, int]:
    """HOST and PORT of `server` ("HOST:PORT", "[IPv6]:PORT"); NodeError if it is not one."""
    host, _, port = server.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NodeError(f"--server must be HOST:PORT (the server's Fleet API address), got {server!r}")
    return host, int(port)


def supernode_argv(options: NodeOptions, runtime_port: int, secret: Path | None = None) -> list[str]:
    """The `flower-supernode` command line for `options`; `secret`: the Runtime API's SuperExec secret file."""
    node_config = f'data-path="{options.data.resolve()}" device="{options.device}"'
    auth = ["--superexec-auth-secret-file", str(secret)] if secret is not None else []
    return [
        _executable("flower-supernode"),
        "--superlink", options.server,
        "--root-certificates", str(options.ca.resolve()),
        "--auth-supernode-private-key", str(options.key.resolve()),
        "--node-config", node_config,
        "--isolation", "process" if options.isolation == "warm" else "subprocess",
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
        *auth,
    ]  # fmt: skip


def worker_argv(options: NodeOptions, runtime_port: int, secret: Path | None = None) -> list[str]:
    """The warm worker's command line: which ClientApp it runs, and the Runtime API's secret file."""
    argv = [sys.executable, "-m", "fedclient.worker", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    if options.client_app:
        argv += ["--client-app", options.client_app]
    if options.trust_server_code:
        argv.append("--trust-server-code")
    return [*argv, "--auth-secret-file", str(secret)] if secret is not None else argv


@contextmanager
def runtime_secret(isolation: str) -> Iterator[Path | None]:
    """A random SuperExec secret in a new file only this user can read (0600), removed at the end.

    None in `"subprocess"` isolation, where Flower's SuperNode ignores the secret.
    """
    if isolation != "warm":
        yield None
        return
    descriptor, name = tempfile.mkstemp(prefix="fedclient-", suffix=".secret")  # mode 0600
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


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
        self.lines: list[str] = []  # the last 40, colour codes removed

    def run(self) -> None:
        for raw in iter(self.source.readline, b""):
            self.sink.write(raw)
            self.sink.flush()
            line = _ANSI.sub("", raw.decode(errors="replace")).strip()
            self.connected = self.connected or CONNECTED in line
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
        reason = _line_after(self.lines, "Failed to initialize the connection")
        reason = reason or _line_after(self.lines, "Exit Code:", offset=0) or "see its output above"
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
    port = options.runtime_port or free_port()
    stop = _stop_on_signals()
    if not wait_for_server(options.server, stop):
        return 0
    with runtime_secret(options.isolation) as secret:
        supernode = supernode_argv(options, port, secret)
        children = [Child("flower-supernode", supernode, pipe_output=True, server=options.server,
                          refusal_grace=options.refusal_grace)]  # fmt: skip
        if options.isolation == "warm":
            children.append(Child("worker", worker_argv(options, port, secret)))
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
    """Restart the warm worker (children[1]) when the SuperNode dropped a task (ABANDONED_TASK)."""
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
    if watcher is not None and not watcher.connected and code != 0:
        watcher.join(timeout=2)
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
    code = reason.split("]")[0] + "]" if reason.startswith("[code:") else reason
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
