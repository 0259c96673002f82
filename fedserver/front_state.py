"""Flower's LinkState as the handlers the fleet front calls (fedserver/fleet_front.py) see it.

Flower's handler for every object a device pulls or pushes, and for every reply and receipt, first
reads its run's status, and the SQLite state first expires old task tokens for that (two UPDATEs
and a SELECT: about 2 ms of CPU); it then adds the object's bytes to the run's traffic (an UPDATE,
about 0.5 ms). A round of 100 devices moves over 3,000 objects. Here:

- a running run's status is read from the state at most every `status_ttl` s (a run that stops
  is refused to the front's calls up to that much later than to Flower's own; any other status
  is read every time);
- traffic is added up and written every `flush_every` s, all runs in one transaction (on the
  next call after that, and when the server stops: a crash loses at most that much traffic
  count, nothing else);

everything else is the LinkState's own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from shared.flower_compat import fleet_api as flower

STATUS_TTL = 1.0  # s a running run's status is reused
FLUSH_EVERY = 1.0  # s traffic is added up before it is written
LOG = logging.getLogger("flowerbed.server")


class FrontState:
    """`state` (Flower's LinkState), its run statuses cached while running and its traffic written
    in batches; see the module docstring."""

    def __init__(self, state: Any, status_ttl: float = STATUS_TTL, flush_every: float = FLUSH_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.state, self._status_ttl, self._flush_every, self._clock = state, status_ttl, flush_every, clock
        self._lock = threading.Lock()
        self._running: dict[int, tuple[Any, float]] = {}  # run -> (its RunStatus, when it was read)
        self._traffic: dict[int, tuple[int, int]] = {}  # run -> (bytes sent, bytes received) not yet written
        self._flushed = clock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.state, name)

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
            due = self._clock() - self._flushed >= self._flush_every
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the traffic added up so far, every run's in one transaction."""
        with self._lock:
            traffic, self._traffic, self._flushed = self._traffic, {}, self._clock()
        if not traffic:
            return
        with self.state.session():
            for run_id, (sent, received) in traffic.items():
                try:
                    self.state.store_traffic(run_id, bytes_sent=sent, bytes_recv=received)
                except ValueError as err:  # the run was deleted meanwhile
                    LOG.debug("traffic of run %d not recorded: %s", run_id, err)
