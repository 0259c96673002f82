"""Child processes that can be stopped for sure: their own process group, and their whole tree.

Flower's processes start children of their own in new sessions (the SuperLink's SuperExec,
its ServerApp), and the SuperLink can hang on SIGTERM while a client streams, so stopping
one means: SIGTERM, a grace period, then SIGKILL for the group and every descendant seen.
Descendants are found through /proc (Linux); elsewhere only the process group is reached.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO

from shared.files import atomic_write_text

PROC = Path("/proc")
REAP_TIMEOUT = 5.0  # seconds SIGKILLed processes get to disappear
PR_SET_PDEATHSIG = 1  # prctl(2) option: a signal the kernel sends when the parent dies


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | int | None = None,
    stderr: IO[bytes] | int | None = subprocess.STDOUT,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `argv` as the leader of a new session and process group.

    `die_with_parent`: the kernel SIGKILLs it when this process dies, even by SIGKILL (Linux;
    elsewhere ignored). Its own children are not reached that way.
    """
    preexec = _parent_death_signal(os.getpid()) if die_with_parent else None
    return subprocess.Popen(
        list(argv), env=dict(env) if env is not None else None, stdout=stdout, stderr=stderr,
        cwd=cwd, start_new_session=True, preexec_fn=preexec,
    )  # fmt: skip


def _parent_death_signal(parent: int) -> Callable[[], None] | None:
    """A preexec_fn asking for SIGKILL when `parent` dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        _die_with(parent, prctl)

    return preexec


def die_with_parent(parent: int) -> None:
    """Called in a child that `spawn` did not start (a multiprocessing worker's initializer): the
    kernel SIGKILLs it when `parent`, the process that started it, dies (Linux; elsewhere nothing).
    The kernel's signal follows the thread that started the child: start it from the main thread."""
    if sys.platform.startswith("linux"):
        _die_with(parent, ctypes.CDLL(None, use_errno=True).prctl)


def _die_with(parent: int, prctl: Callable[..., int]) -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid`, in whichever session or group it now is."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_links():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _parent_links() -> Iterable[tuple[int, int]]:
    if not PROC.is_dir():
        return
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat_fields(int(entry.name))
            if stat is not None:
                yield int(entry.name), int(stat[1])


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, ..."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat field 22); None if gone.

    A pid and its start time name one process for sure, even once the pid is reused.
    """
    stat = _stat_fields(pid)
    return int(stat[19]) if stat is not None and len(stat) > 19 else None


def record_process(path: Path, pid: int) -> None:
    """Write `pid` and its start time to `path`, for `recorded_process` in a later process."""
    atomic_write_text(path, f"{pid} {start_time(pid) or 0}\n")


def recorded_process(path: Path) -> int | None:
    """The pid `record_process` wrote to `path` if that very process still runs, else None."""
    try:
        pid, started = (int(field) for field in path.read_text().split())
    except (OSError, ValueError):
        return None
    return pid if is_alive(pid) and start_time(pid) == started else None


def is_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    stat = _stat_fields(pid)
    if stat is not None:
        return stat[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not PROC.is_dir()


def stop_tree(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM `process`, wait up to `grace` s, then SIGKILL its group and every descendant."""
    stop_trees([process], grace)


def stop_trees(processes: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """`stop_tree` for several processes at once: all get SIGTERM first, then share the grace."""
    trees = {process.pid: descendants(process.pid) for process in processes}
    for process in processes:
        _send(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            trees[process.pid] |= descendants(process.pid)
            _kill_group(process.pid)
            _send(process.pid, signal.SIGKILL)
            process.wait(timeout=REAP_TIMEOUT)
    stop_pids(set().union(*trees.values()), grace=min(grace, 2.0))


def stop_pids(pids: Iterable[int], grace: float) -> None:
    """SIGTERM the live `pids` (not our children), then SIGKILL whichever outlive `grace` s."""
    live = {pid for pid in pids if is_alive(pid)}
    for pid in live:
        _send(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = {pid for pid in live if is_alive(pid)}
    for pid in live:
        _send(pid, signal.SIGKILL)


def stop_pid(pid: int, grace: float) -> bool:
    """Stop a process we did not start (e.g. from a pid file) and its tree; True if it was alive."""
    if not is_alive(pid):
        return False
    tree = descendants(pid)
    _send(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_alive(pid):
        tree |= descendants(pid)
        _kill_group(pid)
        _send(pid, signal.SIGKILL)
    stop_pids(tree, grace=min(grace, 2.0))
    return True


def _kill_group(pid: int) -> None:
    try:
        if os.getpgid(pid) == pid:  # only a group it leads, never our own
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _send(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails (something already listens there, or it cannot be bound)."""
    return bind_error(host, port) is not None


def bind_error(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be bound now (errno EADDRINUSE: something listens there; a
    socket.gaierror: no such host; EADDRNOTAVAIL: not an address of this machine), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> bool:
    """Wait until something accepts connections on `host:port`; False on timeout or if `alive` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False
