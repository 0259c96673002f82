"""The LinkState as the fleet front's handlers see it: run statuses reused while running, traffic
written in batches (fedserver/front_state.py)."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from fedserver.front_state import FrontState
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
        self.node_heartbeats: list[int] = []

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
        self.node_heartbeats.append(node_id)
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


def test_traffic_is_added_up_and_written_in_one_transaction_once_flush_every_passed():
    stand, clock = Stand(), Clock()
    stand.runs.add(8)
    state = FrontState(stand, flush_every=1.0, clock=clock)
    state.store_traffic(RUN, bytes_sent=10, bytes_recv=0)
    state.store_traffic(RUN, bytes_sent=0, bytes_recv=5)
    state.store_traffic(8, bytes_sent=3, bytes_recv=0)
    assert stand.traffic == []
    clock.t = 1.0
    state.store_traffic(RUN, bytes_sent=1, bytes_recv=1)
    assert sorted(stand.traffic) == [(RUN, 11, 6, True), (8, 3, 0, True)]
    assert stand.sessions == 1
    state.flush()
    assert stand.sessions == 1  # nothing left to write


def test_a_deleted_runs_traffic_does_not_stop_the_others():
    stand = Stand()
    state = FrontState(stand, clock=Clock())
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
    assert FrontState(stand).acknowledge_node_heartbeat(5, 30.0) is True
    assert stand.node_heartbeats == [5]


@pytest.fixture
def linkstate(tmp_path, monkeypatch):  # noqa: ANN201
    """Flower's SQLite LinkState, as the SuperLink's app builds it, with one run and its task."""
    monkeypatch.setenv("FLWR_DATABASE", str(tmp_path / "state.db"))
    state = flower.linkstate_of(flower.superlink_main.create_app())
    run = state.create_run(None, None, None, {}, "default", None, None, "serverapp")
    return state, run, state.get_run_info(run_ids=[run])[0].primary_task_id


def test_on_flowers_sqlite_state_traffic_adds_up_and_a_finished_run_is_seen(linkstate):
    state, run, task = linkstate
    clock = Clock()
    front = FrontState(state, status_ttl=1.0, flush_every=60.0, clock=clock)
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
