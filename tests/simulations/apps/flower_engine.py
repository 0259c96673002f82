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

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from simulations.ray_engine import run_on_ray_engine
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
    logging.getLogger("flwr").setLevel(logging.INFO)  # its "Sampled N nodes" lines show a short round
    run_on_ray_engine(
        client_app=app.load_client_app(),
        server_app=once_all_registered(app.load_server_app(), app.num_supernodes),
        run_config=app.run_config,
        num_supernodes=app.num_supernodes,
        app_dir=str(app.directory),
        num_cpus=2,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
