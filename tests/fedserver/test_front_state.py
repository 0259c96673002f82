"""The LinkState as the fleet front's handlers see it: run statuses reused while running, traffic
written in batches (fedserver/front_state.py)."""

from __future__ import annotations

import contextlib
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from fedserver.front_state import FrontState, Turns
from shared.flower_compat import fleet_api as flower

RUN = 7


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Stand:
    """A stand-in for Flower's LinkState: the statuses it was asked for, the traffic it stored and in
    how many transactions."""

    def __init__(self, status: str = flower.RUNNING) -> None:
        self.status, self.asked, self.sessions, self.in_session = status, 0, 0, False
        self.traffic: list[tuple[int, int, int, bool]] = []
        self.runs = {RUN}
        self.object_store = object()
        self.node_heartbeats: list[tuple[int, float, bool]] = []

    def get_run_status(self, run_ids: set[int]) -> dict[int, SimpleNamespace]:
        self.asked += 1
        return {run: SimpleNamespace(status=self.status) for run in run_ids}

    def store_traffic(self, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        if run_id not in self.runs:
            raise ValueError(f"Run {run_id} not found")
        self.traffic.append((run_id, bytes_sent, bytes_recv, self.in_session))

    @contextmanager
    def session(self):  # noqa: ANN201
        self.sessions += 1
        self.in_session = True
        try:
            yield
        finally:
            self.in_session = False

    def acknowledge_node_heartbeat(self, node_id: int, heartbeat_interval: float) -> bool:
        self.node_heartbeats.append((node_id, heartbeat_interval, self.in_session))
        return True


def test_a_running_runs_status_is_read_once_a_ttl():
    stand, clock = Stand(), Clock()
    state = FrontState(stand, status_ttl=1.0, clock=clock)
    for _ in range(5):
        assert state.get_run_status({RUN})[RUN].status == flower.RUNNING
    assert stand.asked == 1
    clock.t = 1.0
    state.get_run_status({RUN})
    assert stand.asked == 2


@pytest.mark.parametrize("status", ["pending", "starting", "finished"])
def test_a_run_that_is_not_running_has_its_status_read_every_time(status):
    stand = Stand(status)
    state = FrontState(stand, status_ttl=60.0, clock=Clock())
    for _ in range(3):
        assert state.get_run_status({RUN})[RUN].status == status
    assert stand.asked == 3


def test_a_run_that_stopped_is_seen_stopped_once_its_running_status_expired():
    stand, clock = Stand(), Clock()
    state = FrontState(stand, status_ttl=1.0, clock=clock)
    state.get_run_status({RUN})
    stand.status = "finished"
    clock.t = 1.5
    assert state.get_run_status({RUN})[RUN].status == "finished"
    assert state.get_run_status({RUN})[RUN].status == "finished"
    assert stand.asked == 3  # the finished status is no longer reused


def test_a_status_asked_with_an_unknown_run_is_read_from_the_state():
    stand = Stand()
    state = FrontState(stand, status_ttl=60.0, clock=Clock())
    state.get_run_status({RUN})
    assert set(state.get_run_status({RUN, 8})) == {RUN, 8}
    assert stand.asked == 2


LONG = 600.0  # s: a flush no test waits for


def test_traffic_and_heartbeats_are_gathered_and_written_in_one_transaction():
    stand = Stand()
    stand.runs.add(8)
    state = FrontState(stand, flush_every=LONG)
    state.store_traffic(RUN, bytes_sent=10, bytes_recv=0)
    state.store_traffic(RUN, bytes_sent=0, bytes_recv=5)
    state.store_traffic(8, bytes_sent=3, bytes_recv=0)
    assert state.acknowledge_node_heartbeat(1, 30.0) is True
    assert state.acknowledge_node_heartbeat(1, 20.0) is True
    assert state.acknowledge_node_heartbeat(2, 30.0) is True
    assert (stand.traffic, stand.node_heartbeats) == ([], [])
    state.flush()
    assert sorted(stand.traffic) == [(RUN, 10, 5, True), (8, 3, 0, True)]
    assert stand.node_heartbeats == [(1, 20.0, True), (2, 30.0, True)]
    assert stand.sessions == 1
    state.flush()
    assert stand.sessions == 1  # nothing left to write


@pytest.mark.parametrize("gathered", ["traffic", "heartbeat"])
def test_what_is_gathered_is_written_without_another_call(gathered):
    stand = Stand()
    state = FrontState(stand, flush_every=0.01)
    if gathered == "traffic":
        state.store_traffic(RUN, bytes_sent=1, bytes_recv=0)
    else:
        state.acknowledge_node_heartbeat(1, 30.0)
    deadline = time.monotonic() + 60.0  # a bound on a failing test, not a timing
    while not (stand.traffic or stand.node_heartbeats) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stand.traffic == [(RUN, 1, 0, True)] or stand.node_heartbeats == [(1, 30.0, True)]


def test_a_flush_that_fails_is_logged_and_raises_nothing(caplog):
    stand = Stand()

    def broken(node_id: int, heartbeat_interval: float) -> bool:
        raise RuntimeError("database is locked")

    stand.acknowledge_node_heartbeat = broken
    state = FrontState(stand, flush_every=LONG)
    state.acknowledge_node_heartbeat(1, 30.0)
    state.flush()
    assert "1 heartbeats and the traffic of 0 runs not written" in caplog.text


def test_a_deleted_runs_traffic_does_not_stop_the_others():
    stand = Stand()
    state = FrontState(stand, flush_every=LONG)
    state.store_traffic(99, bytes_sent=1, bytes_recv=0)
    state.store_traffic(RUN, bytes_sent=2, bytes_recv=0)
    state.flush()
    assert stand.traffic == [(RUN, 2, 0, True)]


@pytest.mark.parametrize(("sent", "received"), [(-1, 0), (0, -1), (0, 0)])
def test_traffic_flower_would_refuse_is_refused_at_once(sent, received):
    state = FrontState(Stand(), clock=Clock())
    with pytest.raises(ValueError, match="traffic"):
        state.store_traffic(RUN, bytes_sent=sent, bytes_recv=received)


def test_everything_else_is_the_states_own():
    stand = Stand()
    assert FrontState(stand).object_store is stand.object_store


@pytest.fixture(params=["sqlite", "memory"])
def linkstate(request, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """Flower's LinkState (SQLite, in memory), as the SuperLink's app builds it, with one run and its task."""
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "state.db") if request.param == "sqlite" else ":flwr-in-memory:")
    state = flower.linkstate_of(flower.superlink_main.create_app())
    run = state.create_run(None, None, None, {}, "default", None, None, "serverapp")
    return state, run, state.get_run_info(run_ids=[run])[0].primary_task_id


