"""What a device tells the server when it does not do a task: a code and that code's fixed message.

An error reply never carries exception text, a path or a byte of the device's data: the device
logs the full detail itself, and the server sees only `Error(code, MESSAGES[code])`. The codes
start at 100, above Flower's own `ErrorCode`s (0-8), so the server can tell a device's refusal
from a Flower failure.
"""

from __future__ import annotations

from enum import IntEnum


class DeviceCode(IntEnum):
    """Why a device answered a task with an error."""

    FAILED = 100  # anything not named below: a bug, out of memory, ...
    BAD_DATA = 101  # the device's own data cannot serve this run (format, labels, shape)
    BAD_CONFIG = 102  # the run config is not valid for this device's ClientApp
    BAD_MESSAGE = 103  # the task's content is malformed (weights that do not fit the model, a bad tokenizer)
    FOREIGN_CODE = 104  # the run's app bundle names a ClientApp other than the installed one
    BAD_SECURE_ROUND = 105  # a secure-aggregation message broke the protocol (order, replay, sizes)
    UNVERIFIED_PEER = 106  # a secure-aggregation peer's keys are not signed by an enrolled device
    POLICY_SECURE_AGGREGATION = 110  # the owner's policy requires secure aggregation; the run does not use it
    POLICY_SECURE_GROUP = 111  # the secure group or its threshold is smaller than the policy's minimum
    POLICY_LOCAL_EPOCHS = 112  # more local epochs than the policy allows
    POLICY_MODEL = 113  # a model the policy does not allow
    POLICY_MODEL_SIZE = 114  # more model parameters than the policy allows
    POLICY_TRAIN_SECONDS = 115  # training would not fit the policy's time limit


MESSAGES: dict[DeviceCode, str] = {
    DeviceCode.FAILED: "the device failed to do the task (details in the device's log)",
    DeviceCode.BAD_DATA: "the device's data cannot serve this run",
    DeviceCode.BAD_CONFIG: "the run config is not valid on this device",
    DeviceCode.BAD_MESSAGE: "the task's content is malformed",
    DeviceCode.FOREIGN_CODE: "the run names a ClientApp other than the one installed on the device",
    DeviceCode.BAD_SECURE_ROUND: "a secure-aggregation message broke the protocol",
    DeviceCode.UNVERIFIED_PEER: "a secure-aggregation peer's keys are not signed by an enrolled device",
    DeviceCode.POLICY_SECURE_AGGREGATION: "refused by the device's policy: secure aggregation is required",
    DeviceCode.POLICY_SECURE_GROUP: "refused by the device's policy: the secure group or its threshold is too small",
    DeviceCode.POLICY_LOCAL_EPOCHS: "refused by the device's policy: too many local epochs",
    DeviceCode.POLICY_MODEL: "refused by the device's policy: model not allowed",
    DeviceCode.POLICY_MODEL_SIZE: "refused by the device's policy: the model has too many parameters",
    DeviceCode.POLICY_TRAIN_SECONDS: "refused by the device's policy: training time limit",
}


# The server's own code for a reply it refused for its size before reading it (fedserver/polling.py):
# below a device's codes, among Flower's, which end at 8.
REPLY_TOO_LARGE = 99
FLOWER_REASON_CHARS = 200
REFUSAL_CHARS = 500  # of the server's own words for a refused reply, which quote what the client sent  # of a Flower error's own text, where the code is below 100


class DeviceRefusal(Exception):
    """A task this device will not do, with its code; `detail` stays in the device's log."""

    def __init__(self, code: DeviceCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def is_refusal(code: int) -> bool:
    """Whether an error code is a refusal by the owner's policy (rather than a failure)."""
    return code >= DeviceCode.POLICY_SECURE_AGGREGATION or code == DeviceCode.FOREIGN_CODE


def describe(code: int) -> str:
    """A code's fixed message, or Flower's own error's number for codes below 100."""
    if code == REPLY_TOO_LARGE:
        return "the reply was over max-reply-bytes: refused before it was read"
    try:
        return MESSAGES[DeviceCode(code)]
    except ValueError:
        return f"Flower error {code}"


def describe_error(code: int, reason: str) -> str:
    """An error reply as the server's log and status put it, e.g. `refused the task: code 110
    (refused by the device's policy: secure aggregation is required)`: a device's code with its
    fixed message, never its text; Flower's own (below 100) with its reason, on one line and cut."""
    if code >= DeviceCode.FAILED:
        return f"{'refused' if is_refusal(code) else 'failed'} the task: code {code} ({describe(code)})"
    return f"failed the task: code {code} (Flower: {log_safe(reason)})"


def log_safe(text: object, limit: int = FLOWER_REASON_CHARS) -> str:
    """`text` a client chose (a reason, names in its reply) fit for one log line: whitespace runs,
    newlines included, made one space, other control characters escaped, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in flat[: limit * 4])
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
