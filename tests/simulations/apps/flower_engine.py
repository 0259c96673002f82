"""Run a Flower app directory on Flower's own simulation engine (Ray), as `flwr run` does.

    python tests/simulations/apps/flower_engine.py APP_DIR NUM_SUPERNODES [RUN_CONFIG ...]

The reference for `fedsim run --app` (tests/simulations/test_apps.py): the same app, run config
and node count, the ServerApp and ClientApp on Flower's Ray engine, every node registered before
the ServerApp starts (as in fedsim). Run in its own process, so that Ray's processes end with it.
"""

import logging
import sys
import time
from pathlib import Path

import ray
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from shared.flower_compat import (
    NOOP_FEDERATION_ID,
    SUPERLINK_NODE_ID,
    EventType,
    new_run,
    run_simulation_with_context,
    set_task_identity,
)
from simulations.apps import load_flower_app


def once_all_registered(server_app: ServerApp, nodes: int) -> ServerApp:
    """The app's ServerApp, called once Flower's engine has registered all its nodes.

    Flower's engine starts the ServerApp while it registers the nodes, so a strategy that waits
    for fewer than all (FedAvg waits for 2) may sample fewer in its first round.
    """
    waiting = ServerApp()

    @waiting.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < nodes:
            time.sleep(0.1)
        server_app(grid=grid, context=context)

    return waiting


def main(directory: str, num_supernodes: str, *run_config: str) -> None:
    app = load_flower_app(Path(directory), list(run_config), int(num_supernodes))
    run = new_run(1, override_config=app.run_config, primary_task_id=1, federation_id=NOOP_FEDERATION_ID)
    set_task_identity(task_id=1, run_id=1, node_id=SUPERLINK_NODE_ID)
    context = Context(run_id=1, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=app.run_config)
    logging.getLogger("flwr").setLevel(logging.INFO)  # its "Sampled N nodes" lines show a short round
    try:
        run_simulation_with_context(
            num_supernodes=app.num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=app.load_client_app(),
            server_app=once_all_registered(app.load_server_app(), app.num_supernodes),
            backend_name="ray",
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 2, "logging_level": "error", "log_to_driver": False}},
            server_app_context=context,
            app_dir=str(app.directory),
            run=run,
            is_app=True,
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
