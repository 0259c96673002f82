"""The daemon's state directory: what `fedserver start` writes and `status` / `stop` read.

Its files are listed in docs/deploy.md. The directory is the daemon's alone (0700, files 0600):
state.db holds every client's update in plaintext. A pid file names a process by pid and start
time, so one left by a dead daemon, or a pid since reused, reads as "not running".
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from shared.errors import ExitCode, FedserverError
from shared.files import atomic_write_text
from shared.processes import recorded_process

FLWR_CONNECTION = "fedserver"
DEFAULT_ADDRESS = "127.0.0.1:9092"
DEFAULT_DASHBOARD = "127.0.0.1:8092"  # the live dashboard's (fedserver.dashboard), beside the SuperLink's
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


class DaemonError(FedserverError, RuntimeError):
    """The daemon cannot start, stopped abnormally, or its SuperLink refused; one line."""

    exit_code = ExitCode.FAILED


class StateDir:
    """Paths inside one daemon's state directory."""

    DEFAULT = Path("fedserver-state")

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def lock_file(self) -> Path:
        return self.root / "fedserver.lock"

    @property
    def pid_file(self) -> Path:
        return self.root / "fedserver.pid"

    @property
    def log(self) -> Path:
        return self.root / "fedserver.log"

    @property
    def superlink_log(self) -> Path:
        return self.root / "superlink.log"

    @property
    def superlink_pid(self) -> Path:
        return self.root / "superlink.pid"

    @property
    def superexec_secret(self) -> Path:
        return self.root / "superexec.secret"

    @property
    def info(self) -> Path:
        return self.root / "daemon.json"

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def app(self) -> Path:
        return self.root / "app"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def create(self) -> None:
        """The directory and its subfolders, private to this user; what an earlier version left
        readable by others is made private too."""
        for directory in (self.root, self.flwr_home, self.run_dir):
            directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        make_private(self.root)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock for the block; a DaemonError if another daemon holds it.

        The kernel drops the lock when the process ends, however it ends, so a daemon that was
        killed never leaves a lock behind (unlike its pid file).
        """
        self.create()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.read_pid()
            raise DaemonError(
                f"a fedserver{f' (pid {pid})' if pid else ''} is already running with state directory {self.root}"
            ) from None
        try:
            yield
        finally:
            os.close(fd)

    def read_pid(self) -> int | None:
        """The daemon's pid if the process the pid file names still runs (same pid, same start
        time), else None."""
        return recorded_process(self.pid_file)


@contextmanager
def private_files() -> Iterator[None]:
    """Files and folders created in the block, by this process or the processes it starts,
    readable by this user only (umask 077); the umask is put back after."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def make_private(root: Path) -> None:
    """Take group and other permissions off `root` and everything under it."""
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            path.chmod(mode & 0o700)


@dataclass(frozen=True)
class DaemonInfo:
    """What a running daemon tells `fedserver status` (STATE/daemon.json)."""

    pid: int
    address: str  # where the SuperLink listens (Fleet, Control and Runtime API)
    control_address: str  # where this machine reaches it
    ca: str
    run_id: int
    rounds: int
    run_status: str = ""  # the run's status when the daemon last looked ("finished:failed", ...)
    run_details: str = ""  # Flower's reason with a failed status

    def write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=1) + "\n")
        _write_flwr_config(path.parent / "flwr-home", self.control_address, self.ca)

    @classmethod
    def read(cls, path: Path) -> DaemonInfo | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _write_flwr_config(flwr_home: Path, address: str, ca: str) -> None:
    """config.toml so that `FLWR_HOME=STATE/flwr-home flwr ls` talks to this daemon's SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection = {"address": address, "root-certificates": ca}
    text = tomli_w.dumps({"superlink": {"default": FLWR_CONNECTION, FLWR_CONNECTION: connection}})
    atomic_write_text(flwr_home / "config.toml", text)
