"""Secure aggregation (SecAgg+, Bell et al., CCS 2020) on Flower's Message API.

Server: `secure_train_round(grid, train_messages, settings, timeout)` -> `SecureAggregate`,
then `as_mean_reply(aggregate, reply_to)` for the strategy's `aggregate_train`.
Client: `ClientApp(mods=[secagg_mod])`.

A round, over a random k-regular graph of the sampled clients (protocol.py has the messages):
1. advertise-keys: each client makes two X25519 key pairs, c (to seal shares) and s (to mask);
   an enrolled device also sends its enrollment certificate and its signature over them
   (enrollment.py), and at share-keys refuses a peer it cannot verify (SecAggUnverifiedPeer);
2. share-keys: it draws a self-mask seed b, Shamir-shares b and its s private key (threshold t)
   among itself and its neighbours, and seals each neighbour's shares with AES-GCM under a key
   agreed with that neighbour, bound to (round, stage, sender, receiver), and commits to each;
3. masked-input: it opens the shares addressed to it (refusing, not masking with, a source whose
   share fails to open or to match its commitment), trains (the wrapped ClientApp), and sends
   y = n * q(update) + PRG(b) + sum_v +-PRG(s_uv) mod 2^m, the count n and metrics inside;
4. unmask: each surviving client reveals, per neighbour, the b-share if that neighbour's vector
   arrived, else its s-share (never both); the server rebuilds the seeds and keys it needs,
   removes the survivors' self masks and their pairwise masks towards the dropped.

Threat model: an honest-but-curious server and clients, any of whom may drop at any time; the
server learns the sum over the clients whose vectors arrived and nothing of any one of them
unless t of a client's neighbours collude with it. With enrollment, a server that swaps keys or
invents peers is refused too; it still chooses the graph and which enrolled devices take part.
Malicious clients: every reply is validated, and a bad one is its client dropping out; each
client commits (SHA-256) to every share it deals, its receiver refuses a share unlike it (and
the server leaves the dealer or the receiver out of the sum), and the server names a client that
reveals a share unlike it and rebuilds from the others. Not covered: a server that lies about
who dropped out to different clients (Bell et al.'s consistency round with signatures), a
client that deals shares of no one polynomial (its seed rebuilds wrong: the decoded mean is
refused, the attempt retried), and clients that send wrong inputs: they cannot learn others'
inputs, and can spoil the sum only within the clipping range (a decoded mean outside it is
refused), as a client's count within [1, max-client-examples].
"""

from shared.secagg.client import secagg_mod
from shared.secagg.server import SecureAggregate, Survivors, as_mean_reply, secure_train_round
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
