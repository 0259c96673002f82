"""Every non-public Flower symbol the project uses, and every write into Flower's objects.

Flowerbed builds on Flower's public Message API (`flwr.app`, `flwr.serverapp`,
`flwr.serverapp.strategy`, `flwr.clientapp`). What that API does not offer comes from here
and from nowhere else: constants, the hooks an in-process Grid needs, the .npy layout of
`Array` bytes, and, for the deployment processes, Flower's Runtime and Control API clients.
tests/shared/test_flower_compat.py checks each one against the installed Flower, and fails
naming the symbol and the Flower version when an upgrade moves or changes one; the same test
keeps every other module off Flower's internal paths.

Cheap symbols (the modules the public API imports anyway) are imported here directly. The
deployment processes' symbols (`fedclient/worker.py`, `fedserver/control.py`) and the
benchmarks' stock-Flower baselines are imported on first use through `DEFERRED_IMPORTS`:
importing them costs seconds (Flower's CLI, SuperNode runtime and simulation packages),
which `fedsim` and the ClientApp do not pay.

Upgrading Flower. Flower >= 1.43 drops the gRPC Fleet and Control APIs, leaving their
HTTP variants. Flowerbed already speaks HTTP only (`--isolation process` workers, the
daemon's Control client, `HttpGrid`), but the names below live in packages shared with the
gRPC transports and are where that upgrade lands; this module absorbs it:
- Control API (fedserver/control.py): `ControlHttpClient`, `CliClientHttpInterceptor`,
  `RuntimeVersionHttpInterceptor`, the `*Request` messages of `flwr.proto.control_pb2`,
  `FlowerError`, `fab_to_proto`, `user_config_to_proto`, `build_fab_from_disk`.
- Runtime API of the SuperNode (fedclient/worker.py): `RuntimeHttpClient`, the
  `flwr.proto.runtime_pb2` requests, `RuntimeTokenHttpInterceptor`, `SuperExecAuthHttpInterceptor`,
  `make_simple_http_retry_invoker`, `HeartbeatSender`, `pull_and_inflate_object_from_tree`
  with its `make_*_fn_protobuf` helpers, `push_message`, `push_task_output`, `Node`.
- The deployment grid (fedserver/polling.py): `is_http_grid`, `pull_replies_within` (HttpGrid's
  `_runtime_client` and `node`, the object-tree pull helpers, `make_message`).
The `flower-superlink` and `flower-supernode` command lines (fedserver/daemon.py,
fedclient/node.py) are Flower's public CLI and are not part of this module.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import threading
from importlib.metadata import version
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.serverapp.strategy import Strategy

FLOWER_VERSION = version("flwr")


def _moved(what: str, err: Exception) -> ImportError:
    return ImportError(
        f"Flower {FLOWER_VERSION} has no {what} ({err}); shared/flower_compat/ must follow this Flower version"
    )


try:
    # Constants: node id of the SuperLink (a message's source on the server), error codes of
    # Error replies, a task's final sub-status, task types, the no-op federation.
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode, SType, SubStatus
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType

    # `Grid.set_run`/`Grid.run` take and give a Run; `Message()` stamps run and source from
    # TaskIdentity (see `set_task_identity`).
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    # A ClientApp mod's `call_next`, and the plaintext layout of SecAgg+ key shares.
    from flwr.clientapp.typing import ClientAppCallable
    from flwr.common.secure_aggregation.secaggplus_utils import (
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
except ImportError as _err:
    raise _moved("symbol the in-process path needs", _err) from _err

# Imported on first access (`from shared.flower_compat import NAME`): name -> (module, attribute).
DEFERRED_IMPORTS: dict[str, tuple[str, str]] = {
    # The SuperNode's Runtime API, as Flower's `flwr-clientapp` uses it (fedclient/worker.py).
    "AcquireTaskRequest": ("flwr.proto.runtime_pb2", "AcquireTaskRequest"),
    "PullAppMessagesRequest": ("flwr.proto.runtime_pb2", "PullAppMessagesRequest"),
    "PullTaskInputRequest": ("flwr.proto.runtime_pb2", "PullTaskInputRequest"),
    "SendTaskHeartbeatRequest": ("flwr.proto.runtime_pb2", "SendTaskHeartbeatRequest"),
    "Node": ("flwr.proto.node_pb2", "Node"),
    "RuntimeHttpClient": ("flwr.supercore.runtime", "RuntimeHttpClient"),
    "RuntimeTokenHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor"),
    "RuntimeVersionHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor"),
    # SuperExec authentication of the Runtime API (`--superexec-auth-secret-file`): the
    # interceptor that signs a request with the shared secret, the methods SuperExec signs,
    # and how the secret file is read.
    "SuperExecAuthHttpInterceptor": ("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor"),
    "SUPEREXEC_AUTH_METHODS": ("flwr.supercore.superexec.run_superexec", "_SUPEREXEC_AUTH_METHODS"),
    "load_superexec_auth_secret": ("flwr.supercore.auth", "load_superexec_auth_secret"),
    # Flower's DP primitives (the ones its DP mods use): a device's own privacy floor clips its
    # update and adds Gaussian noise with them (fedclient/policy.py).
    "compute_clip_model_update": ("flwr.supercore.differential_privacy", "compute_clip_model_update"),
    "add_gaussian_noise_inplace": ("flwr.supercore.differential_privacy", "add_gaussian_noise_inplace"),
    # A FAB's pyproject.toml (its `clientapp` component), read without installing the FAB.
    "get_fab_config": ("flwr.common.config", "get_fab_config"),
    # How long a SuperLink counts a node online after its last heartbeat (fedclient/node.py).
    "HEARTBEAT_DEFAULT_INTERVAL": ("flwr.common.constant", "HEARTBEAT_DEFAULT_INTERVAL"),
    "HEARTBEAT_PATIENCE": ("flwr.common.constant", "HEARTBEAT_PATIENCE"),
    "make_simple_http_retry_invoker": ("flwr.supercore.retry", "make_simple_http_retry_invoker"),
    "HeartbeatSender": ("flwr.supercore.heartbeat", "HeartbeatSender"),
    "pull_and_inflate_object_from_tree": (
        "flwr.supercore.inflatable.inflatable_utils",
        "pull_and_inflate_object_from_tree",
    ),
    "make_pull_object_fn_protobuf": (
        "flwr.supercore.inflatable.inflatable_protobuf_utils",
        "make_pull_object_fn_protobuf",
    ),
    "make_confirm_message_received_fn_protobuf": (
        "flwr.supercore.inflatable.inflatable_protobuf_utils",
        "make_confirm_message_received_fn_protobuf",
    ),
    # The deployed ServerApp's bounded pull of replies (`pull_replies_within`): what
    # HttpGrid.pull_messages does, object by object, with a byte count in between.
    "ConfirmMessageReceivedRequest": ("flwr.proto.message_pb2", "ConfirmMessageReceivedRequest"),
    "iterate_object_tree": ("flwr.supercore.inflatable.inflatable_object", "iterate_object_tree"),
    "pull_objects": ("flwr.supercore.inflatable.inflatable_utils", "pull_objects"),
    "ObjectPullError": ("flwr.supercore.inflatable.inflatable_utils", "ObjectPullError"),
    "inflate_object_from_contents": ("flwr.supercore.inflatable.inflatable_utils", "inflate_object_from_contents"),
    "metadata_from_proto": ("flwr.common.serde_utils", "metadata_from_proto"),
    "make_message": ("flwr.app.message", "make_message"),
    "push_message": ("flwr.supernode.runtime.run_clientapp", "push_message"),
    "push_task_output": ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
    "context_from_proto": ("flwr.common.serde", "context_from_proto"),
    "fab_from_proto": ("flwr.common.serde", "fab_from_proto"),
    "run_from_proto": ("flwr.common.serde", "run_from_proto"),
    "Fab": ("flwr.supercore.fab", "Fab"),
    "install_from_fab": ("flwr.cli.install", "install_from_fab"),
    "get_project_dir": ("flwr.common.config", "get_project_dir"),
    "get_load_client_app_fn": ("flwr.clientapp.utils", "get_load_client_app_fn"),
    "LoadClientAppError": ("flwr.clientapp.client_app", "LoadClientAppError"),
    # A Flower app directory, read as `flwr run` reads it (simulations/apps.py): the checks on
    # its pyproject.toml, the run config merge, Flower's loader (it puts the app's directory on
    # sys.path), and the number of SuperNodes a local simulation has when none is configured.
    "validate_fields_in_config": ("flwr.common.config", "validate_fields_in_config"),
    "get_fused_config_from_dir": ("flwr.common.config", "get_fused_config_from_dir"),
    "flatten_dict": ("flwr.common.config", "flatten_dict"),
    "load_app": ("flwr.supercore.object_ref", "load_app"),
    "DEFAULT_SIMULATION_CONFIG": ("flwr.supercore.constant", "DEFAULT_SIMULATION_CONFIG"),
    # Flower's wire format of a Message and a Context, as a SuperNode sends them to its ClientApp
    # process: what carries a message to fedsim's worker processes (see `message_to_bytes`).
    "ProtoMessage": ("flwr.proto.message_pb2", "Message"),
    "ProtoContext": ("flwr.proto.message_pb2", "Context"),
    "metadata_to_proto": ("flwr.common.serde_utils", "metadata_to_proto"),
    "recorddict_to_proto": ("flwr.common.serde", "recorddict_to_proto"),
    "error_to_proto": ("flwr.common.serde_utils", "error_to_proto"),
    "message_from_proto": ("flwr.common.serde", "message_from_proto"),
    "context_to_proto": ("flwr.common.serde", "context_to_proto"),
    # The SuperLink's Control API, as the `flwr` CLI uses it (fedserver/control.py).
    "ControlHttpClient": ("flwr.supercore.control", "ControlHttpClient"),
    "CliClientHttpInterceptor": ("flwr.cli.cli_client_interceptor", "CliClientHttpInterceptor"),
    "ListNodesRequest": ("flwr.proto.control_pb2", "ListNodesRequest"),
    "ListRunsRequest": ("flwr.proto.control_pb2", "ListRunsRequest"),
    "RegisterNodeRequest": ("flwr.proto.control_pb2", "RegisterNodeRequest"),
    "StartRunRequest": ("flwr.proto.control_pb2", "StartRunRequest"),
    "StopRunRequest": ("flwr.proto.control_pb2", "StopRunRequest"),
    "UnregisterNodeRequest": ("flwr.proto.control_pb2", "UnregisterNodeRequest"),
    "FlowerError": ("flwr.supercore.error", "FlowerError"),
    "fab_to_proto": ("flwr.common.serde", "fab_to_proto"),
    "user_config_to_proto": ("flwr.common.serde", "user_config_to_proto"),
    "build_fab_from_disk": ("flwr.cli.build", "build_fab_from_disk"),
    "public_key_to_bytes": ("flwr.supercore.primitives.asymmetric", "public_key_to_bytes"),
    # Stock-Flower baselines (benchmarks/): the entry `flwr run` uses for a Ray simulation,
    # which, unlike the public `run_simulation()`, passes a run config to the apps ...
    "run_simulation_with_context": ("flwr.simulation.run_simulation", "_run_simulation"),
    "EventType": ("flwr.supercore.telemetry", "EventType"),
    # ... and what Flower's legacy SecAgg+ workflow needs to run on a given Grid.
    "GridClientProxy": ("flwr.server.compat.grid_client_proxy", "GridClientProxy"),
    "parameters_to_arrayrecord": ("flwr.compat.common.recorddict_compat", "parameters_to_arrayrecord"),
    "arrayrecord_to_parameters": ("flwr.compat.common.recorddict_compat", "arrayrecord_to_parameters"),
    "MAIN_CONFIGS_RECORD": ("flwr.server.workflow.constant", "MAIN_CONFIGS_RECORD"),
    "MAIN_PARAMS_RECORD": ("flwr.server.workflow.constant", "MAIN_PARAMS_RECORD"),
    "WorkflowKey": ("flwr.server.workflow.constant", "Key"),
}

HTTP_GRID = ("flwr.superlink.grid.http_grid", "HttpGrid")  # the deployment (SuperLink) grid

__all__ = [
    "FLOWER_VERSION",
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "SType",
    "SubStatus",
    "NOOP_FEDERATION_ID",
    "TaskType",
    "Run",
    "TaskIdentity",
    "ClientAppCallable",
    "share_keys_plaintext_concat",
    "share_keys_plaintext_separate",
    "set_message_id",
    "set_task_identity",
    "new_run",
    "is_http_grid",
    "pull_replies_within",
    "ReplyTooLarge",
    "npy_view",
    "npy_array",
    "sampling_from",
    "parse_run_config",
    "message_to_bytes",
    "message_from_bytes",
    "context_to_bytes",
    "context_from_bytes",
    *DEFERRED_IMPORTS,
]


def __getattr__(name: str) -> Any:
    """Resolve a `DEFERRED_IMPORTS` name on first access (PEP 562)."""
    if name not in DEFERRED_IMPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = DEFERRED_IMPORTS[name]
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise _moved(f"{module_name}.{attribute}", err) from err
    globals()[name] = value
    return value


def set_message_id(message: Message, message_id: str) -> None:
    """Give `message` the id a SuperLink or SuperNode would.

    Relies on `Metadata.message_id` being a read-only property over
    `Metadata.__dict__["_message_id"]`, which Flower itself writes when it stores a message.
    """
    message.metadata.__dict__["_message_id"] = message_id


def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Set the identity this process runs as: messages created from now on carry its run and node.

    Relies on `Message(content, dst_node_id, message_type)` taking `run_id` and `src_node_id`
    from `TaskIdentity`'s class-level properties, which Flower sets from the task it runs.
    """
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def new_run(
    run_id: int,
    *,
    override_config: dict[str, Any] | None = None,
    primary_task_id: int | None = None,
    federation_id: str | None = None,
) -> Run:
    """A Run as the SuperLink would hand it to a Grid, with the given fields set.

    Relies on `Run.create_empty(run_id)` and on `Run` being a mutable dataclass with the fields
    `override_config`, `primary_task_id` and `federation_id`.
    """
    run = Run.create_empty(run_id)
    if override_config is not None:
        run.override_config = dict(override_config)
    if primary_task_id is not None:
        run.primary_task_id = primary_task_id
    if federation_id is not None:
        run.federation_id = federation_id
    return run


