"""The SuperLink as the daemon runs it: Flower's own, with a front that answers idle devices cheaply.

Every connected device asks for a task every 3 s (Flower's SuperNode), and almost every answer is
"none". Flower answers each through its whole web stack and two SQLite transactions; this front
answers a pull from a node whose last pull Flower answered empty, while no task has been stored
for it since, with the same empty answer, after checking the node's signature as Flower does.
Everything else (a node with a task, a stale or unverifiable request, every other call) goes to
Flower unchanged, so refusals and their log lines stay Flower's. An idle mark lasts `IDLE_TTL`
seconds at most: a node removed from the federation is refused by Flower within that time.

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
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from shared.flower_compat import fleet_api as flower

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

IDLE_TTL = 30.0  # s an idle mark stands before a pull goes to Flower again
MAX_PULL_BYTES = 4096  # a pull names one node; a larger body goes to Flower as it came
EMPTY_PULL = flower.PullMessagesResponse().SerializeToString()
_HEADERS = [(b"content-type", flower.PROTOBUF_MEDIA_TYPE.encode()), (b"content-length", str(len(EMPTY_PULL)).encode())]


@dataclass(frozen=True)
class _Idle:
    version: int  # the node's store count when Flower's empty answer was asked for
    public_key: bytes  # the key Flower authenticated the node with
    marked: float  # monotonic time of the mark


class TaskTracker:
    """Which nodes certainly have no task waiting: those whose pull Flower answered empty, no task
    stored for them since (nor being stored while that pull was answered), for `ttl` seconds."""

    def __init__(self, ttl: float = IDLE_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._versions: dict[int, int] = {}
        self._storing: dict[int, int] = {}
        self._idle: dict[int, _Idle] = {}

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

    def mark_idle(self, node_id: int, version: int, public_key: bytes) -> None:
        """Flower answered the pull asked at `version` with no task: idle, unless a task came since."""
        with self._lock:
            if node_id not in self._storing and self._versions.get(node_id, 0) == version:
                self._idle[node_id] = _Idle(version, public_key, self._clock())

    def is_idle(self, node_id: int, public_key: bytes) -> bool:
        with self._lock:
            idle = self._idle.get(node_id)
            return (
                idle is not None
                and idle.public_key == public_key
                and node_id not in self._storing
                and self._versions.get(node_id, 0) == idle.version
                and self._clock() - idle.marked < self._ttl
            )

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
    """ASGI: a pull from an idle node answered here, every other request passed to Flower's `app`."""

    def __init__(self, app: ASGIApp, tracker: TaskTracker) -> None:
        self.app, self.tracker = app, tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != flower.PULL_MESSAGES_PATH:
            await self.app(scope, receive, send)
            return
        body, more = await _read_up_to(receive, MAX_PULL_BYTES)
        pull = None if more else _parse_pull(body)
        key = None if pull is None else signed_key(dict(scope["headers"]))
        if key is not None and self.tracker.is_idle(pull.node.node_id, key):
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            await send({"type": "http.response.body", "body": EMPTY_PULL})
            return
        version = None if key is None else self.tracker.version(pull.node.node_id)
        answer = _Answer(send)
        await self.app(scope, _replay(body, more, receive), answer.send)
        if version is not None and answer.is_empty_pull():
            self.tracker.mark_idle(pull.node.node_id, version, key)


class _Answer:
    """Flower's response passed on as it goes, its status and first bytes kept."""

    def __init__(self, send: Send) -> None:
        self._send, self.status, self.body = send, 0, b""

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body" and len(self.body) <= len(EMPTY_PULL):
            self.body += message.get("body", b"")
        await self._send(message)

    def is_empty_pull(self) -> bool:
        return self.status == 200 and self.body == EMPTY_PULL and self.content_type == _HEADERS[0][1]


async def _read_up_to(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The request body, or its first chunks past `limit` bytes; whether more is left to read."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body, False
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


def _parse_pull(body: bytes) -> Any:
    try:
        return flower.PullMessagesRequest.FromString(body)
    except DecodeError:
        return None


def front(app: ASGIApp) -> FleetFront:
    """Flower's SuperLink app behind the front, its state's task stores tracked."""
    tracker = TaskTracker()
    tracker.track(flower.linkstate_of(app))
    return FleetFront(app, tracker)


def main() -> None:
    flower.run_superlink(front)


if __name__ == "__main__":
    main()
