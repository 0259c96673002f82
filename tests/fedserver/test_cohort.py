"""A round's cohort: sampled from the connected nodes, over-selected, closed at `clients-per-round`
replies or at `reply-deadline`, the late ones named; the same rule in fedsim and under SecAgg+."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from fedserver import cohort
from fedserver.cohort import (
    close_round, cohort_size, collect_replies, enough_replies, nodes_to_wait_for, reply_timeout, responsive_first,
)
from shared.config import ConfigError
from shared.secagg import EarlyClose, secure_train_round
from simulations import engine
from tests.shared.test_secagg import SETTINGS, FaultyGrid, assert_sum_within_bound, toy_app, train_messages


def reply(node: int, error: bool = False) -> SimpleNamespace:
    """A reply from `node` to `message(node)`."""
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=f"m{node}"), has_error=lambda: error)


def message(node: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, message_id=f"m{node}"))


class DeliveringGrid:
    """A grid that delivers every reply at once, in the order given (fedsim's in-process grid)."""

    def __init__(self, replies: list[SimpleNamespace]) -> None:
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return list(self.replies)


class ClosingGrid(DeliveringGrid):
    """A grid that stops polling when told it has `enough` (the deployed grid): here, it hands
    the replies one by one until `enough` holds."""

    def send_and_receive_until(self, messages, *, timeout=None, enough=None):  # noqa: ANN001, ANN201
        got = []
        for one in self.replies:
            got.append(one)
            if enough(got):
                break
        self.stopped_after = len(got)
        return got


@pytest.mark.parametrize(
    "per_round, over_select, connected, expected",
    [(100, 0.3, 1000, 130), (100, 0.0, 1000, 100), (10, 0.25, 1000, 13), (100, 0.3, 110, 110), (3, 0.1, 50, 4)],
)
def test_the_cohort_is_clients_per_round_and_the_over_selected_share_of_those_connected(
    tiny_config, per_round, over_select, connected, expected
):
    cfg = tiny_config(num_clients=1000, clients_per_round=per_round, over_select=over_select)

    assert cohort_size(cfg, connected) == expected


def test_the_first_round_waits_for_every_node_later_ones_for_a_cohort(tiny_config):
    cfg = tiny_config(num_clients=1000, clients_per_round=100, over_select=0.3)

    assert nodes_to_wait_for(cfg, 1) == 1000
    assert nodes_to_wait_for(cfg, 2) == nodes_to_wait_for(cfg, 7) == 130


def test_the_reply_deadline_bounds_the_wait_within_the_round_timeout(tiny_config):
    assert reply_timeout(tiny_config(round_timeout=600)) == 600
    assert reply_timeout(tiny_config(round_timeout=600, reply_deadline=30)) == 30
    assert reply_timeout(tiny_config(round_timeout=20, reply_deadline=30)) == 20


def test_a_round_closes_at_clients_per_round_replies_keeping_every_error():
    replies = [reply(1), reply(2, error=True), reply(3), reply(4), reply(5)]

    counted, late = close_round(replies, enough_replies(2))

    assert [r.metadata.src_node_id for r in counted] == [1, 2, 3]
    assert [r.metadata.src_node_id for r in late] == [4, 5]


def test_without_enough_replies_the_round_counts_all_it_has():
    replies = [reply(1), reply(2, error=True)]

    assert close_round(replies, enough_replies(3)) == (replies, [])


def test_late_replies_and_silent_nodes_are_logged_by_node_id_and_discarded(caplog):
    grid = DeliveringGrid([reply(11), reply(12), reply(13)])
    messages = [message(node) for node in (11, 12, 13, 14)]

    with caplog.at_level(logging.WARNING, logger="flowerbed.server"):
        counted = collect_replies(grid, messages, 10.0, enough_replies(2), server_round=3)

    assert [r.metadata.src_node_id for r in counted] == [11, 12]
    assert "round 3: closed with 2 replies of 4 sampled; late, discarded: nodes 13, 14" in caplog.text
    assert "node 13: reply to round 3 came after the round closed; discarded" in caplog.text


def test_a_grid_that_can_stop_polling_is_told_when_the_round_has_enough():
    grid = ClosingGrid([reply(n) for n in range(1, 9)])

    counted = collect_replies(grid, [message(n) for n in range(1, 9)], 10.0, enough_replies(5), server_round=1)

    assert grid.stopped_after == 5 and len(counted) == 5


def test_without_a_rule_every_reply_counts():
    replies = [reply(1), reply(2)]

    assert collect_replies(DeliveringGrid(replies), [message(1), message(2)], 1.0, None, 1) == replies


@pytest.mark.parametrize("dp", ["central", "distributed"])
def test_over_selection_is_refused_under_poisson_sampled_privacy(tiny_config, dp):
    extra = {"secure_aggregation": True, "clients_per_round": 5, "num_clients": 6} if dp == "distributed" else {}

    with pytest.raises(ConfigError, match=f"over-select with dp '{dp}': its accountant assumes"):
        tiny_config(dp=dp, dp_clipping_norm=1.0, over_select=0.3, **extra)


@pytest.mark.parametrize("key", ["over_select", "reply_deadline"])
def test_negative_shares_and_deadlines_are_refused(tiny_config, key):
    with pytest.raises(ConfigError, match=f"config key '{key.replace('_', '-')}' must be >= 0"):
        tiny_config(**{key: -1})


def test_fedsim_over_selects_and_counts_clients_per_round_replies_a_round(tmp_path, tiny_config, caplog):
    cfg = tiny_config(num_clients=6, clients_per_round=2, over_select=1.0, rounds=2)

    with caplog.at_level(logging.WARNING, logger="flowerbed.server"):
        result = engine.run_simulation(cfg, tmp_path / "r", progress=False)

    assert result.summary["rounds"] == 2
    for server_round in (1, 2):
        assert f"round {server_round}: closed with 2 replies of 4 sampled; late, discarded: nodes" in caplog.text


def test_a_secure_round_closes_once_enough_vectors_are_in_the_late_ones_dropouts(monkeypatch):
    """10 sampled, 6 wanted: the masked-input stage closes at the first prefix of vectors that
    holds 6 and leaves every client's secrets `threshold` holders; the rest drop out and the
    sum is exactly over those in."""
    grid = FaultyGrid(toy_app())
    collected: list[int] = []

    def collect(messages, timeout, enough):  # noqa: ANN001, ANN202
        counted = collect_replies(grid, messages, timeout, enough, server_round=1)
        collected.append(len(counted))
        return counted

    aggregate = secure_train_round(grid, train_messages(grid), SETTINGS, timeout=60, early=EarlyClose(collect, wanted=6))

    assert 6 <= len(aggregate.survivors.masked) < 10
    assert collected[2] == len(aggregate.survivors.masked)  # the masked-input stage, cut there
    assert all(why == "masked-input: no reply" for why in aggregate.failures.values())
    assert_sum_within_bound(aggregate)


def test_a_secure_round_waits_for_more_vectors_while_a_dropout_could_not_be_unmasked():
    grid = FaultyGrid(toy_app())
    inbox_sizes: list[int] = []

    def collect(messages, timeout, enough):  # noqa: ANN001, ANN202
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        if enough is not None:  # the threshold (4) needs more than the 4 wanted vectors of 10
            inbox_sizes.append(next(n for n in range(len(replies) + 1) if enough(replies[:n])))
        return replies

    secure_train_round(grid, train_messages(grid), SETTINGS, timeout=60, early=EarlyClose(collect, wanted=4))

    assert inbox_sizes and inbox_sizes[0] > 4


def test_a_retry_samples_from_the_nodes_that_did_not_fail_while_enough_are_left():
    assert responsive_first([1, 2, 3, 4], avoid={2}, size=3) == [1, 3, 4]
    assert responsive_first([1, 2, 3, 4], avoid={2, 3}, size=3) == [1, 2, 3, 4]  # too few left: everyone
    assert responsive_first([1, 2, 3], avoid=(), size=3) == [1, 2, 3]
