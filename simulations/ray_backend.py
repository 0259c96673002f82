"""`backend = "ray"`: a fedsim run, or a Flower app (`--app`), on Flower's own Ray simulation engine.

The ServerApp runs in this process, in the thread Flower's engine gives it, on Flower's
in-memory grid; the ClientApps run in Ray actors, on this machine or on the Ray cluster that
`RAY_ADDRESS` names (Flower starts Ray through shared/flower_compat.py). A fedsim run goes
through `engine.run_rounds`, so its outputs and round subscribers are those of the fedsim
backend; an app's run is counted into the same timing summary as on fedsim's grid.

Ctrl-C reaches the main thread, where Flower's engine runs, not the ServerApp's thread: the
grid the ServerApp gets raises KeyboardInterrupt there at its next call, so the run ends
with what it did, as on fedsim's own grid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedclient.app import app as flowerbed_client_app
from fedserver.polling import FastPollingGrid
from shared.config import RunConfig
from shared.errors import ExitCode, FedsimError, FlowerbedError
from simulations.ray_engine import run_on_ray_engine
from simulations.engine import SimulationResult, prepare_output, quiet_flower, run_rounds

RAY_EXTRA = "pip install -e '.[ray]'"
PULL_SECONDS = 0.1  # between pulls of replies once one came, as Flower's in-memory grid

ServerMain = Callable[[Grid, Context], None]


class RayMissing(FedsimError, RuntimeError):
    """`backend = "ray"` where Ray is not installed."""


class RayEngineError(FedsimError, RuntimeError):
    """Flower's Ray engine could not run the clients (it logs why in full)."""

    exit_code = ExitCode.FAILED


def require_ray() -> None:
    """Raise RayMissing, naming the extra that installs it, unless Ray can be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayMissing(f"backend 'ray' needs Ray, which is not installed: {RAY_EXTRA}") from None


def run_simulation_on_ray(
    cfg: RunConfig, output: Path, *, progress: bool = True, resume: bool = False, client_app: ClientApp | None = None
) -> SimulationResult:
    """`engine.run_simulation` with the clients on Flower's Ray engine: `num-clients` SuperNodes
    running `fedclient.app:app` (or `client_app`), each reserving `ray-cpus-per-client` and
    `ray-gpus-per-client`."""
    require_ray()
    cfg = prepare_output(cfg, output, resume)
    results: list[SimulationResult] = []

    def server_main(grid: Grid, context: Context) -> None:
        results.append(run_rounds(grid, cfg, output, progress))

    with quiet_flower():
        interrupted = run_on_ray(
            server_main,
            client_app or flowerbed_client_app,
            cfg.to_mapping(),
            cfg.num_clients,
            {"num_cpus": cfg.ray_cpus_per_client, "num_gpus": cfg.ray_gpus_per_client},
        )
    if not results:  # Ctrl-C before the ServerApp started
        raise KeyboardInterrupt
    result = results[0]
    return SimulationResult(result.output, result.summary, result.interrupted or interrupted)


def run_on_ray(
    server_main: ServerMain,
    clients: ClientApp,
    run_config: dict[str, object],
    num_supernodes: int,
    client_resources: dict[str, float] | None = None,
    app_dir: Path | None = None,
) -> bool:
    """Run `server_main` as the ServerApp and `clients` on `num_supernodes` SuperNodes of Flower's
    Ray engine; return whether Ctrl-C interrupted it (after the ServerApp's thread has ended).

    `server_main` is called once every node is registered, as on fedsim's grid (Flower's engine
    alone starts the ServerApp while it registers them, so a first round may sample fewer). It
    gets a grid that raises KeyboardInterrupt once Ctrl-C has reached this thread.
    """
    require_ray()
    stop, started, finished = threading.Event(), threading.Event(), threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        started.set()
        grid = InterruptibleGrid(grid, stop)
        try:
            while len(list(grid.get_node_ids())) < num_supernodes:  # Flower's engine registers them meanwhile
                time.sleep(PULL_SECONDS)
            server_main(grid, context)
        except KeyboardInterrupt:
            pass  # raised by the grid after Ctrl-C: the main thread reports it
        finally:
            finished.set()

    try:
        run_on_ray_engine(
            client_app=clients,
            server_app=server_app,
            run_config=dict(run_config),
            num_supernodes=num_supernodes,
            app_dir=None if app_dir is None else str(app_dir),
            client_resources=client_resources,
        )
    except KeyboardInterrupt:
        return True
    except FlowerbedError:  # the ServerApp's own (e.g. a round without quorum), re-raised by Flower's engine
        raise
    except RuntimeError as err:  # Flower's engine failed, its cause logged (e.g. no actor fits the resources)
        raise RayEngineError(f"Flower's Ray engine stopped: {_first_cause(err)}") from err
    finally:  # Flower's engine has ended, the ServerApp's thread may not have: end it
        stop.set()
        if started.is_set():
            finished.wait()
    return False


class InterruptibleGrid(FastPollingGrid):
    """Flower's simulation grid, raising KeyboardInterrupt at its next call once `stop` is set.

    Its replies are polled here (Flower's own `send_and_receive` would go on waiting for them).
    """

    def __init__(self, inner: Grid, stop: threading.Event) -> None:
        super().__init__(inner, PULL_SECONDS)
        self.stop = stop

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self.inner.pull_messages(message_ids)

    def _check(self) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt


def _first_cause(err: BaseException) -> str:
    """The exception that started the chain `err` ends, as one line (Flower wraps it twice)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__
