"""The ClientApp: unpack the message, train or evaluate with `shared.task`, pack the reply.

Which data a node trains on comes from `context.node_config`: `partition-id` in a
simulation (a view of the federation's dataset), `data-path` in a deployment (the
device's own file, which never leaves it).
"""

from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared import messages as keys
from shared import task
from shared.config import RunConfig
from shared.data.federation import ClientData, data_spec, load_federation, load_local
from shared.recipe import model_from_config
from shared.secagg import secagg_mod
from shared.weights import to_arrayrecord, to_state_dict

app = ClientApp(mods=[secagg_mod])  # passes every non-SecAgg message straight through


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's data and reply with the new weights."""
    cfg = node_run_config(context)
    data = node_data(cfg, context)
    model = _model_with(cfg, msg.content[keys.ARRAYS])
    config: ConfigRecord = msg.content[keys.CONFIG]
    result = task.train(
        model,
        data.x_train,
        data.y_train,
        epochs=int(config.get(keys.LOCAL_EPOCHS, cfg.local_epochs)),
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        proximal_mu=float(config.get(keys.PROXIMAL_MU, cfg.proximal_mu)),
        device=node_device(cfg, context),
        seed=client_seed(cfg, int(config.get(keys.SERVER_ROUND, 0)), context.node_id),
    )
    metrics = MetricRecord({keys.TRAIN_LOSS: result.loss, keys.NUM_EXAMPLES: result.num_examples})
    content = RecordDict({keys.ARRAYS: to_arrayrecord(model.state_dict()), keys.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's held-out data."""
    cfg = node_run_config(context)
    data = node_data(cfg, context)
    if len(data.y_test) == 0:
        raise ValueError(f"node {context.node_id} has no held-out data to evaluate on")
    model = _model_with(cfg, msg.content[keys.ARRAYS])
    result = task.evaluate(model, data.x_test, data.y_test, batch_size=cfg.eval_batch_size, device=node_device(cfg, context))
    metrics = MetricRecord(
        {keys.EVAL_LOSS: result.loss, keys.ACCURACY: result.accuracy, keys.NUM_EXAMPLES: result.num_examples}
    )
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def node_run_config(context: Context) -> RunConfig:
    """The run's configuration, validated once per distinct run config."""
    return _parse_run_config(tuple(sorted(context.run_config.items())))


@functools.lru_cache(maxsize=4)
def _parse_run_config(items: tuple) -> RunConfig:
    cfg = RunConfig.from_mapping(dict(items))
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    return cfg


def node_device(cfg: RunConfig, context: Context) -> str:
    """A deployed node's own `--device` wins over the run's `device`."""
    return str(context.node_config.get("device", cfg.device))


def node_data(cfg: RunConfig, context: Context) -> ClientData:
    """This node's data: its own file in a deployment, its partition in a simulation."""
    node_config = context.node_config
    if "data-path" in node_config:
        return _local_data(str(node_config["data-path"]), cfg)
    if "partition-id" not in node_config:
        raise ValueError("node config has neither 'data-path' nor 'partition-id'")
    return load_federation(cfg).client(int(node_config["partition-id"]))


@functools.lru_cache(maxsize=2)
def _local_data(path: str, cfg: RunConfig) -> ClientData:
    return load_local(path, cfg)


@functools.lru_cache(maxsize=2)
def _model(cfg: RunConfig) -> torch.nn.Module:
    # One model object per process, reloaded with the global weights for each message:
    # nothing of a client's model is kept between its rounds.
    return model_from_config(cfg, data_spec(cfg))


def _model_with(cfg: RunConfig, arrays: ArrayRecord) -> torch.nn.Module:
    model = _model(cfg)
    model.load_state_dict(_decoded(arrays, model))
    return model


class _LastDecoded:
    """The last global weights decoded, kept with the record they came from.

    In a simulation every message of a round carries the same ArrayRecord object, so the
    weights are decoded once a round instead of once a client; `load_state_dict` copies
    them into the model, so sharing the decoded tensors is safe.
    """

    record: ArrayRecord | None = None
    weights: dict[str, torch.Tensor] = {}


def _decoded(arrays: ArrayRecord, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if _LastDecoded.record is not arrays:
        _LastDecoded.weights = to_state_dict(arrays, like=model.state_dict())
        _LastDecoded.record = arrays
    return _LastDecoded.weights


def client_seed(cfg: RunConfig, server_round: int, node_id: int) -> int:
    """A seed per (run seed, round, node): reproducible, and different for every local run."""
    return (cfg.seed * 1_000_003 + server_round * 10_007 + node_id) % (2**63)
