"""fast_polling: replies pulled every `interval` s through the public Grid API; other grids untouched."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from types import SimpleNamespace

import pytest
from flwr.app import Message
from flwr.serverapp import Grid

from fedserver import polling
from fedserver.polling import FastPollingGrid, fast_polling


class _Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()


class FakeGrid(Grid):
    """Pushes give ids m0, m1, ...; each pull returns the reply to one more message."""

    def __init__(self) -> None:
        self.pulls = 0
        self.closed = False
        self.pushes: list[int] = []  # how many messages each push took

    def set_run(self, run):  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type)

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        first, messages = sum(self.pushes), list(messages)
        self.pushes.append(len(messages))
        return [f"m{first + i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        return [_Reply(sorted(message_ids)[0])]  # type: ignore[list-item]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("the wrapper must not call the wrapped grid's polling loop")

    def close(self) -> None:
        self.closed = True


def _messages(n: int) -> list[object]:
    # the wrapper hands them to push_messages and reads each one's node
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=i)) for i in range(n)]


class FakeClock:
    """polling's `time`: `sleep` moves `monotonic` on, instantly (nothing in these tests is timed)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_send_and_receive_pulls_every_interval_until_every_reply_came(monkeypatch):
    # Prepare
    clock = FakeClock()
    monkeypatch.setattr(polling, "time", clock)
    grid = FastPollingGrid(FakeGrid(), interval=0.01)

    # Execute
    replies = list(grid.send_and_receive(_messages(3), timeout=10))

    # Assert: a pull after each interval, and no wait after the last reply came
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.inner.pulls == 3
    assert clock.now < 0.1


def test_the_first_message_is_pushed_on_its_own_then_the_rest():
    grid = FastPollingGrid(FakeGrid(), interval=0.01)
    assert len(grid.send_and_receive(_messages(3), timeout=10)) == 3
    assert grid.inner.pushes == [1, 2]


def test_many_messages_are_pushed_in_chunks_while_the_replies_to_those_pushed_are_pulled():
    inner, pulled = FakeGrid(), threading.Event()
    push, pull = inner.push_messages, inner.pull_messages

    def push_messages(messages):  # type: ignore[no-untyped-def]
        if sum(inner.pushes) == 1 + 2 * polling.PUSH_CHUNK:  # the last chunk waits for a pull
            assert pulled.wait(60), "no reply was pulled while the messages were pushed"
        return push(messages)

    def pull_messages(ids):  # type: ignore[no-untyped-def]
        pulled.set()
        return pull(ids)

    inner.push_messages, inner.pull_messages = push_messages, pull_messages  # type: ignore[method-assign]
    grid = FastPollingGrid(inner, interval=0.001)

    replies = grid.send_and_receive(_messages(25), timeout=None)

    assert sorted(int(r.metadata.reply_to_message_id[1:]) for r in replies) == list(range(25))
    assert inner.pushes == [1, polling.PUSH_CHUNK, polling.PUSH_CHUNK, 4]


def test_send_and_receive_stops_at_the_timeout(monkeypatch):
    # Prepare
    clock = FakeClock()
    monkeypatch.setattr(polling, "time", clock)
    inner = FakeGrid()
    inner.pull_messages = lambda ids: []  # type: ignore[method-assign]
    grid = FastPollingGrid(inner, interval=0.01)

    # Execute
    replies = list(grid.send_and_receive(_messages(2), timeout=0.2))

    # Assert: it waited out the timeout, and no longer
    assert replies == []
    assert clock.now == pytest.approx(0.2)


def test_the_wait_grows_while_nothing_comes_and_drops_when_a_reply_came(monkeypatch):
    # Prepare: the replies to m0 and m1 come at the 5th pull, m2's at the 7th
    inner = FakeGrid()
    arrivals = {5: ["m0", "m1"], 7: ["m2"]}
    pulls = iter(range(1, 100))
    inner.pull_messages = lambda ids: [_Reply(i) for i in arrivals.get(next(pulls), [])]  # type: ignore
    waits: list[float] = []
    monkeypatch.setattr(polling.time, "sleep", waits.append)
    grid = FastPollingGrid(inner, interval=0.2)

    # Execute
    replies = list(grid.send_and_receive(_messages(3), timeout=None))

    # Assert
    assert len(replies) == 3
    assert waits == pytest.approx([0.2, 0.3, 0.45, 0.5, 0.2, 0.3])
    pulls, arrivals = iter(range(1, 100)), {20: ["m3"]}  # the fourth message pushed
    waits.clear()
    assert len(list(grid.send_and_receive(_messages(1), timeout=None))) == 1
    assert max(waits) == waits[-1] == polling.MAX_INTERVAL  # capped


