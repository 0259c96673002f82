"""Stragglers: which sampled clients train, and for how many epochs (the same for the same seed)."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from fedserver.app import apply_stragglers
from shared import messages as keys
from simulations.grid import InProcessGrid, simulation_node_config

NODES = list(range(1001, 1011))


def train_messages(server_round: int) -> list[Message]:
    InProcessGrid(ClientApp(), len(NODES), {}, simulation_node_config(len(NODES)))  # the identity messages need
    content = RecordDict({keys.ARRAYS: ArrayRecord(), keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
    return [Message(content, node, "train") for node in NODES]


def trained(cfg, server_round: int) -> list[tuple[int, int | None]]:
    """(node, local epochs if changed) of each training message that reaches a client."""
    sent = apply_stragglers(train_messages(server_round), cfg, server_round)
    return [(m.metadata.dst_node_id, m.content[keys.CONFIG].get(keys.LOCAL_EPOCHS)) for m in sent]


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
