"""Stopping a process tree for sure: SIGTERM, grace, SIGKILL to the group and every descendant."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time

from shared.processes import (
    bind_error, descendants, is_alive, port_in_use, record_process, recorded_process, spawn, start_time, stop_tree,
)  # fmt: skip

# A parent that ignores SIGTERM (as a hanging SuperLink does) and has a child in a session of
# its own (as the SuperLink's SuperExec has).
PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_stop_tree_kills_a_parent_ignoring_sigterm_and_its_child_in_another_session():
    # Prepare
    parent = spawn([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    assert descendants(parent.pid) == {child}

    # Execute
    stop_tree(parent, grace=0.5)

    # Assert: SIGKILL once the grace passed, and the child gone with it
    assert parent.returncode == -9
    deadline = time.monotonic() + 5
    while is_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(child)


def test_stop_tree_of_a_well_behaved_process_ends_it_by_sigterm_within_the_grace():
    process = spawn([sys.executable, "-c", "import time; time.sleep(60)"])

    stop_tree(process, grace=10)

    assert process.returncode == -15  # SIGTERM ended it: no SIGKILL after the grace


def test_port_in_use():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.listen()
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def test_bind_error_tells_a_port_in_use_from_an_address_that_is_not_this_machines():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        in_use = bind_error("127.0.0.1", port)
    unknown = bind_error("no-such-host.invalid", port)

    assert in_use is not None and in_use.errno == errno.EADDRINUSE
    assert isinstance(unknown, socket.gaierror)
    assert bind_error("127.0.0.1", port) is None


# A parent that starts a child meant to die with it, then waits to be killed.
MORTAL_PARENT = """
import sys, time
from shared.processes import spawn
child = spawn([sys.executable, "-c", "import time; time.sleep(60)"], die_with_parent=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_started_to_die_with_its_parent_dies_when_the_parent_is_killed():
    assert not _child_alive_after_parent_killed(MORTAL_PARENT)


# A parent whose child asks, itself, to die with it (as a multiprocessing worker's initializer does).
PARENT_OF_A_SELF_MORTAL_CHILD = """
import subprocess, sys, time
code = "import os, time; from shared.processes import die_with_parent; die_with_parent(os.getppid()); print('set', flush=True); time.sleep(60)"
child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
assert child.stdout.readline() == b"set\\n"
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_that_asked_to_die_with_its_parent_dies_when_the_parent_is_killed():
    assert not _child_alive_after_parent_killed(PARENT_OF_A_SELF_MORTAL_CHILD)


def _child_alive_after_parent_killed(parent_script: str) -> bool:
    """Run `parent_script` (it prints its child's pid), SIGKILL it; whether the child outlived it by
    5 s (a survivor is killed here)."""
    parent = subprocess.Popen([sys.executable, "-c", parent_script], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    assert is_alive(child)
    parent.kill()
    parent.wait(timeout=5)
    deadline = time.monotonic() + 5
    while is_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = is_alive(child)
    if survived:
        os.kill(child, signal.SIGKILL)
    return survived


def test_a_recorded_process_is_found_while_it_runs_and_never_under_a_reused_pid(tmp_path):
    process = spawn([sys.executable, "-c", "import time; time.sleep(60)"])
    record_process(tmp_path / "pid", process.pid)
    (tmp_path / "reused").write_text(f"{process.pid} {start_time(process.pid) + 1}\n")  # same pid, another process

    assert recorded_process(tmp_path / "pid") == process.pid
    assert recorded_process(tmp_path / "reused") is None
    assert recorded_process(tmp_path / "missing") is None
    stop_tree(process, grace=1)
    assert recorded_process(tmp_path / "pid") is None
