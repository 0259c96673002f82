"""The daemon's state directory: what `fedserver start` writes and `status` / `stop` read.

    fedserver.pid     the daemon's pid while it runs
    fedserver.log     the daemon's own log (also on its stdout)
    superlink.log     the SuperLink's, SuperExec's and ServerApp's output
    superlink.pid     the SuperLink's pid and start time while the daemon's SuperLink runs
    daemon.json       address, CA, run id and rounds of the current daemon
    state.db          the SuperLink's SQLite state (runs, nodes, messages)
    flwr-home/        FLWR_HOME of the SuperLink, and config.toml for `flwr` (connection "fedserver")
    app/              the staged app the run was built from
    run/              the run directory: metrics.jsonl, summary.json, curves.png, model.safetensors,
                      checkpoints
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from shared.errors import ExitCode, FedserverError

FLWR_CONNECTION = "fedserver"
DEFAULT_ADDRESS = "127.0.0.1:9092"


class DaemonError(FedserverError, RuntimeError):
    """The daemon cannot start, stopped abnormally, or its SuperLink refused; one line."""

    exit_code = ExitCode.FAILED


class StateDir:
    """Paths inside one daemon's state directory."""

    DEFAULT = Path("fedserver-state")

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

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
        for directory in (self.root, self.flwr_home, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def open_superlink_log(self) -> IO[bytes]:
        return open(self.superlink_log, "ab")  # noqa: SIM115 - the child process writes to it

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


@dataclass(frozen=True)
class DaemonInfo:
    """What a running daemon tells `fedserver status` (STATE/daemon.json)."""

    pid: int
    address: str  # where the SuperLink listens (Fleet, Control and Runtime API)
    control_address: str  # where this machine reaches it
    ca: str
    run_id: int
    rounds: int

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
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
    text = (
        f'[superlink]\ndefault = "{FLWR_CONNECTION}"\n\n'
        f'[superlink.{FLWR_CONNECTION}]\naddress = "{address}"\nroot-certificates = {json.dumps(ca)}\n'
    )
    (flwr_home / "config.toml").write_text(text)
