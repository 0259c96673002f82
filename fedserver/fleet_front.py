"""The SuperLink as the daemon runs it: Flower's own, with a front that answers idle devices cheaply.

Every connected device asks for a task every 3 s and sends a heartbeat every 30 s (Flower's
SuperNode), and between rounds every answer to the first is "none". Flower answers each through
its whole web stack and SQLite transactions. This front, in the SuperLink's process, answers:

- a pull from a node whose last pull Flower answered empty, with no task stored for it since
  (nor being stored while Flower answered), with that same empty answer;
- a heartbeat by calling the handler Flower's own route calls, without the web stack;

both only for a request whose signature and timestamp verify as Flower's node authentication
checks them, with the public key Flower last accepted for that node. Everything else (a node
with a task, a request that does not verify, every other call) goes to Flower unchanged, so
refusals and their log lines stay Flower's. What the front knows of a node lasts `TTL` seconds:
a node removed from the federation is refused by Flower again within that time.

    python -m fedserver.fleet_front <flower-superlink options>
"""

from __future__ import annotations

import base64
import binascii
import datetime
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import anyio.to_thread
from google.protobuf.message import DecodeError, Message

from shared.flower_compat import fleet_api as flower

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TTL = 30.0  # s an idle mark or a node's known key stands before its requests go to Flower again
MAX_REQUEST_BYTES = 4096  # a pull or a heartbeat names one node; a larger body goes to Flower as it came
EMPTY_PULL = flower.PullMessagesResponse().SerializeToString()
PULL, HEARTBEAT = flower.PULL_MESSAGES_PATH, flower.HEARTBEAT_PATH
REQUESTS = {PULL: flower.PullMessagesRequest, HEARTBEAT: flower.SendNodeHeartbeatRequest}
CONTENT_TYPE = flower.PROTOBUF_MEDIA_TYPE.encode()


