"""The SuperLink's front: a pull from a node Flower last answered empty, with no task stored since, is
answered with Flower's own empty answer, and a heartbeat by Flower's own handler, after the node's
signature checks out with the key Flower last accepted for it; anything else reaches Flower."""

from __future__ import annotations

import asyncio
import base64
import datetime
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedserver import fleet_front
from fedserver.fleet_front import EMPTY_PULL, MAX_REQUEST_BYTES, FleetFront, NodeKeys, TaskTracker, signed_key
from fedserver.fleet_front import front as front_of
from shared.flower_compat import fleet_api as flower
from shared.flower_compat.messages import SUPERLINK_NODE_ID

NODE = 7
NODE_PULL = flower.PullMessagesRequest(node={"node_id": NODE}).SerializeToString()


class Key:
    """A node's key pair, signing as Flower's SuperNode does (a timestamp, ECDSA-SHA256)."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.public = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def headers(self, age: float = 0.0, signer: Key | None = None) -> list[tuple[bytes, bytes]]:
        timestamp = (flower.now() - datetime.timedelta(seconds=age)).isoformat()
        signature = (signer or self).private.sign(timestamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        return [
            (flower.FLEET_HTTP_PUBLIC_KEY_HEADER.encode(), base64.b64encode(self.public)),
            (flower.TIMESTAMP_HEADER.encode(), timestamp.encode()),
            (flower.FLEET_HTTP_SIGNATURE_HEADER.encode(), base64.b64encode(signature)),
            (b"content-type", flower.PROTOBUF_MEDIA_TYPE.encode()),
        ]


class Flower:
    """A stand-in for Flower's app: answers a pull with `answer` (empty: no task), counting calls."""

    def __init__(self, answer: bytes = EMPTY_PULL, status: int = 200, during=None) -> None:  # noqa: ANN001
        self.answer, self.status, self.during, self.bodies = answer, status, during, []

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.bodies.append((scope["path"], body))
        if self.during:
            self.during()
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", flower.PROTOBUF_MEDIA_TYPE.encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": self.answer if self.status == 200 else b'{"detail":"no"}'})


class State:
    """A stand-in for Flower's LinkState: the heartbeats it acknowledged."""

    def __init__(self) -> None:
        self.heartbeats: list[tuple[int, float]] = []
        self.object_store = SimpleNamespace()

    def acknowledge_node_heartbeat(self, node_id: int, heartbeat_interval: float) -> bool:
        self.heartbeats.append((node_id, heartbeat_interval))
        return node_id == NODE


def make_front(inner: Flower, tracker: TaskTracker | None = None, keys: NodeKeys | None = None, hold: float = 0.0) -> FleetFront:
    """The front over `inner`; an idle node's pull is answered at once unless `hold` is given."""
    return FleetFront(inner, State(), tracker or TaskTracker(), keys, hold=hold)


def heartbeat_body(node: int = NODE, interval: float = 30.0) -> bytes:
    return flower.SendNodeHeartbeatRequest(node={"node_id": node}, heartbeat_interval=interval).SerializeToString()


def pull(front: FleetFront, headers: list[tuple[bytes, bytes]], node: int = NODE, path: str = flower.PULL_MESSAGES_PATH,
         body: bytes | None = None, chunk: int = 0) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    """One request through `front`: (status, headers, body) of its answer."""
    return asyncio.run(call(front, headers, node, path, body, chunk))


