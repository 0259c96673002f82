"""Partitions: coverage, determinism, label skew, shards, natural keys, and clear errors."""

import numpy as np
import pytest

from shared.data import dirichlet, iid, natural, shards
from shared.data.partition import MERGED


def mnist_like_labels(per_class: int = 6000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class))


def assert_exact_cover(parts: list[np.ndarray], num_samples: int) -> None:
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == num_samples  # no index twice ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(num_samples))  # ... and every index once


def label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean entropy (nats) of the clients' label distributions: lower means more skew."""
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / len(p)
        freq = freq[freq > 0]
        entropies.append(-(freq * np.log(freq)).sum())
    return float(np.mean(entropies))


def test_iid_covers_all_samples_in_near_equal_parts():
    parts = iid(1003, 10, np.random.default_rng(0))

    assert_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


def test_iid_is_deterministic_for_a_seed():
    first = iid(500, 7, np.random.default_rng(42))

    again = iid(500, 7, np.random.default_rng(42))
    other = iid(500, 7, np.random.default_rng(43))

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_covers_and_respects_min_size():
    labels = mnist_like_labels(per_class=500)

    parts = dirichlet(labels, 20, alpha=0.3, rng=np.random.default_rng(1), min_size=10)

    assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_smaller_alpha_gives_more_skew():
    labels = mnist_like_labels(per_class=1000)

    skewed = dirichlet(labels, 20, alpha=0.1, rng=np.random.default_rng(2))
    mild = dirichlet(labels, 20, alpha=100.0, rng=np.random.default_rng(2))

    assert label_entropy(labels, skewed) < 1.2
    assert label_entropy(labels, mild) > 2.2  # near log(10) = 2.30: every client sees every class


def test_dirichlet_is_deterministic_for_a_seed():
    labels = mnist_like_labels(per_class=100)

    first = dirichlet(labels, 5, 0.5, np.random.default_rng(3))
    again = dirichlet(labels, 5, 0.5, np.random.default_rng(3))

    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_dirichlet_gives_up_with_a_clear_message():
    labels = np.repeat(np.arange(2), 50)

    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet(labels, 50, alpha=0.001, rng=np.random.default_rng(0), min_size=2)


def test_shards_fedavg_mnist_split():
    labels = mnist_like_labels()

    parts = shards(labels, 100, 2, np.random.default_rng(0))

    assert_exact_cover(parts, 60000)
    assert {len(p) for p in parts} == {600}
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert max(distinct) == 2 and np.mean(distinct) > 1.5  # two shards, each of a single digit


def test_shards_deal_randomly_but_deterministically():
    labels = mnist_like_labels(per_class=100)

    first = shards(labels, 10, 2, np.random.default_rng(5))
    again = shards(labels, 10, 2, np.random.default_rng(5))
    other = shards(labels, 10, 2, np.random.default_rng(6))

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_shards_keep_remainder_samples():
    labels = np.arange(103) % 3

    parts = shards(labels, 5, 2, np.random.default_rng(0))

    assert_exact_cover(parts, 103)


def test_natural_one_client_per_key_in_sorted_order():
    keys = np.array(["b", "a", "b", "c", "a", "b"])

    parts, names = natural(keys)

    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]


def test_natural_merges_small_keys_into_one_client():
    keys = [7, 7, 7, 1, 2, 3, 3, 9, 9, 9, 9]

    parts, names = natural(keys, min_size=3)

    assert names == ["7", "9", MERGED]
    assert [p.tolist() for p in parts] == [[0, 1, 2], [7, 8, 9, 10], [3, 4, 5, 6]]
    assert min(len(p) for p in parts) >= 3


@pytest.mark.parametrize(
    "call, problem",
    [
        (lambda rng: iid(5, 10, rng), "cannot split 5 samples among 10 clients"),
        (lambda rng: iid(5, 0, rng), "at least one client"),
        (lambda rng: dirichlet(np.zeros(10), 4, 0.5, rng, min_size=3), "4 clients x min_size 3"),
        (lambda rng: dirichlet(np.zeros(10), 2, 0.0, rng), "alpha must be > 0"),
        (lambda rng: shards(np.zeros(10), 3, 4, rng), "cannot split 10 samples among 12 shards"),
        (lambda rng: natural([]), "keys is empty"),
        (lambda rng: natural([1], min_size=0), "min_size"),
    ],
)
def test_impossible_partitions_raise(call, problem):
    with pytest.raises(ValueError, match=problem):
        call(np.random.default_rng(0))