class NodeKeys:
    """The public key Flower last accepted for each node (a request of it answered 200), for `ttl` seconds."""

    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._keys: dict[int, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def learn(self, node_id: int, public_key: bytes) -> None:
        with self._lock:
            self._keys[node_id] = (public_key, self._clock())

    def knows(self, node_id: int, public_key: bytes) -> bool:
        with self._lock:
            known = self._keys.get(node_id)
        return known is not None and known[0] == public_key and self._clock() - known[1] < self._ttl


class TaskTracker:
    """Which nodes certainly have no task waiting: those whose pull Flower answered empty, no task
    stored for them since (nor being stored while that pull was answered), for `ttl` seconds."""

    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._versions: dict[int, int] = {}
        self._storing: dict[int, int] = {}
        self._idle: dict[int, float] = {}  # node -> when it was marked; a store for it removes the mark

    @contextmanager
    def storing(self, *node_ids: int) -> Iterator[None]:
        """Around storing tasks for `node_ids` (committed when the block ends)."""
        with self._lock:
            for node_id in node_ids:
                self._storing[node_id] = self._storing.get(node_id, 0) + 1
                self._idle.pop(node_id, None)
        try:
            yield
        finally:
            with self._lock:
                for node_id in node_ids:
                    self._versions[node_id] = self._versions.get(node_id, 0) + 1
                    self._storing[node_id] -= 1
                    if not self._storing[node_id]:
                        del self._storing[node_id]

    def version(self, node_id: int) -> int | None:
        """The node's store count before Flower answers its pull; None while a task is being stored for it."""
        with self._lock:
            return None if node_id in self._storing else self._versions.get(node_id, 0)

    def mark_idle(self, node_id: int, version: int) -> None:
        """Flower answered the pull asked at `version` with no task: idle, unless a task came since."""
        with self._lock:
            if node_id not in self._storing and self._versions.get(node_id, 0) == version:
                self._idle[node_id] = self._clock()

    def is_idle(self, node_id: int) -> bool:
        with self._lock:
            marked = self._idle.get(node_id)
        return marked is not None and self._clock() - marked < self._ttl

    def track(self, state: Any) -> None:
        """Route every task `state` (Flower's LinkState) stores through `storing`."""
        for name in flower.STORES_TASKS:
            store = getattr(state, name)

            def tracked(messages: Any, *args: Any, _store: Callable[..., Any] = store, **kwargs: Any) -> Any:
                many = messages if isinstance(messages, (list, tuple)) else [messages]
                with self.storing(*(message.metadata.dst_node_id for message in many)):
                    return _store(messages, *args, **kwargs)

            setattr(state, name, tracked)


def signed_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The public key that signed this request's timestamp, within Flower's time window; None if the
    request does not verify (Flower then refuses it)."""
    try:
        public_key = base64.b64decode(headers[flower.FLEET_HTTP_PUBLIC_KEY_HEADER.encode()], validate=True)
        signature = base64.b64decode(headers[flower.FLEET_HTTP_SIGNATURE_HEADER.encode()], validate=True)
        timestamp = headers[flower.TIMESTAMP_HEADER.encode()].decode("ascii")
        age = (flower.now() - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        window = -flower.SYSTEM_TIME_TOLERANCE < age < flower.TIMESTAMP_TOLERANCE + flower.SYSTEM_TIME_TOLERANCE
        if window and flower.verify_signature(flower.bytes_to_public_key(public_key), timestamp.encode("ascii"), signature):
            return public_key
    except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
        pass
    return None


class FleetFront:
    """ASGI: an idle node's pull and a known node's heartbeat answered here, every other request
    passed to Flower's `app` (whose LinkState is `state`)."""

    def __init__(self, app: ASGIApp, state: Any, tracker: TaskTracker, keys: NodeKeys | None = None) -> None:
        self.app, self.state, self.tracker, self.keys = app, state, tracker, keys or NodeKeys()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path") if scope["type"] == "http" and scope["method"] == "POST" else None
        if path not in REQUESTS:
            await self.app(scope, receive, send)
            return
        read = await _read_up_to(receive, MAX_REQUEST_BYTES)
        if read is None:
            return  # nobody to answer
        body, more = read
        request = None if more else _parse(REQUESTS[path], body)
        key = None if request is None else signed_key(dict(scope["headers"]))
        node = None if key is None else request.node.node_id
        if node is not None and self.keys.knows(node, key):
            answer = await self._answer(path, request)
            if answer is not None:
                await _respond(send, answer)
                return
        version = self.tracker.version(node) if node is not None and path == PULL else None
        flowers = _Answer(send)
        await self.app(scope, _replay(body, more, receive), flowers.send)
        if node is not None and flowers.status == 200:
            self.keys.learn(node, key)
            if version is not None and flowers.is_empty_pull():
                self.tracker.mark_idle(node, version)

    async def _answer(self, path: str, request: Message) -> bytes | None:
        """The answer for a verified, known node's request, or None where Flower must answer."""
        if path == PULL:
            return EMPTY_PULL if self.tracker.is_idle(request.node.node_id) else None
        try:
            acknowledged = await anyio.to_thread.run_sync(partial(flower.send_node_heartbeat, request, self.state))
        except Exception:  # noqa: BLE001 - e.g. an interval out of range: Flower's route answers it, with its error
            return None
        return acknowledged.SerializeToString()


async def _respond(send: Send, body: bytes) -> None:
    headers = [(b"content-type", CONTENT_TYPE), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Answer:
    """Flower's response passed on as it goes, its status and first bytes kept."""

    def __init__(self, send: Send) -> None:
        self._send, self.status, self.body, self.content_type = send, 0, b"", b""

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body" and len(self.body) <= len(EMPTY_PULL):
            self.body += message.get("body", b"")
        await self._send(message)

    def is_empty_pull(self) -> bool:
        return self.status == 200 and self.body == EMPTY_PULL and self.content_type == CONTENT_TYPE


async def _read_up_to(receive: Receive, limit: int) -> tuple[bytes, bool] | None:
    """The request body, or its first chunks past `limit` bytes, and whether more is left to read;
    None if the client went away before its body was whole."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body, False
        if len(body) > limit:
            return body, True


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """`receive` as if nothing had been read: `body` first, then the rest of the stream."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": more}

    return replay


def _parse(kind: type[Message], body: bytes) -> Any:
    try:
        return kind.FromString(body)
    except DecodeError:
        return None


def front(app: ASGIApp) -> FleetFront:
    """Flower's SuperLink app behind the front, its state's task stores tracked."""
    state, tracker = flower.linkstate_of(app), TaskTracker()
    tracker.track(state)
    return FleetFront(app, state, tracker)


def main() -> None:
    flower.run_superlink(front)


if __name__ == "__main__":
    main()
