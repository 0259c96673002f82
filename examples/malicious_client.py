"""A ClientApp of which a tenth of the nodes attack: Flowerbed's own, its training reply poisoned.

    fedsim run --client-app examples.malicious_client:app [--set strategy=fedmedian ...]

Nodes whose partition id (a deployed node: its node id) is a multiple of 10 train honestly, then
add +5 to every weight and claim to have trained on many examples, to pull a FedAvg aggregate,
which weights each update by the count its client claims, onto their model:
- `app` claims `max-client-examples`, the most the server accepts;
- `inflated` claims 10^12, which the server refuses.
The other nodes, and every evaluation, are Flowerbed's own (`fedclient.app`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclient import app as honest
from shared import messages as keys

SHIFT = 5.0
INFLATED = 10**12


def attacks(context: Context) -> bool:
    """Whether this node is one of the tenth that attack."""
    return int(context.node_config.get("partition-id", context.node_id)) % 10 == 0


def poisoned(reply: Message, msg: Message, claimed: int) -> Message:
    """`reply` with every floating-point weight shifted by SHIFT and `claimed` examples."""
    arrays = ArrayRecord(
        {
            name: Array(value + SHIFT if np.issubdtype(value.dtype, np.floating) else value)
            for name, value in ((name, array.numpy()) for name, array in reply.content[keys.ARRAYS].items())
        }
    )
    metrics = MetricRecord({**reply.content[keys.METRICS], keys.NUM_EXAMPLES: claimed})
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=msg)


def make_app(claim: str) -> ClientApp:
    """The attacking ClientApp; `claim`: "cap" (max-client-examples) or "inflated" (10^12)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest.train(msg, context)
        if not attacks(context):
            return reply
        cap = int(context.run_config.get("max-client-examples", 1_000_000))
        return poisoned(reply, msg, cap if claim == "cap" else INFLATED)

    app.evaluate()(honest.evaluate)
    return app


app = make_app("cap")
inflated = make_app("inflated")
