"""SecAgg+ building blocks: settings, neighbour graph, masks, sealed shares, Shamir, fixed point."""

import itertools
import os

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir

from shared.secagg import crypto
from shared.secagg import protocol as p
from shared.secagg.encoding import decode, encode, layout_of, reduce_modulo
from shared.secagg.settings import (
    COMPATIBLE_STRATEGIES,
    SecAggError,
    SecAggIntegrityError,
    SecAggSettings,
    check_run,
)

ROUND = bytes(range(16))


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 1}, "threshold must be >= 2"),
        ({"threshold": 4, "neighbours": 8}, "strict majority"),
        ({"threshold": 10, "neighbours": 8}, "more than a neighbourhood"),
        ({"neighbours": 7}, "even"),
        ({"modulus_bits": 65}, "modulus-bits"),
        ({"quantization_range": 1 << 33, "modulus_bits": 32}, "does not fit"),
        ({"clipping_range": 0.0}, "clipping-range"),
        ({"clipping_range": float("inf")}, "clipping-range"),
    ],
)
def test_settings_refuse_unsafe_or_impossible_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SecAggSettings(**kwargs)


def test_settings_from_run_config_keys():
    s = SecAggSettings.from_mapping(
        {"secagg-threshold": 3, "secagg-neighbours": 4, "secagg-clipping-range": 2, "secagg-quantization-range": 1 << 20, "lr": 0.1}
    )
    assert (s.threshold, s.neighbours, s.clipping_range, s.quantization_range) == (3, 4, 2.0, 1 << 20)
    assert s.modulus_bits == 64 and s.dtype == np.uint64
    assert SecAggSettings(modulus_bits=32, quantization_range=1 << 16).dtype == np.uint32


def test_error_bound_is_half_a_quantization_step():
    s = SecAggSettings(clipping_range=2.0, quantization_range=1001)
    assert s.step == pytest.approx(4.0 / 1000)
    assert s.error_bound() == pytest.approx(0.002)
    assert s.max_total_examples == ((1 << 64) - 1) // 1000


def test_only_averaging_strategies_are_compatible():
    from shared.config import STRATEGIES

    assert set(COMPATIBLE_STRATEGIES) <= set(STRATEGIES)
    assert not {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"} & set(COMPATIBLE_STRATEGIES)


def test_check_run_refuses_robust_strategies_and_too_small_rounds():
    settings = SecAggSettings(threshold=5, neighbours=8)
    check_run(settings, "fedadam", 5)
    with pytest.raises(ValueError, match="strategy 'krum' needs every client's update"):
        check_run(settings, "krum", 10)
    with pytest.raises(ValueError, match="at least secagg-threshold = 5 clients"):
        check_run(settings, "fedavg", 4)


# ----------------------------------------------------------------------------- graph


@pytest.mark.parametrize("n, k", [(20, 8), (11, 4), (30, 2)])
def test_neighbour_graph_is_k_regular_and_symmetric(n, k):
    nodes = list(range(100, 100 + n))
    graph = p.neighbour_graph(nodes, k)
    assert set(graph) == set(nodes)
    for node, neighbours in graph.items():
        assert len(neighbours) == k and node not in neighbours
        assert all(node in graph[other] for other in neighbours)


def test_small_rounds_use_the_complete_graph_and_large_ones_a_random_order():
    graph = p.neighbour_graph([1, 2, 3, 4], 8)
    assert graph[1] == {2, 3, 4}
    nodes = list(range(50))
    assert p.neighbour_graph(nodes, 4) != p.neighbour_graph(nodes, 4)  # fresh secret order each round


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32])
def test_masks_are_deterministic_per_key_and_cancel(dtype):
    size = 3 * (1 << 15) + 17  # several keystream chunks and a ragged end
    a, b = crypto.derive(b"a" * 32, "self-mask"), crypto.derive(b"b" * 32, "self-mask")
    vector = np.arange(size, dtype=dtype)
    crypto.apply_masks(vector, [(a, 1), (b, -1)])
    assert not np.array_equal(vector, np.arange(size, dtype=dtype))
    expected = np.arange(size, dtype=dtype) + crypto.mask(a, size, np.dtype(dtype)) - crypto.mask(b, size, np.dtype(dtype))
    np.testing.assert_array_equal(vector, expected)
    crypto.apply_masks(vector, [(b, 1), (a, -1)])
    np.testing.assert_array_equal(vector, np.arange(size, dtype=dtype))


def test_a_mask_is_the_aes_ctr_keystream_of_its_key():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = crypto.derive(b"k" * 32, "pair-mask")
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * 1000))
    np.testing.assert_array_equal(crypto.mask(key, 1000, np.dtype(np.uint64)), np.frombuffer(stream, np.uint64))


def test_pairwise_keys_agree_and_are_bound_to_round_and_pair():
    sk1, pk1 = crypto.new_key_pair()
    sk2, pk2 = crypto.new_key_pair()
    assert crypto.public_of(sk1) == pk1
    k12 = crypto.agree(sk1, pk2, "pair-mask", ROUND, 1, 2)
    assert k12 == crypto.agree(sk2, pk1, "pair-mask", ROUND, 2, 1)
    assert k12 != crypto.agree(sk1, pk2, "pair-mask", bytes(16), 1, 2)
    assert k12 != crypto.agree(sk1, pk2, "share-key", ROUND, 1, 2)
    with pytest.raises(SecAggError, match="key agreement"):
        crypto.agree(sk1, bytes(32), "pair-mask", ROUND, 1, 2)  # a low-order point


# ----------------------------------------------------------------------------- sealed shares


