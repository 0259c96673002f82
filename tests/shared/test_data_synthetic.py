"""Synthetic(alpha, beta): sizes, input covariance, labelling model, determinism, IID sharing."""

import numpy as np
import pytest

from shared.data import synthetic_device, synthetic_sizes
from shared.data.synthetic import IID_SHARED_KEY

SIGMA = np.arange(1, 61, dtype=np.float64) ** -1.2


def paper_size(seed: int, k: int) -> int:
    """The paper's n_k = int(lognormal(4, 2)) + 50, drawn first from the device's own stream."""
    return int(np.random.default_rng([seed, k]).lognormal(4, 2)) + 50


def test_sizes_follow_lognormal_plus_50():
    sizes = synthetic_sizes(300, seed=7)

    assert sizes.dtype == np.int64 and sizes.min() >= 50
    assert sizes.tolist() == [paper_size(7, k) for k in range(300)]
    assert np.median(sizes) == pytest.approx(np.exp(4) + 50, rel=0.35)  # median of lognormal(4, 2) is e^4


def test_device_length_matches_its_size():
    sizes = synthetic_sizes(5, seed=1)

    lengths = [len(synthetic_device(k, alpha=0.5, beta=0.5, seed=1)[0]) for k in range(5)]

    assert lengths == sizes.tolist()


def test_max_samples_caps_and_keeps_the_stream():
    k = int(np.argmax(synthetic_sizes(50, seed=0)))
    x_full, y_full = synthetic_device(k, alpha=1, beta=1)

    x_cap, y_cap = synthetic_device(k, alpha=1, beta=1, max_samples=100)

    assert len(x_full) > 100 and len(x_cap) == 100
    np.testing.assert_array_equal(x_cap, x_full[:100])
    np.testing.assert_array_equal(y_cap, y_full[:100])
    assert synthetic_sizes(50, seed=0, max_samples=100).max() == 100


@pytest.mark.parametrize("iid", [False, True])
def test_feature_variance_is_j_to_minus_1_2(iid):
    sizes = synthetic_sizes(3000, seed=0)
    k = int(np.flatnonzero((sizes > 20000) & (sizes < 200000))[0])  # enough for a ~1 % variance estimate

    x, y = synthetic_device(k, alpha=1, beta=1, iid=iid)

    assert x.dtype == np.float32 and x.shape == (sizes[k], 60)
    np.testing.assert_allclose(x.var(axis=0, dtype=np.float64), SIGMA, rtol=0.06)
    assert y.dtype == np.int64 and y.min() >= 0 and y.max() <= 9


def test_device_follows_the_paper_draw_by_draw():
    seed, k, alpha, beta = 4, 11, 0.5, 2.0
    rng = np.random.default_rng([seed, k])
    n = int(rng.lognormal(4, 2)) + 50
    u = rng.normal(0, alpha)
    w, b = rng.normal(u, 1, (60, 10)), rng.normal(u, 1, 10)
    v = rng.normal(rng.normal(0, beta), 1, 60)
    expected_x = (v + rng.standard_normal((n, 60)) * np.sqrt(SIGMA)).astype(np.float32)

    x, y = synthetic_device(k, alpha=alpha, beta=beta, seed=seed)

    np.testing.assert_array_equal(x, expected_x)
    np.testing.assert_array_equal(y, np.argmax(x.astype(np.float64) @ w + b, axis=1))


def test_iid_devices_share_one_model_and_zero_mean():
    shared = np.random.default_rng([3, IID_SHARED_KEY])
    w, b = shared.normal(0, 1, (60, 10)), shared.normal(0, 1, 10)

    devices = [synthetic_device(k, alpha=1, beta=1, iid=True, seed=3) for k in range(6)]

    for x, y in devices:
        np.testing.assert_array_equal(y, np.argmax(x.astype(np.float64) @ w + b, axis=1))
    pooled = np.concatenate([x for x, _ in devices])
    assert np.abs(pooled.mean(axis=0)).max() < 5 / np.sqrt(len(pooled))


def test_non_iid_devices_differ_in_model_and_inputs():
    shared = np.random.default_rng([3, IID_SHARED_KEY])
    w, b = shared.normal(0, 1, (60, 10)), shared.normal(0, 1, 10)

    x0, y0 = synthetic_device(0, alpha=1, beta=1, seed=3)
    x1, _ = synthetic_device(1, alpha=1, beta=1, seed=3)

    assert np.mean(np.argmax(x0.astype(np.float64) @ w + b, axis=1) == y0) < 0.9
    assert np.linalg.norm(x0.mean(axis=0) - x1.mean(axis=0)) > 3  # v_0 - v_1 has ~N(0, 2) entries


def test_determinism_under_seed():
    first = synthetic_device(2, alpha=0.5, beta=0.5, seed=9)

    again = synthetic_device(2, alpha=0.5, beta=0.5, seed=9)
    other_seed = synthetic_device(2, alpha=0.5, beta=0.5, seed=10)

    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[0].shape != other_seed[0].shape or not np.array_equal(first[0], other_seed[0])


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"k": -1}, "device id"),
        ({"alpha": -0.1}, "standard deviations"),
        ({"max_samples": 0}, "max_samples"),
    ],
)
def test_rejects_bad_arguments(kwargs, problem):
    args = {"k": 0, "alpha": 1.0, "beta": 1.0} | kwargs

    with pytest.raises(ValueError, match=problem):
        synthetic_device(args.pop("k"), **args)
