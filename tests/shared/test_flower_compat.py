"""Canary for shared/flower_compat/: fails naming the symbol, the Flower version it was checked
against and the installed one when an upgrade moves or changes a Flower internal, log marker or
protocol detail the project relies on; and keeps every other module on Flower's public API."""

import ast
import asyncio
import importlib
import importlib.util
import inspect
import io
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
import types
import typing
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
import pytest
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import shared.flower_compat as package
from fedserver.strategies import build_strategy
from shared.config import STRATEGIES
from shared.flower_compat import flower_symbols, superlink, supernode_log
from simulations.grid import InProcessGrid, simulation_node_config

REPO = Path(__file__).resolve().parents[2]
COMPAT = Path("shared/flower_compat")
# Every submodule that imports Flower, and those that must stay cheap for fedsim and the ClientApp.
FLOWER_FREE = ("supernode_log", "superlink")  # read where Flower is not imported
SUBMODULES = sorted(p.stem for p in (REPO / COMPAT).glob("*.py") if p.stem not in ("__init__", *FLOWER_FREE))
LIGHT = ("messages", "runs", "strategy", "secagg", "dp", "app_config", "http_grid")
HEAVY_FLOWER = ("flwr.supernode.runtime", "flwr.cli.install", "flwr.simulation", "flwr.superlink.grid.http_grid")
MODULES = {name: importlib.import_module(f"shared.flower_compat.{name}") for name in SUBMODULES}
# What the project imports from the package, by name, for the checks below.
compat = types.SimpleNamespace(
    **{n: v for m in MODULES.values() for n, v in vars(m).items() if not n.startswith("_")}
)
VERSION = package.FLOWER_VERSION
CHECKED = package.CHECKED_AGAINST

# How the project calls each callable: positional argument count, keyword names.
CALLS = {
    "install_from_fab": (1, ["skip_prompt"]),
    "get_load_client_app_fn": (0, ["default_app_ref", "app_path", "multi_app"]),
    "get_project_dir": (3, []),
    "push_message": (3, []),
    "push_task_output": (0, ["client", "context", "sub_status", "details"]),
    "pull_and_inflate_object_from_tree": (3, ["return_type", "initial_backoff", "backoff_cap"]),
    "make_pull_object_fn_protobuf": (3, []),
    "make_confirm_message_received_fn_protobuf": (3, []),
    "pull_objects": (2, ["max_concurrent_pulls"]),
    "inflate_object_from_contents": (2, []),
    "iterate_object_tree": (1, []),
    "metadata_from_proto": (1, []),
    "make_message": (0, ["metadata", "error"]),
    "context_from_proto": (1, []),
    "fab_from_proto": (1, []),
    "run_from_proto": (1, []),
    "fab_to_proto": (1, []),
    "user_config_to_proto": (1, []),
    "build_fab_from_disk": (1, []),
    "public_key_to_bytes": (1, []),
    "make_simple_http_retry_invoker": (0, []),
    "load_superexec_auth_secret": (1, []),
    "SuperExecAuthHttpInterceptor": (0, ["master_secret", "protected_methods"]),
    "HeartbeatSender": (1, []),
    "RuntimeTokenHttpInterceptor": (1, []),
    "RuntimeVersionHttpInterceptor": (0, ["component_name"]),
    "CliClientHttpInterceptor": (0, []),
    "Fab": (3, []),
    "GridClientProxy": (3, []),
    "parameters_to_arrayrecord": (1, ["keep_input"]),
    "arrayrecord_to_parameters": (1, ["keep_input"]),
    "share_keys_plaintext_concat": (4, []),
    "share_keys_plaintext_separate": (1, []),
    "compute_clip_model_update": (3, []),
    "add_gaussian_noise_inplace": (2, []),
    "validate_fields_in_config": (1, []),
    "get_fused_config_from_dir": (2, []),
    "flatten_dict": (1, []),
    "load_app": (3, []),
    "run_simulation_with_context": (
        0,
        ["num_supernodes", "exit_event", "client_app", "server_app", "backend_name", "backend_config",
         "server_app_context", "app_dir", "run", "is_app"],
    ),  # fmt: skip
}
CLIENT_CALLS = {
    "RuntimeHttpClient": (
        ["server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"],
        ["AcquireTask", "PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived",
         "SendTaskHeartbeat", "close"],
    ),  # fmt: skip
    "ControlHttpClient": (
        ["server_address", "insecure", "root_certificates", "interceptors"],
        ["RegisterNode", "StartRun", "StopRun", "ListRuns", "ListNodes", "close"],
    ),
}
CONSTANTS = {
    "ErrorCode": ["CLIENT_APP_RAISED_EXCEPTION", "LOAD_CLIENT_APP_EXCEPTION"],
    "SubStatus": ["COMPLETED", "FAILED"],
    "TaskType": ["CLIENT_APP"],
    "SType": ["NUMPY"],
    "EventType": ["PYTHON_API_RUN_SIMULATION_LEAVE"],
    "WorkflowKey": ["CURRENT_ROUND"],
    "Status": ["PENDING", "STARTING", "RUNNING"],
    "NodeStatus": ["UNREGISTERED"],
    "ApiErrorCode": ["PUBLIC_KEY_ALREADY_IN_USE"],
}
# Protobuf messages: the fields the project sets (requests) or reads (responses).
PROTO_FIELDS = {
    ("AcquireTaskRequest", "AcquireTaskRequest"): ["supported_task_types"],
    ("AcquireTaskRequest", "AcquireTaskResponse"): ["task", "token"],
    ("PullTaskInputRequest", "PullTaskInputResponse"): ["task_id", "run", "context", "fab"],
    ("PullAppMessagesRequest", "PullAppMessagesResponse"): ["messages_list", "message_object_trees"],
    ("Node", "Node"): ["node_id"],
    ("ConfirmMessageReceivedRequest", "ConfirmMessageReceivedRequest"): ["node", "run_id", "message_object_id"],
    ("RegisterNodeRequest", "RegisterNodeRequest"): ["public_key", "name"],
    ("StartRunRequest", "StartRunRequest"): ["fab", "override_config"],
    ("StartRunRequest", "StartRunResponse"): ["run_id"],
    ("StopRunRequest", "StopRunRequest"): ["run_id"],
    ("ListRunsRequest", "ListRunsResponse"): ["run_dict"],
    ("ListNodesRequest", "ListNodesResponse"): ["nodes_info"],
    ("Node", "NodeInfo"): ["node_id", "name", "status", "last_activated_at"],
}

