"""A live, read-only dashboard of one run, served by the process that runs it (docs/dashboard.md).

`Dashboard(model, ...)` serves a page, a JSON API and Prometheus's `/metrics` about `model`
(`fedserver.dashboard.model.RunModel`); fedsim feeds the model through `.subscriber`, a round-event
subscriber, the daemon from the events file it follows. `.start()` binds (or raises a one-line
DashboardError), `.stop()` ends it; or use it as a context manager.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from fedserver.addresses import AddressError, is_loopback, parse_address
from fedserver.dashboard.model import RunModel, run_summary
from fedserver.events import RoundEvent, Row, event_record
from fedserver.state import DEFAULT_DASHBOARD
from shared.config import RunConfig
from shared.errors import FlowerbedError

if TYPE_CHECKING:
    from fedserver.dashboard.server import WebServer

__all__ = ["DEFAULT_ADDRESS", "Dashboard", "DashboardError", "RunModel", "dashboard_address", "is_loopback", "run_summary"]

DEFAULT_ADDRESS = DEFAULT_DASHBOARD
DEFAULT_HOST, _, _port = DEFAULT_ADDRESS.rpartition(":")
DEFAULT_PORT = int(_port)
MIN_TOKEN_CHARS = 16
METRICS_MISSING = "the dashboard's /metrics needs prometheus-client: pip install 'flowerbed[server]'"


class DashboardError(FlowerbedError, ValueError):
    """A dashboard flag or file that cannot be used, or an address it cannot serve on; one line."""


def dashboard_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT` -> (host, port); 127.0.0.1 where HOST is left out, any free port for PORT 0."""
    candidate = f"{DEFAULT_HOST}:{text}" if text.isdigit() else text
    host, _, port = candidate.rpartition(":")
    any_port = port == "0"
    try:
        host, number = parse_address(f"{host}:{DEFAULT_PORT}" if any_port else candidate, "--dashboard")
    except AddressError as err:
        raise DashboardError(str(err).replace("HOST:PORT", "[HOST:]PORT")) from None
    return host, 0 if any_port else number


def read_token(path: Path) -> str:
    """The token in `path`: a file of this user's only (like a key: mode 0600 or stricter), of at
    least MIN_TOKEN_CHARS characters."""
    try:
        mode, text = path.stat().st_mode, path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DashboardError(f"cannot read --dashboard-token-file {path}: {err}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DashboardError(f"--dashboard-token-file {path} is readable by others (mode {mode & 0o777:o}): chmod 600 {path}")
    if len(text) < MIN_TOKEN_CHARS or any(c.isspace() for c in text):
        raise DashboardError(f"--dashboard-token-file {path}: the token must be one word of {MIN_TOKEN_CHARS} or more characters")
    return text


def read_names(path: Path) -> dict[int, str]:
    """The operator's names for node ids: a TOML file of lines `NODE_ID = "name"`."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise DashboardError(f"cannot read --dashboard-names {path}: {err}") from None
    bad = [key for key, name in table.items() if not key.isdigit() or not isinstance(name, str)]
    if bad:
        raise DashboardError(f'--dashboard-names {path}: each line is NODE_ID = "name"; not {bad[0]!r}')
    return {int(key): name for key, name in table.items()}


class Dashboard:
    """The page, API and metrics of `model` on http://HOST:PORT/ (port 0: any free one)."""

    def __init__(
        self, model: RunModel, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
        names: Mapping[int, str] | None = None,
    ) -> None:  # fmt: skip
        if token is None and not is_loopback(host):
            raise DashboardError(f"--dashboard {host} is not a loopback address: it needs --dashboard-token-file")
        self.model, self.host, self.port, self.token = model, host, port, token
        self.names = dict(names or {})
        self._server: WebServer | None = None

    @classmethod
    def for_flags(cls, model: RunModel, address: str, token_file: Path | None = None,
                  names_file: Path | None = None) -> Dashboard:  # fmt: skip
        """From `--dashboard [HOST:]PORT`, `--dashboard-token-file` and `--dashboard-names`."""
        host, port = dashboard_address(address)
        token = read_token(token_file) if token_file is not None else None
        return cls(model, host, port, token, read_names(names_file) if names_file is not None else None)

    @classmethod
    def for_simulation(cls, address: str, token_file: Path | None = None, names_file: Path | None = None) -> Dashboard:
        """A fedsim run's dashboard (`describe` what runs, then feed it `.subscriber`)."""
        model = RunModel("simulation")
        model.daemon.update(pid=os.getpid(), running=True)
        return cls.for_flags(model, address, token_file, names_file)

    def describe(self, cfg: RunConfig, history: Iterable[Row] = ()) -> None:
        """What runs, and the rounds it already committed (a resumed run's), as the page shows them."""
        self.model.run = run_summary(cfg)
        for row in history:
            self.model.add(row)

    def subscriber(self, event: RoundEvent) -> None:
        """A round-event subscriber (`fedserver.events.RoundCallback`): the round into the model."""
        self.model.add(event_record(event))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> str:
        """Serve in a thread of this process; the URL, for the caller to tell. DashboardError where the
        address cannot be bound."""
        from fedserver.dashboard.server import WebServer, bind, build_app

        metrics = self.metrics()
        try:
            sock = bind(self.host, self.port)
        except OSError as err:
            raise DashboardError(f"cannot serve the dashboard on {self.host}:{self.port}: {err.strerror or err}") from None
        self.port = sock.getsockname()[1]
        app = build_app(self.model, self.token, self.names, metrics, loopback_only=self.token is None)
        self._server = WebServer(app, sock)
        self._server.start()
        return self.url

    def metrics(self) -> Callable[[], bytes]:
        """What renders `/metrics`: the model in a Prometheus registry of this dashboard's own."""
        try:
            from fedserver.dashboard.metrics import metrics_text, registry_for
        except ImportError:
            raise DashboardError(METRICS_MISSING) from None
        registry = registry_for(self.model)
        return lambda: metrics_text(registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