async def call(front: FleetFront, headers: list[tuple[bytes, bytes]], node: int = NODE, path: str = flower.PULL_MESSAGES_PATH,
               body: bytes | None = None, chunk: int = 0) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    """`pull`, in the running event loop."""
    body = flower.PullMessagesRequest(node={"node_id": node}).SerializeToString() if body is None else body
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    await front(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def key() -> Key:
    return Key()


def test_a_node_flower_answered_empty_is_answered_by_the_front_with_flowers_answer(key):
    inner = Flower()
    front = make_front(inner)

    first = pull(front, key.headers())
    second = pull(front, key.headers())

    assert len(inner.bodies) == 1
    assert first[0] == second[0] == 200 and first[2] == second[2] == EMPTY_PULL
    assert second[1][b"content-type"] == first[1][b"content-type"] == flower.PROTOBUF_MEDIA_TYPE.encode()


def test_a_task_stored_for_the_node_sends_its_next_pull_to_flower(key):
    inner, tracker = Flower(), TaskTracker()
    front = make_front(inner, tracker)
    pull(front, key.headers())

    with tracker.storing(NODE):
        pass
    pull(front, key.headers())

    assert len(inner.bodies) == 2


def test_an_answer_with_a_task_leaves_the_node_with_flower(key):
    inner = Flower(answer=b"\x12\x02ab")  # any non-empty PullMessagesResponse
    front = make_front(inner)

    for _ in range(3):
        pull(front, key.headers())

    assert len(inner.bodies) == 3


def test_a_task_stored_while_flower_answers_the_pull_keeps_the_node_with_flower(key):
    tracker = TaskTracker()

    def store_meanwhile() -> None:
        with tracker.storing(NODE):
            pass

    inner = Flower(during=store_meanwhile)
    front = make_front(inner, tracker)

    pull(front, key.headers())
    inner.during = None
    pull(front, key.headers())

    assert len(inner.bodies) == 2


def test_no_node_is_idle_while_a_task_is_being_stored_for_it(key):
    inner, tracker = Flower(), TaskTracker()
    front = make_front(inner, tracker)
    pull(front, key.headers())

    with tracker.storing(NODE):
        pull(front, key.headers())

    assert len(inner.bodies) == 2


@pytest.mark.parametrize("forged", ["other key", "stale", "from the future", "signed by another", "unsigned", "other node"])
def test_a_request_that_does_not_verify_as_the_idle_node_goes_to_flower_which_refuses_it(key, forged):
    inner = Flower()
    front = make_front(inner)
    pull(front, key.headers())
    inner.status = 401
    requests = {
        "other key": (Key().headers(), NODE),
        "stale": (key.headers(age=flower.TIMESTAMP_TOLERANCE + flower.SYSTEM_TIME_TOLERANCE + 1), NODE),
        "from the future": (key.headers(age=-(flower.SYSTEM_TIME_TOLERANCE + 1)), NODE),
        "signed by another": (key.headers(signer=Key()), NODE),
        "unsigned": ([h for h in key.headers() if h[0] != flower.FLEET_HTTP_SIGNATURE_HEADER.encode()], NODE),
        "other node": (key.headers(), NODE + 1),
    }
    headers, node = requests[forged]

    status, _, _ = pull(front, headers, node=node)

    assert status == 401 and len(inner.bodies) == 2


def test_an_idle_mark_lasts_its_ttl(key):
    now = [0.0]
    inner = Flower()
    front = make_front(inner, TaskTracker(ttl=30.0, clock=lambda: now[0]))
    pull(front, key.headers())

    now[0] = 29.0
    pull(front, key.headers())
    now[0] = 31.0
    pull(front, key.headers())

    assert len(inner.bodies) == 2


def test_other_requests_and_large_bodies_reach_flower_byte_for_byte(key):
    inner = Flower()
    front = make_front(inner)
    pull(front, key.headers())  # the node is known from here on
    large = bytes(range(256)) * (MAX_REQUEST_BYTES // 256 + 8)
    json = [(k, b"application/json" if k == b"content-type" else v) for k, v in key.headers()]

    pull(front, key.headers(), path="/v1/fleet/get-run", body=b"\x01\x02")
    pull(front, key.headers(), body=large, chunk=1 << 20)
    pull(front, key.headers(), body=b"\xff\xff not protobuf")
    pull(front, json)

    assert inner.bodies[1:] == [("/v1/fleet/get-run", b"\x01\x02"), (flower.PULL_MESSAGES_PATH, large),
                                (flower.PULL_MESSAGES_PATH, b"\xff\xff not protobuf"), (flower.PULL_MESSAGES_PATH, NODE_PULL)]  # fmt: skip


OTHER_CALLS = [path for path in flower.FLEET_CALLS if path != flower.PULL_MESSAGES_PATH]


def handled_by(monkeypatch, call: flower.FleetCall, answer=None, error: Exception | None = None) -> list:  # noqa: ANN001
    """Flower's handler of `call` replaced by one that records its arguments and answers `answer` (or raises)."""
    seen = []

    def handler(**kwargs):  # noqa: ANN003, ANN202
        seen.append(kwargs)
        if error is not None:
            raise error
        return answer or SimpleNamespace(SerializeToString=lambda: b"answer", messages_list=[])

    monkeypatch.setattr(flower.fleet_handlers, call.handler, handler)
    return seen


@pytest.mark.parametrize("path", OTHER_CALLS)
def test_a_known_nodes_call_is_answered_by_flowers_handler_without_flower(key, monkeypatch, path):
    call = flower.FLEET_CALLS[path]
    seen = handled_by(monkeypatch, call)
    inner = Flower()
    front = make_front(inner)
    body = call.request(node={"node_id": NODE}).SerializeToString()
    pull(front, key.headers())

    status, headers, answer = pull(front, key.headers(), path=path, body=body)

    assert len(inner.bodies) == 1 and (status, answer) == (200, b"answer")
    assert headers[b"content-type"] == flower.PROTOBUF_MEDIA_TYPE.encode()
    assert [set(kwargs) for kwargs in seen] == [{"request", "state", "store"} if call.with_store else {"request", "state"}]
    assert seen[0]["request"] == call.request.FromString(body) and seen[0]["state"] is front.state
    assert seen[0].get("store", front.state.object_store) is front.state.object_store


def test_the_handlers_see_run_statuses_reused_and_traffic_batched_and_stopping_writes_the_traffic(key, monkeypatch):
    class Linked(State):
        def __init__(self) -> None:
            super().__init__()
            self.asked, self.traffic = 0, []

        def get_run_status(self, run_ids):  # noqa: ANN001, ANN202
            self.asked += 1
            return {run: SimpleNamespace(status=flower.RUNNING) for run in run_ids}

        def store_traffic(self, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
            self.traffic.append((run_id, bytes_sent, bytes_recv))

        @contextmanager
        def session(self):  # noqa: ANN202
            yield

    def pull_object(request, state):  # noqa: ANN001, ANN202 - as Flower's: the run's status, then the traffic
        state.get_run_status({request.run_id})
        state.store_traffic(request.run_id, bytes_sent=3, bytes_recv=0)
        return SimpleNamespace(SerializeToString=lambda: b"object")

    path = "/v1/fleet/pull-object"
    monkeypatch.setattr(flower.fleet_handlers, flower.FLEET_CALLS[path].handler, pull_object)
    linked = Linked()
    front = FleetFront(Flower(), linked, TaskTracker())
    pull(front, key.headers())
    body = flower.FLEET_CALLS[path].request(node={"node_id": NODE}, run_id=5, object_id="ab").SerializeToString()

    async def three_calls_then_stop() -> None:
        for _ in range(3):
            assert (await call(front, key.headers(), path=path, body=body))[2] == b"object"
        assert (linked.asked, linked.traffic) == (1, [])
        front.close()

    asyncio.run(three_calls_then_stop())
    assert linked.traffic == [(5, 9, 0)]


@pytest.mark.parametrize("path", OTHER_CALLS)
def test_a_call_flowers_handler_refuses_is_answered_by_flower(key, monkeypatch, path):
    call = flower.FLEET_CALLS[path]
    seen = handled_by(monkeypatch, call, error=ValueError("run stopped"))
    inner = Flower()
    front = make_front(inner)
    body = call.request(node={"node_id": NODE}).SerializeToString()
    pull(front, key.headers())
    inner.status = 409

    status, _, _ = pull(front, key.headers(), path=path, body=body)

    assert len(seen) == 1 and inner.bodies[-1] == (path, body) and status == 409


def test_a_pull_flowers_handler_answers_empty_marks_the_node_idle_and_one_with_a_task_does_not(key, monkeypatch):
    with_task = SimpleNamespace(SerializeToString=lambda: b"task", messages_list=["a task"])
    seen = handled_by(monkeypatch, flower.FLEET_CALLS[flower.PULL_MESSAGES_PATH], answer=with_task)
    inner = Flower(answer=b"\x12\x02ab")  # Flower answers the first pull with a task
    front = make_front(inner)
    pull(front, key.headers())

    answers = [pull(front, key.headers())[2] for _ in range(2)]
    with_task.messages_list = []
    answers += [pull(front, key.headers())[2] for _ in range(3)]

    assert len(inner.bodies) == 1 and answers == [b"task", b"task", b"task", EMPTY_PULL, EMPTY_PULL]
    assert len(seen) == 3


LONG = 600.0  # s: a hold no test waits out
WAKE_BOUND = 60.0  # s a woken pull may take before the test fails (instead of waiting out LONG)


def request_to(front: FleetFront, headers: list[tuple[bytes, bytes]], sent: list[dict],
               gone: asyncio.Event | None = None):  # noqa: ANN201  # fmt: skip
    """A pull of NODE through `front`, its answer's messages appended to `sent` (run it as a task);
    its device disconnects when `gone` is set."""
    incoming = [{"type": "http.request", "body": NODE_PULL, "more_body": False}]

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    return front({"type": "http", "method": "POST", "path": flower.PULL_MESSAGES_PATH, "headers": headers}, receive, send)


def answered(sent: list[dict]) -> bytes | None:
    return b"".join(m.get("body", b"") for m in sent[1:]) if sent else None


def test_an_idle_nodes_pull_is_held_and_answered_with_the_task_stored_meanwhile(key, monkeypatch):
    seen = handled_by(monkeypatch, flower.FLEET_CALLS[flower.PULL_MESSAGES_PATH],
                      answer=SimpleNamespace(SerializeToString=lambda: b"task", messages_list=["a task"]))  # fmt: skip
    inner, tracker = Flower(), TaskTracker()
    front = make_front(inner, tracker, hold=LONG)
    pull(front, key.headers())  # Flower answers empty: the node is idle from here on
    sent: list[dict] = []

    def store_a_task() -> None:  # as Flower's state does, in a worker thread
        with tracker.storing(NODE):
            pass

    async def scenario() -> None:
        held = asyncio.ensure_future(request_to(front, key.headers(), sent))
        await asyncio.sleep(0)
        assert sent == [] and not held.done()  # held, not answered
        await asyncio.to_thread(store_a_task)
        await held

    asyncio.run(asyncio.wait_for(scenario(), WAKE_BOUND))

    assert answered(sent) == b"task" and len(seen) == 1 and len(inner.bodies) == 1


@pytest.mark.parametrize("case", ["hold passes", "server stops", "second pull"])
def test_a_held_pull_with_no_task_is_answered_none(key, monkeypatch, case):
    seen = handled_by(monkeypatch, flower.FLEET_CALLS[flower.PULL_MESSAGES_PATH])
    front = make_front(Flower(), hold=0.01 if case == "hold passes" else LONG)
    pull(front, key.headers())
    first: list[dict] = []
    second: list[dict] = []

    async def scenario() -> None:
        held = asyncio.ensure_future(request_to(front, key.headers(), first))
        await asyncio.sleep(0)
        if case == "second pull":
            await request_to(front, key.headers(), second)  # answered at once: one pull a node is held
            assert answered(second) == EMPTY_PULL and not held.done()
            front.close()
        if case == "server stops":
            front.close()
        await held
        await request_to(front, key.headers(), second)  # after close(): not held

    asyncio.run(asyncio.wait_for(scenario(), WAKE_BOUND))

    assert answered(first) == answered(second) == EMPTY_PULL and seen == []


def test_a_pull_flowers_handler_answers_none_is_held_for_the_next_task(key, monkeypatch):
    answers = iter([SimpleNamespace(SerializeToString=lambda: b"", messages_list=[]),  # right after a reply: none
                    SimpleNamespace(SerializeToString=lambda: b"next task", messages_list=["a task"])])  # fmt: skip
    seen = handled_by(monkeypatch, flower.FLEET_CALLS[flower.PULL_MESSAGES_PATH])
    monkeypatch.setattr(flower.fleet_handlers, "pull_messages", lambda **kwargs: seen.append(kwargs) or next(answers))
    tracker = TaskTracker()
    front = make_front(Flower(answer=b"\x12\x02ab"), tracker, hold=LONG)  # Flower's first answer: a task
    pull(front, key.headers())
    sent: list[dict] = []

    def store_a_task() -> None:
        with tracker.storing(NODE):
            pass

    async def scenario() -> None:
        held = asyncio.ensure_future(request_to(front, key.headers(), sent))
        while len(seen) < 1:  # the handler has answered "none"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        assert not held.done()  # ... and the pull is held
        await asyncio.to_thread(store_a_task)
        await held

    asyncio.run(asyncio.wait_for(scenario(), WAKE_BOUND))

    assert answered(sent) == b"next task" and len(seen) == 2


def test_a_pull_whose_device_goes_away_while_held_takes_nothing_and_is_not_answered(key, monkeypatch):
    seen = handled_by(monkeypatch, flower.FLEET_CALLS[flower.PULL_MESSAGES_PATH])
    front = make_front(Flower(), hold=LONG)
    pull(front, key.headers())
    sent: list[dict] = []

    again: list[dict] = []

    async def scenario() -> None:
        gone, gone_again = asyncio.Event(), asyncio.Event()
        held = asyncio.ensure_future(request_to(front, key.headers(), sent, gone))
        await asyncio.sleep(0)
        gone.set()
        await held
        held_again = asyncio.ensure_future(request_to(front, key.headers(), again, gone_again))
        await asyncio.sleep(0)
        assert not held_again.done()  # held in turn: the dropped pull no longer holds the node's place
        gone_again.set()
        await held_again

    asyncio.run(asyncio.wait_for(scenario(), WAKE_BOUND))

    assert sent == again == [] and seen == []


def test_a_task_stored_while_a_hold_is_set_up_is_not_missed(key, monkeypatch):
    seen = handled_by(monkeypatch, flower.FLEET_CALLS[flower.PULL_MESSAGES_PATH],
                      answer=SimpleNamespace(SerializeToString=lambda: b"task", messages_list=["a task"]))  # fmt: skip
    tracker = TaskTracker()
    front = make_front(Flower(), tracker, hold=LONG)
    pull(front, key.headers())
    checks = iter([True, False])  # idle when the pull came, no longer once its hold is in place
    monkeypatch.setattr(tracker, "is_idle", lambda node: next(checks))
    sent: list[dict] = []

    asyncio.run(asyncio.wait_for(request_to(front, key.headers(), sent), WAKE_BOUND))

    assert answered(sent) == b"task" and len(seen) == 1


class Nodes:
    """A stand-in for Flower's LinkState: the nodes it removed."""

    def __init__(self) -> None:
        self.removed: list[int] = []

    def delete_node(self, owner_aid: str, node_id: int) -> None:
        self.removed.append(node_id)

    def deactivate_node(self, node_id: int) -> bool:
        self.removed.append(node_id)
        return True


@pytest.mark.parametrize("remove", ["delete", "deactivate", "deactivate by keyword"])
def test_a_node_flowers_state_removes_is_forgotten_at_once(key, remove):
    state, keys = Nodes(), NodeKeys()
    keys.track(state)
    asked_before = keys.now()
    keys.learn(NODE, key.public, keys.now())
    keys.learn(NODE + 1, key.public, keys.now())

    {"delete": lambda: state.delete_node("owner", NODE), "deactivate": lambda: state.deactivate_node(NODE),
     "deactivate by keyword": lambda: state.deactivate_node(node_id=NODE)}[remove]()  # fmt: skip
    keys.learn(NODE, key.public, asked_before)  # Flower accepted a request made before the removal

    assert state.removed == [NODE] and not keys.knows(NODE, key.public) and keys.knows(NODE + 1, key.public)
    keys.learn(NODE, key.public, keys.now())
    assert keys.knows(NODE, key.public)  # a request made after it that Flower accepted (the node came back)


def test_where_flower_logs_or_extends_every_fleet_call_the_front_stands_aside(monkeypatch):
    app = object()
    monkeypatch.setattr(flower, "flower_wraps_fleet_calls", lambda _: True)

    assert front_of(app) is app


def test_every_task_flowers_state_stores_goes_through_the_tracker(key):
    stored = []

    class State:
        def store_message_ins(self, message):  # noqa: ANN001, ANN202
            stored.append(message)
            return "id"

        def store_message_and_object_tree(self, message, tree, session_id):  # noqa: ANN001, ANN202
            return self.store_message_ins(message), []

        def store_messages(self, messages):  # noqa: ANN001, ANN202
            stored.extend(messages)
            return [True] * len(messages)

    state, tracker = State(), TaskTracker()
    tracker.track(state)
    task = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=NODE))

    other = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=NODE + 1))
    before = tracker.version(NODE)
    assert state.store_message_and_object_tree(task, None, "s") == ("id", [])
    state.store_message_ins(task)
    assert state.store_messages([task, other]) == [True, True]

    assert stored == [task, task, task, other]
    assert tracker.version(NODE) == before + 4 and tracker.version(NODE + 1) == 1  # the nested store counts too


