"""What each node did with the tasks of a run: replies accepted, rounds refused or failed, and its
last error (`nodes.json` in the run directory; `fedserver status` shows it).

A refusal is a device declining a task under its owner's policy; any other error reply is a
failure, told by its code (a device's fixed message, or Flower's text, shortened). A round counts
once per node however many attempts it took; the ServerApp writes the ledger after each committed
round and reads it back on a resume. Each round's replies are also kept, in memory, for the
round's event (the dashboard).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedserver.checkpoints import CheckpointError
from fedserver.events import NodeReply
from shared.device_errors import describe, is_refusal
from shared.files import atomic_write_text

if TYPE_CHECKING:
    from flwr.app import Error, Message

NODES_FILE = "nodes.json"
@dataclass
class NodeRecord:
    """One node's counts; a round is counted at most once as refused and once as failed."""

    accepted: int = 0
    rounds_refused: int = 0
    rounds_failed: int = 0
    last_code: int | None = None
    last_round: int | None = None
    last_refused_round: int | None = None
    last_failed_round: int | None = None

    @property
    def last_message(self) -> str | None:
        return None if self.last_code is None else describe(self.last_code)

    def add_error(self, server_round: int, code: int) -> None:
        self.last_code, self.last_round = code, server_round
        if is_refusal(code) and self.last_refused_round != server_round:
            self.rounds_refused, self.last_refused_round = self.rounds_refused + 1, server_round
        elif not is_refusal(code) and self.last_failed_round != server_round:
            self.rounds_failed, self.last_failed_round = self.rounds_failed + 1, server_round

    def to_json(self, node_id: int) -> dict[str, Any]:
        return {"node_id": node_id, **vars(self), "last_message": self.last_message}  # vars: its fields, flat


@dataclass
class NodeLedger:
    """Every node's record for one run, by node id."""

    nodes: dict[int, NodeRecord] = field(default_factory=dict)
    replies: list[NodeReply] = field(default_factory=list, repr=False, compare=False)  # this round's, until `take_replies`

    def record(
        self, server_round: int, replies: list[Message], accepted: list[Message], sent: Sequence[Message] = ()
    ) -> None:
        """Count one screening: `accepted` the replies of `replies` that passed it; `sent` the
        tasks they answer (for each reply's time)."""
        created = {message.metadata.message_id: message.metadata.created_at for message in sent}
        passed = {id(reply) for reply in accepted}
        for reply in replies:
            node, code = reply.metadata.src_node_id, int(reply.error.code) if reply.has_error() else None
            if code is not None:
                self._node(node).add_error(server_round, code)
            elif id(reply) in passed:
                self._node(node).accepted += 1
            outcome = "accepted" if id(reply) in passed else _error_outcome(code)
            start = created.get(reply.metadata.reply_to_message_id)
            seconds = None if start is None else round(max(0.0, reply.metadata.created_at - start), 4)
            self.replies.append(NodeReply(int(node), reply.metadata.message_type, outcome, code, seconds))

    def record_error(self, server_round: int, node_id: int, code: int) -> None:
        """Count one error reply of `node_id` in `server_round` (a secure round's stages report so)."""
        self._node(node_id).add_error(server_round, code)
        self.replies.append(NodeReply(int(node_id), "train", _error_outcome(code), code))

    def record_accepted(self, node_ids: Iterable[int]) -> None:
        """Count one accepted reply of each of `node_ids` (the clients in a secure sum)."""
        for node_id in node_ids:
            self._node(node_id).accepted += 1
            self.replies.append(NodeReply(int(node_id), "train", "accepted"))

    def take_replies(self) -> tuple[NodeReply, ...]:
        """The replies recorded since the last call (a round's), forgotten here."""
        taken, self.replies = tuple(self.replies), []
        return taken

    def entries(self) -> list[dict[str, Any]]:
        """One JSON object per node, by node id (what `nodes.json` holds)."""
        return [record.to_json(node) for node, record in sorted(self.nodes.items())]

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / NODES_FILE, json.dumps({"nodes": self.entries()}, indent=1) + "\n")

    @classmethod
    def read(cls, run_dir: Path) -> NodeLedger:
        """The ledger saved in `run_dir` (empty where there is none); CheckpointError if corrupt."""
        path = run_dir / NODES_FILE
        if not path.exists():
            return cls()
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["nodes"]
            return cls({int(e["node_id"]): _record(e) for e in entries})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is unreadable or corrupt: {err}") from None

    def _node(self, node_id: int) -> NodeRecord:
        return self.nodes.setdefault(int(node_id), NodeRecord())


def _error_outcome(code: int | None) -> str:
    """A reply's outcome where it did not pass screening: screened, or its error code's kind."""
    if code is None:
        return "screened"
    return "refused" if is_refusal(code) else "failed"


def _record(entry: dict[str, Any]) -> NodeRecord:
    saved = {f.name: entry[f.name] for f in fields(NodeRecord)}
    counts = ("accepted", "rounds_refused", "rounds_failed")
    if any(not isinstance(saved[name], int) for name in counts):
        raise ValueError(f"counts must be integers: {[saved[name] for name in counts]}")
    return NodeRecord(**saved)