# The public Message API, and (for benchmarks' stock-Flower baselines only) the legacy one.
PUBLIC = {"flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp"}
LEGACY_PUBLIC = {"flwr.client", "flwr.client.mod", "flwr.common", "flwr.server", "flwr.server.strategy",
                 "flwr.server.workflow", "flwr.simulation"}  # fmt: skip
FLOWER_PATH = re.compile(r"flwr(\.\w+)+")


def resolve(name: str) -> object:
    return getattr(compat, name)


def _flower_imports(submodule: str) -> list[tuple[str, str]]:
    """(Flower module, name) for each `from flwr... import name` in `shared/flower_compat/<submodule>.py`."""
    tree = ast.parse((REPO / COMPAT / f"{submodule}.py").read_text(encoding="utf-8"))
    return [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("flwr.") for alias in node.names]  # fmt: skip


FLOWER_SYMBOLS = sorted({(sub, module, name) for sub in SUBMODULES for module, name in _flower_imports(sub)})


@pytest.mark.parametrize(("submodule", "module", "name"), FLOWER_SYMBOLS, ids=[f"{m}.{n}" for _, m, n in FLOWER_SYMBOLS])
def test_every_flower_symbol_is_where_the_compat_package_imports_it(submodule, module, name):
    try:
        found = hasattr(importlib.import_module(module), name)
    except ImportError as err:
        found, module = False, f"{module} ({err})"
    assert found, (
        f"{module}.{name}, imported by shared/flower_compat/{submodule}.py and checked against Flower {CHECKED}, "
        f"is gone in Flower {VERSION}"
    )


