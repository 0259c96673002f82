"""Secure aggregation (SecAgg+, Bell et al., CCS 2020) on Flower's Message API: the server learns
only the sum of the clients' updates.

Server: `secure_train_round(grid, train_messages, settings, timeout)` -> `SecureAggregate`, then
`as_mean_reply(aggregate, reply_to)` for the strategy's `aggregate_train`. Client:
`ClientApp(mods=[secagg_mod])`. The protocol, its threat model and what it leaves uncovered:
docs/secure-aggregation.md.
"""

from shared.secagg.client import secagg_mod
from shared.secagg.server import EarlyClose, SecureAggregate, Survivors, as_mean_reply, secure_train_round
from shared.secagg.settings import (
    COMPATIBLE_STRATEGIES,
    CONFIG_KEYS,
    SWITCH_KEY,
    SecAggError,
    SecAggIntegrityError,
    SecAggSettings,
    SecAggUnverifiedPeer,
    check_run,
)

__all__ = [
    "COMPATIBLE_STRATEGIES",
    "CONFIG_KEYS",
    "EarlyClose",
    "SWITCH_KEY",
    "SecAggError",
    "SecAggIntegrityError",
    "SecAggSettings",
    "SecAggUnverifiedPeer",
    "SecureAggregate",
    "Survivors",
    "as_mean_reply",
    "check_run",
    "secagg_mod",
    "secure_train_round",
]
