"""What the ServerApp and the ClientApp say to each other in a secure round, named once.

Every stage message is a "train" message whose content holds a ConfigRecord `secagg` with at
least `stage` and `round-id`; the masked-input stage also carries the round's training content
(`arrays`, `config`), and its reply carries the masked vector in the ArrayRecord `secagg-masked`.

  stage            server -> client                              client -> server
  advertise-keys   settings, the client's graph neighbours         two X25519 public keys (+ certificate, signature)
  share-keys       its surviving neighbours' public keys (+ theirs) Shamir shares, AES-GCM sealed, and a
                                                                   SHA-256 commitment to each share it deals
  masked-input     the sealed shares addressed to it, their         the masked vector (+ metric names), the
                   commitments + training                          sources whose shares it refused
  unmask           which of its share owners survived, dropped      b-shares of survivors, sk-shares of the dropped
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

RECORD = "secagg"  # ConfigRecord of every stage message and reply
MASKED = "secagg-masked"  # ArrayRecord of the masked-input reply
VECTOR = "y"  # its one array

ADVERTISE_KEYS = "advertise-keys"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
STAGES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, UNMASK)

# Entries of the `secagg` ConfigRecord.
STAGE = "stage"
ROUND_ID = "round-id"
THRESHOLD = "threshold"
CLIPPING_RANGE = "clipping-range"
QUANTIZATION_RANGE = "quantization-range"
MODULUS_BITS = "modulus-bits"
METRIC_CLIPPING_RANGE = "metric-clipping-range"
DEGREE = "degree"  # the graph's degree setting (k)
NEIGHBOURS = "neighbours"  # advertise-keys: the client's neighbours in the graph
PUBLIC_KEY_C = "pk-c"  # X25519 key for the share-encryption keys
PUBLIC_KEY_S = "pk-s"  # X25519 key for the pairwise masks
PEERS = "peers"  # share-keys: neighbours that advertised keys; parallel to the key lists
PEER_KEYS_C = "peer-pk-c"
PEER_KEYS_S = "peer-pk-s"
CERTIFICATE = "certificate"  # advertise-keys reply of an enrolled device: its enrollment certificate (DER)
SIGNATURE = "signature"  # ... and its node key's signature over (round id, node id, pk-c, pk-s)
PEER_CERTIFICATES = "peer-certificates"  # share-keys: parallel to PEERS; b"" for an unsigned peer
PEER_SIGNATURES = "peer-signatures"
MAX_SIGNED_BYTES = 4096  # the most a certificate or a signature may take; a larger one is malformed
DESTINATIONS = "destinations"  # share-keys reply; parallel to CIPHERTEXTS
SEED_COMMITMENTS = "seed-commitments"  # share-keys reply: parallel to [the node, *DESTINATIONS];
KEY_COMMITMENTS = "key-commitments"  # masked-input: parallel to SOURCES, the source's for this node
SOURCES = "sources"  # masked-input; parallel to CIPHERTEXTS
CIPHERTEXTS = "ciphertexts"
METRIC_KEYS = "metric-keys"  # masked-input reply: the metrics in the vector, in order
MAX_METRIC_KEYS = 256  # ... at most this many, each a name of at most MAX_NAME_CHARS
MAX_NAME_CHARS = 256
REFUSED = "refused"  # masked-input reply: sources whose share failed to open or to match its commitment
ALIVE = "alive"  # unmask: share owners whose masked vector arrived
DROPPED = "dropped"  # unmask: share owners that shared keys but sent no masked vector
OWNERS = "owners"  # unmask reply; parallel to SHARES
SHARES = "shares"


def neighbour_graph(nodes: Sequence[int], degree: int) -> dict[int, frozenset[int]]:
    """A random `degree`-regular graph: a Harary ring over a secret random order of `nodes`.

    Each node is linked to the `degree / 2` nodes on either side of it in the order; with
    `degree >= len(nodes) - 1` the graph is complete. The order is drawn from the OS CSPRNG
    (not `random`, whose seeded state the ServerApp's node sampling relies on).
    """
    order = list(nodes)
    n = len(order)
    if degree >= n - 1:
        return {node: frozenset(order) - {node} for node in order}
    if degree % 2:
        raise ValueError(f"a ring graph needs an even degree, got {degree}")
    secrets.SystemRandom().shuffle(order)
    half = degree // 2
    return {
        node: frozenset(order[(i + offset) % n] for offset in range(-half, half + 1) if offset)
        for i, node in enumerate(order)
    }