def test_signed_key_accepts_the_node_key_and_nothing_else(key):
    assert signed_key(dict(key.headers())) == key.public
    assert signed_key(dict(key.headers(signer=Key()))) is None
    assert signed_key({}) is None


def test_flowers_own_app_answers_as_the_front_does_and_refuses_a_stranger(key, monkeypatch):
    import httpx

    monkeypatch.setenv("FLWR_DATABASE", ":flwr-in-memory:")
    app = flower.superlink_main.create_app()  # the SuperLink's app, as flower-superlink builds it
    state = flower.linkstate_of(app)
    node = state.create_node("owner", "owner", key.public, 30.0)
    state.activate_node(node, 30.0)
    calls = []

    async def counted(scope, receive, send) -> None:  # noqa: ANN001
        calls.append(scope["path"])
        await app(scope, receive, send)

    tracker = TaskTracker()
    tracker.track(state)
    front = FleetFront(counted, state, tracker, hold=0.0)

    async def post(path: str, body: bytes, signer: Key, times: int = 3) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="https://superlink") as client:
            return [await client.post(path, content=body, headers=[(k.decode(), v.decode()) for k, v in signer.headers()])
                    for _ in range(times)]  # fmt: skip

    pull_body = flower.PullMessagesRequest(node={"node_id": node}).SerializeToString()
    flowers, *fronts = asyncio.run(post(flower.PULL_MESSAGES_PATH, pull_body, key))
    online_until = state.get_node_info(node_ids=[node])[0].online_until
    heartbeats = asyncio.run(post(flower.HEARTBEAT_PATH, heartbeat_body(node), key, times=2))
    strangers = asyncio.run(post(flower.PULL_MESSAGES_PATH, pull_body, Key()))
    strangers += asyncio.run(post(flower.HEARTBEAT_PATH, heartbeat_body(node), Key(), times=1))

    assert calls == [flower.PULL_MESSAGES_PATH] + [flower.PULL_MESSAGES_PATH] * 3 + [flower.HEARTBEAT_PATH]
    for answer in fronts:
        assert (answer.status_code, answer.content) == (flowers.status_code, flowers.content) == (200, EMPTY_PULL)
        assert dict(answer.headers) == dict(flowers.headers)
    for answer in heartbeats:
        assert answer.status_code == 200 and answer.headers["content-type"] == flowers.headers["content-type"]
        assert flower.SendNodeHeartbeatResponse.FromString(answer.content).success
    front.state.flush()
    assert state.get_node_info(node_ids=[node])[0].online_until > online_until  # acknowledged in Flower's state
    assert [r.status_code for r in strangers] == [401] * 4


