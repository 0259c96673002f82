"""`fedsim run --app DIR`: any Flower app directory on the in-process Grid, without Ray.

A Flower app directory is the layout `flwr new` makes: a `pyproject.toml` whose
`[tool.flwr.app.components]` names the ServerApp and the ClientApp (`module:attribute`) and
whose `[tool.flwr.app.config]` holds the run config. `load_flower_app` reads it as `flwr run`
does (Flower's own checks, `--run-config` parsing and config merge, and loader, through
shared/flower_compat.py) into a `FlowerApp`: plain data, so a grid runner in another process
can load the same apps again from it. `run_flower_app` calls the ServerApp, unchanged, on an
`InProcessGrid`, each virtual node holding Flower's simulation node config (`partition-id`,
`num-partitions`) and one `Context` for the whole run, and writes fedsim's timing summary. With
`workers`, the nodes' ClientApp runs in a pool of worker processes (simulations/workers.py),
each loading the app from its directory; an app has no clients per round, so `auto` is capped
at its number of nodes. With `--backend ray` the same ServerApp runs on Flower's Ray engine
instead (ray_backend.py).
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

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
from simulations.grid import InProcessGrid, RoundRunner, server_context, simulation_node_config
from simulations.workers import client_workers, visible_gpus, worker_count

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


@dataclass(frozen=True)
class AppRunResult:
    output: Path
    timing: dict[str, Any]
    interrupted: bool


def run_flower_app(
    app: FlowerApp, output: Path, *, backend: str = "fedsim", workers: str = "1", gpu_memory_fraction: float = 0.0
) -> AppRunResult:
    """Run the app's ServerApp on an in-process Grid of `app.num_supernodes` nodes, or with
    `backend="ray"` on as many SuperNodes of Flower's Ray engine (simulations/ray_backend.py).

    On fedsim's grid its ClientApp runs in this process, or in worker processes as config key
    `workers` (a count or `auto`) says, on the visible GPUs with `gpu-memory-fraction` where CUDA
    is available.

    Its ClientApp runs in this process, or in worker processes as config key `workers` (a count
    or `auto`) says, on the visible GPUs with `gpu-memory-fraction` where CUDA is available.
    What the apps write is theirs (relative paths from the working directory, as under
    `flwr run`); fedsim writes only `output/timing.json` (see `timing`). Ctrl-C ends the run
    with the timing of what was done.
    """
    if (output / TIMING_FILE).exists():
        raise AppError(f"{output} already holds a run: choose another --output")
    server_app, client_app = app.load_server_app(), app.load_client_app()  # a bad app: one line, before any worker
    counts = GridCounts()

    def server_main(grid: Grid, context: Context) -> None:
        server_app(grid=CountingGrid(grid, counts), context=context)

    started, count = time.perf_counter(), 1
    if backend == "ray":
        from simulations.ray_backend import run_on_ray  # Ray loads only for a Ray run

        interrupted = run_on_ray(server_main, client_app, app.run_config, app.num_supernodes, app_dir=app.directory)
    else:
        gpus = visible_gpus() if workers != "1" or gpu_memory_fraction > 0 else 0  # spares importing PyTorch
        count = worker_count(workers, app.num_supernodes, gpus)
        with client_workers(app.load_client_app, count, gpus=gpus, gpu_memory_fraction=gpu_memory_fraction) as pool:
            interrupted = _run_in_process(server_main, client_app, app, pool)
    summary = timing(app, backend, counts, time.perf_counter() - started, interrupted, count)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / TIMING_FILE, json.dumps(summary, indent=2) + "\n")
    return AppRunResult(output, summary, interrupted)


def _run_in_process(
    server_main: Callable[[Grid, Context], None], client_app: ClientApp, app: FlowerApp, pool: RoundRunner | None
) -> bool:
    """Call `server_main` on an InProcessGrid of the app's nodes, their ClientApp in `pool` where
    given; return whether Ctrl-C ended it."""
    grid = InProcessGrid(client_app, app.num_supernodes, app.run_config, app.node_config, batch_runner=pool)
    try:
        server_main(grid, server_context(dict(app.run_config)))
    except KeyboardInterrupt:
        return True
    return False


def timing(
    app: FlowerApp, backend: str, counts: GridCounts, wall_seconds: float, interrupted: bool, workers: int
) -> dict[str, Any]:
    """fedsim's summary of an app's run: the ServerApp's wall time and what went through the grid."""
    return {
        "app": str(app.directory),
        "backend": backend,
        "num_supernodes": app.num_supernodes,
        "workers": workers,
        "wall_seconds": round(wall_seconds, 3),
        "rounds": counts.rounds,
        "seconds_per_round": round(wall_seconds / counts.rounds, 3) if counts.rounds else None,
        "messages": dict(sorted(counts.messages.items())),
        "client_errors": counts.client_errors,
        "interrupted": interrupted,
    }
