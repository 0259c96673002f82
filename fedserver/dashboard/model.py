"""The live state of one run, as the dashboard and `fedserver status` show it.

Fed by round records (`fedserver.events.event_record`: in fedsim straight from the ServerApp's
round events, in the daemon from the `events.jsonl` it follows) and, in a deployment, by what the
daemon learns from the SuperLink (its runs and nodes). Thread-safe: the run writes, the web
server's threads read. It holds no client data: metrics, node ids, counts, error codes.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedserver.events import OUTCOMES, Record
from fedserver.node_ledger import NodeRecord
from shared.config import RunConfig
from shared.device_errors import describe
from shared.flower_compat.superlink import NODE_ONLINE

SCREENED_REASON = "refused by the server's screening (the reason is in the server's log)"


def run_summary(cfg: RunConfig) -> dict[str, Any]:
    """What ran: the config keys the page shows above the curves."""
    return {
        "dataset": cfg.dataset, "model": cfg.model, "strategy": cfg.strategy, "num_clients": cfg.num_clients,
        "clients_per_round": cfg.clients_per_round, "rounds": cfg.rounds, "target_accuracy": cfg.target_accuracy,
        "secure_aggregation": cfg.secure_aggregation, "secagg_threshold": cfg.secagg_threshold,
        "secagg_neighbours": cfg.secagg_neighbours, "dp": cfg.dp, "dp_target_epsilon": cfg.dp_target_epsilon,
        "dp_delta": cfg.dp_delta,
    }  # fmt: skip


@dataclass
class NodeStats:
    """One node as the rounds' replies and the SuperLink describe it."""

    ledger: NodeRecord = field(default_factory=NodeRecord)  # counts as nodes.json keeps them
    rounds: int = 0  # rounds it replied in
    last_round: int | None = None
    replies: int = 0
    not_accepted: Counter[tuple[str, int | None]] = field(default_factory=Counter)  # (outcome, code) -> replies
    seconds: float = 0.0  # summed over the `timed` replies whose time is known
    timed: int = 0
    last_seen: float | None = None  # Unix time
    status: str | None = None  # the SuperLink's ("online", "offline", ...); None in a simulation
    name: str = ""  # the SuperLink's (its key file's stem)

    def add(self, server_round: int, reply: Mapping[str, Any], at: float) -> None:
        outcome, code = str(reply.get("outcome")), reply.get("code")
        if server_round != self.last_round:  # records come round after round
            self.rounds, self.last_round = self.rounds + 1, server_round
        self.replies += 1
        if code is not None:
            self.ledger.add_error(server_round, int(code))
        if outcome == "accepted":
            self.ledger.accepted += 1
        else:
            self.not_accepted[(outcome, None if code is None else int(code))] += 1
        if isinstance(reply.get("seconds"), int | float):
            self.seconds, self.timed = self.seconds + float(reply["seconds"]), self.timed + 1
        self.last_seen = max(self.last_seen or at, at)

    def to_json(self, node_id: int, name: str | None, simulated: bool) -> dict[str, Any]:
        refused = [
            {"outcome": outcome, "code": code, "reason": SCREENED_REASON if code is None else describe(code),
             "count": count}
            for (outcome, code), count in sorted(self.not_accepted.items(), key=lambda item: -item[1])
        ]  # fmt: skip
        return {
            **self.ledger.to_json(node_id),
            "name": name,
            "connected": True if simulated else self.status == NODE_ONLINE,
            "status": self.status,
            "last_seen": self.last_seen,
            "rounds_taken_part": self.rounds,
            "last_round_taken_part": self.last_round,
            "replies": self.replies,
            "refused": refused,
            "seconds_per_reply": round(self.seconds / self.timed, 4) if self.timed else None,
        }