def test_on_flowers_own_app_a_refused_call_gets_flowers_answer_and_a_removed_node_is_refused(key, monkeypatch):
    import httpx

    monkeypatch.setenv("FLWR_DATABASE", ":flwr-in-memory:")
    app = flower.superlink_main.create_app()
    state = flower.linkstate_of(app)
    node = state.create_node("owner", "owner", key.public, 30.0)
    state.activate_node(node, 30.0)
    front = front_of(app)
    pull_object = "/v1/fleet/pull-object"
    unknown_run = flower.FLEET_CALLS[pull_object].request(node={"node_id": node}, run_id=12345, object_id="ab").SerializeToString()
    pull_body = flower.PullMessagesRequest(node={"node_id": node}).SerializeToString()

    async def post(to, path: str, body: bytes) -> httpx.Response:  # noqa: ANN001
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=to), base_url="https://superlink") as client:
            return await client.post(path, content=body, headers=[(k.decode(), v.decode()) for k, v in key.headers()])

    assert asyncio.run(post(front, flower.PULL_MESSAGES_PATH, pull_body)).status_code == 200  # known from here on
    flowers = asyncio.run(post(app, pull_object, unknown_run))
    fronts = asyncio.run(post(front, pull_object, unknown_run))
    state.delete_node("owner", node)
    removed = asyncio.run(post(front, flower.PULL_MESSAGES_PATH, pull_body))

    assert flowers.status_code >= 400 and (fronts.status_code, fronts.content) == (flowers.status_code, flowers.content)
    assert removed.status_code == 401