def test_flower_is_pinned_to_the_version_the_package_was_checked_against():
    pins = re.findall(r'"flwr(?:\[\w+\])?==([\w.]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"))

    assert pins and set(pins) == {CHECKED}, f"pyproject pins Flower {pins}: check shared/flower_compat against it"
    assert VERSION == CHECKED, f"Flower {VERSION} is installed; shared/flower_compat was checked against {CHECKED}"


def test_a_moved_symbol_is_named_with_both_flower_versions():
    with pytest.raises(ImportError, match=rf"Flower {re.escape(VERSION)}: cannot import name 'NoSuchThing'.*"
                                          rf"dp\.py was checked against Flower {re.escape(CHECKED)}"):  # fmt: skip
        with flower_symbols("dp"):
            from flwr.supercore.fab import NoSuchThing  # noqa: F401


def test_the_package_and_its_flower_free_values_import_no_flower():
    code = f"import sys, {', '.join(f'shared.flower_compat.{m}' for m in FLOWER_FREE)}; print('flwr' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout

    assert loaded == "False\n"  # `fedclient start`'s supervisor reads the markers


def test_fedsims_submodules_import_none_of_flowers_slow_packages():
    code = f"import sys; import {', '.join(f'shared.flower_compat.{m}' for m in LIGHT)}; " + \
        f"print(sorted(m for m in {HEAVY_FLOWER!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout

    assert loaded == "[]\n"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_callables_take_the_arguments_the_project_passes(name):
    positional, keywords = CALLS[name]
    signature = inspect.signature(resolve(name))
    try:
        signature.bind(*[None] * positional, **dict.fromkeys(keywords))
    except TypeError as err:
        pytest.fail(f"Flower {VERSION}: {name}{signature} no longer takes {positional} positional + {keywords}: {err}")


@pytest.mark.parametrize("name", sorted(CLIENT_CALLS))
def test_api_clients_keep_their_constructor_and_methods(name):
    keywords, methods = CLIENT_CALLS[name]
    client = resolve(name)
    try:
        inspect.signature(client.from_server_address).bind(**dict.fromkeys(keywords))
    except TypeError as err:
        pytest.fail(f"Flower {VERSION}: {name}.from_server_address no longer takes {keywords}: {err}")
    missing = [m for m in methods if not callable(getattr(client, m, None))]
    assert not missing, f"Flower {VERSION}: {name} lost {missing}"


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constants_keep_their_members(name):
    missing = [member for member in CONSTANTS[name] if not hasattr(resolve(name), member)]
    assert not missing, f"Flower {VERSION}: {name} lost {missing}"


def test_scalar_constants_keep_their_types():
    assert isinstance(compat.SUPERLINK_NODE_ID, int) and isinstance(compat.NOOP_FEDERATION_ID, str)
    assert isinstance(compat.MAIN_PARAMS_RECORD, str) and isinstance(compat.MAIN_CONFIGS_RECORD, str)


@pytest.mark.parametrize(("symbol", "message"), sorted(PROTO_FIELDS))
def test_protobuf_messages_keep_their_fields(symbol, message):
    module = sys.modules[resolve(symbol).__module__]
    descriptor = getattr(module, message).DESCRIPTOR
    missing = [f for f in PROTO_FIELDS[(symbol, message)] if f not in descriptor.fields_by_name]
    assert not missing, f"Flower {VERSION}: {module.__name__}.{message} lost fields {missing}"


@pytest.fixture
def task_identity():
    """A server-side identity for the test; then the one this process had (None where it had none)."""
    saved = {}
    for attr in ("task_id", "run_id", "node_id"):
        try:
            saved[attr] = getattr(compat.TaskIdentity, attr)
        except RuntimeError:  # not set yet
            saved[attr] = None
    compat.set_task_identity(task_id=1, run_id=1, node_id=compat.SUPERLINK_NODE_ID)
    yield
    compat.set_task_identity(**saved)


def test_a_message_id_set_is_the_message_id_read(task_identity):
    message = Message(RecordDict(), 1001, "train")

    compat.set_message_id(message, "msg-7")

    assert message.metadata.message_id == "msg-7", f"Flower {VERSION}: Metadata.message_id moved"
    reply = Message(RecordDict(), reply_to=message)
    assert reply.metadata.reply_to_message_id == "msg-7"


def test_new_messages_carry_the_task_identity(task_identity):
    compat.set_task_identity(task_id=5, run_id=77, node_id=42)

    message = Message(RecordDict(), 1001, "train")

    assert message.metadata.run_id == 77, f"Flower {VERSION}: Message no longer takes run_id from TaskIdentity"
    assert message.metadata.src_node_id == 42


def test_a_new_run_has_the_fields_given():
    run = compat.new_run(3, override_config={"rounds": 2}, primary_task_id=1, federation_id=compat.NOOP_FEDERATION_ID)

    assert isinstance(run, compat.Run)
    assert (run.run_id, run.override_config, run.primary_task_id) == (3, {"rounds": 2}, 1)
    assert run.federation_id == compat.NOOP_FEDERATION_ID
    assert compat.new_run(4).override_config == {}


def test_run_config_strings_parse_as_flwr_run_parses_them():
    assert compat.parse_run_config(["lr=0.1 name='a b'", "rounds=3 deep.key=true"]) == {
        "lr": 0.1, "name": "a b", "rounds": 3, "deep.key": True
    }
    with pytest.raises(ValueError, match="invalid format"):  # Flower's message, as a ValueError
        compat.parse_run_config(["lr=abc"])


def test_the_app_manifest_is_an_app_flower_accepts_with_the_run_config_given(tmp_path):
    run_config = {"rounds": 3, "lr": 0.1, "name": 'a "quoted" b', "deep.key": True, "empty": ""}
    manifest = compat.app_manifest("an-app", "1.2.3", {"serverapp": "s:app", "clientapp": "c:app"}, run_config)
    (tmp_path / "pyproject.toml").write_text(manifest, encoding="utf-8")

    valid, errors, _ = compat.validate_fields_in_config(tomllib.loads(manifest))
    assert valid, f"Flower {VERSION} refuses the manifest Flowerbed writes: {errors}"
    assert compat.get_fused_config_from_dir(tmp_path, {}) == run_config, f"Flower {VERSION}"


def test_a_local_simulation_has_flowers_default_number_of_supernodes():
    assert compat.DEFAULT_SIMULATION_CONFIG.num_supernodes == 2, f"Flower {VERSION}: docs/simulation.md says 2"


def test_the_http_grid_has_what_the_bounded_pull_uses():
    module_name, attribute = compat.HTTP_GRID
    http_grid = getattr(importlib.import_module(module_name), attribute)(token="t")

    runtime_client = type(http_grid).__dict__.get("_runtime_client")
    assert isinstance(runtime_client, property), f"Flower {VERSION}: HttpGrid._runtime_client moved"
    assert http_grid.node.node_id == compat.SUPERLINK_NODE_ID and isinstance(type(http_grid).run, property)
    assert issubclass(compat.ObjectPullError, Exception)


def test_only_flowers_http_grid_is_recognised():
    module_name, attribute = compat.HTTP_GRID
    http_grid = getattr(importlib.import_module(module_name), attribute)

    assert compat.is_http_grid(http_grid.__new__(http_grid)), f"Flower {VERSION}: {module_name}.{attribute} moved"
    assert not compat.is_http_grid(InProcessGrid(ClientApp(), 1, {}, simulation_node_config(1)))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sampling_from_lowers_every_strategys_minimums_for_its_block(name, tiny_config):
    strategy = build_strategy(tiny_config(strategy=name, num_clients=6, clients_per_round=4), federated_evaluation=True)
    before = {attr: getattr(strategy, attr, None) for attr in compat.SAMPLING_MINIMUMS}
    assert all(isinstance(v, int) for v in before.values()), f"Flower {VERSION}: {name} sampling minimums {before}"

    with compat.sampling_from(strategy, 2):
        inside = {attr: getattr(strategy, attr) for attr in compat.SAMPLING_MINIMUMS}

    assert inside == {attr: min(value, 2) for attr, value in before.items()}
    assert {attr: getattr(strategy, attr) for attr in compat.SAMPLING_MINIMUMS} == before


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.array([True, False]),
        np.arange(5, dtype=np.int64)[::2],
        np.zeros((0, 3), dtype=np.float16),
        np.array(2.5, dtype=np.float32),
        np.arange(6, dtype=">i4").reshape(2, 3),
    ],
    ids=["float32", "fortran", "bool", "strided", "empty", "scalar", "big-endian"],
)
def test_npy_view_reads_what_array_numpy_reads(value):
    array = Array(value)

    view = compat.npy_view(array)

    expected = array.numpy()
    assert view.dtype == expected.dtype and view.shape == expected.shape, f"Flower {VERSION}: Array bytes changed"
    np.testing.assert_array_equal(view, expected)
    assert not view.flags.writeable  # a view of the message's bytes, not a copy


