"""The ClientApp with `dp = "local-sgd"`: it trains with sample-level DP-SGD and replies valid weights."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator

import pytest
import torch

from fedclient.app import make_client_app
from shared import messages as keys
from shared.privacy_local import sampling
from shared.weights import InvalidUpdate, validate_update
from simulations.grid import FIRST_NODE_ID
from tests.fedclient.test_app import global_weights, send, simulated

pytestmark = pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="needs the opacus extra")


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """The ClientApp sets this process's torch threads to the run's; put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_local_sgd_round_replies_valid_weights_moved_at_most_lr_c_a_step(tiny_config):
    # Prepare: clipping alone (z = 0) to a tiny C, and the same round without DP
    private = tiny_config(dp="local-sgd", dp_clipping_norm=1e-4, dp_noise_multiplier=0.0, lr=0.5)
    plain = tiny_config(lr=0.5)
    arrays = global_weights(private)

    # Execute
    (reply,) = send(simulated(make_client_app(), private), arrays, [FIRST_NODE_ID])
    (plain_reply,) = send(simulated(make_client_app(), plain), arrays, [FIRST_NODE_ID])

    # Assert: valid weights; each of the E * ceil(n/B) steps moves them by at most lr * C * b/B, b <= n
    validate_update(arrays, reply.content[keys.ARRAYS])
    n = int(reply.content[keys.METRICS][keys.NUM_EXAMPLES])
    _, steps = sampling(n, private.batch_size, private.local_epochs)
    bound = private.lr * private.dp_clipping_norm * steps * max(1.0, n / private.batch_size)
    validate_update(arrays, reply.content[keys.ARRAYS], max_norm=bound)
    with pytest.raises(InvalidUpdate, match="exceeds max_norm"):
        validate_update(arrays, plain_reply.content[keys.ARRAYS], max_norm=bound)
    assert math.isfinite(float(reply.content[keys.METRICS][keys.TRAIN_LOSS]))
