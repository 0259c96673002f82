"""A ClientApp that trains honestly, then corrupts its reply: for tests/e2e/test_faults.py.

Run by a real fedclient with `fedclient start --client-app tests.e2e.faulty_client:app`. Its
training reply is fedclient.app's, with the weights spoiled in a way chosen by the round:
round 1 NaN, round 2 a tensor short of values, round 3 (and later) +1e6 everywhere, a change far above
any sensible `max-update-norm`. Evaluation is fedclient.app's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedclient import app as honest
from shared import messages as keys
from shared.weights import to_arrayrecord, to_state_dict

Weights = dict[str, torch.Tensor]


def _nan(weights: Weights) -> Weights:
    first = next(iter(weights))
    weights[first].view(-1)[0] = float("nan")
    return weights


def _short(weights: Weights) -> Weights:
    first = next(iter(weights))
    weights[first] = weights[first].flatten()[:-1]
    return weights


def _huge(weights: Weights) -> Weights:
    return {key: tensor + 1e6 for key, tensor in weights.items()}


# What the server logs for each, as `shared.weights.validate_update` words it.
CORRUPTIONS: tuple[tuple[Callable[[Weights], Weights], str], ...] = (
    (_nan, "non-finite values"),
    (_short, "shape"),
    (_huge, "exceeds max_norm"),
)

app = ClientApp()


def corruption(server_round: int) -> tuple[Callable[[Weights], Weights], str]:
    """The corruption used in `server_round` (1-based) and the reason the server gives for it."""
    return CORRUPTIONS[min(server_round, len(CORRUPTIONS)) - 1]


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    spoil, _reason = corruption(int(msg.content[keys.CONFIG][keys.SERVER_ROUND]))
    runtime = honest.runtimes.get(context)
    like = runtime.model_for(runtime.spec(context)).state_dict()
    weights = spoil(to_state_dict(reply.content[keys.ARRAYS], like=like))
    content = RecordDict({keys.ARRAYS: to_arrayrecord(weights), keys.METRICS: reply.content[keys.METRICS]})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