def test_a_known_nodes_heartbeat_is_acknowledged_by_flowers_handler_without_flower(key):
    inner = Flower()
    front = make_front(inner)
    pull(front, key.headers())

    status, headers, body = pull(front, key.headers(), path=flower.HEARTBEAT_PATH, body=heartbeat_body())
    front.state.flush()

    assert len(inner.bodies) == 1 and front.state.heartbeats == [(NODE, 30.0)]
    assert status == 200 and headers[b"content-type"] == flower.PROTOBUF_MEDIA_TYPE.encode()
    assert flower.SendNodeHeartbeatResponse.FromString(body).success


@pytest.mark.parametrize("case", ["unknown node", "interval Flower refuses", "Flower refused the node", "key expired"])
def test_a_heartbeat_goes_to_flower_unless_the_node_is_known_and_the_handler_takes_it(key, case):
    now = [0.0]
    inner = Flower()
    front = make_front(inner, keys=NodeKeys(ttl=30.0, clock=lambda: now[0]))
    if case == "Flower refused the node":
        inner.status = 401
    if case != "unknown node":
        pull(front, key.headers())
    if case == "key expired":
        now[0] = 31.0
    interval = -1.0 if case == "interval Flower refuses" else 30.0

    pull(front, key.headers(), path=flower.HEARTBEAT_PATH, body=heartbeat_body(interval=interval))
    front.state.flush()

    assert inner.bodies[-1][0] == flower.HEARTBEAT_PATH and front.state.heartbeats == []


