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

A SuperNode that exits before it ever connected was refused (unregistered key, wrong CA, bad
key file): that is a one-line error and exit status 1 (an unregistered key is retried for
REFUSAL_GRACE s first: a daemon registers keys just after its port opens). One that exits
after it had connected, or a worker that exits, is restarted after a growing pause.
SIGTERM or SIGINT stops both; a fedclient killed outright (SIGKILL, OOM) takes both with it
(the kernel's parent-death signal, Linux), so no orphan keeps training as this node.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
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
# A daemon registers node keys a moment after its port opens: a node refused as unregistered
# (Flower's code 2004) in its first REFUSAL_GRACE s tries again before the refusal counts.
# A TLS failure (wrong CA) counts at once: waiting does not change a certificate.
RETRYABLE_REFUSALS = ("[code: 2004]",)
REFUSAL_GRACE = 15.0
REFUSAL_RETRY = 2.0
CONNECTED = "SuperNode ID:"  # what flower-supernode logs once the SuperLink accepted it
# What flower-supernode logs when it drops a message whose run was stopped while it was being
# received (e.g. the server restarted mid-round). Flower 1.41 then leaves the task it created
# for that message unfinished, and a worker that took the task waits for its input for up to
# Flower's PULL_MAX_TIME (2 h): the worker is restarted instead.
ABANDONED_TASK = "is not in `RUNNING` status. Ignoring message"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
HINTS = {
    "[code: 2004]": "is this node's public key registered on the server (its PKI's clients/*.pub)?",
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
    client_app: str = ""  # for tests: MODULE:ATTR run instead of the FAB's ClientApp (warm only)


def check_inputs(options: NodeOptions) -> None:
    """Every file exists and the data path can be passed in Flower's node config."""
    for flag, path in (("--ca", options.ca), ("--key", options.key), ("--data", options.data)):
        if not path.exists():
            raise NodeError(f"{flag} {path} does not exist")
    if '"' in str(options.data.resolve()):
        raise NodeError(f"--data {options.data}: a path with a double quote cannot be passed to Flower")
    if options.isolation not in ISOLATIONS:
        raise NodeError(f"--isolation must be one of {', '.join(ISOLATIONS)}, got {options.isolation!r}")
    if options.client_app and options.isolation != "warm":
        raise NodeError("--client-app needs --isolation warm (the worker loads it)")


def supernode_argv(options: NodeOptions, runtime_port: int) -> list[str]:
    """The `flower-supernode` command line for `options`."""
    node_config = f'data-path="{options.data.resolve()}" device="{options.device}"'
    return [
        _executable("flower-supernode"),
        "--superlink", options.server,
        "--root-certificates", str(options.ca.resolve()),
        "--auth-supernode-private-key", str(options.key.resolve()),
        "--node-config", node_config,
        "--isolation", "process" if options.isolation == "warm" else "subprocess",
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]  # fmt: skip


def worker_argv(runtime_port: int, client_app: str = "") -> list[str]:
    argv = [sys.executable, "-m", "fedclient.worker", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return [*argv, "--client-app", client_app] if client_app else argv


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
    process: subprocess.Popen[bytes] | None = None
    watcher: OutputWatcher | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float = 0.0
    first_started: float | None = None

    def start(self) -> None:
        stdout = subprocess.PIPE if self.pipe_output else None
        self.process = spawn(self.argv, env=node_env(), stdout=stdout, die_with_parent=True)
        self.started = time.monotonic()
        self.first_started = self.first_started or self.started
        if self.pipe_output:
            self.watcher = OutputWatcher(self.process.stdout, sys.stdout.buffer)  # type: ignore[arg-type]
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
        return pause

    def may_retry_refusal(self, reason: str) -> bool:
        """Whether a refusal for `reason` comes within the grace period after the first start."""
        retryable = any(marker in reason for marker in RETRYABLE_REFUSALS)
        return retryable and time.monotonic() - (self.first_started or 0.0) < REFUSAL_GRACE

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_tree(self.process, STOP_GRACE)
        if self.watcher is not None:
            self.watcher.join(timeout=2)


class OutputWatcher(threading.Thread):
    """Copies a child's output through and remembers whether it connected, and why it failed."""

    def __init__(self, source: IO[bytes], sink: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.source, self.sink = source, sink
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
            self.lines = (self.lines + [line])[-40:]

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
    children = [Child("flower-supernode", supernode_argv(options, port), pipe_output=True)]
    if options.isolation == "warm":
        children.append(Child("worker", worker_argv(port, options.client_app)))
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
        _say(f"refused ({reason}); retrying, in case the server is still registering node keys")
        return
    pause = child.schedule_restart()
    _say(f"{child.name} exited with code {code}; restarting it in {pause:.0f} s")


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
