"""The SuperLink's side of the Fleet HTTP API, for `fedserver.fleet_front`: the calls a device makes,
how they are signed and which handler answers each, the state that stores tasks and removes nodes,
and where the SuperLink's web app is built.

Relies on `flower-superlink` building its ASGI app with `flwr.superlink.main.create_app` (looked
up there at start) and serving it with `uvicorn.run` (whose server stops through
`uvicorn.Server.handle_exit`), the app's `state.linkstate_factory`, `fleet_event_log_plugin` and
extension middleware, the LinkState's methods that store a task for a node (`STORES_TASKS`) or
take a node out (`REMOVES_NODES`), those through which the Fleet handlers read a run's status
(`get_run_status`, whose RunStatus has `status`, `RUNNING` while it runs) and add to its traffic
(`store_traffic`), its re-entrant `session()`, the SQLite pragmas every connection Flower opens is
given (`sql_mixin.SQLITE_PRAGMAS`, read as each connects) and the session every access to it
opens (`SqlMixin.session`, `query` included), `create_app`'s call of
`get_objectstore_linkstate_factories` (looked up in `flwr.superlink.main` as the app is built)
and the factories it returns (a LinkState takes any ObjectStore), the Fleet routes' paths, protobuf messages and handlers
(flwr/superlink/routers/fleet/router.py: the functions of `fleet_handlers` each route calls),
and the node-authentication headers and time tolerances that Flower's `authenticate_node`
checks (flwr/superlink/routers/fleet/node_auth.py); for the ServerApp's object calls on the Runtime
API, their routes (flwr/supercore/routers/runtime/router.py: `handlers.<name>(request, state, task)`
with the app's `runtime_handlers` and `runtime_state_factory`), the task-token header and
`get_task_by_token`, with which Flower's `authenticate_task` authenticates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Final

import uvicorn

from shared.flower_compat import flower_symbols

with flower_symbols("fleet_api"):
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE, Status
    from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
        PullMessagesRequest,
        PullMessagesResponse,
        PushMessagesRequest,
    )
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse  # pylint: disable=E0611
    from flwr.proto.message_pb2 import (  # pylint: disable=E0611
        ConfirmMessageReceivedRequest,
        PullObjectRequest,
        PushObjectRequest,
    )
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore import sql_mixin
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.constant import (
        FLEET_HTTP_PUBLIC_KEY_HEADER,
        FLEET_HTTP_SIGNATURE_HEADER,
        FLWR_IN_MEMORY_DB_NAME,
        TASK_TOKEN_HEADER,
    )
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
    from flwr.superlink import extensions
    from flwr.superlink import main as superlink_main  # `flower-superlink` looks up create_app here at start
    from flwr.superlink.servicer.fleet import fleet_handlers

__all__ = [
    "FLEET_CALLS", "FLEET_HTTP_PUBLIC_KEY_HEADER", "FLEET_HTTP_SIGNATURE_HEADER", "HEARTBEAT_PATH",
    "PROTOBUF_MEDIA_TYPE", "PULL_MESSAGES_PATH", "REMOVES_NODES", "RUNNING", "RUNTIME_CALLS", "STORES_TASKS",
    "TASK_TOKEN_HEADER", "RuntimeCall", "SYSTEM_TIME_TOLERANCE",
    "TIMESTAMP_HEADER", "TIMESTAMP_TOLERANCE", "FleetCall", "PullMessagesRequest", "PullMessagesResponse",
    "SendNodeHeartbeatRequest", "SendNodeHeartbeatResponse", "bytes_to_public_key", "flower_wraps_fleet_calls",
    "linkstate_of", "now", "objects_in_memory", "run_superlink", "transactions_take_turns", "verify_signature",
    "wait_for_sqlite_locks",
]  # fmt: skip

PULL_MESSAGES_PATH: Final = "/v1/fleet/pull-messages"
HEARTBEAT_PATH: Final = "/v1/fleet/send-node-heartbeat"
# The LinkState methods through which a task for a node enters the state; the first argument is the
# Message (a sequence of them for `store_messages`).
STORES_TASKS: Final = ("store_message_ins", "store_message_and_object_tree", "store_messages")
# The LinkState methods that take a node out of the federation (unregister) or offline; its id is
# the argument named `node_id`.
REMOVES_NODES: Final = ("delete_node", "deactivate_node")
RUNNING: Final = Status.RUNNING  # a running run's `RunStatus.status`


@dataclass(frozen=True)
class FleetCall:
    """A Fleet call a connected node makes, named by its request's `node`: the protobuf request, and
    the function of `fleet_handlers` Flower's route answers it with (given the LinkState's object
    store too where `with_store`)."""

    request: type[Any]
    handler: str
    with_store: bool = False

    def handle(self, request: Any, state: Any) -> Any:
        """The protobuf response Flower's route would send, from Flower's handler and `state` (a LinkState)."""
        store = {"store": state.object_store} if self.with_store else {}
        return getattr(fleet_handlers, self.handler)(request=request, state=state, **store)


# POST path -> the call. Registration, activation, runs and FABs are not among them.
FLEET_CALLS: Final = {
    PULL_MESSAGES_PATH: FleetCall(PullMessagesRequest, "pull_messages", with_store=True),
    HEARTBEAT_PATH: FleetCall(SendNodeHeartbeatRequest, "send_node_heartbeat"),
    "/v1/fleet/pull-object": FleetCall(PullObjectRequest, "pull_object"),
    "/v1/fleet/push-object": FleetCall(PushObjectRequest, "push_object"),
    "/v1/fleet/push-messages": FleetCall(PushMessagesRequest, "push_messages"),
    "/v1/fleet/confirm-message-received": FleetCall(ConfirmMessageReceivedRequest, "confirm_message_received", with_store=True),
}


@dataclass(frozen=True)
class RuntimeCall:
    """An object call the ServerApp makes on the Runtime API, authenticated by its task token: the
    protobuf request, and the method of the app's `runtime_handlers` Flower's route answers it with."""

    request: type[Any]
    handler: str

    def handle(self, app: Any, request: Any, token: str) -> Any:
        """The protobuf response Flower's route would send to a caller with `token`, from Flower's
        handler and the app's runtime state; None where Flower knows no running task by that token."""
        state = app.state.runtime_state_factory.state()
        task = state.get_task_by_token(token)
        return None if task is None else getattr(app.state.runtime_handlers, self.handler)(request, state, task)