@pytest.mark.parametrize(
    "parts",
    [
        [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7.5], dtype=np.float32)],
        [np.arange(5, dtype=np.int64)[::2], np.zeros(0, dtype=np.int64)],
        [np.array([True, False])],
    ],
    ids=["float32", "strided-and-empty", "bool"],
)
def test_npy_array_is_what_array_makes_of_the_concatenation(parts):
    expected = Array.from_numpy_ndarray(np.concatenate([p.reshape(-1) for p in parts]))

    array = compat.npy_array(parts)

    assert (array.dtype, array.shape, array.stype) == (expected.dtype, expected.shape, expected.stype)
    assert array.data == expected.data, f"Flower {VERSION}: Array bytes changed"


def _npy_array(value: np.ndarray, stype: str | None = None, cut: int = 0) -> Array:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=True)
    data = buf.getvalue()
    return Array(dtype=str(value.dtype), shape=value.shape, stype=stype or compat.SType.NUMPY, data=data[: len(data) - cut])


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (_npy_array(np.array([1, None], dtype=object)), "object arrays"),
        (_npy_array(np.arange(3.0), stype="torch.tensor"), "serialization type"),
        (_npy_array(np.arange(3.0), cut=8), "buffer"),
    ],
    ids=["object", "stype", "truncated"],
)
def test_npy_view_refuses_what_it_cannot_view(array, match):
    with pytest.raises(ValueError, match=match):
        compat.npy_view(array)


def test_a_mod_call_next_and_secagg_share_layout_are_as_expected():
    assert typing.get_args(compat.ClientAppCallable) == ([Message, Context], Message), f"Flower {VERSION}"
    plaintext = compat.share_keys_plaintext_concat(3, 9, b"b-share", b"sk-share")
    assert compat.share_keys_plaintext_separate(plaintext) == (3, 9, b"b-share", b"sk-share")


