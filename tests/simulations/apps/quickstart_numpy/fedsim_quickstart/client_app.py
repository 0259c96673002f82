"""fedsim-quickstart: A Flower / NumPy app."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim_quickstart.task import noise

# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""

    # The model is the global arrays
    ndarrays = msg.content["arrays"].to_numpy_ndarrays()
    partition_id = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])

    # Simulate local training (here we just add seeded noise to model parameters)
    model = [m + noise(m.shape, partition_id, server_round) for m in ndarrays]

    # Construct and return reply Message
    model_record = ArrayRecord(model)
    metrics = {
        "random_metric": float(noise((), partition_id, server_round)),
        "num-examples": 1,
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"arrays": model_record, "metrics": metric_record})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""

    # The model is the global arrays
    ndarrays = msg.content["arrays"].to_numpy_ndarrays()
    partition_id = int(context.node_config["partition-id"])

    # Return reply Message
    metrics = {
        "random_metric": noise((3,), partition_id, len(ndarrays)).tolist(),
        "num-examples": 1,
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"metrics": metric_record})
    return Message(content=content, reply_to=msg)
