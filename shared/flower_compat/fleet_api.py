"""The SuperLink's side of the Fleet HTTP API, for `fedserver.fleet_front`: how a device's pull and
heartbeat are asked, signed and answered, the state that stores its tasks, and where the SuperLink's
web app is built.

Relies on `flower-superlink` building its ASGI app with `flwr.superlink.main.create_app` (looked
up there at start), the app's `state.linkstate_factory`, the LinkState's methods that store a
task for a node (`STORES_TASKS`), the pull's and the heartbeat's paths and protobuf messages,
the heartbeat's handler (the function Flower's route calls), and the node-authentication
headers and time tolerances that Flower's `authenticate_node` checks
(flwr/superlink/routers/fleet/node_auth.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from shared.flower_compat import flower_symbols

with flower_symbols("fleet_api"):
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse  # pylint: disable=E0611
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse  # pylint: disable=E0611
    from flwr.superlink.cli.flower_superlink import flower_superlink
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
    from flwr.superlink import main as superlink_main  # `flower-superlink` looks up create_app here at start
    from flwr.superlink.servicer.fleet.fleet_handlers import send_node_heartbeat

__all__ = [
    "FLEET_HTTP_PUBLIC_KEY_HEADER", "FLEET_HTTP_SIGNATURE_HEADER", "HEARTBEAT_PATH", "PROTOBUF_MEDIA_TYPE",
    "PULL_MESSAGES_PATH", "STORES_TASKS", "SYSTEM_TIME_TOLERANCE", "TIMESTAMP_HEADER", "TIMESTAMP_TOLERANCE",
    "PullMessagesRequest", "PullMessagesResponse", "SendNodeHeartbeatRequest", "SendNodeHeartbeatResponse",
    "bytes_to_public_key", "linkstate_of", "now", "run_superlink", "send_node_heartbeat", "verify_signature",
]  # fmt: skip

PULL_MESSAGES_PATH: Final = "/v1/fleet/pull-messages"  # POST, a PullMessagesRequest
HEARTBEAT_PATH: Final = "/v1/fleet/send-node-heartbeat"  # POST, a SendNodeHeartbeatRequest, answered by `send_node_heartbeat`
# The LinkState methods through which a task for a node enters the state; the first argument is the
# Message (a sequence of them for `store_messages`).
STORES_TASKS: Final = ("store_message_ins", "store_message_and_object_tree", "store_messages")


def linkstate_of(app: Any) -> Any:
    """The LinkState instance the SuperLink's app serves (created when the app is built)."""
    return app.state.linkstate_factory.state()


def run_superlink(wrap: Callable[[Any], Any]) -> None:
    """`flower-superlink` with its command line (sys.argv), serving `wrap(app)` in place of the ASGI app it builds."""
    build = superlink_main.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        return wrap(build(*args, **kwargs))

    superlink_main.create_app = create_app
    flower_superlink()