# Where each marker of the SuperNode's output comes from: (Flower module, the text there).
MARKER_SOURCES = {
    "CONNECTED": ("flwr.supernode.start_client_internal", '"SuperNode ID: %s"'),
    "RETRYING": ("flwr.supercore.retry.http_retry", '"Connection attempt failed, retrying in %.2f seconds"'),
    "CONNECTION_FAILED": ("flwr.supernode.fleet_http_connection", '"Failed to initialize the connection to the SuperLink'),
    "EXIT_CODE": ("flwr.supercore.exit.exit", 'f"Exit Code: {code}'),
    "ACTIVATION_REFUSED": ("flwr.supernode.fleet_http_connection", 'f"[code: {flower_error.code}] {flower_error.message}"'),
    "BAD_KEY": ("flwr.supernode.cli.flower_supernode", '"Unable to parse the private key file."'),
    "ABANDONED_TASK": ("flwr.supernode.start_client_internal", '"Run ID %s is not in `RUNNING` status. Ignoring message %s."'),
}


@pytest.mark.parametrize("marker", sorted(MARKER_SOURCES))
def test_each_supernode_log_marker_is_in_flowers_source(marker):
    module, text = MARKER_SOURCES[marker]
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")

    value = getattr(supernode_log, marker)
    assert text in source, f"Flower {VERSION}: {module} no longer logs {text} (supernode_log.{marker}, Flower {CHECKED})"
    template = value.replace(str(supernode_log.ACTIVATION_REFUSED_CODE), "{flower_error.code}")
    assert template in text.replace("%s", "").replace("{code}", ""), f"supernode_log.{marker} = {value!r} is not {text}"


def test_the_refusal_code_and_the_online_window_are_flowers():
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
    from flwr.supercore.error import ApiErrorCode

    assert ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED == supernode_log.ACTIVATION_REFUSED_CODE, f"Flower {VERSION}"
    assert supernode_log.ONLINE_WINDOW == HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL, f"Flower {VERSION}"


def test_the_superlinks_statuses_and_database_name_are_flowers():
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NodeStatus

    assert superlink.RUN_FAILED == f"{Status.FINISHED}:{SubStatus.FAILED}", f"Flower {VERSION} (checked {CHECKED})"
    joined = 'f"{run.status.status}:{run.status.sub_status}"'
    assert joined in Path(importlib.util.find_spec("flwr.cli.run_utils").origin).read_text(encoding="utf-8"), (
        f"Flower {VERSION}: `flwr ls` no longer shows a run's status as {joined} (superlink.RUN_FAILED, Flower {CHECKED})"
    )
    assert superlink.NODE_ONLINE == NodeStatus.ONLINE, f"Flower {VERSION} (checked {CHECKED})"
    assert superlink.IN_MEMORY_DATABASE == FLWR_IN_MEMORY_DB_NAME, f"Flower {VERSION} (checked {CHECKED})"


def test_a_taken_port_is_reported_with_the_marker():
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]

    async def bind() -> None:
        await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", port)

    try:
        with pytest.raises(OSError) as err:
            asyncio.run(bind())  # what uvicorn does, and logs the error of
    finally:
        holder.close()
    assert supernode_log.PORT_TAKEN in str(err.value)


@pytest.fixture
def tls_server(tmp_path):
    """127.0.0.1: a TLS server with a certificate of its own; its port and that certificate."""
    from shared.pki import write_local_certificate

    certificate, key = tmp_path / "server.pem", tmp_path / "server.key"
    write_local_certificate(certificate, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=_accept_once, args=(listener, context), daemon=True).start()
        yield listener.getsockname()[1], certificate


def _accept_once(listener: socket.socket, context: ssl.SSLContext | None) -> None:
    connection, _ = listener.accept()
    with connection:
        if context is None:
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # a server without TLS
            return
        try:
            context.wrap_socket(connection, server_side=True).close()
        except OSError:
            pass


def _handshake_error(port: int, trusted: Path | None = None) -> str:
    context = ssl.create_default_context(cafile=None if trusted is None else str(trusted))
    with socket.create_connection(("127.0.0.1", port)) as connection:
        try:
            context.wrap_socket(connection, server_hostname="127.0.0.1").close()
        except ssl.SSLError as err:
            return str(err)
    return ""


def test_a_certificate_another_ca_signed_is_reported_with_the_marker(tls_server, tmp_path):
    from shared.pki import write_local_certificate

    port, _ = tls_server
    other = tmp_path / "other"
    other.mkdir()
    write_local_certificate(other / "ca.pem", other / "ca.key")

    assert supernode_log.UNTRUSTED_CERTIFICATE in _handshake_error(port, other / "ca.pem"), ssl.OPENSSL_VERSION


def test_a_port_without_tls_is_reported_with_the_marker():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=_accept_once, args=(listener, None), daemon=True).start()
        error = _handshake_error(listener.getsockname()[1])

    assert supernode_log.NOT_TLS in error, f"{ssl.OPENSSL_VERSION}: {error}"


def _flower_paths(tree: ast.Module) -> list[tuple[str, str]]:
    """(module, name) for every Flower import; ("", path) for a string naming a Flower path."""
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "flwr"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and FLOWER_PATH.fullmatch(node.value):
            found.append(("", node.value))
    return found