def test_a_client_gone_before_its_body_was_whole_is_not_handed_to_flower(key):
    inner = Flower()
    front = make_front(inner)
    incoming = [{"type": "http.request", "body": b"\x0a", "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": flower.PULL_MESSAGES_PATH, "headers": key.headers()}
    asyncio.run(front(scope, receive, send))

    assert inner.bodies == [] and sent == []


def test_the_serverapps_object_calls_are_answered_by_flowers_runtime_handler_once_flower_accepted_its_token(monkeypatch):
    import httpx
    from flwr.proto.message_pb2 import PullObjectResponse
    from flwr.supercore.runtime_version_compatibility import RuntimeVersionMetadata

    monkeypatch.setenv("FLWR_DATABASE", ":flwr-in-memory:")
    app = flower.superlink_main.create_app()
    state = flower.linkstate_of(app)
    run = state.create_run(None, None, None, {}, "default", None, None, "serverapp")
    task = state.get_run_info(run_ids=[run])[0].primary_task_id
    token = state.claim_task(task)
    state.activate_task(task)
    calls = []

    async def counted(scope, receive, send) -> None:  # noqa: ANN001
        calls.append(scope["path"])
        await app(scope, receive, send)

    front = FleetFront(counted, state, TaskTracker(), runtime_app=app)
    version = dict(RuntimeVersionMetadata.from_local_component("ServerApp").as_metadata())
    path = "/v1/runtime/pull-object"
    body = flower.RUNTIME_CALLS[path].request(node={"node_id": SUPERLINK_NODE_ID}, run_id=run,
                                              object_id="ab" * 32).SerializeToString()  # fmt: skip

    def post(*tokens: str) -> httpx.Response:
        headers = [("content-type", flower.PROTOBUF_MEDIA_TYPE), *version.items()]
        headers += [(flower.TASK_TOKEN_HEADER, value) for value in tokens]

        async def posting() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="https://s") as client:
                return await client.post(path, content=body, headers=headers)

        return asyncio.run(posting())

    flowers, fronts = post(token), post(token)
    assert calls == [path]  # the second answered by the front
    assert (fronts.status_code, fronts.content) == (flowers.status_code, flowers.content)
    assert flowers.status_code == 200 and not PullObjectResponse.FromString(flowers.content).object_found
    strangers = [post("forged"), post(token, token), post()]
    assert [r.status_code for r in strangers] == [401] * 3 and len(calls) == 4  # Flower refused each
    body = flower.RUNTIME_CALLS[path].request(node={"node_id": 5}, run_id=run, object_id="ab" * 32).SerializeToString()
    assert post(token).status_code >= 400 and len(calls) == 5  # the handler raised: Flower's answer
    state.finish_task(task, "completed", "")
    body = fronts.request.content
    assert post(token).status_code == 401 and len(calls) == 6  # no running task by it: Flower refuses


