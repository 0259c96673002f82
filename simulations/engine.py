"""Flowerbed's own app for the runner: the deployment's ServerApp and ClientApp on the run's data.

`flowerbed_app` reads the federation once and hands it to the ServerApp, this process's ClientApp
and (through shared memory) the worker processes; its round subscribers are the metrics rows,
the live plot, the progress bar and the summary. `run_simulation` runs it (simulations/runner.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedclient.app import ClientRuntimes, make_client_app
from fedclient.app import app as flowerbed_client_app
from fedserver.app import evaluated_on, run_federation
from fedserver.checkpoints import STATE_FILE, RunDirectory
from fedserver.events import RoundCallback
from fedserver.report import CURVES_FILE, SUMMARY_FILE, run_title, summarize, write_summary
from shared import task
from shared.config import ConfigError, RunConfig
from shared.data.federation import Federation, load_federation, open_source, shared_source
from shared.errors import FedsimError, FlowerbedError
from shared.files import atomic_write_text
from simulations.client_apps import ImportedClientApp
from simulations.grid import RoundRunner, simulation_node_config
from simulations.plotter import LivePlot, PlotError
from simulations.report import ProgressBar
from simulations import runner
from simulations.runner import Backend, RunOutcome, SimulationResult, Workload, WorkerSide, client_gpus, simulate
from simulations.stragglers import with_stragglers
from simulations.vectorized import batch_runner_for, vectorizes
from simulations.workers import AUTO

LOG = logging.getLogger("flowerbed.sim")
CONFIG_FILE = "config.toml"
SIZE_SAMPLE = 20  # clients whose training sizes estimate a run's size for `workers = "auto"`
LABELS_FILE = "labels.json"  # {class name: id}, where the data named its classes in text
OUTPUTS = "config.toml, metrics.jsonl, summary.json, curves.png, model.safetensors"

class OutputExists(FedsimError, ValueError):
    """The output directory already holds a run, and this is not a resumption of it."""


def run_simulation(
    cfg: RunConfig,
    output: Path,
    *,
    progress: bool = True,
    resume: bool = False,
    client_app: str = "",
    subscribers: Sequence[RoundCallback] = (),
) -> SimulationResult:
    """Every round of `cfg`, on the backend its execution keys name, all outputs in `output`.

    With `resume`, `output` must hold a run: it goes on after its last committed round. With
    `client_app` (MODULE:ATTR) every node runs that ClientApp instead of Flowerbed's own.
    `subscribers` get every round's event after fedsim's own (`runner.simulate`).
    """
    backend = Backend.from_config(cfg)
    backend.require()
    with flowerbed_app(cfg, output, progress=progress, resume=resume, client_app=client_app) as app:
        return simulate(app, backend, subscribers=subscribers)


@contextlib.contextmanager
def flowerbed_app(
    cfg: RunConfig, output: Path, *, progress: bool = True, resume: bool = False, client_app: str = ""
) -> Iterator[FlowerbedApp]:
    """Flowerbed's app for `cfg`, its output directory prepared; a run that fails leaves no
    plotting process behind."""
    own_app = ImportedClientApp(client_app) if client_app else None
    if own_app is not None:
        own_app()  # a wrong one fails before any output
        if cfg.vectorized == "on":
            raise ConfigError("config key 'vectorized' is 'on': a vectorized round runs no ClientApp, not --client-app")
    federation = load_federation(cfg)
    cfg = prepare_output(cfg, federation, output, resume)
    app = FlowerbedApp(cfg, output, federation, progress=progress, own_app=own_app)
    try:
        yield app
    except BaseException:
        app.plot.cancel()  # the run failed: no plot, and no plotting process left behind
        raise


@dataclass
class FlowerbedClients:
    """A process's Flowerbed ClientApp (`make_app`) and vectorized runner (`make_batch_runner`) on
    the run's federation. Picklable: a worker process builds its own federation on the arrays
    shared in `shared` (memory-mapped); `federation`, where this process has it, is not pickled."""

    cfg: RunConfig
    shared: str | None = None
    federation: Federation | None = None
    make_app: Callable[[ClientRuntimes], ClientApp] = make_client_app
    make_batch_runner: Callable[[RunConfig, Federation], RoundRunner | None] = batch_runner_for

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "federation": None}

    def data(self) -> Federation:
        if self.federation is None:
            self.federation = load_federation(self.cfg, open_source(self.shared) if self.shared else None)
        return self.federation

    def __call__(self) -> ClientApp:
        return self.make_app(ClientRuntimes(federation=self.data()))

    def batch_runner(self) -> RoundRunner | None:
        return self.make_batch_runner(self.cfg, self.data())


class FlowerbedApp:
    """Flowerbed's ServerApp and ClientApp (or `own_app`'s) for `cfg`, on `federation`: a `runner.SimulatedApp`."""

    quiet = True
    app_dir = None

    def __init__(
        self, cfg: RunConfig, output: Path, federation: Federation, *, progress: bool, own_app: ImportedClientApp | None
    ) -> None:
        self.cfg, self.output, self.federation = cfg, output, federation
        self.run_config: UserConfig = cfg.to_mapping()
        self.num_nodes = cfg.num_clients
        self.node_config = simulation_node_config(cfg.num_clients)
        self._own_app = own_app
        self.rows = RunDirectory(output).history()
        self.plot = LivePlot(output / CURVES_FILE, run_title(cfg), rows=self.rows)
        self._progress = progress
        self.workload = workload(cfg, federation, size=self._training_size())

    def client_app(self) -> ClientApp:
        if self._own_app is not None:
            return self._own_app()
        return self._clients()()

    def batch_runner(self) -> RoundRunner | None:
        """The vectorized path where it applies, never with a user's ClientApp (it runs no ClientApp)."""
        return None if self._own_app is not None else batch_runner_for(self.cfg, self.federation)

    @contextlib.contextmanager
    def worker_side(self) -> Iterator[WorkerSide]:
        """The dataset's arrays saved once for the workers, which map them; this process builds on
        the mapped arrays too, so the dataset is in memory once. Each worker runs Flowerbed's
        ClientApp (vectorized where the run is) or the user's."""
        with shared_source(self.federation, self.cfg) as shared:
            if shared is not None:
                self.federation = load_federation(self.cfg, open_source(shared))
            if self._own_app is not None:
                yield self._own_app, None
                return
            clients = self._clients(shared)
            yield clients, (clients.batch_runner if vectorizes(self.cfg, self.federation) else None)

    def _clients(self, shared: str | None = None) -> FlowerbedClients:
        return FlowerbedClients(self.cfg, shared, self.federation, make_client_app, batch_runner_for)

    def ray_client_app(self) -> ClientApp:
        return self._own_app() if self._own_app is not None else flowerbed_client_app

    def serve(self, grid: Grid, context: Context, subscribers: Sequence[RoundCallback]) -> None:
        """The ServerApp's rounds (stragglers added), each round to the rows, plot, progress bar, then `subscribers`."""
        own: list[RoundCallback] = [lambda event: self.rows.append(event.row()), self.plot]
        if self._progress:
            own.append(ProgressBar())
        run_federation(with_stragglers(grid, self.cfg), self.cfg, on_round=[*own, *subscribers],
                       federation=self.federation)  # fmt: skip

    def finish(self, outcome: RunOutcome) -> SimulationResult:
        summary = summarize(self.rows, self.cfg.target_accuracy, evaluated_on(self.cfg, self.federation))
        write_summary(self.output / SUMMARY_FILE, summary)
        try:
            self.plot.close()
        except PlotError as err:  # the run's other outputs stand
            LOG.warning("%s", err)
        return SimulationResult(self.output, summary, outcome.interrupted, OUTPUTS)

    def _training_size(self) -> Callable[[Context], int]:
        """A node's number of training examples (read once per node), to schedule the largest first."""
        sizes: dict[int, int] = {}

        def size(context: Context) -> int:
            partition_id = int(context.node_config.get("partition-id", -1))
            if partition_id not in sizes:
                try:
                    sizes[partition_id] = len(self.federation.client(partition_id).y_train)
                except FlowerbedError:  # not a partition: the ClientApp will say so
                    sizes[partition_id] = 0
            return sizes[partition_id]

        return size


