"""The SuperLink as the daemon runs it: Flower's own, with a front that answers connected devices cheaply.

Every connected device asks for a task every 3 s and sends a heartbeat every 30 s (Flower's
SuperNode), and in a round it pulls and pushes each object of its task and its reply. Flower
answers each call through its whole web stack (nine middlewares) and looks the node's key up in
SQLite. This front, in the SuperLink's process, answers a known node's Fleet calls itself:

- a pull from an idle node (its last pull was answered empty, with no task stored for it since
  nor being stored while it was answered): held until a task is stored for it, then answered by
  Flower's handler, or for `HOLD` seconds, then answered with that same empty answer; a pull the
  handler answers empty is held the same way (long polling: idle devices ask less often, and a
  task reaches its device when it is stored, not at the device's next poll); a pull is answered
  empty, no task taken for it, once its device has stopped waiting (`ANSWER_BY`);
- every other call of `FLEET_CALLS` (a pull, a heartbeat, an object pulled or pushed, a reply
  pushed, a receipt confirmed) with the handler Flower's own route calls, in a worker thread as
  Flower's route runs it, over the state as `fedserver.front_state` shows it (a running run's
  status reused for a second, traffic written in batches);

both only for a protobuf request whose signature and timestamp verify as Flower's node
authentication checks them, with the public key Flower last accepted for that node. The
ServerApp's object calls on the Runtime API (an object of a task pushed, of a reply pulled, a
reply's receipt) are answered the same way, with Flower's Runtime handler, for one task token
that Flower accepted before and that still names a running task (`get_task_by_token`, as
Flower authenticates them). Everything else (a node Flower has not yet accepted, a request that
does not verify, a handler that raises, every other call) goes to Flower unchanged, so refusals
and their log lines stay Flower's. What the front knows of a node is forgotten as soon as
Flower's state removes the node or takes it offline, and after `TTL` seconds in any case.

    python -m fedserver.fleet_front <flower-superlink options>
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import inspect
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from typing import Any

import anyio.to_thread
from google.protobuf.message import DecodeError, Message

from fedserver.front_state import FrontState, Turns
from shared.flower_compat import fleet_api as flower

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TTL = 300.0  # s an idle mark or a node's known key stands before its requests go to Flower again
# s an idle node's pull is held for a task before it is answered "none" (Flower's SuperNode waits
# up to 30 s for an answer, then 3 s before it asks again)
HOLD = 20.0
# s after a pull arrived that Flower's handler may still take a task for it: Flower's SuperNode
# stops waiting for an answer after 30 s, and a task taken for a device that no longer waits is lost
ANSWER_BY = 25.0
# A call's body the front reads: a pushed object is at most one array chunk (Flower's 5 MiB) and
# its request's few fields; a larger body goes to Flower as it came.
MAX_REQUEST_BYTES = 6 << 20
# s a SQLite write waits for another's to end before it fails with "database is locked" (Flower:
# 5 s); as long as a device waits for any answer
LOCK_WAIT = 30.0
DEVICE_THREADS = 40  # worker threads for the device calls the front answers (Flower's requests have anyio's 40)
KNOWN_TOKENS = 64  # task tokens (one a ServerApp run) whose object calls the front answers
KNOWN_KEYS = 16_384  # public keys kept parsed (each verifies a node's every request)
EMPTY_PULL = flower.PullMessagesResponse().SerializeToString()
TASK, GONE = b"<a task was stored>", b"<the device went away>"  # what a held pull came to, besides EMPTY_PULL
LATE = object()  # a call whose device stopped waiting before a worker thread took it up
PULL, HEARTBEAT = flower.PULL_MESSAGES_PATH, flower.HEARTBEAT_PATH
TASK_TOKEN = flower.TASK_TOKEN_HEADER.lower().encode()
CONTENT_TYPE = flower.PROTOBUF_MEDIA_TYPE.encode()
LOG = logging.getLogger("flowerbed.server")


class NodeKeys:
    """The public key Flower last accepted for each node (a request of it answered 200), for `ttl`
    seconds or until the node is removed (`forget`)."""

    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._keys: dict[int, tuple[bytes, float]] = {}
        self._removed: dict[int, float] = {}  # node -> when it was last removed
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._clock()

    def learn(self, node_id: int, public_key: bytes, asked_at: float) -> None:
        """Flower accepted `public_key` for `node_id` in a request made at `asked_at` (`now()`)."""
        with self._lock:
            if self._removed.get(node_id, -1.0) < asked_at:
                self._keys[node_id] = (public_key, asked_at)

    def knows(self, node_id: int, public_key: bytes) -> bool:
        with self._lock:
            known = self._keys.get(node_id)
        return known is not None and known[0] == public_key and self._clock() - known[1] < self._ttl

    def forget(self, node_id: int) -> None:
        """The node left the federation or went offline: its next request goes to Flower."""
        with self._lock:
            self._keys.pop(node_id, None)
            self._removed[node_id] = self._clock()

    def track(self, state: Any) -> None:
        """Forget each node `state` (Flower's LinkState) removes or takes offline, before and after it does."""
        _wrap_each(state, flower.REMOVES_NODES, lambda call: self._removing(call.arguments["node_id"]))

    @contextmanager
    def _removing(self, node_id: int) -> Iterator[None]:
        self.forget(node_id)
        try:
            yield
        finally:
            self.forget(node_id)


class TaskTracker:
    """Which nodes certainly have no task waiting: those whose pull Flower answered empty, no task
    stored for them since (nor being stored while that pull was answered), for `ttl` seconds."""

    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self.stored: Callable[[tuple[int, ...]], None] = lambda _: None  # after tasks for these nodes are stored
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
            self.stored(node_ids)

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
        _wrap_each(state, flower.STORES_TASKS, lambda call: self.storing(*_destinations(call.args[0])))


def _destinations(messages: Any) -> list[int]:
    """The nodes a Message, or a sequence of them, is for."""
    many = messages if isinstance(messages, (list, tuple)) else [messages]
    return [message.metadata.dst_node_id for message in many]


Around = Callable[[inspect.BoundArguments], AbstractContextManager[Any]]


def _wrap_each(state: Any, names: tuple[str, ...], around: Around) -> None:
    """Replace each of `state`'s methods `names` by one that runs it inside `around(its arguments)`."""
    for name in names:
        method = getattr(state, name)
        signature = inspect.signature(method)

        def wrapped(*args: Any, _method: Callable[..., Any] = method, _signature: inspect.Signature = signature,
                    **kwargs: Any) -> Any:  # fmt: skip
            with around(_signature.bind(*args, **kwargs)):
                return _method(*args, **kwargs)

        setattr(state, name, wrapped)


def signed_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The public key that signed this request's timestamp, within Flower's time window; None if the
    request does not verify (Flower then refuses it)."""
    try:
        public_key = base64.b64decode(headers[flower.FLEET_HTTP_PUBLIC_KEY_HEADER.encode()], validate=True)
        signature = base64.b64decode(headers[flower.FLEET_HTTP_SIGNATURE_HEADER.encode()], validate=True)
        timestamp = headers[flower.TIMESTAMP_HEADER.encode()].decode("ascii")
        age = (flower.now() - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        window = -flower.SYSTEM_TIME_TOLERANCE < age < flower.TIMESTAMP_TOLERANCE + flower.SYSTEM_TIME_TOLERANCE
        if window and flower.verify_signature(_parsed_key(public_key), timestamp.encode("ascii"), signature):
            return public_key
    except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
        pass
    return None


@lru_cache(maxsize=KNOWN_KEYS)
def _parsed_key(public_key: bytes) -> Any:
    return flower.bytes_to_public_key(public_key)


class FleetFront:
    """ASGI: a known node's Fleet calls answered here (an idle node's pull held until a task is
    stored for it or `hold` s pass, the others by Flower's handlers), every other request passed to
    Flower's `app` (whose LinkState is `state`)."""

    def __init__(self, app: ASGIApp, state: Any, tracker: TaskTracker, keys: NodeKeys | None = None,
                 hold: float = HOLD, turns: Turns | None = None, runtime_app: Any = None) -> None:  # fmt: skip
        self.app, self.tracker, self.keys, self.hold = app, tracker, keys or NodeKeys(), hold
        self.runtime_app = runtime_app  # Flower's app, whose Runtime handlers answer the ServerApp's object calls
        self._tokens: dict[str, None] = {}  # task tokens Flower accepted on a Runtime call, oldest first
        self.state = FrontState(state, turns)  # what Flower's handlers see when the front calls them
        self._threads: anyio.CapacityLimiter | None = None  # the device calls' own, beside Flower's requests'
        self._held: dict[int, asyncio.Event] = {}  # node -> set when a task is stored for it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        tracker.stored = self._task_stored

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = flower.RUNTIME_CALLS.get(scope["path"]) if scope["type"] == "http" else None
        if runtime is not None and self.runtime_app is not None and _is_protobuf_post(scope):
            await self._runtime(runtime, scope, receive, send)
            return
        call = flower.FLEET_CALLS.get(scope["path"]) if scope["type"] == "http" else None
        if call is None or not _is_protobuf_post(scope):
            await self.app(scope, receive, send)
            return
        self._loop = asyncio.get_running_loop()
        asked_at = self.keys.now()
        read = await _read_up_to(receive, MAX_REQUEST_BYTES)
        if read is None:
            return  # nobody to answer
        body, more = read
        request = None if more else _parse(call.request, body)
        key = None if request is None else signed_key(dict(scope["headers"]))
        node = None if key is None else request.node.node_id
        if node is not None and self.keys.knows(node, key):
            answer = await self._answer(scope["path"], call, request, receive, asked_at)
            if answer is GONE:
                return  # the device went away while its pull was held: nothing taken for it
            if answer is not None:
                await _respond(send, answer)
                return
        version = self.tracker.version(node) if node is not None and scope["path"] == PULL else None
        flowers = _Answer(send)
        await self.app(scope, _replay(body, more, receive), flowers.send)
        if node is not None and flowers.status == 200:
            self.keys.learn(node, key, asked_at)
            if version is not None and flowers.is_empty_pull():
                self.tracker.mark_idle(node, version)

    async def _runtime(self, call: flower.RuntimeCall, scope: Scope, receive: Receive, send: Send) -> None:
        """The ServerApp's object call: answered by Flower's handler if it carries one task token
        that Flower accepted before (answered a Runtime call of it) and that still names a running
        task; else, or where the handler raises, by Flower."""
        read = await _read_up_to(receive, MAX_REQUEST_BYTES)
        if read is None:
            return
        body, more = read
        tokens = [value for name, value in scope["headers"] if name.lower() == TASK_TOKEN]
        token = tokens[0].decode("latin-1") if len(tokens) == 1 else None
        request = None if more or token not in self._tokens else _parse(call.request, body)
        if request is not None:
            try:
                response = await anyio.to_thread.run_sync(call.handle, self.runtime_app, request, token)
            except Exception:  # noqa: BLE001 - Flower answers it, with its error
                response = None
            if response is not None:
                await _respond(send, response.SerializeToString())
                return
        flowers = _Answer(send)
        await self.app(scope, _replay(body, more, receive), flowers.send)
        if token is not None and flowers.status == 200:
            self._tokens[token] = None
            while len(self._tokens) > KNOWN_TOKENS:
                del self._tokens[next(iter(self._tokens))]

    def close(self) -> None:
        """The server is stopping: every held pull is answered now, and none is held from here on;
        the traffic counted so far is written."""
        self._closing = True
        self.state.flush()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._wake(tuple(self._held)))

    async def _answer(self, path: str, call: flower.FleetCall, request: Message, receive: Receive,
                      asked_at: float) -> bytes | None:  # fmt: skip
        """The answer to a verified, known node's call (asked at `asked_at`), GONE if its device left
        while its pull was held, or None where Flower must answer it."""
        if path == PULL:
            return await self._pull(call, request, receive, asked_at + ANSWER_BY)
        response = self._handled_here(call, request) if path == HEARTBEAT else await self._handled(call, request)
        return None if response is None else response.SerializeToString()

    def _handled_here(self, call: flower.FleetCall, request: Message) -> Any:
        """`_handled`, in the event loop: for a call the front's state answers without its database (a
        heartbeat, gathered and written later), so that no worker thread busy with other devices'
        calls delays it past Flower's 5 s heartbeat timeout and takes its device offline."""
        try:
            return self.state.handle(call, request)
        except Exception:  # noqa: BLE001 - as `_handled`
            return None

    async def _pull(self, call: flower.FleetCall, request: Message, receive: Receive, by: float) -> bytes | None:
        """A pull: Flower's handler's answer unless it is "none", in which case the node is idle and
        the pull is held for a task (so a device asking right after its reply gets the next round's
        task as soon as it is stored)."""
        node = request.node.node_id
        if not self.tracker.is_idle(node):
            answer = await self._handled_pull(call, request, by)
            if answer != EMPTY_PULL or not self.tracker.is_idle(node):
                return answer
        held = await self._hold(node, receive)
        return held if held is not TASK else await self._handled_pull(call, request, by)

    async def _handled_pull(self, call: flower.FleetCall, request: Message, by: float) -> bytes | None:
        """Flower's answer to a pull; empty, and no task taken, once its device stopped waiting (`by`)."""
        node = request.node.node_id
        version = self.tracker.version(node)
        response = await self._handled(call, request, by)
        if response is LATE:
            return EMPTY_PULL  # not marked idle: a task may be waiting for its next pull
        if response is None:
            return None
        if version is not None and not response.messages_list:
            self.tracker.mark_idle(node, version)
        return response.SerializeToString()

    async def _handled(self, call: flower.FleetCall, request: Message, by: float = math.inf) -> Any:
        """Flower's handler's response, None where it raised (e.g. a run that stopped: Flower's
        route answers that, with its error), or LATE where its worker thread came after `by`."""
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(DEVICE_THREADS)
        try:
            return await anyio.to_thread.run_sync(self._in_time, call, request, by, limiter=self._threads)
        except Exception:  # noqa: BLE001 - see the docstring
            return None

    def _in_time(self, call: flower.FleetCall, request: Message, by: float) -> Any:
        return LATE if self.keys.now() > by else self.state.handle(call, request)

    async def _hold(self, node: int, receive: Receive) -> bytes:
        """Hold an idle node's pull until a task is stored for it (TASK), `hold` s pass (EMPTY_PULL)
        or its device goes away (GONE). A node has one pull held at a time; while the server
        stops, none is."""
        if self.hold <= 0 or self._closing or node in self._held:
            return EMPTY_PULL
        stored = self._held[node] = asyncio.Event()
        waits = [asyncio.ensure_future(stored.wait()), asyncio.ensure_future(receive())]  # receive: a disconnect
        try:
            if not self.tracker.is_idle(node):
                return TASK  # a task came while the hold was set up (its store may have missed it)
            done, _ = await asyncio.wait(waits, timeout=self.hold, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            del self._held[node]
        if waits[1] in done:
            return GONE
        return TASK if stored.is_set() and not self._closing else EMPTY_PULL

    def _task_stored(self, node_ids: tuple[int, ...]) -> None:
        """From the thread that stored tasks for `node_ids`: wake their held pulls."""
        if self._loop is not None and any(node in self._held for node in node_ids):
            self._loop.call_soon_threadsafe(self._wake, node_ids)

    def _wake(self, node_ids: tuple[int, ...]) -> None:
        for node in node_ids:
            if node in self._held:
                self._held[node].set()


def _is_protobuf_post(scope: Scope) -> bool:
    if scope["method"] != "POST":
        return False
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    return content_type.partition(b";")[0].strip().lower() == CONTENT_TYPE


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
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False
        if size > limit:
            return b"".join(chunks), True


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


def front(app: ASGIApp, turns: Turns | None = None) -> ASGIApp:
    """Flower's SuperLink app behind the front, its state's task stores and node removals tracked,
    its device calls deferring to others for `turns` of the database; the app alone where Flower
    does more around a Fleet call than authenticate it."""
    if flower.flower_wraps_fleet_calls(app):
        LOG.warning("fleet front off: this Flower build logs or extends every Fleet call, so Flower answers each")
        return app
    state, tracker, keys = flower.linkstate_of(app), TaskTracker(), NodeKeys()
    tracker.track(state)
    keys.track(state)
    return FleetFront(app, state, tracker, keys, turns=turns, runtime_app=app)


def main() -> None:
    turns = Turns()
    flower.transactions_take_turns(turns)
    flower.wait_for_sqlite_locks(LOCK_WAIT)
    flower.objects_in_memory()
    served: list[ASGIApp] = []

    def build(app: ASGIApp) -> ASGIApp:
        served.append(front(app, turns))
        return served[-1]

    def stopping() -> None:
        for app in served:
            if isinstance(app, FleetFront):
                app.close()

    flower.run_superlink(build, stopping)


if __name__ == "__main__":
    main()
