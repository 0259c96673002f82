"""The node ledger: each node's accepted replies, rounds refused and failed, its last error code,
and nodes.json, written atomically and read back."""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedserver.checkpoints import CheckpointError
from fedserver.node_ledger import NODES_FILE, NodeLedger, NodeRecord
from shared.device_errors import MESSAGES, DeviceCode
from simulations.grid import FIRST_NODE_ID, InProcessGrid, simulation_node_config

REFUSING, FAILING, FLOWER_FAILING, HONEST = (FIRST_NODE_ID + i for i in range(4))
ERRORS = {
    REFUSING: Error(DeviceCode.POLICY_SECURE_AGGREGATION, MESSAGES[DeviceCode.POLICY_SECURE_AGGREGATION]),
    FAILING: Error(DeviceCode.BAD_DATA, MESSAGES[DeviceCode.BAD_DATA]),
    FLOWER_FAILING: Error(2, "RuntimeError: out of memory"),  # Flower's CLIENT_APP_RAISED_EXCEPTION
}


def answering_app() -> ClientApp:
    """A ClientApp whose nodes answer as ERRORS says, and HONEST with an empty record."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_id in ERRORS:
            return Message(ERRORS[context.node_id], reply_to=msg)
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)

    return app


@pytest.fixture
def ask():
    """Sends one task to every node; returns the replies and those of them without an error."""
    grid = InProcessGrid(answering_app(), 4, {}, simulation_node_config(4))

    def ask_all() -> tuple[list[Message], list[Message]]:
        messages = [grid.create_message(RecordDict(), "train", node, group_id="1") for node in grid.get_node_ids()]
        replies = list(grid.send_and_receive(messages))
        return replies, [reply for reply in replies if not reply.has_error()]

    return ask_all


def test_refusals_and_failures_count_once_a_round_and_accepted_replies_each(ask):
    ledger = NodeLedger()

    ledger.record(1, *ask())
    ledger.record(1, *ask())  # a retry, or the round's evaluation: the same round
    ledger.record(2, *ask())

    assert ledger.nodes[REFUSING] == NodeRecord(
        accepted=0, rounds_refused=2, rounds_failed=0, last_code=110, last_round=2, last_refused_round=2
    )
    assert ledger.nodes[FAILING].rounds_failed == 2 and ledger.nodes[FAILING].rounds_refused == 0
    assert ledger.nodes[FLOWER_FAILING].rounds_failed == 2 and ledger.nodes[FLOWER_FAILING].last_code == 2
    assert ledger.nodes[HONEST] == NodeRecord(accepted=3)


def test_a_failure_and_a_refusal_in_one_round_count_once_each():
    record = NodeRecord()

    for code in (DeviceCode.BAD_DATA, DeviceCode.POLICY_MODEL, DeviceCode.FAILED, DeviceCode.FOREIGN_CODE):
        record.add_error(4, code)

    assert (record.rounds_failed, record.rounds_refused) == (1, 1)
    assert (record.last_code, record.last_round, record.last_message) == (104, 4, MESSAGES[DeviceCode.FOREIGN_CODE])


def test_the_ledger_round_trips_through_nodes_json_with_each_message(tmp_path, ask):
    ledger = NodeLedger()
    ledger.record(3, *ask())

    ledger.save(tmp_path)
    again = NodeLedger.read(tmp_path)
    again.record(4, *ask())  # a resumed run's counts continue

    saved = json.loads((tmp_path / NODES_FILE).read_text())["nodes"]
    assert [entry["node_id"] for entry in saved] == [REFUSING, FAILING, FLOWER_FAILING, HONEST]
    assert saved[0]["last_message"] == "refused by the device's policy: secure aggregation is required"
    assert "out of memory" not in (tmp_path / NODES_FILE).read_text()  # codes only, never a reply's text
    assert NodeLedger.read(tmp_path) == ledger
    assert again.nodes[REFUSING].rounds_refused == 2 and again.nodes[HONEST].accepted == 2
    assert os.listdir(tmp_path) == [NODES_FILE]  # no temporary file left


def test_a_failed_save_leaves_the_previous_nodes_json_whole(tmp_path, monkeypatch, ask):
    ledger = NodeLedger()
    ledger.record(1, *ask())
    ledger.save(tmp_path)
    before = (tmp_path / NODES_FILE).read_text()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    ledger.record(2, *ask())
    with pytest.raises(OSError, match="disk full"):
        ledger.save(tmp_path)

    assert (tmp_path / NODES_FILE).read_text() == before
    assert os.listdir(tmp_path) == [NODES_FILE]


@pytest.mark.parametrize(
    "corrupt",
    ["{", json.dumps({"nodes": [{**NodeRecord().to_json(5), "accepted": "many"}]}), '{"nodes": [{"node_id": 5}]}'],
    ids=["not JSON", "a count not an integer", "a missing count"],
)
def test_no_nodes_json_is_an_empty_ledger_and_a_corrupt_one_an_error(tmp_path, corrupt):
    assert NodeLedger.read(tmp_path) == NodeLedger()

    (tmp_path / NODES_FILE).write_text(corrupt)

    with pytest.raises(CheckpointError, match="nodes.json is unreadable or corrupt"):
        NodeLedger.read(tmp_path)
