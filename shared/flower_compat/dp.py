"""Flower's differential-privacy primitives, the ones its DP mods and strategy wrappers use: central
DP (fedserver/privacy.py), distributed DP (shared/secagg) and a device's privacy floor (fedclient/guard.py)
clip an update and add Gaussian noise with them.
"""

from __future__ import annotations

from shared.flower_compat import flower_symbols

with flower_symbols("dp"):
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update

__all__ = ["add_gaussian_noise_inplace", "compute_clip_model_update"]
