"""fedsim's engine: build the federation, run the deployment's ServerApp on an in-process Grid.

The ServerApp's rounds (`fedserver.app.run_federation`) and the ClientApp (`fedclient.app`)
are the very code a deployment runs (`--client-app` puts a user's ClientApp in its place,
`simulations/client_apps.py`); this module only wires them together, adds simulated
stragglers on the grid, starts the pool of worker processes `workers` asks for, and
subscribes a progress bar, a live plot and the summary to the round events.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedclient.app import app as client_app
from fedclient.app import make_client_app
from fedserver.app import evaluated_on, run_federation
from fedserver.checkpoints import STATE_FILE, RunDirectory
from fedserver.events import RoundCallback
from fedserver.report import CURVES_FILE, SUMMARY_FILE, Summary, run_title, summarize, write_summary
from shared import task
from shared.config import ConfigError, RunConfig
from shared.data.federation import load_federation, shared_federation, with_shared_data
from shared.errors import FedsimError, FlowerbedError
from shared.files import atomic_write_text
from shared.logs import quieter
from simulations.client_apps import ImportedClientApp
from simulations.grid import InProcessGrid, RoundRunner, simulation_node_config
from simulations.plotter import LivePlot, PlotError
from simulations.report import ProgressBar
from simulations.stragglers import with_stragglers
from simulations.vectorized import batch_runner_for, vectorizes
from simulations.workers import AUTO, WorkerPool, client_workers, visible_gpus, worker_count

LOG = logging.getLogger("flowerbed.sim")
CONFIG_FILE = "config.toml"
SIZE_SAMPLE = 20  # clients whose training sizes estimate a run's size for `workers = "auto"`
LABELS_FILE = "labels.json"  # {class name: id}, where the data named its classes in text


@dataclass(frozen=True)
class SimulationResult:
    output: Path
    summary: Summary
    interrupted: bool


def resolve(cfg: RunConfig) -> RunConfig:
    """The config as it will run: a natural split fixes the number of clients."""
    federation = load_federation(cfg)
    if federation.num_clients != cfg.num_clients:
        cfg = cfg.replace(num_clients=federation.num_clients)
    return cfg


class OutputExists(FedsimError, ValueError):
    """The output directory already holds a run, and this is not a resumption of it."""


def run_simulation(
    cfg: RunConfig, output: Path, *, progress: bool = True, resume: bool = False, client_app: str = ""
) -> SimulationResult:
    """Run every round of `cfg`, its clients in this process or in `workers` processes; write all outputs to `output`.

    With `resume`, `output` must hold a run: it goes on after its last committed round. With
    `client_app` (MODULE:ATTR) every node runs that ClientApp instead of Flowerbed's own. With
    `backend = "ray"` the clients run on Flower's Ray engine instead (simulations/ray_backend.py).
    """
    own_app = ImportedClientApp(client_app)() if client_app else None  # a wrong one fails before any output
    if own_app is not None and cfg.vectorized == "on":
        raise ConfigError("config key 'vectorized' is 'on': a vectorized round runs no ClientApp, not --client-app")
    if cfg.backend == "ray":
        from simulations.ray_backend import run_simulation_on_ray  # Ray loads only for a Ray run

        return run_simulation_on_ray(cfg, output, progress=progress, resume=resume, client_app=own_app)
    cfg = prepare_output(cfg, output, resume)
    with _worker_pool(cfg, client_app) as pool:
        return _run(cfg, output, pool, progress, own_app)


def prepare_output(cfg: RunConfig, output: Path, resume: bool) -> RunConfig:
    """The config as it will run, its `run-dir` `output`, written there with the labels; a new
    run's `output` must hold no run, a resumed one's must (else OutputExists)."""
    if (output / STATE_FILE).exists() != resume:
        raise OutputExists(
            f"{output} already holds a run: resume it with --resume {output} or choose another --output"
            if not resume
            else f"{output} holds no run to resume ({STATE_FILE} is missing)"
        )
    cfg = resolve(cfg).replace(run_dir=str(output.resolve()))
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / CONFIG_FILE, cfg.to_toml())
    write_labels(cfg, output)
    return cfg


def _run(
    cfg: RunConfig, output: Path, pool: WorkerPool | None, progress: bool, own_app: ClientApp | None
) -> SimulationResult:
    grid = InProcessGrid(
        own_app or client_app,
        cfg.num_clients,
        cfg.to_mapping(),
        simulation_node_config(cfg.num_clients),
        batch_runner=_batch_runner(cfg, pool, own_app),
    )
    return run_rounds(grid, cfg, output, progress)


def _batch_runner(cfg: RunConfig, pool: WorkerPool | None, own_app: ClientApp | None) -> RoundRunner | None:
    """The worker pool where there is one; else the vectorized path where it applies, never with a
    user's ClientApp (the vectorized path runs no ClientApp)."""
    if pool is not None:
        return pool
    return None if own_app is not None else batch_runner_for(cfg)