def test_other_calls_go_to_the_wrapped_grid():
    grid = FastPollingGrid(FakeGrid(), interval=0.1)

    assert list(grid.get_node_ids()) == [1, 2]
    grid.close()
    assert grid.inner.closed


def test_only_flowers_deployment_grid_is_wrapped(monkeypatch):
    class HttpGrid(FakeGrid):
        pass

    monkeypatch.setattr(polling, "is_http_grid", lambda grid: isinstance(grid, HttpGrid))
    riding_out = []
    monkeypatch.setattr(polling, "retry_handshake_timeouts", riding_out.append)
    plain, deployed = FakeGrid(), HttpGrid()

    assert fast_polling(plain) is plain  # e.g. fedsim's in-process grid
    wrapped = fast_polling(deployed)
    assert isinstance(wrapped, FastPollingGrid) and wrapped.interval == polling.DEFAULT_INTERVAL
    assert fast_polling(deployed, interval=0) is deployed
    assert riding_out == [deployed, deployed]  # a deployment's grid retries handshake timeouts either way


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(polling.ENV_INTERVAL, "0.25")
    assert polling.poll_interval() == 0.25
    monkeypatch.setenv(polling.ENV_INTERVAL, "0")
    assert polling.poll_interval() == 0
    monkeypatch.setenv(polling.ENV_INTERVAL, "soon")
    with pytest.raises(ValueError, match=polling.ENV_INTERVAL):
        polling.poll_interval()


def test_a_round_that_has_enough_stops_polling_and_its_late_replies_are_dropped_later(monkeypatch, caplog):
    # Prepare: pushes give ids m0, m1, ...; a pull returns the replies in `ready` it asks for
    monkeypatch.setattr(polling, "time", FakeClock())
    inner, ready, pushed, asked = FakeGrid(), {"m0", "m1"}, iter(range(100)), []
    inner.push_messages = lambda messages: [f"m{next(pushed)}" for _ in messages]  # type: ignore[method-assign]

    def pull(ids):  # type: ignore[no-untyped-def]
        asked.append(set(ids))
        return [_Reply(i) for i in sorted(ready & set(ids))]

    inner.pull_messages = pull  # type: ignore[method-assign]
    grid = FastPollingGrid(inner, interval=0.01)

    # Execute: a round of 4 that has enough at 2 replies; then m3 replies late, during the next round
    first = grid.send_and_receive_until(_messages(4), timeout=10, enough=lambda got: len(got) >= 2)
    ready |= {"m3", "m4"}
    with caplog.at_level(logging.WARNING, logger="flowerbed.server"):
        second = grid.send_and_receive(_messages(1), timeout=10)

    # Assert: it stopped at 2 replies; the next round asked for the two left behind, dropped m3's reply
    assert [r.metadata.reply_to_message_id for r in first] == ["m0", "m1"] and asked[0] == {"m0", "m1", "m2", "m3"}
    assert asked[1] == {"m2", "m3", "m4"}
    assert [r.metadata.reply_to_message_id for r in second] == ["m4"]
    assert "node 3: a reply came after its round closed; discarded" in caplog.text
    assert set(grid.abandoned) == {"m2"}


@pytest.mark.parametrize("tasks", [3, 25])  # pushed here, and from a thread of their own
def test_a_push_that_fails_fails_the_round(tasks):
    inner = FakeGrid()
    push = inner.push_messages

    def push_messages(messages):  # type: ignore[no-untyped-def]
        if inner.pushes:
            raise RuntimeError("SuperLink gone")
        return push(messages)

    inner.push_messages = push_messages  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="SuperLink gone"):
        FastPollingGrid(inner, interval=0.001).send_and_receive(_messages(tasks), timeout=None)
    if tasks <= 1 + polling.PUSH_CHUNK:
        assert inner.pulls == 0  # raised at once, before any reply was waited for
