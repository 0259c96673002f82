"""Stragglers: which sampled clients train, and for how many epochs (the same for the same seed)."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from shared import messages as keys
from simulations.grid import InProcessGrid, simulation_node_config
from simulations.stragglers import with_stragglers

NODES = list(range(1001, 1011))


def recording_grid(received: list[Message]) -> InProcessGrid:
    """A grid of 10 nodes whose ClientApp records each message it gets and replies empty."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        received.append(msg)
        return Message(RecordDict(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        received.append(msg)
        return Message(RecordDict(), reply_to=msg)

    return InProcessGrid(app, len(NODES), {}, simulation_node_config(len(NODES)))


def round_messages(server_round: int, message_type: str = "train") -> list[Message]:
    content = RecordDict({keys.ARRAYS: ArrayRecord(), keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
    return [Message(content, node, message_type) for node in NODES]


def trained(cfg, server_round: int) -> list[tuple[int, int | None]]:
    """(node, local epochs if changed) of each training message that reaches a client."""
    received: list[Message] = []
    grid = with_stragglers(recording_grid(received), cfg)

    replies = grid.send_and_receive(round_messages(server_round))

    assert len(list(replies)) == len(received)  # a dropped straggler never replies
    return [(m.metadata.dst_node_id, m.content[keys.CONFIG].get(keys.LOCAL_EPOCHS)) for m in received]


@pytest.mark.parametrize(
    ("server_round", "nodes"),
    [(1, [1001, 1004, 1005, 1009, 1010]), (2, [1001, 1003, 1004, 1006, 1009])],
)
def test_fedavg_drops_the_same_stragglers_for_the_same_seed(tiny_config, server_round, nodes):
    cfg = tiny_config(stragglers=0.5, strategy="fedavg", seed=7)

    assert trained(cfg, server_round) == [(node, None) for node in nodes]


@pytest.mark.parametrize(
    ("server_round", "epochs"),
    [
        (1, [None, 3, 3, None, None, 3, 5, 5, None, None]),
        (2, [None, 2, None, None, 2, None, 2, 1, None, 1]),
    ],
)
def test_fedprox_keeps_the_same_stragglers_with_the_same_partial_epochs(tiny_config, server_round, epochs):
    cfg = tiny_config(stragglers=0.5, strategy="fedprox", seed=7, local_epochs=5)

    assert trained(cfg, server_round) == list(zip(NODES, epochs))


def test_without_stragglers_every_client_trains_as_configured(tiny_config):
    assert trained(tiny_config(strategy="fedavg"), 1) == [(node, None) for node in NODES]


def test_fedprox_keeps_most_stragglers_with_varied_partial_epochs(tiny_config):
    sent = trained(tiny_config(stragglers=0.9, strategy="fedprox", local_epochs=20), 1)

    epochs = [e for _, e in sent if e is not None]
    assert [node for node, _ in sent] == NODES
    assert len(epochs) == 9 and all(1 <= e <= 20 for e in epochs) and len(set(epochs)) > 1


def test_fedavg_drops_most_stragglers(tiny_config):
    assert len(trained(tiny_config(stragglers=0.9, strategy="fedavg"), 1)) == 1


def test_evaluation_is_never_slowed_down(tiny_config):
    received: list[Message] = []
    grid = with_stragglers(recording_grid(received), tiny_config(stragglers=0.9, strategy="fedavg"))

    grid.send_and_receive(round_messages(1, "evaluate"))

    assert [m.metadata.dst_node_id for m in received] == NODES
