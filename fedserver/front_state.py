"""Flower's LinkState as the handlers the fleet front calls (fedserver/fleet_front.py) see it.

Flower's handler for every object a device pulls or pushes, and for every reply and receipt, first
reads its run's status, and the SQLite state first expires old task tokens for that (two UPDATEs
and a SELECT: about 2 ms of CPU); it then adds the object's bytes to the run's traffic (an UPDATE,
about 0.5 ms). A round of 100 devices moves over 3,000 objects, and 1,000 connected devices send
33 heartbeats a second, each an UPDATE and a commit of its own. Here:

- a running run's status is read from the state at most every `status_ttl` s (a run that stops
  is refused to the front's calls up to that much later than to Flower's own; any other status
  is read every time);
- traffic is added up, and heartbeats are acknowledged (as Flower acknowledges a known node's),
  then both are written `flush_every` s after the first of them, together in one transaction
  (SQLite's; Flower's in-memory state has none), and when the server stops (a crash loses at
  most that much traffic count and those heartbeats, which their devices send again);

everything else is the LinkState's own.

`Turns` is the one lock the SuperLink's process takes for every session of Flower's database
(`shared.flower_compat.fleet_api.transactions_take_turns`), where each would wait in SQLite's busy
handler, which sleeps 1, 2, 5 ... 100 ms between tries: under a fleet's writes the database stood
idle while writers slept, and one that kept missing its turn failed with "database is locked".
The front's device calls defer to every other waiting session, for up to `URGENT_STREAK` turns in
a row: the ServerApp's calls (storing a round's tasks, pulling its replies), a few among a
thousand devices', would otherwise wait behind each of them, and a round's end with them. The heartbeats and traffic gathered here do not (a
heartbeat written late takes its device offline, and its reply with it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shared.flower_compat import fleet_api as flower

STATUS_TTL = 1.0  # s a running run's status is reused
FLUSH_EVERY = 1.0  # s traffic and heartbeats are gathered before they are written
URGENT_STREAK = 4  # turns in a row the ServerApp's sessions may take while a device's waits
LOG = logging.getLogger("flowerbed.server")


class Turns:
    """A re-entrant lock that lets the threads waiting outside `deferring()` in before those inside,
    but for at most `streak` turns in a row while one inside waits (so that devices' calls move on
    under a ServerApp that always has one waiting)."""

    def __init__(self, streak: int = URGENT_STREAK) -> None:
        self._lock = threading.Lock()
        self._urgent, self._deferred = threading.Condition(self._lock), threading.Condition(self._lock)
        self._owner: int | None = None
        self._depth = 0  # the owner's nested turns
        self._urgent_waiting = self._deferred_waiting = 0
        self._streak, self._in_a_row = streak, 0  # urgent turns in a row
        self._handing_over = False  # the next turn is a deferring thread's
        self._local = threading.local()

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Around work whose turns come after every other waiting thread's."""
        before = getattr(self._local, "deferring", False)
        self._local.deferring = True
        try:
            yield
        finally:
            self._local.deferring = before

    def __enter__(self) -> None:
        me, deferring = threading.get_ident(), getattr(self._local, "deferring", False)
        with self._lock:
            if self._owner == me:
                self._depth += 1
                return
            if deferring:
                self._deferred_waiting += 1
                while self._owner is not None or (self._urgent_waiting and not self._handing_over):
                    self._deferred.wait()
                self._deferred_waiting -= 1
                self._handing_over, self._in_a_row = False, 0
            else:
                self._urgent_waiting += 1
                while self._owner is not None or self._handing_over:
                    self._urgent.wait()
                self._urgent_waiting -= 1
                self._in_a_row += 1
            self._owner, self._depth = me, 1

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            if self._deferred_waiting and (not self._urgent_waiting or self._in_a_row >= self._streak):
                self._handing_over = bool(self._urgent_waiting)
                self._deferred.notify()
            else:
                self._urgent.notify()


