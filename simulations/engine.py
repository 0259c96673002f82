"""fedsim's engine: build the federation, run the deployment's ServerApp on an in-process Grid.

The ServerApp (`fedserver.app`) and ClientApp (`fedclient.app`) are the very objects a
deployment runs; this module only wires them together and turns the run directory the
ServerApp writes into a summary and a plot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fedclient.app import app as client_app
from fedserver.app import ROUND_LOGGER
from fedserver.app import app as server_app
from fedserver.checkpoints import STATE_FILE, read_metrics
from shared.config import RunConfig
from shared.data.federation import load_federation
from shared.errors import FedsimError
from shared.files import atomic_write_text
from simulations.grid import InProcessGrid, server_context, simulation_node_config
from simulations.plotter import LivePlot
from simulations.report import ProgressBar, Row, RoundRowHandler, summarize, write_summary
from simulations.vectorized import batch_runner_for

CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
LABELS_FILE = "labels.json"  # {class name: id}, where the data named its classes in text


@dataclass(frozen=True)
class SimulationResult:
    output: Path
    summary: dict[str, float | int | None]
    interrupted: bool


def resolve(cfg: RunConfig) -> RunConfig:
    """The config as it will run: a natural split fixes the number of clients."""
    federation = load_federation(cfg)
    if federation.num_clients != cfg.num_clients:
        cfg = cfg.replace(num_clients=federation.num_clients)
    return cfg


class OutputExists(FedsimError, ValueError):
    """The output directory already holds a run, and this is not a resumption of it."""


def run_simulation(cfg: RunConfig, output: Path, *, progress: bool = True, resume: bool = False) -> SimulationResult:
    """Run every round of `cfg` with its clients in this process; write all outputs to `output`.

    With `resume`, `output` must hold a run: it goes on after its last committed round.
    """
    if (output / STATE_FILE).exists() != resume:
        raise OutputExists(
            f"{output} already holds a run: resume it with --resume {output} or choose another --output"
            if not resume
            else f"{output} holds no run to resume ({STATE_FILE} is missing)"
        )
    cfg = resolve(cfg).replace(run_dir=str(output))
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / CONFIG_FILE, cfg.to_toml())
    write_labels(cfg, output)
    run_config = cfg.to_mapping()
    grid = InProcessGrid(
        client_app,
        cfg.num_clients,
        run_config,
        simulation_node_config(cfg.num_clients),
        batch_runner=batch_runner_for(cfg),
    )
    started = time.perf_counter()
    interrupted = False
    plot = LivePlot(output / CURVES_FILE, title=output.name, rows=read_metrics(output))
    with _quiet_flower(), _on_rounds(_progress_handlers(cfg.rounds if progress else 0) + [plot.add]):
        try:
            server_app(grid, server_context(run_config))
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            plot.cancel()  # the run failed: no plot, and no plotting process left behind
            raise
    rows = read_metrics(output)
    summary = summarize(rows, cfg.target_accuracy, time.perf_counter() - started)
    write_summary(output / SUMMARY_FILE, summary)
    plot.close()
    return SimulationResult(output, summary, interrupted)


def write_labels(cfg: RunConfig, output: Path) -> None:
    """Save the map of text class labels to ids with the run, so its predictions can be named."""
    classes = load_federation(cfg).classes  # cached: the federation `resolve` read
    if classes is not None:
        labels = {name: label_id for label_id, name in enumerate(classes)}
        atomic_write_text(output / LABELS_FILE, json.dumps(labels, indent=2) + "\n")


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower logs every sampling and aggregation at INFO; fedsim shows its own progress."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _progress_handlers(total_rounds: int) -> list[Callable[[Row], None]]:
    return [ProgressBar(total_rounds)] if total_rounds else []


@contextlib.contextmanager
def _on_rounds(callbacks: list[Callable[[Row], None]]) -> Iterator[None]:
    """Hand each row the ServerApp logs at the end of a round to every callback."""
    handler = RoundRowHandler(callbacks)
    level = ROUND_LOGGER.level
    ROUND_LOGGER.addHandler(handler)
    ROUND_LOGGER.setLevel(logging.INFO)
    try:
        yield
    finally:
        ROUND_LOGGER.removeHandler(handler)
        ROUND_LOGGER.setLevel(level)