def test_sealed_shares_fail_when_tampered_replayed_or_redirected():
    key = crypto.derive(b"s" * 32, "share-key")
    aad = crypto.share_aad(ROUND, p.SHARE_KEYS, 1, 2)
    blob = crypto.seal(key, b"secret share", aad)
    assert crypto.unseal(key, blob, aad, "x") == b"secret share"
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad_blob, bad_aad in [
        (tampered, aad),
        (blob, crypto.share_aad(ROUND, p.SHARE_KEYS, 2, 1)),  # reflected back to its sender
        (blob, crypto.share_aad(ROUND, p.SHARE_KEYS, 1, 3)),  # redirected
        (blob, crypto.share_aad(bytes(16), p.SHARE_KEYS, 1, 2)),  # another round
    ]:
        with pytest.raises(SecAggIntegrityError, match="authentication failed"):
            crypto.unseal(key, bad_blob, bad_aad, "x")


# ----------------------------------------------------------------------------- Shamir


@pytest.mark.parametrize(
    "secret",
    [bytes(range(32)), crypto.new_key_pair()[0], os.urandom(32)],
    ids=["counting", "private-key", "random"],  # random bytes in an id differ between pytest-xdist's workers
)
def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not(secret):
    shares = crypto.split_secret(secret, 4, 7)
    assert [int.from_bytes(share[:4], "little") for share in shares] == list(range(1, 8))
    assert crypto.rebuild_secret(shares, 4, "s") == secret
    for subset in itertools.combinations(shares, 4):
        assert crypto.rebuild_secret(list(subset), 4, "s") == secret
    with pytest.raises(SecAggError, match="3 shares, 4 needed"):
        crypto.rebuild_secret(shares[:3] + [shares[0]], 4, "s")  # a repeated share counts once
    with pytest.raises(SecAggError, match="3 shares, 4 needed"):
        crypto.rebuild_secret(shares[:3] + [shares[4][:-1], "not bytes"], 4, "s")  # malformed ones do not count


def test_threshold_minus_one_shares_rebuild_something_else():
    """Interpolating t - 1 shares (what `rebuild_secret` refuses) gives no trace of the secret."""
    secret = os.urandom(32)
    shares = crypto.split_secret(secret, 3, 5)
    for i in (0, 16):
        points = [(int.from_bytes(s[:4], "little"), s[4 + i : 20 + i]) for s in shares[:2]]
        assert Shamir.combine(points) != secret[i : i + 16]


def test_a_split_is_refused_for_a_threshold_above_the_count_or_a_partial_block():
    with pytest.raises(SecAggError, match="threshold 4"):
        crypto.split_secret(bytes(32), 4, 3)
    with pytest.raises(SecAggError, match="20-byte secret"):
        crypto.split_secret(bytes(20), 2, 3)


# ----------------------------------------------------------------------------- fixed point


def _arrays(rng, scale=1.0):
    return {
        "w": (rng.standard_normal((30, 20)) * scale).astype(np.float32),
        "b": (rng.standard_normal(20) * scale).astype(np.float64),
        "steps": np.array(7, dtype=np.int64),
    }


def test_encode_then_decode_is_within_half_a_step():
    rng = np.random.default_rng(0)
    settings = SecAggSettings(clipping_range=4.0, quantization_range=1 << 12)
    reference = _arrays(rng)
    update = {k: (v + rng.uniform(-1, 1, v.shape)).astype(v.dtype) for k, v in reference.items()}
    layout = layout_of(reference).with_metrics(("loss",))
    vector = encode(update, reference, 3, {"loss": 0.25}, layout, settings)
    sums, means, count, metrics = decode(vector, reference, layout, settings)
    assert count == 3
    for name in ("w", "b"):
        assert means[name].dtype == reference[name].dtype and means[name].shape == reference[name].shape
        err = np.abs(means[name].astype(np.float64) - update[name].astype(np.float64)).max()
        assert err <= settings.error_bound() + 1e-6
        np.testing.assert_allclose(sums[name], 3 * means[name], rtol=1e-6)
    assert means["steps"].dtype == np.int64 and abs(int(means["steps"]) - int(update["steps"])) <= 1
    assert metrics["loss"] == pytest.approx(0.25, abs=settings.metric_step / 2 + 1e-12)


def test_updates_beyond_the_clipping_range_are_clipped():
    settings = SecAggSettings(clipping_range=1.0, quantization_range=1 << 16)
    reference = {"w": np.zeros(3, np.float32)}
    layout = layout_of(reference)
    vector = encode({"w": np.array([5.0, -5.0, 0.5], np.float32)}, reference, 1, {}, layout, settings)
    _, means, _, _ = decode(vector, reference, layout, settings)
    np.testing.assert_allclose(means["w"], [1.0, -1.0, 0.5], atol=settings.error_bound())


def test_non_finite_updates_and_oversized_counts_are_refused():
    settings = SecAggSettings(modulus_bits=32, quantization_range=1 << 16)
    reference = {"w": np.zeros(3, np.float32)}
    layout = layout_of(reference)
    with pytest.raises(SecAggError, match="non-finite"):
        encode({"w": np.array([np.nan, 0, 0], np.float32)}, reference, 1, {}, layout, settings)
    with pytest.raises(SecAggError, match="example count"):
        encode(reference, reference, settings.max_total_examples + 1, {}, layout, settings)
    total = np.zeros(layout.length, dtype=np.uint32)
    total[layout.count_index] = settings.max_total_examples + 1
    with pytest.raises(SecAggError, match="may have wrapped"):
        decode(total, reference, layout, settings)


def test_sums_wrap_modulo_two_to_the_m():
    v = np.array([(1 << 40) + 5, 3], dtype=np.uint64)
    reduce_modulo(v, 40)
    np.testing.assert_array_equal(v, [5, 3])
