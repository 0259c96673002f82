"""A round's cohort as fleets need it: sampled from the nodes connected now, over-selected, and
closed once enough replies are in or at the reply deadline, the late ones discarded and named.

Bonawitz et al. 2019 ("Towards Federated Learning at Scale") sample about 30 % more devices than
a round needs, because some always drop, and close the round when enough have replied.
`over-select` is that share, `reply-deadline` the bound on the wait. The same functions serve
fedsim's in-process grid (every reply is in at once, and the replies past the cut are the late
ones) and the deployed grid (`fedserver.polling`, which stops polling as soon as the round can
close): one code path.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

from shared.config import RunConfig

LOG = logging.getLogger("flowerbed.server")
Enough = Callable[[Sequence[Message]], bool]  # whether the replies so far let the round close


def cohort_size(cfg: RunConfig, connected: int) -> int:
    """Nodes a round samples: `clients-per-round` and `over-select`'s share more, at most those connected."""
    extra = math.ceil(round(cfg.clients_per_round * cfg.over_select, 9))  # 100 x 0.3 is 30, not 31
    return min(connected, cfg.clients_per_round + extra)


def sample_cohort(node_ids: Iterable[int], size: int, rng: random.Random | None = None) -> list[int]:
    """`size` of `node_ids`, drawn from the run's `random` stream (or `rng`)."""
    nodes = list(node_ids)
    return (rng or random).sample(nodes, min(size, len(nodes)))


def responsive_first(node_ids: Sequence[int], avoid: Collection[int], size: int) -> list[int]:
    """The nodes a retried round samples from: those not in `avoid` (sampled in a failed attempt
    without a valid reply; a killed device stays connected for Flower's online window) where at
    least `size` of them are left, else all of them."""
    fresh = [node for node in node_ids if node not in avoid]
    return fresh if len(fresh) >= size else list(node_ids)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, server_round: int, poll: float = 1.0) -> list[int]:
    """The connected node ids once `wanted` are connected (looking every `poll` s), or after `timeout` s
    those connected then (a node gone for good must not stall the run), saying so."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(poll)
    if len(nodes) < wanted:
        LOG.warning(
            "round %d: %d of %d nodes connected after %g s; sampling from those", server_round, len(nodes), wanted, timeout
        )
    return nodes


def nodes_to_wait_for(cfg: RunConfig, server_round: int) -> int:
    """A run's first round waits for `num-clients` nodes; later rounds (and a resumed run's) only for
    a full cohort, and sample from the nodes connected then, as devices come and go."""
    return cfg.num_clients if server_round == 1 else min(cfg.num_clients, cohort_size(cfg, cfg.num_clients))


def reply_timeout(cfg: RunConfig) -> float:
    """Seconds a round's training replies are waited for: `reply-deadline` where set, at most `round-timeout`."""
    return min(cfg.reply_deadline, cfg.round_timeout) if cfg.reply_deadline > 0 else cfg.round_timeout


def enough_replies(wanted: int) -> Enough:
    """Closes a plaintext round at `wanted` replies that are not errors."""
    return lambda replies: sum(not reply.has_error() for reply in replies) >= wanted


def collect_replies(
    grid: Grid, messages: Sequence[Message], timeout: float | None, enough: Enough | None, server_round: int
) -> list[Message]:
    """Send `messages` and gather their replies until `enough` of them are in or `timeout` s passed.

    The replies are taken in the order they arrived up to the first point where `enough` holds
    (error replies are always kept: the node ledger counts them); the others are late, and so are
    the sampled nodes that have not replied: both are logged with their node ids and discarded.
    A grid with `send_and_receive_until` (the deployed one) stops polling at that point; any other
    (fedsim's) delivers every reply and the same cut applies. Without `enough`, every reply counts.
    """
    receive_until = getattr(grid, "send_and_receive_until", None)
    if enough is None or receive_until is None:
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    else:
        replies = list(receive_until(messages, timeout=timeout, enough=enough))
    if enough is None:
        return replies
    counted, late = close_round(replies, enough)
    _log_late(server_round, messages, counted, late)
    return counted


def close_round(replies: Sequence[Message], enough: Enough) -> tuple[list[Message], list[Message]]:
    """(counted, late): the shortest prefix of `replies` that is `enough`, every error reply with it;
    all of them when no prefix is."""
    for end in range(len(replies) + 1):
        if enough(replies[:end]):
            late = [reply for reply in replies[end:] if not reply.has_error()]
            late_ids = {id(reply) for reply in late}
            return [reply for reply in replies if id(reply) not in late_ids], late
    return list(replies), []


def _log_late(server_round: int, messages: Sequence[Message], counted: list[Message], late: list[Message]) -> None:
    # by the message answered: an error reply the SuperLink makes for a node comes from the SuperLink
    answered = {reply.metadata.reply_to_message_id for reply in counted}
    missing = sorted({m.metadata.dst_node_id for m in messages if m.metadata.message_id not in answered})
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        LOG.warning(
            "round %d: closed with %d replies of %d sampled; late, discarded: nodes %s",
            server_round, len(counted), len(messages), shown,
        )  # fmt: skip
    for reply in late:
        LOG.warning("node %d: reply to round %d came after the round closed; discarded", reply.metadata.src_node_id, server_round)
