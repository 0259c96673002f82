"""Local training and evaluation of one client's data, in plain PyTorch (no Flower here).

The loop is kept lean (it is benchmarked against a bare PyTorch loop): data moves to the device
once, one permutation per epoch, one host sync at the end. Labels are class indices, (N,), or one
per position, (N, T), with ``IGNORE`` where nothing is scored; integer ``x`` is token ids padded
with 0, batched by length (``batch_plan``).
"""

from __future__ import annotations

import contextlib
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.config import OPTIMIZERS
from shared.data.text import PAD  # token id of padding
from shared.data.textsets import IGNORE  # a label nothing is scored at (cross_entropy's ignore_index)
from shared.privacy_local import SampleLevelDp, sampling

DEVICE_TYPES = ("cpu", "cuda", "mps")
BUCKET_POOL = 50  # batches drawn together, then sorted by length (they stay shuffled across pools)

Batch = tuple[torch.Tensor, int | None]  # example indices, and the width to cut token ids to


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean cross-entropy over the last epoch's examples (proximal term excluded)
    num_examples: int  # examples trained on: all of x, or fewer where `time_limit` stopped the first epoch
    stopped_early: bool = False  # `time_limit` ended training before its last step


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy over scored labels
    accuracy: float
    num_examples: int  # scored labels: examples, or positions not IGNORE


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
    time_limit: float | None = None,
    dp: SampleLevelDp | None = None,
) -> TrainResult:
    """Train ``model`` in place with cross-entropy for ``epochs`` passes over (x, y).

    ``proximal_mu > 0`` adds FedProx's (mu/2)*||w - w_start||^2, where w_start
    are the weights on entry (with plain SGD the pull is stable only for
    lr * mu < 2). ``seed`` fixes the shuffling and dropout, so runs
    on CPU are bit-identical; the global RNG state is left untouched.
    Mixed precision is used on CUDA only. ``time_limit`` (seconds) stops training after the
    step that passes it (at least one step runs): the loss is then the mean over the examples
    of the epoch it stopped in, and ``num_examples`` counts what was trained on, at most len(x).

    ``dp`` trains with sample-level DP-SGD instead (``_train_sample_level_dp``): Poisson-sampled
    batches, each example's gradient clipped and Gaussian noise added by Opacus.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    dev = resolve_device(device)
    lengths = token_lengths(x)
    xs, ys = _to_device(x, y, dev)
    n = len(xs)
    if dp is not None:
        deadline = None if time_limit is None else time.monotonic() + time_limit
        settings = _LocalSgd(epochs, batch_size, lr, optimizer, proximal_mu, seed, deadline)
        return _train_sample_level_dp(model, xs, ys, lengths, dev, dp, settings)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    proximal = _proximal(params, proximal_mu)
    amp_dtype = mixed_precision_dtype(dev)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    opt = _make_optimizer(optimizer, params, lr=lr, scaled=scaler is not None)
    amp = autocast_context(dev, amp_dtype)  # reusable: entered once per step, never nested
    shuffle = _generator(seed)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    loss_sum = torch.zeros((), device=dev)
    trained = seen = 0  # examples trained on in all, and in this epoch
    with _seeded_rng(seed, dev):
        for epoch in range(epochs):
            scored = epoch == epochs - 1 or deadline is not None  # whose loss may be the one reported
            loss_sum.zero_()
            seen = 0
            for idx, width in batch_plan(n, batch_size, shuffle, lengths):
                xb, yb = gather(xs, ys, idx.to(dev, non_blocking=True), width)
                with amp:
                    loss = _loss(model(xb), yb)
                _step(loss, opt, scaler, proximal)
                seen += idx.shape[0]
                if scored:
                    loss_sum.add_(loss.detach(), alpha=idx.shape[0])
                if deadline is not None and time.monotonic() >= deadline:
                    trained += seen
                    return TrainResult((loss_sum / seen).item(), min(trained, n), stopped_early=True)
            trained += seen
    return TrainResult(loss=(loss_sum / n).item(), num_examples=n)


@dataclass(frozen=True)
class _LocalSgd:
    """What a sample-level DP training run takes from `train`'s arguments."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    proximal_mu: float
    seed: int | None  # dropout only: batches and noise never come from a seed the server knows
    deadline: float | None  # time.monotonic() after which training stops


