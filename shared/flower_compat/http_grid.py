"""The deployed ServerApp's bounded pull of replies (fedserver/polling.py): what `HttpGrid.pull_messages`
does, object by object, with a byte count in between, so that an oversized reply is never inflated.

Flower's HttpGrid has no bound; this reads its Runtime client (`_runtime_client`), `node` and
`run`, and uses the object-tree helpers its own `pull_messages` uses.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from flwr.app import Error, Message

from shared.flower_compat import flower_symbols
from shared.flower_compat.messages import ErrorCode, set_message_id

with flower_symbols("http_grid"):
    from flwr.app.message import make_message
    from flwr.common.serde_utils import metadata_from_proto
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectPullError,
        inflate_object_from_contents,
        pull_objects,
    )

REPLIES_AT_ONCE = 4  # replies pulled side by side
OBJECTS_AT_ONCE = 8  # objects of a reply pulled side by side
# Flower's deployment (SuperLink) grid, by module path: a simulation does not pay for importing it.
HTTP_GRID = ("flwr.superlink.grid.http_grid", "HttpGrid")

__all__ = ["HTTP_GRID", "ReplyTooLarge", "is_http_grid", "pull_replies_within", "retry_handshake_timeouts"]


def is_http_grid(grid: object) -> bool:
    """Whether `grid` is Flower's deployment grid (`HttpGrid`, which polls the SuperLink).

    Looked up in `sys.modules`, not imported: importing Flower's SuperLink grid costs a
    simulation about a second, and a grid can only be an HttpGrid once its module is imported.
    Relies on the class's module path, `HTTP_GRID`.
    """
    module_name, attribute = HTTP_GRID
    http_grid = getattr(sys.modules.get(module_name), attribute, None)
    return http_grid is not None and isinstance(grid, http_grid)


def retry_handshake_timeouts(grid: Any) -> None:
    """Let `grid` (an HttpGrid) retry a connection whose TLS handshake timed out, as it retries
    every other connect timeout, where Flower gives up and fails the run.

    Flower's HTTP retry (`make_simple_http_retry_invoker`) gives up on any error whose text says
    "ssl", to stop on certificate errors; a handshake that timed out on a busy SuperLink says
    "_ssl.c: The handshake operation timed out" too (httpx.ConnectTimeout: nothing was sent, so
    a retry cannot repeat a request). Relies on HttpGrid's `_retry_invoker`, the RetryInvoker
    its Runtime client calls through, and that invoker's `should_giveup`.
    """
    import httpx  # noqa: PLC0415 - Flower's own dependency, loaded with HttpGrid

    invoker = grid._retry_invoker  # noqa: SLF001 - see the docstring
    gives_up = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        return not isinstance(exc, httpx.ConnectTimeout) and bool(gives_up and gives_up(exc))

    invoker.should_giveup = should_giveup


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
    the objects in flight for each of the REPLIES_AT_ONCE replies it pulls side by side, each
    OBJECTS_AT_ONCE objects at a time (Flower's HttpGrid pulls one reply at a time, 2 objects at
    a time: a round's replies then take a round trip to the SuperLink for every 2 objects).

    Relies on HttpGrid's `_runtime_client` (PullMessages, PullObject, ConfirmMessageReceived; it
    takes calls from several threads), `node` and `run`, and on the object-tree helpers its own
    `pull_messages` uses.
    """
    client = grid._runtime_client  # noqa: SLF001 - see the docstring
    response = client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
    announced = list(zip(response.messages_list, response.message_object_trees, strict=True))
    if len(announced) < 2:
        return [_pull_reply(grid, proto, tree, limit, too_large) for proto, tree in announced]
    with ThreadPoolExecutor(min(REPLIES_AT_ONCE, len(announced)), thread_name_prefix="pull-reply") as pool:
        return list(pool.map(lambda reply: _pull_reply(grid, *reply, limit, too_large), announced))


def _pull_reply(grid: Any, proto: Any, tree: Any, limit: int, too_large: Callable[[ReplyTooLarge], Error]) -> Message:
    client, run_id, message_id = grid._runtime_client, grid.run.run_id, proto.metadata.message_id  # noqa: SLF001
    fetch = make_pull_object_fn_protobuf(client.PullObject, grid.node, run_id)
    budget = _ByteBudget(limit)
    ids = [node.object_id for node in iterate_object_tree(tree)]
    try:
        contents = pull_objects(ids, lambda object_id: budget.take(fetch(object_id)), max_concurrent_pulls=OBJECTS_AT_ONCE)
    except ObjectPullError as err:  # as HttpGrid: the device's upload is incomplete
        unavailable = Error(ErrorCode.MESSAGE_UNAVAILABLE, f"Reply message objects are unavailable. {err}")
        return _error_reply(proto, unavailable)
    except ReplyTooLarge as err:
        error: Error | None = too_large(err)
    else:
        error = None
    client.ConfirmMessageReceived(
        ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=message_id)
    )
    if error is not None:
        return _error_reply(proto, error)
    message = cast(Message, inflate_object_from_contents(message_id, contents))  # a reply's tree is a Message
    set_message_id(message, message_id)
    return message


def _error_reply(proto: Any, error: Error) -> Message:
    """An error reply in place of the reply `proto` announced: same node, run and message answered."""
    return make_message(metadata=metadata_from_proto(proto.metadata), error=error)