def test_on_flowers_state_heartbeats_are_acknowledged_once_written(linkstate):
    state, _, _ = linkstate
    node = state.create_node("owner", "owner", b"key", 30.0)
    state.activate_node(node, 30.0)
    before = state.get_node_info(node_ids=[node])[0].online_until
    front = FrontState(state, flush_every=LONG)
    assert front.acknowledge_node_heartbeat(node, 60.0)
    front.flush()
    assert state.get_node_info(node_ids=[node])[0].online_until > before


def test_on_flowers_state_traffic_adds_up_and_a_finished_run_is_seen(linkstate):
    state, run, task = linkstate
    clock = Clock()
    front = FrontState(state, status_ttl=1.0, flush_every=LONG, clock=clock)
    assert front.get_run_status({run})[run].status == "pending"
    state.claim_task(task)
    state.activate_task(task)
    assert front.get_run_status({run})[run].status == flower.RUNNING
    front.store_traffic(run, bytes_sent=100, bytes_recv=0)
    front.store_traffic(run, bytes_sent=0, bytes_recv=20)
    assert state.get_run_info(run_ids=[run])[0].bytes_sent == 0
    front.flush()
    info = state.get_run_info(run_ids=[run])[0]
    assert (info.bytes_sent, info.bytes_recv) == (100, 20)
    state.finish_task(task, "completed", "")
    assert front.get_run_status({run})[run].status == flower.RUNNING  # reused within the ttl
    clock.t = 1.0
    assert front.get_run_status({run})[run].status == "finished"


BOUND = 60.0  # s a test waits for a thread before it fails (not a timing)


def wait_until(condition) -> None:  # noqa: ANN001
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "a thread never got there"
        time.sleep(0.001)


def test_a_turn_is_reentrant_and_one_threads_at_a_time():
    turns, order = Turns(), []
    with turns, turns:  # nested: the same turn
        other = threading.Thread(target=lambda: [turns.__enter__(), order.append("other"), turns.__exit__()])
        other.start()
        wait_until(lambda: turns._urgent_waiting == 1)  # noqa: SLF001 - it waits for this thread's turn
        order.append("first")
    other.join(BOUND)
    assert order == ["first", "other"]


def test_threads_waiting_outside_deferring_go_before_those_inside():
    turns, order, leave = Turns(), [], threading.Event()

    def take(name: str, deferring: bool) -> None:
        with turns.deferring() if deferring else contextlib.nullcontext(), turns:
            order.append(name)

    with turns:
        deferred = threading.Thread(target=take, args=("device", True))
        deferred.start()
        wait_until(lambda: turns._deferred_waiting == 1)  # noqa: SLF001
        urgent = threading.Thread(target=take, args=("serverapp", False))
        urgent.start()
        wait_until(lambda: turns._urgent_waiting == 1)  # noqa: SLF001
    for thread in (deferred, urgent):
        thread.join(BOUND)
    assert order == ["serverapp", "device"]


def test_the_front_states_handler_calls_defer_and_its_flushes_do_not():
    stand, deferring = Stand(), []
    turns = Turns()
    state = FrontState(stand, turns, flush_every=LONG)
    call = SimpleNamespace(handle=lambda request, state: deferring.append(turns._local.deferring) or "answer")  # noqa: SLF001
    assert state.handle(call, "request") == "answer" and deferring == [True]
    stand.store_traffic = lambda run_id, **_: deferring.append(getattr(turns._local, "deferring", False))  # noqa: SLF001
    state.store_traffic(RUN, bytes_sent=1, bytes_recv=0)
    state.flush()
    assert deferring == [True, False] and not turns._local.deferring  # noqa: SLF001 - heartbeats go first


def test_a_deferring_thread_gets_a_turn_after_at_most_streak_urgent_ones_in_a_row():
    turns, order = Turns(streak=2), []

    def take(name: str, deferring: bool) -> None:
        with turns.deferring() if deferring else contextlib.nullcontext(), turns:
            order.append(name)

    with turns:  # an urgent turn
        threads = [threading.Thread(target=take, args=("device", True))]
        threads[0].start()
        wait_until(lambda: turns._deferred_waiting == 1)  # noqa: SLF001
        threads += [threading.Thread(target=take, args=(f"serverapp {i}", False)) for i in range(4)]
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: turns._urgent_waiting == 4)  # noqa: SLF001
    for thread in threads:
        thread.join(BOUND)
    assert len(order) == 5 and order.index("device") == 1  # after this turn and one more, not last