def _internal_uses(path: Path) -> list[str]:
    allowed = PUBLIC | LEGACY_PUBLIC if path.parts[0] == "benchmarks" else PUBLIC
    bad = []
    for module, name in _flower_paths(ast.parse((REPO / path).read_text(encoding="utf-8"))):
        if module not in allowed:
            bad.append(f"{path}: {'.'.join(filter(None, (module, name)))}")
        elif name and name != "*" and name not in getattr(importlib.import_module(module), "__all__", [name]):
            bad.append(f"{path}: {module}.{name} (not exported by {module})")
    return bad


def test_only_flower_compat_touches_flower_internals():
    """Product code, apps and benchmarks import Flower's public API only (tests may probe Flower)."""
    sources = [
        p.relative_to(REPO)
        for p in REPO.rglob("*.py")
        if not any(part.startswith(".") or part in ("tests", "build", "venv") for part in p.relative_to(REPO).parts)
    ]
    assert COMPAT / "__init__.py" in sources and len(sources) > 20
    bad = [use for p in sources if COMPAT not in p.parents for use in _internal_uses(p)]
    assert not bad, "Flower internals outside shared/flower_compat/:\n" + "\n".join(bad)


def test_the_internals_check_catches_each_way_in():
    source = (
        "from flwr.app import Message\n"
        "from flwr.supercore.run import Run\n"
        "import flwr.proto.node_pb2\n"
        "HTTP = 'flwr.superlink.grid.http_grid'\n"
    )
    assert _flower_paths(ast.parse(source)) == [
        ("flwr.app", "Message"),
        ("flwr.supercore.run", "Run"),
        ("flwr.proto.node_pb2", ""),
        ("", "flwr.superlink.grid.http_grid"),
    ]


def test_flower_superlink_builds_its_app_with_the_create_app_the_front_replaces():
    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
    source = inspect.getsource(cli._run_superlink_http_api)  # noqa: SLF001 - the hook point itself

    assert re.search(r"from flwr\.superlink\.main import \(?[^)]*\bcreate_app\b", source), "create_app is not looked up at start"
    assert "uvicorn.run(" in source and "app=fastapi_app" in source


@pytest.mark.parametrize("state_class", ["SqlLinkState", "InMemoryLinkState"])
def test_every_way_a_task_enters_flowers_state_takes_the_message_first(state_class):
    from flwr.server.superlink import linkstate

    cls = getattr(linkstate, state_class)
    for name in compat.STORES_TASKS:
        assert list(inspect.signature(getattr(cls, name)).parameters)[1] in ("message", "messages"), f"{state_class}.{name}"
    stores = {n for n, f in inspect.getmembers(cls, inspect.isfunction) if n.startswith("store_message")}
    assert stores - {"store_message_res"} == set(compat.STORES_TASKS), f"{state_class} stores tasks another way"


def test_the_superlink_served_is_the_wrapped_app_and_stopping_runs_before_uvicorn_stops(monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "handle_exit", uvicorn.Server.handle_exit)  # restored after the test
    monkeypatch.setattr(compat.superlink_main, "create_app", compat.superlink_main.create_app)
    assert "self.handle_exit" in inspect.getsource(uvicorn.Server.capture_signals), "uvicorn stops another way"
    events = []

    def flower_superlink() -> None:  # what `flower-superlink` does: build the app, serve it, be signalled
        events.append(("served", compat.superlink_main.create_app()))
        server = uvicorn.Server(uvicorn.Config(app=events[-1][1]))
        server.handle_exit(signal.SIGTERM, None)
        events.append(("exiting", server.should_exit))

    monkeypatch.setenv("FLWR_DATABASE", ":flwr-in-memory:")
    monkeypatch.setattr(sys.modules["shared.flower_compat.fleet_api"], "flower_superlink", flower_superlink)
    compat.run_superlink(lambda app: ("wrapped", app), lambda: events.append(("stopping", None)))

    assert [e[0] for e in events] == ["served", "stopping", "exiting"] and events[2][1] is True
    assert events[0][1][0] == "wrapped" and hasattr(events[0][1][1], "state")


@pytest.mark.parametrize("state_class", ["SqlLinkState", "InMemoryLinkState"])
def test_every_way_a_node_leaves_flowers_state_names_it_node_id(state_class):
    from flwr.server.superlink import linkstate

    cls = getattr(linkstate, state_class)
    for name in compat.REMOVES_NODES:
        assert "node_id" in inspect.signature(getattr(cls, name)).parameters, f"{state_class}.{name}"
    leaves = {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if re.match(r"(delete|deactivate|unregister|remove|disable)_node", n)}
    assert leaves == set(compat.REMOVES_NODES), f"{state_class} takes nodes out another way"


