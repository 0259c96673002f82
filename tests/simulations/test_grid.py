"""The in-process Grid: delivery to the right node, persistent Contexts, error replies."""

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.flower_compat.messages import SUPERLINK_NODE_ID
from simulations.grid import FIRST_NODE_ID, RUN_ID, InProcessGrid, simulation_node_config


def counting_app() -> ClientApp:
    """A ClientApp that counts its calls in Context.state and echoes its partition id."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls = context.state.config_records.get("calls", ConfigRecord({"n": 0}))
        calls["n"] = int(calls["n"]) + 1
        context.state["calls"] = calls
        metrics = MetricRecord({"partition": context.node_config["partition-id"], "calls": calls["n"]})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_grid(num_nodes: int = 4, app: ClientApp | None = None) -> InProcessGrid:
    return InProcessGrid(app or counting_app(), num_nodes, {"k": 1}, simulation_node_config(num_nodes))


def train_message(node_id: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"x": 1})}), node_id, "train")


def test_each_message_reaches_its_node_and_state_persists():
    grid = make_grid()
    nodes = list(grid.get_node_ids())

    first = grid.send_and_receive([train_message(nodes[2]), train_message(nodes[0])])
    second = grid.send_and_receive([train_message(nodes[2])])

    assert [r.content["metrics"]["partition"] for r in first] == [2, 0]
    assert [r.metadata.src_node_id for r in first] == [nodes[2], nodes[0]]
    assert second[0].content["metrics"]["calls"] == 2  # node 2's Context.state kept its count


def test_replies_point_back_at_their_messages():
    grid = make_grid()
    message = train_message(FIRST_NODE_ID + 1)
    ids = grid.push_messages([message])

    replies = list(grid.pull_messages(ids))

    assert message.metadata.message_id == ids[0]
    assert replies[0].metadata.reply_to_message_id == ids[0]
    assert list(grid.pull_messages(ids)) == []  # a reply is handed over once


def test_messages_the_server_app_creates_come_from_the_superlink_of_this_run():
    grid = make_grid()

    message = grid.create_message(RecordDict(), "train", FIRST_NODE_ID, group_id="1")

    assert message.metadata.run_id == grid.run.run_id == RUN_ID
    assert message.metadata.src_node_id == SUPERLINK_NODE_ID
    assert grid.run.override_config == {"k": 1}


def test_unknown_node_is_refused():
    grid = make_grid(num_nodes=2)
    with pytest.raises(ValueError, match="unknown node id"):
        grid.push_messages([train_message(FIRST_NODE_ID + 5)])


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), SystemExit("disk on fire")], ids=repr)
def test_a_failing_client_app_becomes_an_error_reply(failure):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise failure  # sys.exit too: a ClientApp does not end the simulation

    grid = make_grid(app=app)

    (reply,) = grid.send_and_receive([train_message(FIRST_NODE_ID)])

    assert reply.has_error() and f"{type(failure).__name__}: disk on fire" in reply.error.reason


def test_contexts_are_made_only_for_addressed_nodes():
    made: list[int] = []  # partition ids whose Context was made (node_config is asked once per Context)

    def node_config(partition_id: int) -> dict[str, int]:
        made.append(partition_id)
        return {"partition-id": partition_id, "num-partitions": 10_000}

    grid = InProcessGrid(counting_app(), 10_000, {"k": 1}, node_config)
    grid.send_and_receive([train_message(FIRST_NODE_ID + 9_999)])
    grid.send_and_receive([train_message(FIRST_NODE_ID + 9_999)])

    assert made == [9_999]
    context = grid.context(FIRST_NODE_ID + 9_999)
    assert context is grid.context(FIRST_NODE_ID + 9_999)
    assert context.state.config_records["calls"]["n"] == 2
    assert made == [9_999]  # looking a made Context up makes no other
