"""The ClientApp: unpack the message, train or evaluate with `shared.task`, pack the reply.

Which data a node trains on comes from `context.node_config`: `partition-id` in a
simulation (a view of the federation's dataset), `data-path` in a deployment (the
device's own file, which never leaves it).

What the process keeps between messages is one `ClientRuntime` per run configuration, in
the `ClientRuntimes` a ClientApp is made with (`make_client_app`): its state lives as long
as the app. `app` is the ClientApp Flower loads (`fedclient.app:app`); `train` and
`evaluate` are its handlers, for apps that run them under other mods or wrap their replies.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared import messages as keys
from shared import task
from shared.config import RunConfig
from shared.data.federation import (
    ClientData,
    Federation,
    UnfittedTokenizer,
    data_spec,
    load_federation,
    load_local,
)
from shared.data.shipping import received_tokenizer
from shared.recipe import model_from_config
from shared.secagg import secagg_mod
from shared.weights import to_arrayrecord, to_state_dict

MAX_RUNS = 2  # runtimes a ClientApp keeps: a worker may start a run before the last one's messages end


class ClientRuntime:
    """What this process keeps for one run configuration, between the messages of its nodes.

    - `cfg`: the run config, parsed once;
    - the model: one object, built on first use and loaded with the global weights for every
      message, so nothing of a client's training is kept between its rounds;
    - the last global weights decoded, with the record they came from: in a simulation every
      message of a round carries the same ArrayRecord object, so the weights are decoded once a
      round instead of once a client (`load_state_dict` copies them into the model, so sharing
      the decoded tensors is safe);
    - the data: a simulated node's partition is a view of the run's federation, read once; a
      deployed node's file is read once;
    - the tokenizer the run ships (`tokenizer = "file"`), taken from the first message, checked
      against the run's pinned checksum before the model or the data is built from it.

    One runtime serves every node of the run that this process hosts (all of a simulation's
    nodes, the one node of a deployed worker): that is what lets a round decode its weights once.
    It is not kept in Flower's `Context.state`: that is one node's, so nodes could not share it,
    and it holds only records, which a deployed SuperNode sends to the ClientApp process with
    every message and takes back with every reply: a model or a dataset there would be
    serialised twice a message instead of kept.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._model: torch.nn.Module | None = None
        self._decoded_from: ArrayRecord | None = None
        self._decoded: dict[str, torch.Tensor] = {}
        self._federation: Federation | None = None
        self._local: tuple[str, ClientData] | None = None  # a deployed node's data path and data
        self._tokenizer: UnfittedTokenizer | None = None

    def apply_threads(self) -> None:
        """Run this process's PyTorch ops on the run's `torch-threads` (0: leave torch's own)."""
        threads = self.cfg.torch_threads
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    @property
    def model(self) -> torch.nn.Module:
        """The run's model (built on first use), holding whichever weights were loaded last."""
        if self._model is None:
            self._model = model_from_config(self.cfg, data_spec(self.cfg, self._tokenizer))
        return self._model

    def receive(self, config: ConfigRecord | None) -> None:
        """Take the run's tokenizer from a message's config, once (a no-op unless `tokenizer = "file"`)."""
        if self._tokenizer is None:
            self._tokenizer = received_tokenizer(self.cfg, config or {})

    def model_with(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The model, loaded with the global weights in `arrays`."""
        if self._decoded_from is not arrays:
            self._decoded = to_state_dict(arrays, like=self.model.state_dict())
            self._decoded_from = arrays
        self.model.load_state_dict(self._decoded)
        return self.model

    def node_data(self, context: Context) -> ClientData:
        """This node's data: its own file in a deployment, its partition in a simulation."""
        node_config = context.node_config
        if "data-path" in node_config:
            path = str(node_config["data-path"])
            if self._local is None or self._local[0] != path:
                self._local = (path, load_local(path, self.cfg, self._tokenizer))
            return self._local[1]
        if "partition-id" not in node_config:
            raise ValueError("node config has neither 'data-path' nor 'partition-id'")
        if self._federation is None:
            self._federation = load_federation(self.cfg)
        return self._federation.client(int(node_config["partition-id"]))

    def node_device(self, context: Context) -> str:
        """A deployed node's own `--device` wins over the run's `device`."""
        return str(context.node_config.get("device", self.cfg.device))


class ClientRuntimes:
    """A ClientApp's state, one `ClientRuntime` per run configuration, and the handlers using it.

    At most `max_runs` runtimes are kept, the least recently used dropped first. They are keyed by
    the run config, not the run id: everything in a runtime follows from the config, and fedsim
    gives every run the same run id.
    """

    def __init__(self, max_runs: int = MAX_RUNS) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        self._max_runs = max_runs
        self._runtimes: OrderedDict[tuple, ClientRuntime] = OrderedDict()

    def get(self, context: Context) -> ClientRuntime:
        """The runtime for the context's run config, made (the config parsed) on first use."""
        key = tuple(sorted(context.run_config.items()))
        if key not in self._runtimes:
            self._runtimes[key] = ClientRuntime(RunConfig.from_mapping(dict(key)))
            while len(self._runtimes) > self._max_runs:
                self._runtimes.popitem(last=False)
        self._runtimes.move_to_end(key)
        return self._runtimes[key]

    def train(self, msg: Message, context: Context) -> Message:
        """Train the received global model on this node's data and reply with the new weights."""
        config: ConfigRecord = msg.content[keys.CONFIG]
        runtime = self._entered(context, config)
        cfg, data = runtime.cfg, runtime.node_data(context)
        model = runtime.model_with(msg.content[keys.ARRAYS])
        result = task.train(
            model,
            data.x_train,
            data.y_train,
            epochs=int(config.get(keys.LOCAL_EPOCHS, cfg.local_epochs)),
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            optimizer=cfg.optimizer,
            proximal_mu=float(config.get(keys.PROXIMAL_MU, cfg.proximal_mu)),
            device=runtime.node_device(context),
            seed=client_seed(cfg, int(config.get(keys.SERVER_ROUND, 0)), context.node_id),
        )
        metrics = MetricRecord({keys.TRAIN_LOSS: result.loss, keys.NUM_EXAMPLES: result.num_examples})
        content = RecordDict({keys.ARRAYS: to_arrayrecord(model.state_dict()), keys.METRICS: metrics})
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Evaluate the received global model on this node's held-out data."""
        runtime = self._entered(context, msg.content.config_records.get(keys.CONFIG))
        data = runtime.node_data(context)
        if len(data.y_test) == 0:
            raise ValueError(f"node {context.node_id} has no held-out data to evaluate on")
        model = runtime.model_with(msg.content[keys.ARRAYS])
        result = task.evaluate(
            model, data.x_test, data.y_test, batch_size=runtime.cfg.eval_batch_size, device=runtime.node_device(context)
        )
        metrics = MetricRecord(
            {keys.EVAL_LOSS: result.loss, keys.ACCURACY: result.accuracy, keys.NUM_EXAMPLES: result.num_examples}
        )
        return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)

    def _entered(self, context: Context, config: ConfigRecord | None) -> ClientRuntime:
        """The message's runtime, its thread count applied (the process may have served another
        run) and the run's tokenizer taken from the message's `config`."""
        runtime = self.get(context)
        runtime.apply_threads()
        runtime.receive(config)
        return runtime


def make_client_app(runtimes: ClientRuntimes | None = None) -> ClientApp:
    """A ClientApp whose handlers keep their state in `runtimes` (a fresh one when None).

    SecAgg's mod passes every non-SecAgg message straight through.
    """
    runtimes = ClientRuntimes() if runtimes is None else runtimes
    client_app = ClientApp(mods=[secagg_mod])
    client_app.train()(runtimes.train)
    client_app.evaluate()(runtimes.evaluate)
    return client_app


def client_seed(cfg: RunConfig, server_round: int, node_id: int) -> int:
    """A seed per (run seed, round, node): reproducible, and different for every local run."""
    return (cfg.seed * 1_000_003 + server_round * 10_007 + node_id) % (2**63)


runtimes = ClientRuntimes()  # `app`'s state: as long as this module is imported (a fedclient worker re-imports per FAB)
app = make_client_app(runtimes)
train, evaluate = runtimes.train, runtimes.evaluate
