"""Split a dataset's sample indices among federated clients.

Every function returns one sorted int64 index array per client; together they are disjoint and,
except where a docstring says otherwise, cover every sample. Randomness comes only from the
`rng` passed in, so a seeded generator gives the same partition every time. A partition that
would leave a client empty raises ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MERGED = "<merged>"
_MAX_DIRICHLET_DRAWS = 1000


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniform random split into near-equal parts (sizes differ by at most one)."""
    _check_enough(num_samples, num_clients)
    return _sorted_parts(np.array_split(rng.permutation(num_samples), num_clients))


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 1
) -> list[np.ndarray]:
    """Label skew: each class is spread over the clients in proportions drawn from Dir(alpha).

    Small alpha concentrates each class on few clients. The whole draw is repeated until every
    client holds at least `min_size` samples (ValueError after 1000 failed draws).
    """
    labels = np.asarray(labels)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    _check_enough(len(labels), num_clients * min_size, what=f"{num_clients} clients x min_size {min_size}")
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(labels, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_DIRICHLET_DRAWS} gave all {num_clients} clients "
        f">= {min_size} samples; raise alpha or lower num_clients/min_size"
    )


def _dirichlet_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, part in zip(chunks, np.split(members, cuts)):
            client.append(part)
    return _sorted_parts([np.concatenate(c) for c in chunks])


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """The FedAvg pathological split: sort by label (stable), cut into num_clients * shards_per_client
    near-equal shards, and deal each client `shards_per_client` shards at random.

    MNIST's 60,000 training images with 100 clients x 2 shards gives shards of 300, so most
    clients see two digits.
    """
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    _check_enough(len(labels), num_shards, what=f"{num_shards} shards")
    pieces = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _sorted_parts([np.concatenate([pieces[s] for s in row]) for row in dealt])


def natural(keys: Sequence[object] | np.ndarray, min_size: int = 1) -> tuple[list[np.ndarray], list[str]]:
    """One client per distinct key (writer, movie, ...), in sorted key order, with the key as name.

    Keys with fewer than `min_size` samples are pooled into one last client named "<merged>";
    that client can still hold fewer than `min_size` when the small keys together are too few.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    keys = np.asarray(keys)
    if keys.size == 0:
        raise ValueError("no samples to partition: keys is empty")
    names, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    groups = np.split(order, np.cumsum(counts)[:-1])
    big = counts >= min_size
    parts = [g for g, keep in zip(groups, big) if keep]
    labels = [str(n) for n, keep in zip(names, big) if keep]
    if not big.all():
        parts.append(np.concatenate([g for g, keep in zip(groups, big) if not keep]))
        labels.append(MERGED)
    return _sorted_parts(parts), labels


def _check_enough(num_samples: int, needed: int, what: str | None = None) -> None:
    if needed < 1:
        raise ValueError(f"need at least one client, got {needed}")
    if num_samples < needed:
        raise ValueError(
            f"cannot split {num_samples} samples among {what or f'{needed} clients'}: a client would be empty"
        )


def _sorted_parts(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(p).astype(np.int64) for p in parts]