class RunModel:
    """One run's rounds and nodes, and in a deployment the daemon's view of it."""

    def __init__(self, kind: str, run: dict[str, Any] | None = None) -> None:
        self.kind = kind  # "simulation" or "deployment"
        self.run = run  # run_summary(cfg), where known
        self.state = "running"  # a deployment's: the SuperLink's run status
        self.started_at = time.time()
        self.daemon: dict[str, Any] = {}  # a deployment's: the status keys the daemon knows (pid, address, runs, ...)
        self._lock = threading.Lock()
        self._rounds: list[dict[str, Any]] = []
        self._numbers: list[int] = []  # each row's round, ascending: `rounds(since)` bisects it
        self._elapsed = 0.0
        self._nodes: dict[int, NodeStats] = {}
        self._replies: Counter[tuple[str, int | None]] = Counter()

    def add(self, record: Record, at: float | None = None) -> None:
        """One round record; `at`: when it came (Unix time; now by default)."""
        at = time.time() if at is None else at
        server_round = int(record["round"])
        replies = [r for r in record.get("replies") or () if isinstance(r, Mapping) and "node_id" in r]
        outcomes = Counter(str(r.get("outcome")) for r in replies)
        row = {key: value for key, value in record.items() if key not in ("replies", "rounds")}
        row.update(at=at, replies={outcome: outcomes[outcome] for outcome in OUTCOMES})
        with self._lock:
            if record.get("rounds"):
                self.run = {**(self.run or {}), "rounds": int(record["rounds"])}
            self._rounds.append(row)
            self._numbers.append(server_round)
            self._elapsed += float(row.get("seconds") or 0.0)
            for reply in replies:
                self._node(int(reply["node_id"])).add(server_round, reply, at)
                self._replies[(str(reply.get("outcome")), reply.get("code"))] += 1

    def reset(self) -> None:
        """Forget the rounds and what the replies said (their source starts over); the SuperLink's
        view of the nodes stays."""
        with self._lock:
            self._rounds, self._numbers, self._elapsed, self._replies = [], [], 0.0, Counter()
            self._nodes = {i: NodeStats(status=n.status, name=n.name, last_seen=n.last_seen) for i, n in self._nodes.items()}

    def set_superlink_nodes(self, nodes: Iterable[Any]) -> None:
        """The SuperLink's nodes (`fedserver.control.NodeInfo`): status, name, last heartbeat."""
        with self._lock:
            for info in nodes:
                node = self._node(info.node_id)
                node.status, node.name = info.status, info.name
                if info.last_seen is not None:
                    node.last_seen = max(node.last_seen or info.last_seen, info.last_seen)

    def rounds(self, since: int = 0) -> list[dict[str, Any]]:
        """The rounds after round `since`, oldest first."""
        with self._lock:
            return [dict(row) for row in self._rounds[bisect.bisect_right(self._numbers, since):]]

    def progress(self) -> tuple[int, float, dict[str, Any] | None]:
        """The rounds completed, their time summed, and the last one (None before the first)."""
        with self._lock:
            return len(self._rounds), self._elapsed, dict(self._rounds[-1]) if self._rounds else None

    def last_known(self, key: str) -> Any:
        """The latest round's value of `key` among the rounds that have one (None where none has)."""
        with self._lock:
            return next((row[key] for row in reversed(self._rounds) if row.get(key) is not None), None)

    def nodes(self, names: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
        """Every node, by node id; `name` from `names` where given, else the SuperLink's (None if none)."""
        with self._lock:
            items = sorted(self._nodes.items())
            return [
                node.to_json(node_id, (names.get(node_id) if names is not None else node.name) or None,
                             self.kind == "simulation")
                for node_id, node in items
            ]  # fmt: skip

    def reply_counts(self) -> dict[tuple[str, int | None], int]:
        """Replies of the whole run by (outcome, error code)."""
        with self._lock:
            return dict(self._replies)

    def connected(self) -> int:
        """Nodes connected now: a deployment's online nodes, a simulation's every virtual node."""
        with self._lock:
            if self.kind == "simulation":
                return int((self.run or {}).get("num_clients") or len(self._nodes))
            return sum(node.status == NODE_ONLINE for node in self._nodes.values())

    def _node(self, node_id: int) -> NodeStats:
        return self._nodes.setdefault(node_id, NodeStats())