@pytest.mark.parametrize("state_class", ["SqlLinkState", "InMemoryLinkState"])
def test_the_state_methods_the_fronts_handlers_see_replaced_take_what_the_front_gives(state_class):
    """fedserver.front_state stands in for these methods of Flower's state: the same parameters."""
    from flwr.server.superlink import linkstate

    cls = getattr(linkstate, state_class)
    parameters = {name: list(inspect.signature(getattr(cls, name)).parameters)[1:] for name in
                  ("get_run_status", "store_traffic", "acknowledge_node_heartbeat")}  # fmt: skip
    assert parameters == {"get_run_status": ["run_ids"], "store_traffic": ["run_id", "bytes_sent", "bytes_recv"],
                          "acknowledge_node_heartbeat": ["node_id", "heartbeat_interval"]}  # fmt: skip
    assert inspect.signature(cls.store_traffic).parameters["bytes_sent"].kind is inspect.Parameter.KEYWORD_ONLY
    assert hasattr(cls, "session") is (state_class == "SqlLinkState")
    assert compat.RUNNING == "running"


def test_sqlite_connections_opened_after_wait_for_sqlite_locks_wait_that_long(tmp_path, monkeypatch):
    import sqlalchemy  # Flower's
    from flwr.supercore import sql_mixin

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after the test
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "state.db"))
    compat.wait_for_sqlite_locks(12.5)
    state = compat.linkstate_of(compat.superlink_main.create_app())
    with state.session() as session:
        assert session.execute(sqlalchemy.text("PRAGMA busy_timeout")).scalar() == 12500
        assert session.execute(sqlalchemy.text("PRAGMA journal_mode")).scalar() == "wal"  # Flower's other pragmas stay


@pytest.mark.parametrize("database", ["file", ":memory:", ":flwr-in-memory:"])
def test_after_objects_in_memory_the_superlinks_objects_are_in_memory_and_its_state_where_it_was(database, tmp_path,
                                                                                                  monkeypatch):  # fmt: skip
    from flwr.server.superlink.linkstate import InMemoryLinkState, SqlLinkState
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    monkeypatch.setattr(compat.superlink_main, "get_objectstore_linkstate_factories",
                        compat.superlink_main.get_objectstore_linkstate_factories)  # restored after the test  # fmt: skip
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "state.db") if database == "file" else database)
    compat.objects_in_memory()
    state = compat.linkstate_of(compat.superlink_main.create_app())
    assert isinstance(state, InMemoryLinkState if database == ":flwr-in-memory:" else SqlLinkState)
    assert isinstance(state.object_store, InMemoryObjectStore)
    if database == "file":
        assert (tmp_path / "state.db").exists()


def test_after_transactions_take_turns_a_session_holds_the_turn_until_it_ends(tmp_path, monkeypatch):
    from flwr.supercore import sql_mixin

    monkeypatch.setattr(sql_mixin.SqlMixin, "session", sql_mixin.SqlMixin.session)  # restored after the test
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "state.db"))
    turn = threading.RLock()
    compat.transactions_take_turns(turn)
    state = compat.linkstate_of(compat.superlink_main.create_app())
    inside, leave, seen = threading.Event(), threading.Event(), []

    def hold_a_session() -> None:
        with state.session(), state.session():  # nested: one turn
            seen.append(state.get_run_status(set()))  # a query inside it
            inside.set()
            leave.wait(60)

    holder = threading.Thread(target=hold_a_session)
    holder.start()
    assert inside.wait(60)
    assert not turn.acquire(blocking=False)  # another thread's session waits for this one
    leave.set()
    holder.join(60)
    assert turn.acquire(blocking=False)
    turn.release()
    assert seen == [{}] and state.get_run_status(set()) == {}


def test_each_fleet_call_the_front_answers_is_the_route_flower_answers_with_that_handler():
    from flwr.superlink.routers.fleet import router

    routes = {route.path: route for route in router.router.routes}
    for path, call in compat.FLEET_CALLS.items():
        route = routes[path]
        source = inspect.getsource(route.endpoint)
        assert route.methods == {"POST"}, path
        assert typing.get_type_hints(route.endpoint, include_extras=True)["request"].__origin__ is call.request, path
        assert f"fleet_handlers.{call.handler}(" in source, path
        assert ("store=state.object_store" in source) is call.with_store, path
        assert call.request.DESCRIPTOR.fields_by_name["node"].message_type.name == "Node", path
    # The router's one dependency only logs a version mismatch (the front answers without it).
    assert [(type(d.dependency).__name__, d.dependency._reject_incompatible) for d in router.router.dependencies] == [  # noqa: SLF001
        ("VersionDependency", False)
    ]


