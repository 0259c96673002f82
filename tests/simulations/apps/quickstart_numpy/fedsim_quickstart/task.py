"""fedsim-quickstart: the model and the local 'training'."""

import numpy as np


def get_dummy_model() -> list[np.ndarray]:
    return [np.ones((1, 1))]


def noise(shape: tuple[int, ...], partition_id: int, server_round: int) -> np.ndarray:
    """What node `partition_id` adds in `server_round`: uniform in [0, 1), the same in every run."""
    return np.random.default_rng([partition_id, server_round]).random(shape)
