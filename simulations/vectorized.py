"""Placeholder until the vectorized path lands: always falls back to the ClientApp."""

from shared.config import RunConfig


def batch_runner_for(cfg: RunConfig) -> None:
    return None
