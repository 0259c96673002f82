"""What stands between a server's task and this device, in the ClientApp itself (so a deployment
and a simulation enforce it alike):

- `error_reply_mod`: whatever a task raises, the reply carries a code and that code's fixed
  message (shared/device_errors.py), never exception text, a path or data; the detail goes to
  this device's own log;
- `policy_mod` and the `check_*` functions: the owner's policy (fedclient/policy.py), checked
  before a task does anything: secure aggregation required, the smallest secure group, local
  epochs, allowed models, model size;
- `privacy_floor`: the owner's local clipping and noise, applied to every update it sends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType

from fedclient.policy import DevicePolicy
from shared.config import ConfigError, RunConfig
from shared.data.errors import DataError
from shared.device_errors import MESSAGES, DeviceCode, DeviceRefusal, is_refusal
from shared.flower_compat.messages import ClientAppCallable
from shared.secagg import protocol as p
from shared.secagg.client import stage_request
from shared.secagg.settings import SecAggError, SecAggUnverifiedPeer
from shared.weights import InvalidUpdate

LOG = logging.getLogger("flowerbed.device")

# An exception's code, by its type (first match); anything else is DeviceCode.FAILED.
CODES: tuple[tuple[type[Exception], DeviceCode], ...] = (
    (SecAggUnverifiedPeer, DeviceCode.UNVERIFIED_PEER),
    (SecAggError, DeviceCode.BAD_SECURE_ROUND),
    (DataError, DeviceCode.BAD_DATA),
    (ConfigError, DeviceCode.BAD_CONFIG),
    (InvalidUpdate, DeviceCode.BAD_MESSAGE),
)
# The secure-aggregation stages' lists whose length, plus this device, is its secure group.
GROUP_LISTS = {p.ADVERTISE_KEYS: p.NEIGHBOURS, p.SHARE_KEYS: p.PEERS, p.MASKED_INPUT: p.SOURCES}


def error_code(err: Exception) -> DeviceCode:
    if isinstance(err, DeviceRefusal):
        return err.code
    return next((code for kind, code in CODES if isinstance(err, kind)), DeviceCode.FAILED)


def error_reply_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the task; where it raises, reply `Error(code, fixed message)` and log the detail here."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - nothing a task raises may reach the server as text
        code = error_code(err)
        what = "refused" if is_refusal(code) else "failed"
        kind = msg.metadata.message_type
        if code == DeviceCode.FAILED:
            LOG.error("node %d: %s task %s (code %d)", context.node_id, kind, what, code, exc_info=err)
        else:
            LOG.warning("node %d: %s task %s (code %d): %s", context.node_id, kind, what, code, err)
        return Message(Error(code=int(code), reason=MESSAGES[code]), reply_to=msg)


def policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a training task the node's policy does not allow before secure aggregation or
    training sees it: plaintext training where secure aggregation is required, a secure group
    smaller than `min-secure-group`."""
    policy = DevicePolicy.from_node_config(context.node_config)
    if policy is not None and msg.metadata.message_type == MessageType.TRAIN and msg.has_content():
        stage = stage_request(msg)
        if stage is None:
            if policy.require_secure_aggregation:
                raise DeviceRefusal(
                    DeviceCode.POLICY_SECURE_AGGREGATION, "a plaintext training task; the policy requires secure aggregation"
                )
        elif policy.min_secure_group:
            check_secure_group(stage, policy.min_secure_group)
    return call_next(msg, context)


def check_secure_group(stage: ConfigRecord, min_group: int) -> None:
    """A secure stage's group (this device and the peers it lists) and threshold are not below the
    policy's: at least `min_group` members, and a threshold of a strict majority of `min_group`."""
    name = stage.get(p.STAGE)
    members = stage.get(GROUP_LISTS.get(str(name), ""), None)
    if isinstance(members, list) and len(members) + 1 < min_group:
        raise DeviceRefusal(
            DeviceCode.POLICY_SECURE_GROUP, f"{name}: a group of {len(members) + 1}, the policy's minimum is {min_group}"
        )
    threshold = stage.get(p.THRESHOLD)
    if name == p.ADVERTISE_KEYS and (not isinstance(threshold, int) or threshold < min_group // 2 + 1):
        raise DeviceRefusal(
            DeviceCode.POLICY_SECURE_GROUP,
            f"{name}: threshold {threshold!r}, the policy's minimum is {min_group // 2 + 1} (a majority of {min_group})",
        )


def check_task(policy: DevicePolicy | None, cfg: RunConfig, epochs: int) -> None:
    """The task's local epochs and model are ones the policy allows (nothing is built yet)."""
    if policy is None:
        return
    if policy.max_local_epochs and epochs > policy.max_local_epochs:
        raise DeviceRefusal(
            DeviceCode.POLICY_LOCAL_EPOCHS, f"{epochs} local epochs; the policy allows {policy.max_local_epochs}"
        )
    if policy.models and cfg.model not in policy.models:
        raise DeviceRefusal(DeviceCode.POLICY_MODEL, f"model {cfg.model!r}; the policy allows {', '.join(policy.models)}")


def check_model_size(policy: DevicePolicy | None, parameters: int) -> None:
    if policy is not None and policy.max_model_parameters and parameters > policy.max_model_parameters:
        raise DeviceRefusal(
            DeviceCode.POLICY_MODEL_SIZE,
            f"a model of {parameters:,} parameters; the policy allows {policy.max_model_parameters:,}",
        )


def privacy_floor(
    policy: DevicePolicy | None, received: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`trained` with its update (trained - received) clipped to the policy's `dp-clipping-norm`
    in L2 over every floating-point tensor, plus Gaussian noise of standard deviation
    `dp-noise-multiplier` x that norm, by Flower's DP primitives; unchanged without a floor."""
    if policy is None or policy.dp_clipping_norm == 0:
        return dict(trained)
    from shared.flower_compat.dp import add_gaussian_noise_inplace, compute_clip_model_update  # noqa: PLC0415

    names = [name for name, tensor in trained.items() if tensor.is_floating_point()]
    new = [trained[name].detach().cpu().float().numpy().copy() for name in names]
    old = [received[name].detach().cpu().float().numpy() for name in names]
    compute_clip_model_update(new, old, policy.dp_clipping_norm)
    if policy.dp_noise_multiplier:
        add_gaussian_noise_inplace(new, policy.dp_noise_multiplier * policy.dp_clipping_norm)
    floored = dict(trained)
    for name, values in zip(names, new, strict=True):
        floored[name] = torch.from_numpy(values).to(trained[name].dtype)
    return floored
