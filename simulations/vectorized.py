"""The vectorized fast path: a round's sampled clients trained together with `torch.func`.

Each client's parameters get a leading client dimension; one `vmap(grad_and_value(...))` per
step computes every client's loss and gradient, and SGD or Adam is written on the stacked
tensors. A reply is what `fedclient.app.train` would send (same data, seed, batches, metrics), up
to the order of float operations. What falls back to the ClientApp (the runner returns None):
non-TRAIN batches, batches where no two clients share (train size, epochs, mu), a client that
cannot be prepared or names its own `device`, models with other layers than Linear, ReLU,
Conv2d, MaxPool2d, Flatten, buffers or frozen parameters. `vectorized = "auto"` only on CUDA:
on a CPU it is slower than the plain loop (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedclient.app import ClientRuntimes, client_seed
from shared import messages as keys
from shared import task
from shared.config import ConfigError, RunConfig
from shared.data.federation import Federation, data_spec
from shared.recipe import model_from_config
from shared.weights import to_arrayrecord, to_state_dict
from simulations.grid import RoundRunner

SUPPORTED_LAYERS = (nn.Linear, nn.ReLU, nn.Conv2d, nn.MaxPool2d, nn.Flatten)
SUPPORTED_OPTIMIZERS = ("sgd", "adam")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as task.train uses them

Params = dict[str, torch.Tensor]  # name -> (C, *shape)


def batch_runner_for(cfg: RunConfig, federation: Federation | None = None) -> RoundRunner | None:
    """The runner the grid (or each worker process) should use for `cfg` (see the module docstring),
    or None; its clients' data is `federation`'s (else loaded)."""
    return VectorizedTrainer(cfg, federation) if vectorizes(cfg, federation) else None


def vectorizes(cfg: RunConfig, federation: Federation | None = None) -> bool:
    """Whether `cfg`'s clients train on the vectorized path; a ConfigError where `on` cannot."""
    if cfg.vectorized == "off":
        return False
    if cfg.vectorized == "auto":
        try:
            on_cuda = task.resolve_device(cfg.device).type == "cuda"
        except ValueError:  # the ClientApp will report the bad device
            return False
        return on_cuda and unsupported_reason(cfg, federation) is None
    reason = unsupported_reason(cfg, federation)
    if reason is not None:
        raise ConfigError(f"config key 'vectorized' is 'on' but this run cannot be vectorized: {reason}")
    return True


def unsupported_reason(cfg: RunConfig, federation: Federation | None = None) -> str | None:
    """Why the local training of `cfg` cannot be vectorized, or None when it can."""
    if cfg.secure_aggregation:
        return "secure aggregation masks each client's update in its ClientApp mod"
    if cfg.dp == "local-sgd":
        return "dp 'local-sgd' clips each example's gradient in the ClientApp"
    if cfg.optimizer not in SUPPORTED_OPTIMIZERS:
        return f"optimizer '{cfg.optimizer}' (supported: {', '.join(SUPPORTED_OPTIMIZERS)})"
    try:
        dev = task.resolve_device(cfg.device)
    except ValueError as err:
        return str(err)
    if task.mixed_precision_dtype(dev) == torch.float16:
        return "this CUDA device lacks bf16, and fp16 training needs a GradScaler"
    model = model_from_config(cfg, data_spec(cfg, federation=federation))
    leaves = {type(m).__name__ for m in model.modules() if not list(m.children())}
    unsupported = sorted(n for n in leaves if n not in {t.__name__ for t in SUPPORTED_LAYERS})
    if unsupported:
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        return f"model '{cfg.model}' has {', '.join(unsupported)} layers (supported: {names})"
    if list(model.buffers()) or any(not p.requires_grad for p in model.parameters()):
        return f"model '{cfg.model}' has buffers or frozen parameters"
    return None


@dataclass(frozen=True)
class _Job:
    """One client's share of a round: its message, data and starting weights."""

    message: Message
    x: np.ndarray  # (N, D)
    y: np.ndarray  # (N,)
    weights: dict[str, torch.Tensor]
    seed: int
    epochs: int
    mu: float

    @property
    def group(self) -> tuple[int, int, float]:
        return len(self.y), self.epochs, self.mu


