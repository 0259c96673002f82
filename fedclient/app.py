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

from fedclient.guard import LOG, check_model_size, check_task, error_reply_mod, policy_mod, privacy_floor
from fedclient.policy import DevicePolicy
from shared import messages as keys
from shared import task
from shared.config import RunConfig, device_config
from shared.data.errors import DataError
from shared.data.federation import (
    ClientData,
    DataSpec,
    Federation,
    UnfittedTokenizer,
    data_spec,
    load_federation,
    load_local,
    local_spec,
)
from shared.data.shipping import received_tokenizer
from shared.device_errors import DeviceCode, DeviceRefusal
from shared.node_config import DATA_PATH
from shared.privacy_local import SampleLevelDp
from shared.recipe import model_from_config, parameter_count
from shared.secagg import secagg_mod
from shared.weights import to_arrayrecord, to_state_dict

MAX_RUNS = 2  # runtimes a ClientApp keeps: a worker may start a run before the last one's messages end


class ClientRuntime:
    """What this process keeps for one run configuration, between the messages of its nodes.

    - `cfg`: the run config, parsed once (on a deployed device, without the device-owned keys);
    - the model: one object, built on first use and loaded with the global weights for every
      message, so nothing of a client's training is kept between its rounds;
    - the last global weights decoded, with the record they came from: in a simulation every
      message of a round carries the same ArrayRecord object, so the weights are decoded once a
      round instead of once a client (`load_state_dict` copies them into the model, so sharing
      the decoded tensors is safe);
    - the data: a simulated node's partition is a view of the run's federation, read once; a
      deployed node's own file (its `--data`) is read once, and shapes its model;
    - the tokenizer the run ships (`tokenizer = "file"`), taken from the first message, checked
      against the run's pinned checksum before the model or the data is built from it.

    One runtime serves every node of the run that this process hosts (all of a simulation's
    nodes, the one node of a deployed worker): that is what lets a round decode its weights once.
    It is not kept in Flower's `Context.state`: that is one node's, so nodes could not share it,
    and it holds only records, which a deployed SuperNode sends to the ClientApp process with
    every message and takes back with every reply: a model or a dataset there would be
    serialised twice a message instead of kept.
    """

    def __init__(self, cfg: RunConfig, deployed: bool = False, federation: Federation | None = None) -> None:
        self.cfg = cfg
        self.deployed = deployed  # a device's own data (`data-path` node config), not a simulated partition
        self._model: torch.nn.Module | None = None
        self._decoded_from: ArrayRecord | None = None
        self._decoded: dict[str, torch.Tensor] = {}
        self._federation = federation  # a simulation's data, passed in by fedsim or loaded on first use
        self._local: tuple[str, ClientData] | None = None  # a deployed node's data path and data
        self._tokenizer: UnfittedTokenizer | None = None

    def apply_threads(self) -> None:
        """Run this process's PyTorch ops on the run's `torch-threads` (0: leave torch's own). A
        deployed device keeps its own: PyTorch's default, every core (or its `OMP_NUM_THREADS`)."""
        threads = 0 if self.deployed else self.cfg.torch_threads
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def spec(self, context: Context) -> DataSpec:
        """The model's shape: a device's from the config and its own data, never from a file the
        run config names; a simulated node's from the run's dataset."""
        if self.deployed:
            return local_spec(self.cfg, self.node_data(context), self._tokenizer)
        return data_spec(self.cfg, self._tokenizer, self.federation())

    def parameter_count(self, spec: DataSpec) -> int:
        """The run's model's parameters: counted on the built model, else without building it."""
        if self._model is not None:
            return sum(p.numel() for p in self._model.parameters())
        return parameter_count(self.cfg, spec)

    def model_for(self, spec: DataSpec) -> torch.nn.Module:
        """The run's model (built on first use), holding whichever weights were loaded last."""
        if self._model is None:
            self._model = model_from_config(self.cfg, spec)
        return self._model

    def receive(self, config: ConfigRecord | None) -> None:
        """Take the run's tokenizer from a message's config, once (a no-op unless `tokenizer = "file"`).

        A tokenizer is data from the server, checked (size, checksum, format), never a path."""
        if self._tokenizer is None:
            try:
                self._tokenizer = received_tokenizer(self.cfg, config or {})
            except DataError as err:
                raise DeviceRefusal(DeviceCode.BAD_MESSAGE, f"the message's tokenizer: {err}") from None

    def model_with(self, arrays: ArrayRecord, spec: DataSpec) -> torch.nn.Module:
        """The model, loaded with the global weights in `arrays` (checked against the model first)."""
        model = self.model_for(spec)
        if self._decoded_from is not arrays:
            self._decoded = to_state_dict(arrays, like=model.state_dict())
            self._decoded_from = arrays
        model.load_state_dict(self._decoded)
        return model

    @property
    def received(self) -> dict[str, torch.Tensor]:
        """The global weights last loaded (`model_with`), as decoded."""
        return self._decoded

    def node_data(self, context: Context) -> ClientData:
        """This node's data: its own file in a deployment, its partition in a simulation."""
        node_config = context.node_config
        if self.deployed:
            path = str(node_config[DATA_PATH])
            if self._local is None or self._local[0] != path:
                self._local = (path, load_local(path, self.cfg, self._tokenizer))
            return self._local[1]
        if "partition-id" not in node_config:
            raise ValueError("node config has neither 'data-path' nor 'partition-id'")
        return self.federation().client(int(node_config["partition-id"]))

    def federation(self) -> Federation:
        """A simulation's federation: the one this runtime was given, else loaded once."""
        if self._federation is None:
            self._federation = load_federation(self.cfg)
        return self._federation

    def node_device(self, context: Context) -> str:
        """A deployed node's own `--device` wins over the run's `device`."""
        return str(context.node_config.get("device", self.cfg.device))


