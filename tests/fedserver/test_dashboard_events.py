"""Round events as the daemon gets them: the ServerApp's events.jsonl (EventLog), followed by offset
(EventFollower: partial lines, a truncated or replaced file, a resumed run), the replies each round
carries (NodeLedger), and the daemon's loop feeding one model."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedclient.app import app as client_app
from fedserver import daemon
from fedserver.app import main as server_main
from fedserver.checkpoints import read_metrics
from fedserver.dashboard import RunModel
from fedserver.events import EVENTS_FILE, EventFollower, EventLog, NodeReply, RoundEvent, event_record
from fedserver.node_ledger import NodeLedger
from fedserver.state import DaemonInfo, StateDir
from simulations.grid import InProcessGrid, simulation_node_config


def event(n: int, rounds: int = 5) -> RoundEvent:
    return RoundEvent(n, rounds, 1.0, 0.9, 0.1 * n, 0.5, replies=(NodeReply(7, "train", "accepted", None, 0.2),))


def line(n: int) -> str:
    return json.dumps(event_record(event(n))) + "\n"


def test_the_follower_reads_whole_lines_only_and_goes_on_from_its_offset(tmp_path):
    path = tmp_path / EVENTS_FILE
    follower = EventFollower(path)

    before = follower.poll()
    path.write_text(line(1) + line(2)[:10])  # round 2 half written
    first = follower.poll()
    with path.open("a") as file:
        file.write(line(2)[10:] + line(3))
    second = follower.poll()
    third = follower.poll()

    assert before == (False, [])
    assert first[0] is False and [r["round"] for r in first[1]] == [1]
    assert [r["round"] for r in second[1]] == [2, 3] and second[1][0]["replies"][0]["seconds"] == 0.2
    assert third == (False, [])


def test_a_truncated_or_replaced_file_is_read_again_from_its_start(tmp_path):
    path = tmp_path / EVENTS_FILE
    path.write_text(line(1) + line(2) + line(3))
    follower = EventFollower(path)
    follower.poll()

    path.write_text(line(1))  # truncated in place
    shrunk = follower.poll()
    replacement = tmp_path / "new"
    replacement.write_text(line(1) + line(2))
    os.replace(replacement, path)  # replaced, as EventLog rewrites it: another inode
    replaced = follower.poll()
    path.unlink()
    gone = follower.poll()

    assert shrunk[0] is True and [r["round"] for r in shrunk[1]] == [1]
    assert replaced[0] is True and [r["round"] for r in replaced[1]] == [1, 2]
    assert gone == (True, [])


def test_a_line_that_is_not_a_record_is_skipped(tmp_path):
    path = tmp_path / EVENTS_FILE
    path.write_text(line(1) + "not json\n[1, 2]\n" + line(2))

    _, records = EventFollower(path).poll()

    assert [r["round"] for r in records] == [1, 2]


def test_the_event_log_appends_one_line_per_event(tmp_path):
    log = EventLog(tmp_path, history=[], rounds=5)

    log(event(1))
    log(event(2))
    log.close()

    records = [json.loads(text) for text in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and records[0]["replies"][0]["node_id"] == 7
    assert records[1] == json.loads(line(2))


def test_a_resumed_run_s_log_holds_each_committed_round_once(tmp_path):
    # Prepare: rounds 1-3 logged and a half line of 4; only rounds 1-2 committed, then round 2 lost from the file
    path = tmp_path / EVENTS_FILE
    path.write_text(line(1) + line(2) + line(3) + line(4)[:7])
    history = [event(n).row() for n in (1, 2)]
    follower = EventFollower(path)
    follower.poll()

    # Execute
    EventLog(tmp_path, history, rounds=5).close()
    restarted, records = follower.poll()
    path.write_text(line(1))
    EventLog(tmp_path, history, rounds=5).close()  # round 2 missing: written from its row

    # Assert
    assert restarted is True and [r["round"] for r in records] == [1, 2]
    assert records[1]["replies"][0]["node_id"] == 7  # a kept line keeps its replies
    again = [json.loads(text) for text in path.read_text().splitlines()]
    assert [r["round"] for r in again] == [1, 2] and again[1]["replies"] == [] and again[1]["rounds"] == 5


def test_an_unchanged_log_is_not_rewritten(tmp_path):
    path = tmp_path / EVENTS_FILE
    path.write_text(line(1))
    inode = path.stat().st_ino

    EventLog(tmp_path, [event(1).row()], rounds=5).close()

    assert path.stat().st_ino == inode


def echo_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)

    return app


def test_the_ledger_gives_each_reply_of_a_round_with_its_outcome_and_time():
    grid = InProcessGrid(echo_app(), 2, {}, simulation_node_config(2))
    messages = [grid.create_message(RecordDict(), "train", node, group_id="1") for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages))
    ledger = NodeLedger()

    ledger.record(1, replies, replies[:1], sent=messages)
    ledger.record_accepted([9])
    taken, after = ledger.take_replies(), ledger.take_replies()

    assert [(r.node_id, r.task, r.outcome) for r in taken] == [
        (replies[0].metadata.src_node_id, "train", "accepted"), (replies[1].metadata.src_node_id, "train", "screened"),
        (9, "train", "accepted"),
    ]  # fmt: skip
    assert all(r.seconds is not None and r.seconds >= 0 for r in taken[:2]) and taken[2].seconds is None
    assert after == ()


def test_the_deployed_server_app_writes_a_round_event_line_after_each_committed_round(tmp_path, tiny_config):
    cfg = tiny_config(run_dir=str(tmp_path / "run"))
    grid = InProcessGrid(client_app, cfg.num_clients, cfg.to_mapping(), simulation_node_config(cfg.num_clients))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_mapping())

    server_main(grid, context)

    _, records = EventFollower(tmp_path / "run" / EVENTS_FILE).poll()
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2] and records[0]["rounds"] == 2
    assert [{k: v for k, v in r.items() if k not in ("rounds", "replies")} for r in records] == rows
    assert sorted(r["outcome"] for r in records[0]["replies"]).count("accepted") >= cfg.clients_per_round


class QuietControl:
    def list_runs(self) -> list:
        return []

    def list_nodes(self) -> list:
        return []


class LiveProcess:
    def poll(self) -> None:
        return None


def test_the_daemon_follows_events_into_its_model_and_logs_only_new_rounds(tmp_path, caplog, monkeypatch):
    # Prepare: a state directory whose run already had round 1 when the daemon started
    state = StateDir(tmp_path / "state")
    state.create()
    events = state.run_dir / EVENTS_FILE
    events.write_text(line(1))
    info = DaemonInfo(os.getpid(), "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 5)
    model, stop = RunModel("deployment"), threading.Event()
    polls = 0

    def append_then_stop(timeout: float) -> bool:
        nonlocal polls
        polls += 1
        if polls == 1:
            events.write_text(line(1) + line(2) + line(3))
        return polls > 2

    stop.wait = append_then_stop  # type: ignore[method-assign]

    # Execute
    monkeypatch.setattr(daemon.LOG, "propagate", True)
    with caplog.at_level(logging.INFO, logger="fedserver"):
        daemon._watch(QuietControl(), [LiveProcess()], info, state, stop, model)  # noqa: SLF001

    # Assert
    assert [r["round"] for r in model.rounds()] == [1, 2, 3]
    logged = {m.split(":")[0] for m in caplog.messages if m.startswith("round ")}
    assert logged == {"round 2", "round 3"}  # round 1 was there before the daemon started
    assert model.nodes()[0]["rounds_taken_part"] == 3


def test_no_metrics_file_is_read_by_the_daemon_to_learn_of_a_round(tmp_path):
    state = StateDir(tmp_path / "state")
    state.create()
    (state.run_dir / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.5, "seconds": 1.0}\n')
    stop = threading.Event()
    stop.set()
    model = RunModel("deployment")
    info = DaemonInfo(os.getpid(), "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 5)

    daemon._watch(QuietControl(), [LiveProcess()], info, state, stop, model)  # noqa: SLF001

    assert model.rounds() == [] and not Path(state.run_dir / EVENTS_FILE).exists()
