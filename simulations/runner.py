"""fedsim's one runner: any Flower app, on fedsim's in-process Grid or on Flower's Ray engine.

A `SimulatedApp` is what runs: Flowerbed's own (`simulations/engine.py`) or a Flower app
directory (`simulations/apps.py`). `simulate` picks the workers, GPUs and threads by one rule,
stops at Ctrl-C with what was done, and returns one `SimulationResult`. The drawing of the
runner, its backends and one round's data: docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flwr.app import Context, Message, MessageType, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedserver.events import RoundCallback
from shared.config import RunConfig
from shared.logs import quieter
from simulations.grid import InProcessGrid, RoundRunner, serve_batch, server_context
from simulations.workers import AUTO, AppFactory, BatchFactory, client_workers, visible_gpus, worker_count

BACKEND_FEDSIM, BACKEND_RAY = "fedsim", "ray"

ServerMain = Callable[[Grid, Context, Sequence[RoundCallback]], None]
WorkerSide = tuple[AppFactory, BatchFactory | None]  # picklable: each worker process builds its clients with them


@dataclass(frozen=True)
class Workload:
    """What the runner knows of an app's work before it runs, for `workers = "auto"` and the GPUs.

    `run_examples`: the examples the whole run trains, where known ahead; None: `auto` times the
    first training round instead, against `startup_seconds` (a worker process's start-up).
    `size(context)` ranks a node's work (largest first); `on_cuda`: whether its clients may
    train on CUDA (False: no GPU is counted or capped).
    """

    clients_per_round: int
    run_examples: int | None = None
    startup_seconds: float = 0.0
    size: Callable[[Context], int] | None = None
    on_cuda: bool = True


@dataclass(frozen=True)
class Backend:
    """How the clients run: `name` fedsim (this process and `workers`) or ray (Flower's engine,
    each ClientApp reserving `ray_resources`); `gpu_memory_fraction` caps each process's VRAM."""

    name: str = BACKEND_FEDSIM
    workers: str = AUTO
    gpu_memory_fraction: float = 0.0
    ray_resources: dict[str, float] | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Backend:
        """The execution keys of a run config: `backend`, `workers`, `gpu-memory-fraction`, `ray-*-per-client`."""
        resources = {"num_cpus": cfg.ray_cpus_per_client, "num_gpus": cfg.ray_gpus_per_client}
        return cls(cfg.backend, cfg.workers, cfg.gpu_memory_fraction, resources)

    def require(self) -> None:
        """A one-line error where this backend cannot run here (Ray not installed): before any output."""
        if self.name == BACKEND_RAY:
            from simulations.ray_backend import require_ray

            require_ray()


@dataclass(frozen=True)
class RunOutcome:
    """What the runner tells the app when the rounds end: for its summary."""

    interrupted: bool
    wall_seconds: float
    backend: str
    workers: int  # processes that trained clients (1: this one; 0: Ray's actors)


@dataclass(frozen=True)
class SimulationResult:
    """A finished (or interrupted) run: where its outputs are (`outputs` says which), its summary."""

    output: Path
    summary: dict[str, Any]
    interrupted: bool
    outputs: str


class SimulatedApp(Protocol):
    """A Flower app as the runner runs it: a ServerApp, a ClientApp, a run config, node configs."""

    run_config: UserConfig
    num_nodes: int
    workload: Workload
    quiet: bool  # Flower's INFO log off while it runs
    app_dir: Path | None  # put on sys.path of Ray's actors

    def node_config(self, partition_id: int) -> UserConfig:
        """Node `partition_id`'s `Context.node_config`."""

    def client_app(self) -> ClientApp:
        """The ClientApp this process runs."""

    def batch_runner(self) -> RoundRunner | None:
        """This process's fast path for a whole batch (the vectorized trainer), if any."""

    def worker_side(self) -> AbstractContextManager[WorkerSide]:
        """The factories of a worker process's ClientApp and batch runner, valid inside the block."""

    def ray_client_app(self) -> ClientApp:
        """The ClientApp Flower's Ray engine gives its actors (each loads its own data)."""

    def serve(self, grid: Grid, context: Context, subscribers: Sequence[RoundCallback]) -> None:
        """The ServerApp: every round on `grid`, each round's event to `subscribers` where it tells rounds."""

    def finish(self, outcome: RunOutcome) -> SimulationResult:
        """Write the app's summary; the result."""


def simulate(
    app: SimulatedApp, backend: Backend, *, subscribers: Sequence[RoundCallback] = ()
) -> SimulationResult:
    """Run `app` on `backend` to its end or to Ctrl-C, and return its result.

    `subscribers`: extra round-event subscribers (`fedserver.events.RoundCallback`, e.g. a live
    dashboard), called after the app's own (progress bar, plot, summary) with every committed
    round's `RoundEvent`; one returning True stops the run there. Only a ServerApp that tells its
    rounds calls them: Flowerbed's does, a Flower app directory's does not.
    """
    backend.require()
    started = time.perf_counter()
    with quieter("flwr", logging.WARNING) if app.quiet else contextlib.nullcontext():
        if backend.name == BACKEND_RAY:
            interrupted, workers = _on_ray(app, backend, subscribers), 0
        else:
            interrupted, workers = _on_grid(app, backend, subscribers)
    return app.finish(RunOutcome(interrupted, time.perf_counter() - started, backend.name, workers))


def client_gpus(workload: Workload) -> int:
    """The GPUs the clients train on: every visible one, unless the app trains on the CPU."""
    return visible_gpus() if workload.on_cuda else 0


def planned_workers(workload: Workload, backend: Backend, num_nodes: int, gpus: int = 0) -> int:
    """The processes that will train the clients (1: this one) by the one rule, `worker_count`;
    for `auto` without a known run size, the count the pool gets if the first round starts it."""
    return worker_count(backend.workers, min(workload.clients_per_round, num_nodes), gpus, workload.run_examples)


def _on_grid(app: SimulatedApp, backend: Backend, subscribers: Sequence[RoundCallback]) -> tuple[bool, int]:
    """The ServerApp on an InProcessGrid, the ClientApp in this process or the worker pool; whether
    Ctrl-C ended it, and how many processes trained clients."""
    workload, gpus = app.workload, client_gpus(app.workload)
    count = planned_workers(workload, backend, app.num_nodes, gpus)
    measured = backend.workers == AUTO and workload.run_examples is None and count > 1
    with ExitStack() as stack:

        def pool(workers: int) -> RoundRunner | None:
            """`workers` processes serving the clients (None: this one), stopped when the run ends."""
            factory, batch_factory = stack.enter_context(app.worker_side()) if workers > 1 else (None, None)
            return stack.enter_context(
                client_workers(factory, workers, workload.size, gpus=gpus,  # type: ignore[arg-type] - None for 1
                               gpu_memory_fraction=backend.gpu_memory_fraction, batch_factory=batch_factory)
            )  # fmt: skip

        if measured:
            client = app.client_app()
            pool(1)  # this process's threads and VRAM until the first round has been timed
            runner: RoundRunner | None = MeasuredWorkers(client, lambda: pool(count), count, workload.startup_seconds)
        else:
            runner = pool(count) or app.batch_runner()
            client = app.client_app()
        grid = InProcessGrid(client, app.num_nodes, app.run_config, app.node_config, batch_runner=runner)
        interrupted = _until_ctrl_c(lambda: app.serve(grid, server_context(dict(app.run_config)), subscribers))
        return interrupted, (runner.workers if isinstance(runner, MeasuredWorkers) else count)


def _on_ray(app: SimulatedApp, backend: Backend, subscribers: Sequence[RoundCallback]) -> bool:
    """The ServerApp and ClientApp on Flower's Ray engine; whether Ctrl-C ended it."""
    from simulations.ray_backend import run_on_ray  # Ray loads only for a Ray run

    return run_on_ray(
        lambda grid, context: app.serve(grid, context, subscribers),
        app.ray_client_app(),
        dict(app.run_config),
        app.num_nodes,
        backend.ray_resources,
        app_dir=app.app_dir,
    )


def _until_ctrl_c(run: Callable[[], None]) -> bool:
    """Call `run`; whether Ctrl-C ended it (the run keeps what it committed)."""
    try:
        run()
    except KeyboardInterrupt:
        return True
    return False


class MeasuredWorkers:
    """`workers = "auto"` for an app whose work is not known ahead: its first training batch is
    served by `client_app` in this process and timed; where it took longer than a worker's
    start-up (`startup_seconds`), `start()` starts the pool of `count`, which serves every later batch.

    So `auto` costs at most one start-up more than in process: the pool starts only once a round
    has shown that it pays back its start-up within about a round.
    """

    def __init__(
        self, client_app: ClientApp, start: Callable[[], RoundRunner | None], count: int, startup_seconds: float
    ) -> None:
        self._client_app = client_app
        self._start = start
        self._count = count
        self._startup = startup_seconds
        self._runner: RoundRunner | None = None
        self._decided = False
        self.workers = 1
        self.first_round_seconds: float | None = None

    def __call__(self, messages: list[Message], contexts: list[Context]) -> list[Message] | None:
        if self._runner is not None:
            return self._runner(messages, contexts)
        if self._decided or not any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            return None  # the grid's ClientApp, in this process
        started = time.perf_counter()
        replies = serve_batch(self._client_app, None, messages, contexts)
        self.first_round_seconds = time.perf_counter() - started
        self._decided = True
        if self.first_round_seconds > self._startup:
            self._runner = self._start()
            self.workers = self._count
        return replies
