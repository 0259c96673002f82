"""max-reply-bytes: the deployed grid counts a reply's bytes as its objects arrive and stops
pulling one that passes the bound, before inflating it; screening refuses it, naming the node
and the sizes. Flower's SuperLink is stood in for by `FakeRuntime`, serving real object trees."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree, iterate_object_tree

from fedserver.polling import REPLY_MARGIN, BoundedRepliesGrid, FastPollingGrid, fast_polling
from shared.device_errors import REPLY_TOO_LARGE
from fedserver.strategies import screen_evaluation_replies
from shared.flower_compat.messages import SUPERLINK_NODE_ID, set_message_id
from shared.flower_compat.runs import new_run
from shared.config import ConfigError, RunConfig

NODE = 7
ARRAY_BYTES = 10_000  # each of a reply's arrays; each is one object of about this size
ARRAYS = 40
BARRIER_BOUND = 60.0  # s a test waits for a pull beside another before it fails (not a timing)


class FakeRuntime:
    """The Runtime API of a SuperLink holding `replies`: their protos, trees and objects."""

    def __init__(self, replies: list[Message]) -> None:
        self.protos = [message_to_proto(remove_content_from_message(r)) for r in replies]
        self.trees = [get_object_tree(r) for r in replies]
        self.objects = {k: v.deflate() for r in replies for k, v in get_all_nested_objects(r).items()}
        self.pulled = 0  # bytes served by PullObject
        self.confirmed: list[str] = []

    def PullMessages(self, request):  # noqa: N802 - Flower's method names
        return PullAppMessagesResponse(messages_list=self.protos, message_object_trees=self.trees)

    def PullObject(self, request):  # noqa: N802
        content = self.objects[request.object_id]
        self.pulled += len(content)
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, request):  # noqa: N802
        self.confirmed.append(request.message_object_id)


class FakeHttpGrid:
    """What `pull_replies_within` and `retry_handshake_timeouts` use of Flower's HttpGrid."""

    def __init__(self, replies: list[Message]) -> None:
        self._runtime_client = FakeRuntime(replies)
        self._retry_invoker = SimpleNamespace(should_giveup=None)
        self.node = Node(node_id=SUPERLINK_NODE_ID)
        self.run = new_run(1)
        self.pushed: list[Message] = []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushed.extend(messages)
        return [f"m{i}" for i, _ in enumerate(messages)]