def run_rounds(grid: Grid, cfg: RunConfig, output: Path, progress: bool) -> SimulationResult:
    """The ServerApp's rounds of `cfg` on `grid` (stragglers added), each round's event to the
    metrics rows, the live plot and the progress bar; then the summary. Ctrl-C ends the run
    with what it did."""
    rows = RunDirectory(output).history()
    plot = LivePlot(output / CURVES_FILE, run_title(cfg), rows=rows)
    subscribers: list[RoundCallback] = [lambda event: rows.append(event.row()), plot]
    if progress:
        subscribers.append(ProgressBar())
    interrupted = False
    with quiet_flower():
        try:
            run_federation(with_stragglers(grid, cfg), cfg, on_round=subscribers)
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            plot.cancel()  # the run failed: no plot, and no plotting process left behind
            raise
    summary = summarize(rows, cfg.target_accuracy, evaluated_on(cfg))
    write_summary(output / SUMMARY_FILE, summary)
    _finish(plot)
    return SimulationResult(output, summary, interrupted)


@contextlib.contextmanager
def _worker_pool(cfg: RunConfig, client_app: str) -> Iterator[WorkerPool | None]:
    """The pool of `workers` processes serving the clients (see simulations/workers.py), or None
    for the clients in this process; stopped, every worker with it, when the run ends. Each
    worker runs Flowerbed's ClientApp, or the one `client_app` (MODULE:ATTR) names. Where the
    run is vectorized (never with `client_app`), each worker trains its share of a round on the
    vectorized path.

    The workers build their federation from the dataset's arrays as read here, memory-mapped
    (`shared_federation`), not from the file: one copy, read once, whatever their number.
    """
    gpus = _cuda_devices(cfg)
    workers = planned_workers(cfg, gpus)
    app_factory: Callable[[], ClientApp] = ImportedClientApp(client_app) if client_app else make_client_app
    if workers == 1:  # in this process, its VRAM capped on CUDA
        with client_workers(app_factory, 1, gpus=gpus, gpu_memory_fraction=cfg.gpu_memory_fraction) as pool:
            yield pool
        return
    vectorized = functools.partial(batch_runner_for, cfg) if vectorizes(cfg) and not client_app else None
    with (
        shared_federation(cfg) as data,
        client_workers(
            functools.partial(with_shared_data, data, app_factory),
            workers,
            training_size(cfg),
            gpus=gpus,
            gpu_memory_fraction=cfg.gpu_memory_fraction,
            batch_factory=vectorized,
        ) as pool,
    ):
        yield pool


def planned_workers(cfg: RunConfig, gpus: int = 0) -> int:
    """The worker processes the run will use (1: in this process); `auto` weighs the run's size."""
    run_examples = estimated_run_examples(cfg) if cfg.workers == AUTO else None
    return worker_count(cfg.workers, cfg.clients_per_round, gpus, run_examples)


def estimated_run_examples(cfg: RunConfig) -> int:
    """Examples the whole run trains on: rounds x clients a round x local epochs x a client's
    mean training size, estimated from up to SIZE_SAMPLE clients spread over the federation."""
    federation = load_federation(cfg)
    step = max(1, federation.num_clients // SIZE_SAMPLE)
    sample = range(0, federation.num_clients, step)[:SIZE_SAMPLE]
    mean_size = sum(len(federation.client(k).y_train) for k in sample) / len(sample)
    return int(cfg.rounds * cfg.clients_per_round * cfg.local_epochs * mean_size)


def _cuda_devices(cfg: RunConfig) -> int:
    """The GPUs the clients train on: every visible one where `device` resolves to CUDA, else none."""
    try:
        on_cuda = task.resolve_device(cfg.device).type == "cuda"
    except ValueError:  # the ClientApp will report the bad device
        return 0
    return visible_gpus() if on_cuda else 0


def training_size(cfg: RunConfig) -> Callable[[Context], int]:
    """A node's number of training examples (read once per node), to schedule the largest first."""
    federation = load_federation(cfg)
    sizes: dict[int, int] = {}

    def size(context: Context) -> int:
        partition_id = int(context.node_config.get("partition-id", -1))
        if partition_id not in sizes:
            try:
                sizes[partition_id] = len(federation.client(partition_id).y_train)
            except FlowerbedError:  # not a partition: the ClientApp will say so
                sizes[partition_id] = 0
        return sizes[partition_id]

    return size


def write_labels(cfg: RunConfig, output: Path) -> None:
    """Save the map of text class labels to ids with the run, so its predictions can be named."""
    classes = load_federation(cfg).classes  # cached: the federation `resolve` read
    if classes is not None:
        labels = {name: label_id for label_id, name in enumerate(classes)}
        atomic_write_text(output / LABELS_FILE, json.dumps(labels, indent=2) + "\n")


def _finish(plot: LivePlot) -> None:
    """The final plot; one that cannot be drawn is a warning, the run's other outputs stand."""
    try:
        plot.close()
    except PlotError as err:
        LOG.warning("%s", err)


def quiet_flower() -> contextlib.AbstractContextManager[None]:
    """Flower logs every sampling and aggregation at INFO; fedsim shows its own progress."""
    return quieter("flwr", logging.WARNING)
