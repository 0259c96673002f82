"""A ClientApp that trains honestly, then spoils its reply's metrics: for tests/e2e/test_faults.py.

Run by a real fedclient with `fedclient start --client-app tests.e2e.bad_reply_client:app`. Its
training reply is fedclient.app's with, by round: 1 `num-examples` = 10^12, 2 an extra metric key
(which once ended the run inside Flower's aggregation), 3 (and later) a NaN train loss.
Evaluation is fedclient.app's, unchanged.
"""

from __future__ import annotations

import math

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclient import app as honest
from shared import messages as keys

# The metric entries changed in rounds 1, 2, 3 (and later).
SPOILS: tuple[dict[str, int | float], ...] = ({keys.NUM_EXAMPLES: 10**12}, {"extra": 1.0}, {keys.TRAIN_LOSS: math.nan})

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    changes = SPOILS[min(int(msg.content[keys.CONFIG][keys.SERVER_ROUND]), len(SPOILS)) - 1]
    metrics = MetricRecord({**reply.content[keys.METRICS], **changes})
    return Message(RecordDict({keys.ARRAYS: reply.content[keys.ARRAYS], keys.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
