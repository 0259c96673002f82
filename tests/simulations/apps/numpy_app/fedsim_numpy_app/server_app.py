"""fedsim-numpy-app: FedAvg's own `start` loop, from a zero array."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg with every node each round; save the final array where `result-path` says."""
    result = FedAvg().start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(3)]),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
    path = str(context.run_config["result-path"])
    if path:
        np.save(path, result.arrays.to_numpy_ndarrays()[0])