def is_http_grid(grid: object) -> bool:
    """Whether `grid` is Flower's deployment grid (`HttpGrid`, which polls the SuperLink).

    Looked up in `sys.modules`, not imported: importing Flower's SuperLink grid costs a
    simulation about a second, and a grid can only be an HttpGrid once its module is imported.
    Relies on the class's module path, `HTTP_GRID`.
    """
    module_name, attribute = HTTP_GRID
    http_grid = getattr(sys.modules.get(module_name), attribute, None)
    return http_grid is not None and isinstance(grid, http_grid)


class ReplyTooLarge(Exception):
    """A reply's objects came to more than its byte bound; the pull stopped there."""

    def __init__(self, received: int, limit: int) -> None:
        super().__init__(f"at least {received} bytes, over the bound of {limit} bytes")
        self.received, self.limit = received, limit


class _ByteBudget:
    """Counts the bytes of one reply's objects as they arrive (from several pulling threads)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.received = limit, 0
        self._lock = threading.Lock()

    def take(self, content: bytes) -> bytes:
        with self._lock:
            self.received += len(content)
            if self.received > self.limit:
                raise ReplyTooLarge(self.received, self.limit)
        return content


def pull_replies_within(
    grid: Any, message_ids: Iterable[str], limit: int, too_large: Callable[[ReplyTooLarge], Error]
) -> list[Message]:
    """`HttpGrid.pull_messages(message_ids)`, each reply's objects counted as they arrive.

    A reply whose objects pass `limit` bytes is not pulled further nor inflated: the SuperLink
    is told it was received (so it deletes its objects) and it comes back as an error reply,
    `too_large(err)`, with the reply's own metadata (its node, the message it answers). An
    object is counted once it has arrived whole: the ServerApp holds at most `limit` bytes plus
    the objects in flight (Flower pulls up to FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS at once).

    Relies on HttpGrid's `_runtime_client` (PullMessages, PullObject, ConfirmMessageReceived),
    `node` and `run`, and on the object-tree helpers its own `pull_messages` uses.
    """
    client = grid._runtime_client  # noqa: SLF001 - see the docstring
    response = client.PullMessages(_deferred("PullAppMessagesRequest")(message_ids=list(message_ids)))
    return [
        _pull_reply(grid, proto, tree, limit, too_large)
        for proto, tree in zip(response.messages_list, response.message_object_trees, strict=True)
    ]


def _pull_reply(grid: Any, proto: Any, tree: Any, limit: int, too_large: Callable[[ReplyTooLarge], Error]) -> Message:
    client, run_id, message_id = grid._runtime_client, grid.run.run_id, proto.metadata.message_id  # noqa: SLF001
    fetch = _deferred("make_pull_object_fn_protobuf")(client.PullObject, grid.node, run_id)
    budget = _ByteBudget(limit)
    ids = [node.object_id for node in _deferred("iterate_object_tree")(tree)]
    try:
        contents = _deferred("pull_objects")(ids, lambda object_id: budget.take(fetch(object_id)))
    except _deferred("ObjectPullError") as err:  # as HttpGrid: the device's upload is incomplete
        unavailable = Error(ErrorCode.MESSAGE_UNAVAILABLE, f"Reply message objects are unavailable. {err}")
        return _error_reply(proto, unavailable)
    except ReplyTooLarge as err:
        error: Error | None = too_large(err)
    else:
        error = None
    client.ConfirmMessageReceived(
        _deferred("ConfirmMessageReceivedRequest")(node=grid.node, run_id=run_id, message_object_id=message_id)
    )
    if error is not None:
        return _error_reply(proto, error)
    message = _deferred("inflate_object_from_contents")(message_id, contents)
    set_message_id(message, message_id)
    return message


def _error_reply(proto: Any, error: Error) -> Message:
    """An error reply in place of the reply `proto` announced: same node, run and message answered."""
    return _deferred("make_message")(metadata=_deferred("metadata_from_proto")(proto.metadata), error=error)


def npy_view(array: Array) -> np.ndarray:
    """A read-only ndarray over `array.data`, without copying.

    Relies on Flower serializing an ndarray `Array` as .npy bytes (`np.save`) with
    `stype == SType.NUMPY`. `Array.numpy()` reads the same with `np.load`, which copies the
    data. Raises ValueError for another serialization type, object dtypes (never unpickled),
    or data that is not what its header says.
    """
    if array.stype != SType.NUMPY:
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    buf = io.BytesIO(array.data)
    header_version = np.lib.format.read_magic(buf)
    if header_version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif header_version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:  # rare header versions: let numpy decode (one copy)
        return array.numpy()
    if dtype.hasobject:
        raise ValueError(f"object arrays are not allowed (dtype {dtype})")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=buf.tell())  # (numel,)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def npy_array(parts: Sequence[np.ndarray]) -> Array:
    """The `Array` that `Array.from_numpy_ndarray` makes of the concatenation of `parts` (one
    dtype), flat: the same .npy bytes, written with one copy of the values instead of three
    (concatenating, `np.save` into a buffer, taking its value)."""
    dtype = parts[0].dtype
    count = sum(part.size for part in parts)
    header = io.BytesIO()
    header_data = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
    np.lib.format.write_array_header_1_0(header, header_data)
    data = b"".join([header.getvalue(), *(np.ascontiguousarray(part, dtype=dtype).reshape(-1) for part in parts)])
    return Array(dtype=str(dtype), shape=(count,), stype=SType.NUMPY, data=data)


SAMPLING_MINIMUMS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


@contextlib.contextmanager
def sampling_from(strategy: Strategy, connected: int) -> Iterator[None]:
    """Let one configure_train/configure_evaluate call sample from `connected` nodes.

    Writes Flower strategies' public sampling minimums (`SAMPLING_MINIMUMS`), set in their
    constructors, and puts them back after the block.

    Flower's strategies wait, without end, until `min_available_nodes` nodes are connected; a
    device that is gone for good would stall the run. Within this block the minimums are at
    most `connected`, so the strategy samples from the nodes that are there.
    """
    saved = {name: getattr(strategy, name) for name in SAMPLING_MINIMUMS}
    for name, value in saved.items():
        setattr(strategy, name, min(value, connected))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(strategy, name, value)


def parse_run_config(overrides: list[str]) -> dict[str, Any]:
    """The `--run-config` strings of `flwr run` as the flat dict Flower's `parse_config_args` makes.

    Each string holds space-separated `key=value` pairs, the values read as TOML; a single
    string ending in `.toml` is a file of overrides. Raises ValueError for what Flower refuses: it raises click's
    ClickException for a value that is not TOML, which is turned into a ValueError here.
    """
    from click import ClickException  # a dependency of Flower's CLI, which its config module imports
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(overrides)
    except ClickException as err:
        raise ValueError(err.message) from err


def _deferred(name: str) -> Any:
    """A `DEFERRED_IMPORTS` name from inside this module (module globals skip `__getattr__`)."""
    return globals()[name] if name in globals() else __getattr__(name)


def message_to_bytes(message: Message, content: RecordDict | None = None) -> bytes:
    """`message` in Flower's wire format (its protobuf), with `content` in place of its own if given.

    Relies on `flwr.proto.message_pb2.Message` having the fields `metadata`, `content`, `error`,
    filled by Flower's serde as `message_to_proto` does.
    """
    proto = _deferred("ProtoMessage")(metadata=_deferred("metadata_to_proto")(message.metadata))
    if message.has_error():
        proto.error.CopyFrom(_deferred("error_to_proto")(message.error))
    else:
        proto.content.CopyFrom(_deferred("recorddict_to_proto")(message.content if content is None else content))
    return proto.SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """The Message `message_to_bytes` wrote."""
    proto = _deferred("ProtoMessage")()
    proto.ParseFromString(data)
    return _deferred("message_from_proto")(proto)


def context_to_bytes(context: Context) -> bytes:
    """`context` (node config, state, run config) in Flower's wire format."""
    return _deferred("context_to_proto")(context).SerializeToString()


def context_from_bytes(data: bytes) -> Context:
    """The Context `context_to_bytes` wrote."""
    proto = _deferred("ProtoContext")()
    proto.ParseFromString(data)
    return _deferred("context_from_proto")(proto)
