"""A Flower `Grid` that hands each message straight to a `ClientApp` in this process.

The ServerApp runs against it unchanged: it sees node ids, pushes messages and pulls replies
exactly as through the SuperLink. Each virtual node keeps one `Context` across rounds,
created the first time the node is addressed, so memory grows with the nodes that have been
sampled, never with a copy of data or model per node.

A `batch_runner` may take a whole batch of messages instead: the vectorized trainer
(simulations/vectorized.py) or a pool of worker processes (simulations/workers.py).

What the public Grid API does not offer (the Run, message ids, the identity new messages
carry, error codes) comes from shared/flower_compat.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from shared.flower_compat.messages import SUPERLINK_NODE_ID, ErrorCode, set_message_id
from shared.flower_compat.runs import Run, new_run, set_task_identity

RUN_ID = 1
FIRST_NODE_ID = 1001  # node ids of virtual nodes: FIRST_NODE_ID + partition id


class RoundRunner(Protocol):
    """Produces the replies of a batch of messages at once (the vectorized fast path)."""

    def __call__(self, messages: list[Message], contexts: list[Context]) -> list[Message] | None:
        """Return one reply per message, in order, or None to fall back to the ClientApp."""


class InProcessGrid(Grid):
    """Delivers messages to `client_app` for `num_nodes` virtual nodes in this process.

    `node_config(partition_id)` gives each node's `Context.node_config` (Flower's
    `partition-id` / `num-partitions` keys in a simulation).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: UserConfig,
        node_config: Callable[[int], UserConfig],
        batch_runner: RoundRunner | None = None,
    ) -> None:
        self._client_app = client_app
        self._num_nodes = num_nodes
        self._run_config = run_config
        self._node_config = node_config
        self._batch_runner = batch_runner
        self._contexts: dict[int, Context] = {}
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self._message_ids = (f"msg-{i}" for i in itertools.count(1))
        self._run = new_run(RUN_ID, override_config=run_config)
        # Messages created by the ServerApp take their source and run from this identity.
        set_task_identity(task_id=1, run_id=RUN_ID, node_id=SUPERLINK_NODE_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(range(FIRST_NODE_ID, FIRST_NODE_ID + self._num_nodes))

    def context(self, node_id: int) -> Context:
        """The node's persistent Context (made on first use)."""
        if node_id not in self._contexts:
            partition_id = self._partition_id(node_id)
            self._contexts[node_id] = Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config=self._node_config(partition_id),
                state=RecordDict(),
                run_config=self._run_config,
            )
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self._partition_id(message.metadata.dst_node_id)  # unknown node -> error now
            message_id = next(self._message_ids)
            set_message_id(message, message_id)
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = [i for i in message_ids if i in self._pending or i in self._replies]
        self._deliver([i for i in wanted if i in self._pending])
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        # Delivery is synchronous, so every reply is in hand when pull returns: no polling.
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message_ids: list[str]) -> None:
        messages = [self._pending.pop(i) for i in message_ids]
        contexts = [self.context(m.metadata.dst_node_id) for m in messages]
        replies = serve_batch(self._client_app, self._batch_runner, messages, contexts)
        for message_id, reply in zip(message_ids, replies, strict=True):
            self._replies[message_id] = reply

    def _partition_id(self, node_id: int) -> int:
        partition_id = node_id - FIRST_NODE_ID
        if not 0 <= partition_id < self._num_nodes:
            raise ValueError(f"unknown node id {node_id}: this grid has {self._num_nodes} nodes")
        return partition_id


def serve_batch(
    client_app: ClientApp, batch_runner: RoundRunner | None, messages: list[Message], contexts: list[Context]
) -> list[Message]:
    """The replies to `messages`: the batch runner's where it takes them, else the ClientApp's."""
    replies = batch_runner(messages, contexts) if batch_runner is not None else None
    if replies is None:
        replies = [call_client(client_app, m, c) for m, c in zip(messages, contexts, strict=True)]
    return replies


def call_client(client_app: ClientApp, message: Message, context: Context) -> Message:
    """The ClientApp's reply to `message`; an exception in it, `sys.exit` included, becomes an
    error reply, as a SuperNode sends: a ClientApp does not end the simulation."""
    try:
        return client_app(message, context)
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as err:  # the ClientApp failed: reply with an error, as a SuperNode does
        return error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}")


def error_reply(message: Message, code: int, reason: str) -> Message:
    """A reply to `message` carrying an Error instead of content."""
    return Message(Error(code, reason), reply_to=message)


def simulation_node_config(num_nodes: int) -> Callable[[int], Mapping[str, int]]:
    """Flower's node-config keys for a simulated node: its partition and their number."""

    def node_config(partition_id: int) -> UserConfig:
        return {"partition-id": partition_id, "num-partitions": num_nodes}

    return node_config


def server_context(run_config: UserConfig) -> Context:
    """The ServerApp's Context, as the SuperLink would hand it over."""
    return Context(
        run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=run_config
    )