class VectorizedTrainer:
    """A `RoundRunner` that trains a batch of TRAIN messages' clients with one vmap per step."""

    def __init__(self, cfg: RunConfig, federation: Federation | None = None) -> None:
        self._cfg = cfg
        self._device = task.resolve_device(cfg.device)
        self._amp = task.autocast_context(self._device, task.mixed_precision_dtype(self._device))
        self._model = model_from_config(cfg, data_spec(cfg, federation=federation)).to(self._device)
        self._like = {k: v.cpu() for k, v in self._model.state_dict().items()}
        self._grad: Callable[..., tuple[Params, torch.Tensor]] = vmap(grad_and_value(self._loss))
        # the nodes' run config and data, as the ClientApp reads them
        self._runtimes = ClientRuntimes(max_runs=1, federation=federation)

    def __call__(self, messages: list[Message], contexts: list[Context]) -> list[Message] | None:
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return None
        try:
            jobs = [self._job(m, c) for m, c in zip(messages, contexts, strict=True)]
        except Exception:  # noqa: BLE001 - the ClientApp meets the same problem and replies with an error
            return None
        groups: dict[tuple[int, int, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group, []).append(i)
        if len(groups) == len(jobs):  # no two clients stack: nothing to gain
            return None
        replies: dict[int, Message] = {}
        for members in groups.values():
            replies.update(zip(members, self._train([jobs[i] for i in members]), strict=True))
        return [replies[i] for i in range(len(jobs))]

    def _job(self, msg: Message, context: Context) -> _Job:
        runtime = self._runtimes.get(context)
        cfg = runtime.cfg
        if cfg != self._cfg or runtime.node_device(context) != cfg.device:
            raise ValueError("the node's run config or device is not the one this runner was built for")
        data = runtime.node_data(context)
        config = msg.content[keys.CONFIG]
        weights = to_state_dict(msg.content[keys.ARRAYS], like=self._like)
        if weights.keys() != self._like.keys() or any(weights[k].shape != v.shape for k, v in self._like.items()):
            raise ValueError("the message's weights do not fit the model")
        job = _Job(
            message=msg,
            x=data.x_train,
            y=data.y_train,
            weights=weights,
            seed=client_seed(cfg, int(config.get(keys.SERVER_ROUND, 0)), context.node_id),
            epochs=int(config.get(keys.LOCAL_EPOCHS, cfg.local_epochs)),
            mu=float(config.get(keys.PROXIMAL_MU, cfg.proximal_mu)),
        )
        if job.epochs < 1 or len(job.y) == 0 or len(job.x) != len(job.y):
            raise ValueError("task.train would refuse this client")
        return job

    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One client's mean cross-entropy on one batch (under vmap: params (*shape), x (b, D))."""
        with self._amp:
            return F.cross_entropy(functional_call(self._model, params, (x,)), y)

    def _train(self, jobs: list[_Job]) -> list[Message]:
        """Train a group of clients with equal (N, epochs, mu) exactly as task.train would."""
        cfg, dev = self._cfg, self._device
        n, epochs, mu = jobs[0].group
        x = torch.stack([task.input_tensor(j.x) for j in jobs]).to(dev)  # (C, N, D)
        y = torch.stack([task.input_tensor(j.y) for j in jobs]).to(dev, torch.long)  # (C, N)
        params = {k: torch.stack([j.weights[k] for j in jobs]).to(dev) for k in self._like}  # (C, *shape)
        anchor = dict(params)  # updates are out of place, so these stay the starting weights
        update = _sgd(cfg.lr) if cfg.optimizer == "sgd" else _adam(cfg.lr, params)
        shuffles = [torch.Generator().manual_seed(j.seed) for j in jobs]  # as task._generator(seed)
        rows = torch.arange(len(jobs), device=dev)[:, None]  # (C, 1)
        loss_sum = torch.zeros(len(jobs), device=dev)  # (C,)
        for epoch in range(epochs):
            perm = torch.stack([torch.randperm(n, generator=g) for g in shuffles]).to(dev)  # (C, N)
            for start in range(0, n, cfg.batch_size):
                idx = perm[:, start : start + cfg.batch_size]  # (C, b)
                grads, loss = self._grad(params, x[rows, idx], y[rows, idx])  # (C, *shape), (C,)
                if mu > 0:  # FedProx, as task._proximal adds it: g + mu*w - mu*w_start
                    grads = {k: g.add(params[k], alpha=mu).sub(anchor[k], alpha=mu) for k, g in grads.items()}
                params = update(params, grads)
                if epoch == epochs - 1:
                    loss_sum.add_(loss.detach(), alpha=idx.shape[1])
        losses = (loss_sum / n).tolist()  # (C,) as task.train's (loss_sum / n).item()
        cpu = {k: v.detach().cpu() for k, v in params.items()}  # (C, *shape)
        replies = []
        for c, job in enumerate(jobs):
            metrics = MetricRecord({keys.TRAIN_LOSS: losses[c], keys.NUM_EXAMPLES: n})
            arrays = to_arrayrecord({k: v[c] for k, v in cpu.items()})
            replies.append(Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=job.message))
        return replies


def _sgd(lr: float) -> Callable[[Params, Params], Params]:
    """torch.optim.SGD without momentum or weight decay: p - lr * g."""

    def update(params: Params, grads: Params) -> Params:
        return {k: p.add(grads[k], alpha=-lr) for k, p in params.items()}

    return update


def _adam(lr: float, like: Params) -> Callable[[Params, Params], Params]:
    """torch.optim.Adam's single-tensor step (defaults: no weight decay, no amsgrad)."""
    beta1, beta2 = ADAM_BETAS
    exp_avg = {k: torch.zeros_like(p) for k, p in like.items()}  # (C, *shape)
    exp_avg_sq = {k: torch.zeros_like(p) for k, p in like.items()}  # (C, *shape)
    step = 0

    def update(params: Params, grads: Params) -> Params:
        nonlocal step
        step += 1
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        out = {}
        for k, p in params.items():
            g = grads[k]
            exp_avg[k] = exp_avg[k].lerp(g, 1 - beta1)
            exp_avg_sq[k] = exp_avg_sq[k].mul(beta2).addcmul(g, g, value=1 - beta2)
            denom = (exp_avg_sq[k].sqrt() / bias_correction2_sqrt).add(ADAM_EPS)
            out[k] = p.addcdiv(exp_avg[k], denom, value=-step_size)
        return out

    return update
