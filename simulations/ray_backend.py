"""`backend = "ray"`: the runner's app on Flower's own Ray simulation engine.

The ServerApp runs in the thread Flower's engine gives it, the ClientApps in Ray actors (on the
cluster `RAY_ADDRESS` names, if any). Ctrl-C reaches the main thread, where the engine runs: the
ServerApp's grid then raises KeyboardInterrupt at its next call, so the run ends with what it did.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedserver.polling import FastPollingGrid
from shared.errors import ExitCode, FedsimError, FlowerbedError
from simulations.ray_engine import run_on_ray_engine

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
