"""`fedsim run --app DIR`: a Flower app directory, read as `flwr run` reads it, for the runner.

`load_flower_app` reads the directory (`pyproject.toml`'s components and run config, Flower's own
checks, loader and config merge) into a `FlowerApp`, plain data that a worker process can load
again; `FlowerAppRun` is the runner's app for it: the ServerApp unchanged, its grid counted into
fedsim's timing summary (`timing.json`), Flower's simulation node config for every node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedserver.events import RoundCallback
from fedserver.grid_wrapper import GridWrapper
from shared.errors import FedsimError
from shared.files import atomic_write_text
from shared.flower_compat.app_config import (
    DEFAULT_SIMULATION_CONFIG,
    flatten_dict,
    get_fused_config_from_dir,
    load_app,
    parse_run_config,
    validate_fields_in_config,
)
from shared.flower_compat.messages import ErrorCode
from simulations.grid import RoundRunner, simulation_node_config
from simulations.runner import RunOutcome, SimulationResult, Workload, WorkerSide

LOG = logging.getLogger("flowerbed.sim")

APP_FILE = "pyproject.toml"
TIMING_FILE = "timing.json"
LOCAL_SIMULATION = "local-simulation"  # the federation `flwr new` declares for a simulation


class AppError(FedsimError, ValueError):
    """The app directory, its pyproject.toml, its components or `--run-config` cannot be used."""


class _LoadError(Exception):
    """What Flower's loader raises for a reference it cannot resolve (made one line by `_load`)."""


@dataclass(frozen=True)
class FlowerApp:
    """A Flower app directory, resolved: everything a grid runner needs, as plain data.

    `run_config` is the app's `[tool.flwr.app.config]` merged with `--run-config`, as `flwr run`
    merges them; every node and the ServerApp see it. Node `i` (0 <= i < num_supernodes) gets
    the node config `node_config(i)`. A worker process rebuilds the ClientApp with
    `load_client_app()`.
    """

    directory: Path
    server_ref: str
    client_ref: str
    run_config: UserConfig = field(hash=False)
    num_supernodes: int

    def node_config(self, partition_id: int) -> UserConfig:
        """Node `partition_id`'s `Context.node_config`, as in Flower's simulation."""
        return simulation_node_config(self.num_supernodes)(partition_id)

    def load_server_app(self) -> ServerApp:
        return _load(self.server_ref, "serverapp", self.directory, ServerApp)

    def load_client_app(self) -> ClientApp:
        """The ClientApp (importable in any process: Flower's loader puts the directory on sys.path)."""
        return _load(self.client_ref, "clientapp", self.directory, ClientApp)


def load_flower_app(directory: Path, run_config: list[str], num_supernodes: int | None = None) -> FlowerApp:
    """Read the app in `directory` with `--run-config` strings and an optional `--num-supernodes`.

    Without `num_supernodes`: the default federation's `options.num-supernodes` in the app's
    `[tool.flwr.federations]` (or `local-simulation`'s), else Flower's own default for a local
    simulation (`flwr run` on a SuperLink with no simulation config). Raises AppError.
    """
    directory = directory.resolve()
    project = _read_project(directory)
    components = project["tool"]["flwr"]["app"]["components"]
    for kind in ("serverapp", "clientapp"):
        if not isinstance(components, dict) or not isinstance(components.get(kind), str):
            raise AppError(f"{directory / APP_FILE}: [tool.flwr.app.components] names no {kind}")
    nodes = num_supernodes if num_supernodes is not None else _configured_num_supernodes(project)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise AppError(f"num-supernodes must be a whole number >= 1, got {nodes!r}")
    return FlowerApp(
        directory=directory,
        server_ref=components["serverapp"],
        client_ref=components["clientapp"],
        run_config=_fused_run_config(directory, project, run_config),
        num_supernodes=nodes,
    )


def _read_project(directory: Path) -> dict[str, Any]:
    """The app's pyproject.toml, with the fields Flower requires of an app (else AppError)."""
    path = directory / APP_FILE
    if not path.is_file():
        raise AppError(f"{directory} is not a Flower app directory: it has no {APP_FILE}")
    try:
        project = tomllib.loads(path.read_text(encoding="utf-8"))
        valid, errors, _ = validate_fields_in_config(project)
    except ValueError as err:  # TOML syntax, or a config value that is not a bool, number or string
        raise AppError(f"{path}: {_one_line(err)}") from err
    if not valid:
        raise AppError(f"{path} is not a Flower app: {'; '.join(errors)}")
    return project


def _configured_num_supernodes(project: dict[str, Any]) -> object:
    federations = project["tool"]["flwr"].get("federations")
    if not isinstance(federations, dict):
        return DEFAULT_SIMULATION_CONFIG.num_supernodes
    for name in (federations.get("default"), LOCAL_SIMULATION):
        federation = federations.get(name) if isinstance(name, str) else None
        options = federation.get("options") if isinstance(federation, dict) else None
        if isinstance(options, dict) and "num-supernodes" in options:
            return options["num-supernodes"]
    return DEFAULT_SIMULATION_CONFIG.num_supernodes


def _fused_run_config(directory: Path, project: dict[str, Any], run_config: list[str]) -> UserConfig:
    """The app's run config with the `--run-config` overrides, as `flwr run` gives the apps."""
    try:
        overrides = parse_run_config(run_config)
    except (ValueError, OSError) as err:  # OSError: a .toml file of overrides that cannot be read
        raise AppError(f"--run-config: {_one_line(err)}") from err
    empty = [text for text in run_config if text.strip() and not parse_run_config([text])]
    if empty:
        raise AppError(f"--run-config {empty[0]!r} holds no KEY=VALUE pair (no spaces around '=')")
    known = flatten_dict(project["tool"]["flwr"]["app"].get("config", {}))
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise AppError(
            f"--run-config: {', '.join(map(repr, unknown))} not in the app's [tool.flwr.app.config] "
            f"(its keys: {', '.join(sorted(known)) or 'none'})"
        )
    return get_fused_config_from_dir(directory, overrides)


