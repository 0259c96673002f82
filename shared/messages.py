"""The names of records and entries in the messages between ServerApp and ClientApp, once.

The record names are those Flower's strategies use by default (`arrayrecord_key`,
`configrecord_key`, `weighted_by_key`).
"""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Config entries sent with a training message.
SERVER_ROUND = "server-round"  # set by Flower's strategies
LOCAL_EPOCHS = "local-epochs"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
# With `tokenizer = "file"`, in training and evaluation messages: the tokenizer file's bytes and SHA-256.
TOKENIZER = "tokenizer"
TOKENIZER_SHA256 = "tokenizer-sha256"

# Metric entries in a reply.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
ACCURACY = "accuracy"

# What a reply holds, exactly: the records by name, and the entries of its metric record.
TRAIN_REPLY_RECORDS = (ARRAYS, METRICS)
TRAIN_REPLY_METRICS = (TRAIN_LOSS, NUM_EXAMPLES)
EVALUATE_REPLY_RECORDS = (METRICS,)
EVALUATE_REPLY_METRICS = (EVAL_LOSS, ACCURACY, NUM_EXAMPLES)