def _train_sample_level_dp(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    lengths: torch.Tensor | None,
    dev: torch.device,
    dp: SampleLevelDp,
    run: _LocalSgd,
) -> TrainResult:
    """DP-SGD (Abadi et al. 2016) by Opacus: E * ceil(n/B) steps, each on a Poisson-sampled batch
    (every example with probability q = min(1, B/n), as the accountant in `shared.privacy_local`
    assumes), each example's gradient clipped to C, N(0, (z*C)^2) added to their sum, divided by
    the expected batch size; FedProx's pull, which reads no data, is added after the noise.

    The batches and the noise come from fresh entropy, not from `seed`: the server knows the seed
    (`fedclient.app.client_seed`), and could otherwise replay both. No mixed precision.
    `num_examples` is n even where the time limit stops training: it is what the server's
    accountant reads as the client's n (fewer steps than accounted only lowers the real ε).
    """
    grad_sample_module, dp_optimizer = _opacus()
    n = len(xs)
    q, steps = sampling(n, run.batch_size, run.epochs)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    own_attrs = [set(vars(p)) for p in params]  # Opacus leaves attributes on the parameters; they go after
    proximal = _proximal(params, run.proximal_mu)
    if run.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {run.optimizer!r}; allowed: {list(OPTIMIZERS)}")
    base = torch.optim.SGD(params, lr=run.lr) if run.optimizer == "sgd" else torch.optim.Adam(params, lr=run.lr)
    sampler, noise = _secret_generator(torch.device("cpu")), _secret_generator(dev)
    loss_sum = torch.zeros((), device=dev)
    seen = 0  # examples sampled in this epoch
    wrapped = grad_sample_module(model, loss_reduction="mean")  # hooks on `model`'s layers; its keys stay its own
    try:
        opt = dp_optimizer(
            base,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.clipping_norm,
            expected_batch_size=min(run.batch_size, n),
            loss_reduction="mean",
            generator=noise,
        )
        with _seeded_rng(run.seed, dev), warnings.catch_warnings():
            # An empty Poisson batch still takes its step (noise only); its hooks fire on no inputs.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for step in range(steps):
                if step % (steps // run.epochs) == 0:
                    loss_sum.zero_()
                    seen = 0
                idx = torch.nonzero(torch.rand(n, generator=sampler) < q).squeeze(1)  # (b,), b ~ Binomial(n, q)
                width = _width(lengths, idx) if lengths is not None and len(idx) else None
                xb, yb = gather(xs, ys, idx.to(dev, non_blocking=True), width)
                opt.zero_grad(set_to_none=True)
                loss = _loss(wrapped(xb), yb)  # mean over the batch: NaN for an empty one, whose grads are empty
                loss.backward()
                if opt.pre_step():  # clip, sum, noise, scale: p.grad is now the private gradient
                    if proximal is not None:
                        proximal()
                    opt.original_optimizer.step()
                if len(idx):
                    seen += len(idx)
                    loss_sum.add_(loss.detach(), alpha=len(idx))
                if run.deadline is not None and time.monotonic() >= run.deadline:
                    return TrainResult((loss_sum / max(seen, 1)).item(), n, stopped_early=step < steps - 1)
    finally:  # the runtime keeps this model for its next message: no hooks, gradients or attributes left
        wrapped.to_standard_module()
        for p, attrs in zip(params, own_attrs, strict=True):
            p.grad = None
            for name in set(vars(p)) - attrs:
                delattr(p, name)
    return TrainResult(loss=(loss_sum / max(seen, 1)).item(), num_examples=n)


def _opacus() -> tuple[type, type]:
    """Opacus's GradSampleModule and DPOptimizer, imported only where sample-level DP trains."""
    try:
        from opacus import GradSampleModule  # noqa: PLC0415
        from opacus.optimizers import DPOptimizer  # noqa: PLC0415
    except ImportError as err:
        raise ImportError("dp 'local-sgd' trains with Opacus, not installed: pip install 'flowerbed[opacus]'") from err
    return GradSampleModule, DPOptimizer


def _secret_generator(dev: torch.device) -> torch.Generator:
    """A generator on `dev` seeded from the OS's entropy (not a CSPRNG: Opacus's secure_mode would need torchcsprng)."""
    gen = torch.Generator(device=dev)
    gen.manual_seed(secrets.randbits(63))
    return gen


def evaluate(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 1000,
    device: str = "auto",
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode, over scored labels."""
    dev = resolve_device(device)
    lengths = token_lengths(x)
    xs, ys = _to_device(x, y, dev)
    model.to(dev).eval()
    amp_dtype = mixed_precision_dtype(dev)
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    scored = torch.zeros((), dtype=torch.long, device=dev)
    with torch.inference_mode():
        for idx, width in _eval_plan(len(xs), batch_size, lengths):
            xb, yb = gather(xs, ys, idx.to(dev, non_blocking=True), width)
            with autocast_context(dev, amp_dtype):
                logits = model(xb)  # (b, C) or (b, T, C)
            logits, yb = logits.flatten(0, -2).float(), yb.flatten()
            keep = yb != IGNORE
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += ((logits.argmax(dim=1) == yb) & keep).sum()
            scored += keep.sum()
    count = int(scored.item())
    if count == 0:
        raise ValueError("no labels to score: every label is IGNORE")
    return EvalResult(loss=(loss_sum / count).item(), accuracy=correct.item() / count, num_examples=count)


def token_lengths(x: torch.Tensor | np.ndarray) -> torch.Tensor | None:
    """Each row's length up to its trailing padding, (N,) on the CPU, for integer (token id) x; else None."""
    xt = input_tensor(x) if isinstance(x, np.ndarray) else x
    if xt.ndim != 2 or xt.is_floating_point():
        return None
    return (xt != PAD).sum(dim=1).cpu()


def batch_plan(n: int, batch_size: int, shuffle: torch.Generator, lengths: torch.Tensor | None) -> list[Batch]:
    """One epoch's batches, drawn with `shuffle`: a random permutation cut into batches.

    With token `lengths`, each run of BUCKET_POOL batches of the permutation is sorted by length
    before it is cut, the batches are shuffled, and each is cut to its longest row's width.
    """
    perm = torch.randperm(n, generator=shuffle)  # (N,)
    if lengths is None:
        return [(perm[start : start + batch_size], None) for start in range(0, n, batch_size)]
    pool = batch_size * BUCKET_POOL
    batches = []
    for start in range(0, n, pool):
        members = perm[start : start + pool]
        members = members[torch.argsort(lengths[members], stable=True)]
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    order = torch.randperm(len(batches), generator=shuffle).tolist()
    return [(batches[i], _width(lengths, batches[i])) for i in order]


def _eval_plan(n: int, batch_size: int, lengths: torch.Tensor | None) -> list[Batch]:
    """In order for features; shortest first for token ids, each batch cut to its width."""
    if lengths is None:
        return [(torch.arange(start, min(start + batch_size, n)), None) for start in range(0, n, batch_size)]
    order = torch.argsort(lengths, stable=True)
    return [(idx, _width(lengths, idx)) for idx in order.split(batch_size)]


def _width(lengths: torch.Tensor, idx: torch.Tensor) -> int:
    return max(int(lengths[idx].max()), 1)


def gather(
    xs: torch.Tensor, ys: torch.Tensor, idx: torch.Tensor, width: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch `idx`, its token ids (and per-position labels) cut to `width` positions."""
    xb, yb = xs[idx], ys[idx]
    if width is None:
        return xb, yb
    return xb[:, :width], (yb[:, :width] if yb.ndim == 2 else yb)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored labels: (B, C) vs (B,), or (B, T, C) vs (B, T)."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE)


def _to_device(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    xs = input_tensor(x) if isinstance(x, np.ndarray) else x
    ys = input_tensor(y) if isinstance(y, np.ndarray) else y
    if len(xs) == 0:
        raise ValueError("no examples: x is empty")
    if len(xs) != len(ys):
        raise ValueError(f"x and y differ in length: {len(xs)} != {len(ys)}")
    return xs.to(dev), ys.to(dev, torch.long)  # labels as class indices for cross_entropy


def input_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor on `array`'s memory, a read-only array too (fedsim's memory-mapped data), without
    PyTorch's warning that it cannot mark the tensor read-only: training never writes its input."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class PlainSGD:
    """SGD without momentum or weight decay: `p -= lr * p.grad`, the very op torch.optim.SGD's
    single-tensor step makes for these settings (so the weights are bit-identical).

    Why not torch.optim.SGD itself: the first use of torch.optim in a process imports
    torch._dynamo, 2.6 s on this project's 2-core machine (`benchmarks/simulation_speed.py` notes
    it), which every fedsim worker and every device's ClientApp process would pay for one add.
    A GradScaler needs a torch.optim optimizer, so mixed precision on CUDA keeps torch's.
    """

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        self.params, self.lr = params, lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


def _make_optimizer(
    name: str, params: list[nn.Parameter], *, lr: float, scaled: bool = False
) -> torch.optim.Optimizer | PlainSGD:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr) if scaled else PlainSGD(params, lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {list(OPTIMIZERS)}")


def _step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer | PlainSGD,
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