def _load(ref: str, kind: str, directory: Path, expected: type) -> Any:
    """The object `ref` names, imported by Flower's loader with `directory` on sys.path."""
    try:
        loaded = load_app(ref, _LoadError, directory)
    except (_LoadError, ImportError) as err:
        raise AppError(f"{directory}: the {kind} {ref!r} cannot be loaded: {_one_line(err)}") from err
    if not isinstance(loaded, expected):
        raise AppError(f"{directory}: the {kind} {ref!r} is a {type(loaded).__name__}, not a {expected.__name__}")
    return loaded


def _one_line(err: Exception) -> str:
    """The first line of a Flower message (its loader appends a paragraph of help)."""
    return _first_line(str(err)) or type(err).__name__


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@dataclass
class GridCounts:
    """What a ServerApp sent through its grid, for the timing summary: rounds, messages, client errors.

    A round is a batch of `train` messages (one `send_and_receive` or `push_messages` call), which
    is one per round for Flower's strategies (`Strategy.start`).
    """

    rounds: int = 0
    messages: dict[str, int] = field(default_factory=dict)
    client_errors: int = 0


class CountingGrid(GridWrapper):
    """Counts into `counts` what the ServerApp sends through `inner` and the errors it gets back.

    A ClientApp that a worker process could not load is reported once (a warning); its messages
    are client errors. A batch always has replies from a loaded ClientApp: fedsim's own process,
    which loaded it before the run, serves a share of every batch (simulations/workers.py).
    """

    def __init__(self, inner: Grid, counts: GridCounts) -> None:
        super().__init__(inner)
        self.counts = counts
        self._load_failures: set[str] = set()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._count(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._errors(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._errors(self.inner.send_and_receive(self._count(messages), timeout=timeout))

    def _count(self, messages: Iterable[Message]) -> list[Message]:
        batch = list(messages)
        for message in batch:
            kind = message.metadata.message_type
            self.counts.messages[kind] = self.counts.messages.get(kind, 0) + 1
        self.counts.rounds += any(m.metadata.message_type == MessageType.TRAIN for m in batch)
        return batch

    def _errors(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.counts.client_errors += sum(reply.has_error() for reply in replies)
        failures = [
            _first_line(r.error.reason)
            for r in replies
            if r.has_error() and r.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        ]
        for reason in sorted(set(failures) - self._load_failures):
            LOG.warning("fedsim: %s", reason)
        self._load_failures.update(failures)
        return replies


def worker_startup_estimate() -> float:
    """A worker process's start-up, estimated as this process's CPU time so far, its app loaded:
    a spawned worker pays the same (the interpreter, Flower, the app's imports), little else."""
    return time.process_time()


class FlowerAppRun:
    """The runner's app for a Flower app directory (`runner.SimulatedApp`); its outputs: `output/timing.json`.

    Its work is not known ahead, so `workers = "auto"` times its first round against a worker's
    start-up (`worker_startup_estimate`). Its ServerApp tells no round events: the runner's
    subscribers get none.
    """

    def __init__(self, app: FlowerApp, output: Path, quiet: bool = False) -> None:
        if (output / TIMING_FILE).exists():
            raise AppError(f"{output} already holds a run: choose another --output")
        self.app, self.output, self.quiet = app, output, quiet
        self.run_config, self.num_nodes, self.app_dir = app.run_config, app.num_supernodes, app.directory
        self.node_config = app.node_config
        self._server_app = app.load_server_app()  # a bad app: one line, before any worker
        self._client_app = app.load_client_app()
        self.workload = Workload(app.num_supernodes, startup_seconds=worker_startup_estimate())
        self.counts = GridCounts()

    def client_app(self) -> ClientApp:
        return self._client_app

    def batch_runner(self) -> RoundRunner | None:
        return None

    @contextlib.contextmanager
    def worker_side(self) -> Iterator[WorkerSide]:
        """Each worker loads the app from its directory."""
        yield self.app.load_client_app, None

    def ray_client_app(self) -> ClientApp:
        return self._client_app

    def serve(self, grid: Grid, context: Context, subscribers: Sequence[RoundCallback]) -> None:
        self._server_app(grid=CountingGrid(grid, self.counts), context=context)

    def finish(self, outcome: RunOutcome) -> SimulationResult:
        """`timing.json`: the wall time and what went through the grid."""
        summary = timing(self.app, outcome, self.counts)
        self.output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output / TIMING_FILE, json.dumps(summary, indent=2) + "\n")
        where = f"{TIMING_FILE}; the app's own outputs are where it writes them"
        return SimulationResult(self.output, summary, outcome.interrupted, where)


def timing(app: FlowerApp, outcome: RunOutcome, counts: GridCounts) -> dict[str, Any]:
    """fedsim's summary of an app's run: the ServerApp's wall time and what went through the grid."""
    return {
        "app": str(app.directory),
        "backend": outcome.backend,
        "num_supernodes": app.num_supernodes,
        "workers": outcome.workers,
        "wall_seconds": round(outcome.wall_seconds, 3),
        "rounds": counts.rounds,
        "seconds_per_round": round(outcome.wall_seconds / counts.rounds, 3) if counts.rounds else None,
        "messages": dict(sorted(counts.messages.items())),
        "client_errors": counts.client_errors,
        "interrupted": outcome.interrupted,
    }
