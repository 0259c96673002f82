"""Flower's own simulation engine (Ray) running a ServerApp and a ClientApp: the orchestration of
`backend = "ray"`, as `flwr run` -> flower-simulation does it; the Flower internals it needs
come from `shared.flower_compat`."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from shared.flower_compat.app_config import app_manifest
from shared.flower_compat.messages import SUPERLINK_NODE_ID
from shared.flower_compat.runs import NOOP_FEDERATION_ID, new_run, set_task_identity

# The manifest of the app directory written for a run given without one: Flower requires components,
# but runs the app objects it is given.
RAY_APP = "flowerbed-ray-run"
GIVEN_COMPONENTS = {"serverapp": "given:server_app", "clientapp": "given:client_app"}


def run_on_ray_engine(
    *,
    client_app: Any,
    server_app: Any,
    run_config: dict[str, Any],
    num_supernodes: int,
    app_dir: str | None = None,
    num_cpus: int | None = None,
    client_resources: dict[str, float] | None = None,
) -> None:
    """Run `server_app` and `client_app` on Flower's own simulation engine (Ray), as
    `flwr run` -> flower-simulation does: an app directory whose pyproject.toml holds the run
    config (without `app_dir`, a temporary one holding `run_config`), and a ServerApp Context
    carrying `run_config`. Each running ClientApp reserves `client_resources` (Flower's
    `num_cpus`/`num_gpus`; default one CPU); Ray is shut down (or disconnected) afterwards.

    Flower calls `ray.init(**init_args)` with no address, so Ray joins the cluster `RAY_ADDRESS`
    names, else one started with `ray start` on this machine, else starts a local instance of
    `num_cpus` CPUs (default: every core). `num_cpus` must be None when joining a cluster.

    Relies on `flwr.simulation.run_simulation._run_simulation` (the public `run_simulation()`
    takes no run config) and its keyword arguments, and needs the `ray` extra.
    """
    run = new_run(1, override_config=run_config, primary_task_id=1, federation_id=NOOP_FEDERATION_ID)
    set_task_identity(task_id=1, run_id=1, node_id=SUPERLINK_NODE_ID)
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=run_config)
    init_args: dict[str, Any] = {"logging_level": "error", "log_to_driver": False}
    if num_cpus is not None:
        init_args["num_cpus"] = num_cpus
    backend_config = {
        "client_resources": client_resources or {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": init_args,
    }
    import ray

    # Flower's simulation package: seconds to import
    from shared.flower_compat.stock_flower import EventType, run_simulation_with_context

    try:
        with _app_directory(app_dir, run_config) as directory, warnings.catch_warnings():
            # Ray's tip that a later Ray stops hiding GPUs from actors that reserve none (as today).
            warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)
            run_simulation_with_context(
                num_supernodes=num_supernodes,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server_app,
                backend_name="ray",
                backend_config=backend_config,
                server_app_context=context,
                app_dir=directory,
                run=run,
                is_app=True,
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def _app_directory(app_dir: str | None, run_config: dict[str, Any]) -> Iterator[str]:
    """`app_dir`, or a temporary directory whose pyproject.toml has `run_config` as its
    `[tool.flwr.app.config]`: where Flower's engine reads the ClientApps' run config from."""
    if app_dir is not None:
        yield app_dir
        return
    with tempfile.TemporaryDirectory(prefix="flowerbed-ray-app-") as directory:
        manifest = app_manifest(RAY_APP, "0.1.0", GIVEN_COMPONENTS, run_config)
        (Path(directory) / "pyproject.toml").write_text(manifest, encoding="utf-8")
        yield directory
