"""The SuperLink's front: a pull from a node Flower last answered empty, with no task stored since, is
answered with Flower's own empty answer, and a heartbeat by Flower's own handler, after the node's
signature checks out with the key Flower last accepted for it; anything else reaches Flower."""

from __future__ import annotations

import asyncio
import base64
import datetime
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedserver.fleet_front import EMPTY_PULL, FleetFront, NodeKeys, TaskTracker, signed_key
from shared.flower_compat import fleet_api as flower

NODE = 7


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

    def acknowledge_node_heartbeat(self, node_id: int, heartbeat_interval: float) -> bool:
        self.heartbeats.append((node_id, heartbeat_interval))
        return node_id == NODE


def make_front(inner: Flower, tracker: TaskTracker | None = None, keys: NodeKeys | None = None) -> FleetFront:
    return FleetFront(inner, State(), tracker or TaskTracker(), keys)


def heartbeat_body(node: int = NODE, interval: float = 30.0) -> bytes:
    return flower.SendNodeHeartbeatRequest(node={"node_id": node}, heartbeat_interval=interval).SerializeToString()


def pull(front: FleetFront, headers: list[tuple[bytes, bytes]], node: int = NODE, path: str = flower.PULL_MESSAGES_PATH,
         body: bytes | None = None, chunk: int = 0) -> tuple[int, dict[bytes, bytes], bytes]:  # fmt: skip
    """One request through `front`: (status, headers, body) of its answer."""
    body = flower.PullMessagesRequest(node={"node_id": node}).SerializeToString() if body is None else body
    chunks = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(front(scope, receive, send))
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
    large = bytes(range(256)) * 64

    pull(front, key.headers(), path="/v1/fleet/push-messages", body=b"\x01\x02")
    pull(front, key.headers(), body=large, chunk=1000)
    pull(front, key.headers(), body=b"\xff\xff not protobuf")

    assert inner.bodies == [("/v1/fleet/push-messages", b"\x01\x02"), (flower.PULL_MESSAGES_PATH, large),
                            (flower.PULL_MESSAGES_PATH, b"\xff\xff not protobuf")]  # fmt: skip


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
    front = FleetFront(counted, state, tracker)

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
    assert state.get_node_info(node_ids=[node])[0].online_until > online_until  # acknowledged in Flower's state
    assert [r.status_code for r in strangers] == [401] * 4


def test_a_known_nodes_heartbeat_is_acknowledged_by_flowers_handler_without_flower(key):
    inner = Flower()
    front = make_front(inner)
    pull(front, key.headers())

    status, headers, body = pull(front, key.headers(), path=flower.HEARTBEAT_PATH, body=heartbeat_body())

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