class ClientRuntimes:
    """A ClientApp's state, one `ClientRuntime` per run configuration, and the handlers using it.

    At most `max_runs` runtimes are kept, the least recently used dropped first. They are keyed by
    the run config, not the run id: everything in a runtime follows from the config, and fedsim
    gives every run the same run id.
    A `federation` given is the simulated nodes' data (fedsim builds it once and passes it).
    """

    def __init__(self, max_runs: int = MAX_RUNS, federation: Federation | None = None) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        self._max_runs = max_runs
        self._federation = federation  # a simulation's data, for its simulated nodes' runtimes
        self._runtimes: OrderedDict[tuple, ClientRuntime] = OrderedDict()

    def get(self, context: Context) -> ClientRuntime:
        """The runtime for the context's run config, made (the config parsed) on first use.

        A deployed node (one with `data-path` in its node config) takes the server's config less
        its device-owned keys (every path: `shared.config.KEY_ROLES`), saying once which it ignored.
        """
        deployed = DATA_PATH in context.node_config
        key = (deployed, *sorted(context.run_config.items()))
        if key not in self._runtimes:
            self._runtimes[key] = _new_runtime(context, deployed, self._federation)
            while len(self._runtimes) > self._max_runs:
                self._runtimes.popitem(last=False)
        self._runtimes.move_to_end(key)
        return self._runtimes[key]

    def train(self, msg: Message, context: Context) -> Message:
        """Train the received global model on this node's data and reply with the new weights."""
        config: ConfigRecord = msg.content[keys.CONFIG]
        runtime = self._entered(context, config)
        cfg, policy = runtime.cfg, DevicePolicy.from_node_config(context.node_config)
        epochs = int(config.get(keys.LOCAL_EPOCHS, cfg.local_epochs))
        check_task(policy, cfg, epochs)
        model = _checked_model(runtime, msg, context, policy)
        data = runtime.node_data(context)
        result = task.train(
            model,
            data.x_train,
            data.y_train,
            epochs=epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            optimizer=cfg.optimizer,
            proximal_mu=float(config.get(keys.PROXIMAL_MU, cfg.proximal_mu)),
            device=runtime.node_device(context),
            seed=client_seed(cfg, int(config.get(keys.SERVER_ROUND, 0)), context.node_id),
            time_limit=(policy.max_train_seconds or None) if policy else None,
            dp=SampleLevelDp(cfg.dp_clipping_norm, cfg.dp_noise_multiplier) if cfg.dp == "local-sgd" else None,
        )
        if result.stopped_early:
            LOG.warning("node %d: training stopped at the policy's max-train-seconds after %d examples",
                        context.node_id, result.num_examples)  # fmt: skip
        weights = privacy_floor(policy, runtime.received, model.state_dict())
        metrics = MetricRecord({keys.TRAIN_LOSS: result.loss, keys.NUM_EXAMPLES: result.num_examples})
        content = RecordDict({keys.ARRAYS: to_arrayrecord(weights), keys.METRICS: metrics})
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Evaluate the received global model on this node's held-out data."""
        runtime = self._entered(context, msg.content.config_records.get(keys.CONFIG))
        policy = DevicePolicy.from_node_config(context.node_config)
        check_task(policy, runtime.cfg, 0)
        data = runtime.node_data(context)
        if len(data.y_test) == 0:
            raise ValueError(f"node {context.node_id} has no held-out data to evaluate on")
        model = _checked_model(runtime, msg, context, policy)
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


def _new_runtime(context: Context, deployed: bool, federation: Federation | None) -> ClientRuntime:
    if not deployed:
        return ClientRuntime(RunConfig.from_mapping(dict(context.run_config)), federation=federation)
    cfg, ignored = device_config(dict(context.run_config))
    if ignored:
        LOG.warning("node %d: the run config sets %s; a device uses its own (its data is its --data)",
                    context.node_id, ", ".join(ignored))  # fmt: skip
    return ClientRuntime(cfg, deployed=True)


def _checked_model(
    runtime: ClientRuntime, msg: Message, context: Context, policy: DevicePolicy | None
) -> torch.nn.Module:
    """The model loaded with the message's weights, once its size passed the policy."""
    spec = runtime.spec(context)
    check_model_size(policy, runtime.parameter_count(spec))
    return runtime.model_with(msg.content[keys.ARRAYS], spec)


def make_client_app(runtimes: ClientRuntimes | None = None) -> ClientApp:
    """A ClientApp whose handlers keep their state in `runtimes` (a fresh one when None).

    Its mods, outermost first: error replies carry codes only (`error_reply_mod`), the node's policy
    (`policy_mod`), then SecAgg's, which passes every non-SecAgg message straight through.
    """
    runtimes = ClientRuntimes() if runtimes is None else runtimes
    client_app = ClientApp(mods=[error_reply_mod, policy_mod, secagg_mod])
    client_app.train()(runtimes.train)
    client_app.evaluate()(runtimes.evaluate)
    return client_app


def client_seed(cfg: RunConfig, server_round: int, node_id: int) -> int:
    """A seed per (run seed, round, node): reproducible, and different for every local run."""
    return (cfg.seed * 1_000_003 + server_round * 10_007 + node_id) % (2**63)


runtimes = ClientRuntimes()  # `app`'s state: as long as this module is imported (a fedclient worker re-imports per FAB)
app = make_client_app(runtimes)
train, evaluate = runtimes.train, runtimes.evaluate