class FrontState:
    """`state` (Flower's LinkState), its run statuses cached while running, its traffic and
    heartbeats written in batches; see the module docstring."""

    def __init__(self, state: Any, turns: Turns | None = None, status_ttl: float = STATUS_TTL,
                 flush_every: float = FLUSH_EVERY, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.state, self._status_ttl, self._flush_every, self._clock = state, status_ttl, flush_every, clock
        self.turns = turns or Turns()
        self._lock = threading.Lock()
        self._running: dict[int, tuple[Any, float]] = {}  # run -> (its RunStatus, when it was read)
        self._traffic: dict[int, tuple[int, int]] = {}  # run -> (bytes sent, bytes received) not yet written
        self._heartbeats: dict[int, float] = {}  # node -> its heartbeat interval, acknowledged, not yet written
        self._timer: threading.Timer | None = None  # the flush due

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)

    def handle(self, call: Any, request: Any) -> Any:
        """Flower's handler's response to a device's `call` (a FleetCall), from this state, its
        database turns deferred to others'."""
        with self.turns.deferring():
            return call.handle(request, self)

    def get_run_status(self, run_ids: Iterable[int]) -> dict[int, Any]:
        """The runs' statuses (Flower's RunStatus), a running one's from up to `status_ttl` s ago."""
        run_ids, now = set(run_ids), self._clock()
        with self._lock:
            cached = {run: status for run, (status, at) in self._running.items() if now - at < self._status_ttl}
        if run_ids <= cached.keys():
            return {run: cached[run] for run in run_ids}
        statuses = self.state.get_run_status(run_ids)
        with self._lock:
            for run, status in statuses.items():
                if status.status == flower.RUNNING:
                    self._running[run] = (status, now)
                else:
                    self._running.pop(run, None)
        return statuses

    def store_traffic(self, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        """Add to the run's traffic; written with the rest within `flush_every` s."""
        if bytes_sent < 0 or bytes_recv < 0 or not (bytes_sent or bytes_recv):
            raise ValueError(f"run {run_id}: traffic of {bytes_sent} bytes sent, {bytes_recv} received")
        with self._lock:
            sent, received = self._traffic.get(run_id, (0, 0))
            self._traffic[run_id] = (sent + bytes_sent, received + bytes_recv)
            self._flush_soon()

    def acknowledge_node_heartbeat(self, node_id: int, heartbeat_interval: float) -> bool:
        """A known node's heartbeat: acknowledged now (True, as Flower answers a registered node),
        written with the rest within `flush_every` s."""
        with self._lock:
            self._heartbeats[node_id] = heartbeat_interval
            self._flush_soon()
        return True

    def _flush_soon(self) -> None:
        """With the lock held: a flush `flush_every` s from now, unless one is due already."""
        if self._timer is None:
            self._timer = threading.Timer(self._flush_every, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def flush(self) -> None:
        """Write the traffic added up and the heartbeats acknowledged so far, in one transaction."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            traffic, heartbeats, self._traffic, self._heartbeats, self._timer = self._traffic, self._heartbeats, {}, {}, None
        if not (traffic or heartbeats):
            return
        session = getattr(self.state, "session", contextlib.nullcontext)  # Flower's in-memory state has none
        try:
            with session():
                for node_id, interval in heartbeats.items():
                    self.state.acknowledge_node_heartbeat(node_id, interval)
                for run_id, (sent, received) in traffic.items():
                    try:
                        self.state.store_traffic(run_id, bytes_sent=sent, bytes_recv=received)
                    except ValueError as err:  # the run was deleted meanwhile
                        LOG.debug("traffic of run %d not recorded: %s", run_id, err)
        except Exception:  # noqa: BLE001 - a flush from a timer thread has nobody else to tell
            LOG.exception("%d heartbeats and the traffic of %d runs not written", len(heartbeats), len(traffic))
