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
given (`sql_mixin.SQLITE_PRAGMAS`, read as each connects), the Fleet routes' paths, protobuf messages and handlers
(flwr/superlink/routers/fleet/router.py: the functions of `fleet_handlers` each route calls),
and the node-authentication headers and time tolerances that Flower's `authenticate_node`
checks (flwr/superlink/routers/fleet/node_auth.py).
"""

from __future__ import annotations

from collections.abc import Callable
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
    from flwr.supercore import sql_mixin
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
    from flwr.superlink import extensions
    from flwr.superlink import main as superlink_main  # `flower-superlink` looks up create_app here at start
    from flwr.superlink.servicer.fleet import fleet_handlers

__all__ = [
    "FLEET_CALLS", "FLEET_HTTP_PUBLIC_KEY_HEADER", "FLEET_HTTP_SIGNATURE_HEADER", "HEARTBEAT_PATH",
    "PROTOBUF_MEDIA_TYPE", "PULL_MESSAGES_PATH", "REMOVES_NODES", "RUNNING", "STORES_TASKS", "SYSTEM_TIME_TOLERANCE",
    "TIMESTAMP_HEADER", "TIMESTAMP_TOLERANCE", "FleetCall", "PullMessagesRequest", "PullMessagesResponse",
    "SendNodeHeartbeatRequest", "SendNodeHeartbeatResponse", "bytes_to_public_key", "flower_wraps_fleet_calls",
    "linkstate_of", "now", "run_superlink", "verify_signature", "wait_for_sqlite_locks",
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