def reply(arrays: int = ARRAYS, node: int = NODE) -> Message:
    """A reply of `node` to message m0: `arrays` arrays of ARRAY_BYTES each, and metrics."""
    record = ArrayRecord({f"a{i}": Array(np.full(ARRAY_BYTES // 4, i, np.float32)) for i in range(arrays)})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 5})})
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=node, dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id="m0",
        group_id="1", created_at=time.time(), ttl=600.0, message_type="train",
    )  # fmt: skip
    message = make_message(metadata=metadata, content=content)
    set_message_id(message, message.object_id)
    return message


def total_bytes(runtime: FakeRuntime) -> int:
    return sum(len(content) for content in runtime.objects.values())


def test_a_reply_within_the_bound_is_pulled_whole_and_inflated():
    sent = reply()
    grid = BoundedRepliesGrid(FakeHttpGrid([sent]), max_reply_bytes=2 * ARRAYS * ARRAY_BYTES)

    [received] = grid.pull_messages(["m0"])

    assert not received.has_error()
    np.testing.assert_array_equal(received.content["arrays"]["a3"].numpy(), sent.content["arrays"]["a3"].numpy())
    assert received.metadata.message_id == sent.metadata.message_id
    assert grid.inner._runtime_client.confirmed == [sent.metadata.message_id]


def test_a_reply_over_the_bound_is_not_pulled_further_and_comes_back_as_an_error_naming_the_sizes():
    sent = reply()
    inner = FakeHttpGrid([sent])
    bound = 5 * ARRAY_BYTES
    grid = BoundedRepliesGrid(inner, max_reply_bytes=bound)

    [received] = grid.pull_messages(["m0"])

    assert received.has_error() and received.error.code == REPLY_TOO_LARGE
    assert f"over the bound of {bound} bytes" in received.error.reason
    assert (received.metadata.src_node_id, received.metadata.reply_to_message_id) == (NODE, "m0")
    runtime = inner._runtime_client
    assert runtime.pulled < total_bytes(runtime) // 2  # stopped early: most objects never pulled
    assert runtime.confirmed == [sent.metadata.message_id]  # so that the SuperLink deletes its objects


def test_unset_the_bound_is_twice_the_weights_pushed_plus_the_margin():
    grid = BoundedRepliesGrid(FakeHttpGrid([]))
    assert grid.reply_bound() == REPLY_MARGIN  # nothing pushed yet: e.g. SecAgg+'s key exchange

    grid.push_messages([reply(arrays=3)])

    weights = sum(len(a.data) for a in reply(arrays=3).content["arrays"].values())
    assert grid.reply_bound() == 2 * weights + REPLY_MARGIN
    assert BoundedRepliesGrid(FakeHttpGrid([]), max_reply_bytes=123).reply_bound() == 123


def test_a_reply_refused_for_its_size_is_screened_out_with_its_node_and_sizes(caplog):
    grid = BoundedRepliesGrid(FakeHttpGrid([reply()]), max_reply_bytes=ARRAY_BYTES)
    replies = list(grid.pull_messages(["m0"]))

    with caplog.at_level(logging.WARNING, logger="flowerbed.server"):
        valid = screen_evaluation_replies(replies, cfg=None)  # type: ignore[arg-type]  # refused before any check

    assert valid == []
    assert f"node {NODE}: evaluation refused: reply too large: at least" in caplog.text
    assert f"over the bound of {ARRAY_BYTES} bytes" in caplog.text


def test_the_deployed_grid_polls_through_the_bound(monkeypatch):
    monkeypatch.setattr("fedserver.polling.is_http_grid", lambda grid: True)

    grid = fast_polling(FakeHttpGrid([]), 0.2, max_reply_bytes=456)  # type: ignore[arg-type]

    assert isinstance(grid, FastPollingGrid) and isinstance(grid.inner, BoundedRepliesGrid)
    assert grid.inner.reply_bound() == 456


def test_a_negative_bound_is_a_config_error():
    with pytest.raises(ConfigError, match="'max-reply-bytes' must be >= 0"):
        RunConfig.from_mapping({"max-reply-bytes": -1})


def test_replies_pulled_side_by_side_come_back_in_order_each_bounded_on_its_own():
    sent = [reply(node=n, arrays=ARRAYS * 3 if n == 3 else ARRAYS) for n in range(1, 8)]
    inner = FakeHttpGrid(sent)
    grid = BoundedRepliesGrid(inner, max_reply_bytes=2 * ARRAYS * ARRAY_BYTES)

    received = grid.pull_messages(["m0"])

    assert [r.metadata.src_node_id for r in received] == list(range(1, 8))
    assert [r.has_error() for r in received] == [n == 3 for n in range(1, 8)]
    assert received[2].error.code == REPLY_TOO_LARGE
    assert sorted(inner._runtime_client.confirmed) == sorted(r.metadata.message_id for r in sent)


def test_replies_are_pulled_side_by_side():
    """Each of the first two replies' first object is only served once the other's is asked for
    too: pulled one after the other, the barrier breaks (after BARRIER_BOUND s) and the test fails."""
    sent = [reply(node=n) for n in range(1, 5)]
    inner = FakeHttpGrid(sent)
    runtime = inner._runtime_client
    owner = {node.object_id: i for i, tree in enumerate(runtime.trees) for node in iterate_object_tree(tree)}
    barrier, waited, lock = threading.Barrier(2, timeout=BARRIER_BOUND), set(), threading.Lock()
    serve = runtime.PullObject

    def pull_object(request):  # noqa: ANN001, ANN202
        with lock:
            first = owner[request.object_id] in (0, 1) and owner[request.object_id] not in waited
            waited.add(owner[request.object_id])
        if first:
            barrier.wait()
        return serve(request)

    runtime.PullObject = pull_object
    received = BoundedRepliesGrid(inner).pull_messages(["m0"])
    assert [r.metadata.src_node_id for r in received] == [1, 2, 3, 4] and not any(r.has_error() for r in received)
