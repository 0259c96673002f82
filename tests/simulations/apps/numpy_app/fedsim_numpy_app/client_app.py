"""fedsim-numpy-app: each node moves the array by an amount set by its partition and its state.

Node i of n, training for the t-th time, returns w + step * (i + 1) * t / n * DIRECTION with
weight i + 1. FedAvg's weighted mean moves w by step * t * (2n + 1) / (3n) * DIRECTION in the
round where every node trains for the t-th time.
"""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

DIRECTION = np.array([1.0, -1.0, 0.5])
STATE = "fedsim-numpy-app"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    trained = int(context.state[STATE]["trained"]) + 1 if STATE in context.state else 1
    context.state[STATE] = ConfigRecord({"trained": trained})
    (weights,) = msg.content["arrays"].to_numpy_ndarrays()
    step = float(context.run_config["step"])
    update = weights + step * (partition + 1) * trained / partitions * DIRECTION
    metrics = MetricRecord({"num-examples": partition + 1, "trained": trained})
    return Message(RecordDict({"arrays": ArrayRecord([update]), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    (weights,) = msg.content["arrays"].to_numpy_ndarrays()
    partition = int(context.node_config["partition-id"])
    metrics = MetricRecord({"num-examples": partition + 1, "loss": float(np.abs(weights).sum())})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