def test_a_known_nodes_heartbeat_is_answered_without_waiting_for_a_worker_thread(key, monkeypatch):
    async def no_threads(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a heartbeat waited for a worker thread")

    inner = Flower()
    front = make_front(inner)
    pull(front, key.headers())
    monkeypatch.setattr(fleet_front.anyio.to_thread, "run_sync", no_threads)

    status, _, body = pull(front, key.headers(), path=flower.HEARTBEAT_PATH, body=heartbeat_body())
    front.state.flush()

    assert status == 200 and flower.SendNodeHeartbeatResponse.FromString(body).success
    assert len(inner.bodies) == 1 and front.state.heartbeats == [(NODE, 30.0)]


def test_a_pull_whose_device_stopped_waiting_before_a_worker_thread_took_it_takes_no_task(key, monkeypatch):
    now, tracker, inner = [0.0], TaskTracker(), Flower()
    front = make_front(inner, tracker=tracker, keys=NodeKeys(clock=lambda: now[0]))
    pull(front, key.headers())  # Flower answers: the key is known, the node idle
    with tracker.storing(NODE):
        pass  # a task is stored for it
    seen = handled_by(monkeypatch, flower.FLEET_CALLS[flower.PULL_MESSAGES_PATH])
    run_sync = fleet_front.anyio.to_thread.run_sync

    async def after_a_long_wait(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        now[0] += fleet_front.ANSWER_BY + 1.0  # the call waited that long for a worker thread
        return await run_sync(*args, **kwargs)

    monkeypatch.setattr(fleet_front.anyio.to_thread, "run_sync", after_a_long_wait)
    status, _, body = pull(front, key.headers())

    assert (status, body) == (200, EMPTY_PULL) and seen == []  # Flower's handler never took the task
    assert not tracker.is_idle(NODE) and len(inner.bodies) == 1  # its next pull asks for it again
