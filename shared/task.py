"""Local training and evaluation of one client's data, in plain PyTorch (no Flower here).

The training loop is kept lean on purpose: it is benchmarked against a bare
PyTorch loop doing the same SGD steps. Data moves to the device once, batches
are gathered by indexing with one permutation per epoch, and the only host
sync is the final ``.item()`` of the accumulated loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPTIMIZERS = ("sgd", "adam")
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean cross-entropy over the last epoch's examples (proximal term excluded)
    num_examples: int
    steps: int  # optimizer steps over all epochs


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy
    accuracy: float
    num_examples: int


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; an explicit device must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}; allowed: 'auto' or one of {DEVICE_TYPES}") from e
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {device!r}; allowed: 'auto' or one of {DEVICE_TYPES}")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"device {device!r} requested but CUDA device is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


def train(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    proximal_mu: float = 0.0,
    device: str = "auto",
    seed: int | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place with cross-entropy for ``epochs`` passes over (x, y).

    ``proximal_mu > 0`` adds FedProx's (mu/2)*||w - w_start||^2, where w_start
    are the weights on entry (with plain SGD the pull is stable only for
    lr * mu < 2). ``seed`` fixes the shuffling and dropout, so runs
    on CPU are bit-identical; the global RNG state is left untouched.
    ``momentum`` applies to SGD only. Mixed precision is used on CUDA only.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    dev = resolve_device(device)
    xs, ys = _to_device(x, y, dev)
    n = len(xs)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    proximal = _proximal(params, proximal_mu)
    amp_dtype = mixed_precision_dtype(dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    amp = autocast_context(dev, amp_dtype)  # reusable: entered once per step, never nested
    shuffle = _generator(seed)
    loss_sum = torch.zeros((), device=dev)
    with _seeded_rng(seed, dev):
        for epoch in range(epochs):
            last = epoch == epochs - 1
            perm = torch.randperm(n, generator=shuffle).to(dev, non_blocking=True)  # (N,)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]  # (b,)
                with amp:
                    loss = F.cross_entropy(model(xs[idx]), ys[idx])
                _step(loss, opt, scaler, proximal)
                if last:
                    loss_sum.add_(loss.detach(), alpha=idx.shape[0])
    steps = epochs * math.ceil(n / batch_size)
    return TrainResult(loss=(loss_sum / n).item(), num_examples=n, steps=steps)


def evaluate(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 1000,
    device: str = "auto",
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode."""
    dev = resolve_device(device)
    xs, ys = _to_device(x, y, dev)
    n = len(xs)
    model.to(dev).eval()
    amp_dtype = mixed_precision_dtype(dev)
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
            with autocast_context(dev, amp_dtype):
                logits = model(xb)  # (b, C)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(dim=1) == yb).sum()
    return EvalResult(loss=(loss_sum / n).item(), accuracy=correct.item() / n, num_examples=n)


def _to_device(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    ys = torch.from_numpy(y) if isinstance(y, np.ndarray) else y
    if len(xs) == 0:
        raise ValueError("no examples: x is empty")
    if len(xs) != len(ys):
        raise ValueError(f"x and y differ in length: {len(xs)} != {len(ys)}")
    return xs.to(dev), ys.to(dev, torch.long)  # labels as class indices for cross_entropy


def _make_optimizer(
    name: str, params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {list(OPTIMIZERS)}")


def _step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    proximal: Callable[[], None] | None,
) -> None:
    """Backward and update; with a GradScaler, gradients are unscaled before the proximal term."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if proximal is not None:
            proximal()
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    if proximal is not None:
        proximal()
    scaler.step(opt)
    scaler.update()


def _proximal(params: list[nn.Parameter], mu: float) -> Callable[[], None] | None:
    """FedProx: a callable adding the gradient of (mu/2)*||w - w_start||^2 to ``params``' grads.

    Adding mu*(w - w_start) to the gradients directly is the same update as
    differentiating the term, without growing the autograd graph each step.
    """
    if mu <= 0:
        return None
    anchor = [p.detach().clone() for p in params]

    @torch.no_grad()
    def add_grad() -> None:
        for p, a in zip(params, anchor, strict=True):
            if p.grad is None:  # parameter unused in this step's forward
                p.grad = torch.zeros_like(p)
            p.grad.add_(p, alpha=mu).sub_(a, alpha=mu)

    return add_grad


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def mixed_precision_dtype(dev: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype: bf16 (or fp16 where bf16 is unsupported) on CUDA, none elsewhere."""
    if dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(dev: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=amp_dtype)


@contextlib.contextmanager
def _seeded_rng(seed: int | None, dev: torch.device) -> Iterator[None]:
    """Seed the global RNG (dropout) inside the block and restore its state afterwards."""
    if seed is None:
        yield
        return
    on_accel = dev.type != "cpu"
    with torch.random.fork_rng(devices=[dev] if on_accel else [], device_type=dev.type if on_accel else None):
        torch.manual_seed(seed)
        yield