def test_each_runtime_call_the_front_answers_is_the_route_flower_answers_with_that_handler_and_task(monkeypatch):
    from flwr.supercore.dependencies import task
    from flwr.supercore.routers.runtime import router

    routes = {route.path: route for route in router.routes}
    for path, call in compat.RUNTIME_CALLS.items():
        route = routes[path]
        assert route.methods == {"POST"}, path
        assert typing.get_type_hints(route.endpoint, include_extras=True)["request"].__origin__ is call.request, path
        assert f"handlers.{call.handler}(request, state, task)" in inspect.getsource(route.endpoint), path
        assert [d.call.__name__ for d in route.dependant.dependencies] == [
            "get_protobuf_request", "get_runtime_state", "get_runtime_handlers", "get_task"], path  # fmt: skip
    # The task is the one `get_task_by_token` finds for the one token header (as RuntimeCall.handle)
    source = inspect.getsource(task.authenticate_task)
    assert "getlist(TASK_TOKEN_HEADER)) != 1" in source and "state.get_task_by_token(token)" in source
    assert task.TASK_TOKEN_HEADER == compat.TASK_TOKEN_HEADER
    monkeypatch.setenv("FLWR_DATABASE", ":flwr-in-memory:")
    app = compat.superlink_main.create_app()
    assert app.state.runtime_state_factory.state() is compat.linkstate_of(app)
    assert all(callable(getattr(app.state.runtime_handlers, c.handler)) for c in compat.RUNTIME_CALLS.values())


def test_flowers_app_does_nothing_around_a_fleet_call_but_authenticate_it(monkeypatch):
    """The middleware the front answers without: none of it but NodeAuthMiddleware (whose checks the
    front makes) and the protobuf translation (which it does itself) acts on a Fleet call, nor on the
    ServerApp's object calls (runtime tracing acts on two other responses only)."""
    from flwr.supercore.routers.runtime import tracing
    from flwr.superlink import main

    middleware = [m.cls.__name__ + (f":{m.kwargs['dispatch'].__name__}" if "dispatch" in m.kwargs else "") for m in main._get_middleware()]  # noqa: SLF001
    monkeypatch.setenv("FLWR_DATABASE", ":flwr-in-memory:")

    assert middleware == [
        "ControlSensitiveResponseMiddleware", "BaseHTTPMiddleware:http_error_translator", "ControlAuthenticationMiddleware",
        "ControlLicenseMiddleware", "ProtobufTranslationMiddleware", "RuntimeTracingMiddleware",
        "ControlEventLogMiddleware", "NodeAuthMiddleware", "FleetEventLogMiddleware",
    ]  # fmt: skip
    assert not compat.flower_wraps_fleet_calls(compat.superlink_main.create_app())
    traced = re.findall(r"isinstance\(result, (\w+)\)", inspect.getsource(tracing.RuntimeTracingMiddleware.dispatch))
    assert traced == ["AcquireTaskResponse", "PullTaskInputResponse"]


def test_the_front_accepts_what_flowers_supernode_signs():
    import httpx
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    from flwr.supercore.protobuf.client import ProtobufRequestContext

    from fedserver.fleet_front import signed_key

    private = ec.generate_private_key(ec.SECP256R1())
    request = httpx.Request("POST", "https://superlink" + compat.PULL_MESSAGES_PATH)
    context = ProtobufRequestContext("/flwr.proto.Fleet/PullMessages", compat.PullMessagesRequest(), request)

    NodeAuthHttpInterceptor(private, private.public_key()).intercept(context, lambda ctx: ctx.request)

    assert signed_key({k.lower(): v for k, v in request.headers.raw}) == compat.public_key_to_bytes(private.public_key())
    assert compat.PullMessagesResponse().SerializeToString() == b""  # the front's empty answer: no field set


def test_an_emulated_device_that_cannot_connect_fails_alone():
    from flwr.supernode import fleet_http_connection

    source = inspect.getsource(fleet_http_connection.http_request_response)

    assert "flwr_exit(" in source, "the Fleet connection no longer ends its process through flwr_exit"
    assert fleet_http_connection.flwr_exit is not flower_exit()
    with pytest.raises(compat.FleetConnectionError, match="exit code 305: no SuperLink"):
        fleet_http_connection.flwr_exit(305, "no SuperLink")


def flower_exit() -> object:
    from flwr.supercore.exit import flwr_exit

    return flwr_exit


def test_a_deployed_grid_retries_a_handshake_that_timed_out_and_still_gives_up_on_a_bad_certificate():
    import httpx
    from flwr.supercore.retry import make_simple_http_retry_invoker

    timed_out = httpx.ConnectTimeout("_ssl.c:989: The handshake operation timed out")
    bad_certificate = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed (_ssl.c:1006)")
    grid = types.SimpleNamespace(_retry_invoker=make_simple_http_retry_invoker())
    assert grid._retry_invoker.should_giveup(timed_out), "Flower now retries handshake timeouts itself"

    compat.retry_handshake_timeouts(grid)

    assert not grid._retry_invoker.should_giveup(timed_out)
    assert grid._retry_invoker.should_giveup(bad_certificate)
