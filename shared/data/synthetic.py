"""Synthetic(alpha, beta), the FedProx benchmark (Li et al., MLSys 2020), one device at a time.

Device k gets n_k = int(lognormal(4, 2)) + 50 samples, x ~ N(v_k, Sigma) in R^60 with
Sigma diagonal, Sigma_jj = j^-1.2, and label argmax(softmax(x W_k + b_k)) over 10 classes, where

    u_k ~ N(0, alpha),  W_k (60x10), b_k (10) ~ N(u_k, 1),  B_k ~ N(0, beta),  v_k (60) ~ N(B_k, 1)

(alpha and beta are standard deviations). alpha sets how much the devices' models differ, beta how
much their inputs do. The IID variant shares one W, b ~ N(0, 1) over all devices and has v = 0.

Device k draws everything from its own stream, np.random.default_rng([seed, k]), in this order:
n_k, u_k, W_k, b_k, B_k, v_k, then the (n_k, 60) standard-normal noise of x (IID: n_k, then the
noise). So any one of 10,000 devices can be made without making the others. The shared IID
W, b come from np.random.default_rng([seed, IID_SHARED_KEY]): W first, then b.
"""

from __future__ import annotations

import numpy as np

NUM_FEATURES = 60
NUM_CLASSES = 10
MIN_SAMPLES = 50
# Spans two 32-bit seed words, so no device id below 2**32 shares its stream.
IID_SHARED_KEY = 0x53484152_45
_MAX_DEVICE = 2**32
# Sigma_jj = j^-1.2, j = 1..60: the variance of feature j around the device mean v_k.
FEATURE_VARIANCE = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -1.2


def synthetic_device(
    k: int,
    *,
    alpha: float,
    beta: float,
    iid: bool = False,
    seed: int = 0,
    max_samples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Device k's features (n_k, 60) float32 and labels (n_k,) int64 in 0..9.

    `max_samples` caps n_k (the lognormal tail gives a few devices tens of thousands of samples);
    None keeps the paper's definition. The cap keeps the random stream, so capped devices are
    a prefix of the uncapped ones.
    """
    if not 0 <= k < _MAX_DEVICE:
        raise ValueError(f"device id must be in [0, 2**32), got {k}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta are standard deviations, must be >= 0; got {alpha}, {beta}")
    _check_cap(max_samples)
    rng = np.random.default_rng([seed, k])
    n = _num_samples(rng, max_samples)
    if iid:
        weights, bias = _shared_model(seed)
        mean = np.zeros(NUM_FEATURES)
    else:
        weights, bias = _device_model(rng, alpha)
        input_shift = rng.normal(0.0, beta)  # B_k
        mean = rng.normal(input_shift, 1.0, NUM_FEATURES)
    x = (mean + rng.standard_normal((n, NUM_FEATURES)) * np.sqrt(FEATURE_VARIANCE)).astype(np.float32)
    # argmax(softmax(z)) == argmax(z); labels come from the float32 features that are returned.
    y = np.argmax(x.astype(np.float64) @ weights + bias, axis=1).astype(np.int64)
    return x, y


def synthetic_sizes(num_devices: int, seed: int = 0, max_samples: int | None = None) -> np.ndarray:
    """n_k for devices 0..num_devices-1 (int64), without generating their data."""
    _check_cap(max_samples)
    return np.array(
        [_num_samples(np.random.default_rng([seed, k]), max_samples) for k in range(num_devices)], np.int64
    )


def _num_samples(rng: np.random.Generator, max_samples: int | None) -> int:
    n = int(rng.lognormal(4, 2)) + MIN_SAMPLES
    return n if max_samples is None else min(n, max_samples)


def _device_model(rng: np.random.Generator, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    u = rng.normal(0.0, alpha)
    return rng.normal(u, 1.0, (NUM_FEATURES, NUM_CLASSES)), rng.normal(u, 1.0, NUM_CLASSES)


def _shared_model(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, IID_SHARED_KEY])
    return rng.normal(0.0, 1.0, (NUM_FEATURES, NUM_CLASSES)), rng.normal(0.0, 1.0, NUM_CLASSES)


def _check_cap(max_samples: int | None) -> None:
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