def prepare_output(cfg: RunConfig, federation: Federation, output: Path, resume: bool) -> RunConfig:
    """The config as it will run (a natural split fixes `num-clients`; `run-dir` is `output`),
    written there with the labels; a new run's `output` must hold no run, a resumed one's must."""
    if (output / STATE_FILE).exists() != resume:
        raise OutputExists(
            f"{output} already holds a run: resume it with --resume {output} or choose another --output"
            if not resume
            else f"{output} holds no run to resume ({STATE_FILE} is missing)"
        )
    cfg = cfg.replace(num_clients=federation.num_clients, run_dir=str(output.resolve()))
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / CONFIG_FILE, cfg.to_toml())
    write_labels(federation, output)
    return cfg


def workload(cfg: RunConfig, federation: Federation, size: Callable[[Context], int] | None = None) -> Workload:
    """What the runner knows of `cfg`'s work ahead: clients a round, the run's size (for `auto`), the device."""
    run_examples = estimated_run_examples(cfg, federation) if cfg.workers == AUTO else None
    return Workload(cfg.clients_per_round, run_examples, size=size, on_cuda=_on_cuda(cfg))


def planned_workers(cfg: RunConfig) -> int:
    """The processes `cfg`'s clients will train in (1: in this process), by the runner's rule."""
    work = workload(cfg, load_federation(cfg))
    return runner.planned_workers(work, Backend.from_config(cfg), cfg.num_clients, client_gpus(work))


def estimated_run_examples(cfg: RunConfig, federation: Federation) -> int:
    """Examples the whole run trains on: rounds x clients a round x local epochs x a client's
    mean training size, estimated from up to SIZE_SAMPLE clients spread over the federation."""
    step = max(1, federation.num_clients // SIZE_SAMPLE)
    sample = range(0, federation.num_clients, step)[:SIZE_SAMPLE]
    mean_size = sum(len(federation.client(k).y_train) for k in sample) / len(sample)
    return int(cfg.rounds * cfg.clients_per_round * cfg.local_epochs * mean_size)


def _on_cuda(cfg: RunConfig) -> bool:
    """Whether `device` resolves to CUDA (a bad device: no; the ClientApp reports it)."""
    try:
        return task.resolve_device(cfg.device).type == "cuda"
    except ValueError:
        return False


def write_labels(federation: Federation, output: Path) -> None:
    """Save the map of text class labels to ids with the run, so its predictions can be named."""
    if federation.classes is not None:
        labels = {name: label_id for label_id, name in enumerate(federation.classes)}
        atomic_write_text(output / LABELS_FILE, json.dumps(labels, indent=2) + "\n")
