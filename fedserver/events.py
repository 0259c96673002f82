"""What the ServerApp tells its subscribers after each committed round.

`run_federation(..., on_round=[...])` calls every subscriber with one `RoundEvent` once the
round's checkpoint is committed; a subscriber that returns True asks the run to stop there
(the round stays committed). fedsim's progress bar and plot and a run directory's summary
are subscribers, and so is the live dashboard (`fedserver.dashboard`). A field added here
takes a default, so that existing subscribers keep working.

A deployment's ServerApp runs in a child of the daemon, so it also appends each event as one
JSON line to `events.jsonl` in its run directory (`EventLog`), which the daemon follows by
offset (`EventFollower`): one complete line is one committed round.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from shared.files import atomic_write_text

Row = dict[str, float | None]  # one line of metrics.jsonl
Record = dict[str, Any]  # one line of events.jsonl: a RoundEvent's fields, `replies` as objects
EVENTS_FILE = "events.jsonl"
OUTCOMES = ("accepted", "screened", "refused", "failed")


@dataclass(frozen=True)
class NodeReply:
    """One reply of a round (or an error in its place), as the server judged it.

    `outcome`: "accepted" (passed screening), "screened" (refused by the server's screening),
    "refused" (the device declined under its owner's policy, `code`), "failed" (any other error
    reply, `code`). `seconds`: from the task's creation (server clock) to the reply's (the
    device's clock in a deployment); None where unknown, as for the clients of a secure sum.
    """

    node_id: int
    task: str  # "train" or "evaluate"
    outcome: str
    code: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class RoundEvent:
    """Round `round` of `rounds` is committed, with these metrics (None where not measured)."""

    round: int
    rounds: int  # the rounds the run is configured for (it may stop earlier)
    train_loss: float | None
    eval_loss: float | None
    accuracy: float | None
    seconds: float  # the round's own time: sampling, training, aggregation, evaluation
    replies: tuple[NodeReply, ...] = ()  # every reply of the round's attempts and its evaluation

    def row(self) -> Row:
        """The round's line of `metrics.jsonl`."""
        row: Row = asdict(self)
        del row["rounds"], row["replies"]
        return row


RoundCallback = Callable[[RoundEvent], "bool | None"]


def notify(subscribers: Sequence[RoundCallback], event: RoundEvent) -> bool:
    """Hand `event` to every subscriber, in order; whether any of them asked to stop."""
    stop = False
    for subscriber in subscribers:
        stop = bool(subscriber(event)) or stop
    return stop


def event_record(event: RoundEvent) -> Record:
    """`event` as plain JSON values: its fields (a private round's `epsilon` too), `replies` as objects."""
    record = {f.name: getattr(event, f.name) for f in fields(event)}  # not asdict: it deep-copies each reply
    record["replies"] = [dict(vars(reply)) for reply in event.replies]
    return record


class EventLog:
    """A subscriber appending each event to `run_dir/events.jsonl`, one JSON line, flushed.

    Opened with the run's committed rows (`history`), it first makes the file hold one line per
    committed round and nothing else: a partial last line (a crash while writing) and lines past
    the committed round are dropped, the rounds it misses are written from `history` (without
    replies); where that changes the file it is rewritten atomically, so a follower sees it
    replaced and reads it again from the start.
    """

    def __init__(self, run_dir: Path, history: Sequence[Row], rounds: int) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        kept = [r for r in _complete_records(self.path) if int(r.get("round", 0)) <= len(history)]
        lines = [json.dumps(r) + "\n" for r in kept]
        lines += [json.dumps({**row, "rounds": rounds, "replies": []}) + "\n" for row in history[len(kept):]]
        text = "".join(lines)
        if not self.path.exists() or self.path.read_text(encoding="utf-8") != text:
            atomic_write_text(self.path, text)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def __call__(self, event: RoundEvent) -> None:
        os.write(self._fd, (json.dumps(event_record(event)) + "\n").encode("utf-8"))

    def close(self) -> None:
        os.close(self._fd)


def _complete_records(path: Path) -> list[Record]:
    """The records of `path`'s complete lines, in order, up to the first that is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in text.split("\n")[:-1]:  # the text after the last newline is not a complete line
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class EventFollower:
    """Reads the records appended to an events file since the last `poll`, whole lines only.

    A partial last line waits for its newline. A file that shrank or was replaced (another
    inode) is read again from its start, and `poll` says so: its records are the whole run.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.inode: int | None = None

    def poll(self) -> tuple[bool, list[Record]]:
        """(whether the file started over, the records of the complete lines since the last poll)."""
        try:
            with open(self.path, "rb") as file:
                stat = os.fstat(file.fileno())
                restarted = self.inode is not None and (stat.st_ino != self.inode or stat.st_size < self.offset)
                if restarted:
                    self.offset = 0
                self.inode = stat.st_ino
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            restarted, self.inode, self.offset = self.inode is not None, None, 0
            return restarted, []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return restarted, [r for r in map(_record, complete.decode("utf-8", "replace").splitlines()) if r is not None]


def _record(line: str) -> Record | None:
    """A line's record; None for a blank line or one that is not a JSON object (never written so)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None
