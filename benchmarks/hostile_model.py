#!/usr/bin/env python
"""What a device's memory does when a server asks for a model it cannot hold, against an honest
task, side by side in one command.

    .venv/bin/python benchmarks/hostile_model.py [--hidden 12000,12000] [--honest 200,200] [--max-parameters N]

Each task runs in a fresh process: fedclient.app's ClientApp, on a deployed node with the default
device policy (`max-model-parameters` 20 M), receives a training message whose run config sets
`hidden` on an MLP over 784 features, as an InProcessGrid delivers it. It prints the reply (trained,
or its error code) and the process's peak RSS before and after the task: an honest MLP and the
hostile one (153 M parameters) under the default policy, which refuses it before it is built, and
the hostile one on a node without a policy (Flowerbed before device policies), which builds it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TASK = """
import resource, sys
import numpy as np
from flwr.app import ConfigRecord, MessageType, RecordDict
from fedclient.app import make_client_app
from fedclient.policy import DevicePolicy
from shared import messages as keys
from shared.config import RunConfig
from shared.data.federation import DataSpec
from shared.recipe import model_from_config
from shared.weights import to_arrayrecord
from simulations.grid import FIRST_NODE_ID, InProcessGrid

data, hidden, policy, limit = sys.argv[1], sys.argv[2], sys.argv[3] == "policy", int(sys.argv[4])
recipe = {"dataset": "npz", "model": "mlp", "input-dim": 784, "num-classes": 10, "hidden": hidden}
owner = DevicePolicy(**({"max_model_parameters": limit} if limit else {}))
node = {"data-path": data, "device": "cpu", **(owner.to_node_config() if policy else {})}
grid = InProcessGrid(make_client_app(), 1, recipe, lambda _: node)
honest = RunConfig.from_mapping({**recipe, "hidden": sys.argv[5]})
arrays = to_arrayrecord(model_from_config(honest, DataSpec(784, 10)).state_dict())
content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
(reply,) = grid.send_and_receive([grid.create_message(content, MessageType.TRAIN, FIRST_NODE_ID, "1")])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
outcome = f"error {reply.error.code}" if reply.has_error() else "trained"
print(f"{hidden:>14}  {sys.argv[3]:>9}  {outcome:>10}  {before:6.0f} MB  {after:6.0f} MB")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", default="12000,12000", help="the hostile run config's `hidden`")
    parser.add_argument("--honest", default="200,200", help="the honest run config's `hidden`")
    parser.add_argument(
        "--max-parameters", type=int, default=0, help="the policy's `max-model-parameters` (default: the policy's)"
    )
    args = parser.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "own.npz"
        subprocess.run([sys.executable, "-c", "import numpy as np, sys; r = np.random.default_rng(0); "
                        "np.savez(sys.argv[1], x=r.random((100, 784), dtype=np.float32), y=r.integers(0, 10, 100))",
                        str(data)], check=True)  # fmt: skip
        print(f"{'hidden':>14}  {'policy':>9}  {'reply':>10}  {'peak before':>9}  {'peak after':>9}")
        for hidden, policy in ((args.honest, "policy"), (args.hidden, "policy"), (args.hidden, "none")):
            argv = [sys.executable, "-c", TASK, str(data), hidden, policy, str(args.max_parameters), args.honest]
            subprocess.run(argv, env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