# POST path -> the call: each object of a round's tasks and replies. Not pull-messages (which deletes
# what it answers, so it could not be handed to Flower again) nor anything else.
RUNTIME_CALLS: Final = {
    "/v1/runtime/pull-object": RuntimeCall(PullObjectRequest, "pull_object"),
    "/v1/runtime/push-object": RuntimeCall(PushObjectRequest, "push_object"),
    "/v1/runtime/confirm-message-received": RuntimeCall(ConfirmMessageReceivedRequest, "confirm_message_received"),
}


def linkstate_of(app: Any) -> Any:
    """The LinkState instance the SuperLink's app serves (created when the app is built)."""
    return app.state.linkstate_factory.state()


def flower_wraps_fleet_calls(app: Any) -> bool:
    """Whether the app does more around a Fleet call than authenticate it: an event log or extension
    middleware (plugins of Flower's enterprise builds; the open-source build has neither)."""
    return getattr(app.state, "fleet_event_log_plugin", None) is not None or bool(extensions.get_middleware())


def wait_for_sqlite_locks(seconds: float) -> None:
    """Every SQLite connection Flower opens from here on waits up to `seconds` for another's write
    to end (its `busy_timeout`), where Flower's waits 5 s: under a large fleet's writes a request
    that waited longer fails with "database is locked" (a 500 to a device, which loses its task)."""
    sql_mixin.SQLITE_PRAGMAS = tuple(
        (pragma, str(round(seconds * 1000)) if pragma == "busy_timeout" else value)
        for pragma, value in sql_mixin.SQLITE_PRAGMAS
    )


def transactions_take_turns(turn: AbstractContextManager[Any]) -> None:
    """Flower's database sessions in this process (every read and write of its SQLite state) each
    take `turn` (a re-entrant lock: a thread's nested sessions share its turn) from here on, where
    each would wait for another's write in SQLite's busy handler."""
    session = sql_mixin.SqlMixin.session

    @contextmanager
    def in_turn(self: Any) -> Iterator[Any]:
        with turn, session(self) as opened:
            yield opened

    sql_mixin.SqlMixin.session = in_turn


def objects_in_memory() -> None:
    """SuperLink apps built from here on keep their object store (the content of the messages in
    flight: a task's weights until its device has them, a reply's until the ServerApp has it) in
    memory, Flower's own InMemoryObjectStore, while their state (nodes, runs, messages, push
    sessions) stays in the `--database` SQLite file. Flower keeps both in that file: every object
    of every message, a round's weights for each device twice, is written there and deleted again."""
    build = superlink_main.get_objectstore_linkstate_factories

    def factories(database: str, federation_manager: Any) -> tuple[Any, Any]:
        objects, state = build(database, federation_manager)
        if type(objects) is not ObjectStoreFactory or objects.database == FLWR_IN_MEMORY_DB_NAME:
            return objects, state  # in memory already, or a database other than SQLite
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    superlink_main.get_objectstore_linkstate_factories = factories


def run_superlink(wrap: Callable[[Any], Any], stopping: Callable[[], None] = lambda: None) -> None:
    """`flower-superlink` with its command line (sys.argv), serving `wrap(app)` in place of the ASGI
    app it builds; `stopping()` runs as its web server (uvicorn) begins to stop on SIGINT or SIGTERM,
    before it waits for the requests in flight."""
    build, handle_exit = superlink_main.create_app, uvicorn.Server.handle_exit

    def create_app(*args: Any, **kwargs: Any) -> Any:
        return wrap(build(*args, **kwargs))

    def on_exit(server: uvicorn.Server, *signal: Any) -> None:
        stopping()
        handle_exit(server, *signal)

    superlink_main.create_app = create_app
    uvicorn.Server.handle_exit = on_exit  # the handler uvicorn installs for SIGINT and SIGTERM
    flower_superlink()
