"""The ClientApp on a deployed node: its own data file, its own device, the reply's shape."""

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedclient.app import app
from shared import messages as keys
from shared.config import RunConfig
from shared.data.federation import data_spec
from shared.recipe import model_from_config
from shared.weights import to_arrayrecord, validate_update
from simulations.grid import InProcessGrid, simulation_node_config


def test_a_deployed_node_trains_on_its_own_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "local.npz"
    np.savez(path, x=rng.random((40, 5), dtype=np.float32), y=rng.integers(0, 3, 40))
    cfg = RunConfig.from_mapping({"dataset": "npz", "input-dim": 5, "num-classes": 3, "hidden": "4"})
    global_arrays = to_arrayrecord(model_from_config(cfg, data_spec(cfg)).state_dict())
    InProcessGrid(app, 1, {}, simulation_node_config(1))  # the identity a server-side message needs
    msg = Message(RecordDict({keys.ARRAYS: global_arrays, keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}), 7, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(7, 7, {"data-path": str(path), "device": "cpu"}, RecordDict(), cfg.to_mapping())

    reply = app(msg, context)

    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == 32  # 40 minus the 20 % held out
    validate_update(global_arrays, reply.content[keys.ARRAYS])
