"""Tests for shared.task: device resolution, the training loop, evaluation."""

from __future__ import annotations

import copy
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.models import build_model
from shared.task import IGNORE, EvalResult, TrainResult, batch_plan, evaluate, resolve_device, token_lengths, train


def _data(n: int = 40, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_dim=6, hidden=[8], num_classes=2)


def _distance(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return math.sqrt(sum(float((p - q).detach().pow(2).sum()) for p, q in pairs))


# --- resolve_device -----------------------------------------------------------------


def test_resolve_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)

    # Execute / Assert
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_explicit_unavailable_device_raises(monkeypatch, device):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    # Execute / Assert
    with pytest.raises(ValueError, match=device):
        resolve_device(device)


@pytest.mark.parametrize("device", ["gpu", "xpu"])
def test_invalid_device_raises(device):
    with pytest.raises(ValueError, match=device):
        resolve_device(device)


# --- train --------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_weights_with_dropout():
    # Prepare: dropout makes the global RNG matter too
    torch.manual_seed(0)
    first = build_model("transformer-classifier", vocab_size=10, d_model=16, nhead=2, num_layers=1, dropout=0.3)
    second, third = copy.deepcopy(first), copy.deepcopy(first)
    x = torch.randint(1, 10, (24, 6))
    y = torch.randint(0, 2, (24,))

    # Execute
    rng_before = torch.get_rng_state()
    train(first, x, y, epochs=2, batch_size=5, lr=0.1, seed=3, device="cpu")
    torch.rand(1)  # advance the global RNG: the seed alone must fix dropout
    rng_between = torch.get_rng_state()
    train(second, x, y, epochs=2, batch_size=5, lr=0.1, seed=3, device="cpu")
    train(third, x, y, epochs=2, batch_size=5, lr=0.1, seed=4, device="cpu")

    # Assert
    a, b, c = first.state_dict(), second.state_dict(), third.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(rng_between, rng_before)
    assert torch.equal(torch.get_rng_state(), rng_between)


def _count_forwards(model: nn.Module) -> list[int]:
    """The batch size of each forward pass of ``model``, as it happens."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    return sizes


def test_every_example_is_seen_once_an_epoch_and_counted():
    # Prepare
    x, y = _data(n=23)
    model = _mlp()
    batches = _count_forwards(model)

    # Execute
    result = train(model, x, y, epochs=3, batch_size=5, lr=0.1, seed=0, device="cpu")

    # Assert: 23 examples in batches of 5 are five steps an epoch, the last of 3
    assert isinstance(result, TrainResult)
    assert result.num_examples == 23
    assert batches == [5, 5, 5, 5, 3] * 3


def test_reported_loss_is_mean_over_last_epoch():
    # Prepare: lr=0 keeps the weights, so every batch loss is the model's loss on it
    model = _mlp()
    x, y = _data(n=23)
    expected = evaluate(model, x, y, device="cpu").loss

    # Execute: uneven batches (5, 5, 5, 5, 3) must be weighted by size
    result = train(model, x, y, epochs=2, batch_size=5, lr=0.0, seed=0, device="cpu")

    # Assert
    assert result.loss == pytest.approx(expected, rel=1e-5)


def _reference_full_batch(model: nn.Module, x, y, steps: int, lr: float, mu: float) -> None:
    """Textbook FedProx gradient descent, with the proximal term through autograd."""
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        prox = sum((p - s).pow(2).sum() for p, s in zip(model.parameters(), start, strict=True))
        loss = F.cross_entropy(model(x), y) + mu / 2 * prox
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_full_batch_sgd_matches_textbook_fedprox(mu):
    # Prepare
    x, y = _data()
    model, reference = _mlp(), _mlp()

    # Execute: one batch per epoch, so shuffling cannot matter
    train(model, x, y, epochs=5, batch_size=len(x), lr=0.3, proximal_mu=mu, seed=0, device="cpu")
    _reference_full_batch(reference, x, y, steps=5, lr=0.3, mu=mu)

    # Assert
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_large_proximal_mu_keeps_weights_near_start():
    # Prepare
    x, y = _data()
    start, free, held = _mlp(), _mlp(), _mlp()

    # Execute: lr * mu = 1 is the strongest stable pull for plain SGD
    train(free, x, y, epochs=10, batch_size=8, lr=0.1, seed=0, device="cpu")
    train(held, x, y, epochs=10, batch_size=8, lr=0.1, proximal_mu=10.0, seed=0, device="cpu")

    # Assert
    assert _distance(held, start) < 0.2 * _distance(free, start)


def test_adam_lowers_loss_and_differs_from_sgd():
    # Prepare
    x, y = _data()
    adam, sgd = _mlp(), _mlp()
    before = evaluate(adam, x, y, device="cpu").loss

    # Execute
    train(adam, x, y, epochs=5, batch_size=8, lr=0.01, optimizer="adam", seed=0, device="cpu")
    train(sgd, x, y, epochs=5, batch_size=8, lr=0.01, optimizer="sgd", seed=0, device="cpu")

    # Assert
    assert evaluate(adam, x, y, device="cpu").loss < 0.8 * before
    assert _distance(adam, sgd) > 1e-3


def test_unknown_optimizer_lists_allowed():
    x, y = _data()
    with pytest.raises(ValueError, match=r"'rmsprop'.*sgd.*adam"):
        train(_mlp(), x, y, epochs=1, batch_size=8, lr=0.1, optimizer="rmsprop", device="cpu")


def test_accepts_numpy_arrays():
    # Prepare
    x, y = _data()
    model = _mlp()

    # Execute
    result = train(model, x.numpy(), y.numpy().astype(np.int32), epochs=1, batch_size=8, lr=0.1, device="cpu")

    # Assert
    assert result.num_examples == len(x)
    assert math.isfinite(result.loss)


def test_train_rejects_empty_and_mismatched_data():
    x, y = _data()
    with pytest.raises(ValueError, match="empty"):
        train(_mlp(), x[:0], y[:0], epochs=1, batch_size=8, lr=0.1, device="cpu")
    with pytest.raises(ValueError, match="length"):
        train(_mlp(), x, y[:-1], epochs=1, batch_size=8, lr=0.1, device="cpu")


# --- evaluate -----------------------------------------------------------------------


def test_evaluate_hand_checked():
    # Prepare: identity layer, so the logits are the inputs
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1, 1])  # predictions 0, 1, 0, 1: three right
    expected_loss = (
        math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(2)) + math.log1p(math.exp(-5))
    ) / 4

    # Execute: batch_size 3 splits the data unevenly
    result = evaluate(model, x, y, batch_size=3, device="cpu")

    # Assert
    assert isinstance(result, EvalResult)
    assert result.accuracy == 0.75
    assert result.num_examples == 4
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)


def test_evaluate_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        evaluate(_mlp(), torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), device="cpu")


# --- token ids: length buckets, per-position labels -----------------------------------


def _padded_tokens(n: int = 120, width: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 1..width token ids (never 0) followed by padding, and their lengths."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    x = torch.randint(1, 9, (n, width), generator=g)
    x[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    return x, lengths


def test_token_lengths_only_for_integer_ids():
    x, lengths = _padded_tokens()

    assert torch.equal(token_lengths(x), lengths)
    assert token_lengths(x.float()) is None
    assert token_lengths(x[:, :, None]) is None


def test_batch_plan_buckets_by_length_and_covers_every_example_once():
    # Prepare
    x, lengths = _padded_tokens(n=1000)

    # Execute
    plan = batch_plan(1000, 8, torch.Generator().manual_seed(0), lengths)
    plain = batch_plan(1000, 8, torch.Generator().manual_seed(0), None)

    # Assert
    assert sorted(torch.cat([idx for idx, _ in plan]).tolist()) == list(range(1000))
    assert len(plan) == len(plain) == 125 and all(width is None for _, width in plain)
    assert all(width == int(lengths[idx].max()) for idx, width in plan)
    cost = sum(len(idx) * width for idx, width in plan)
    unbucketed = sum(len(idx) * int(lengths[idx].max()) for idx, _ in plain)
    assert cost < 0.7 * unbucketed  # far less padding than random batches


def test_training_on_token_ids_cuts_batches_to_their_longest_row():
    # Prepare
    x, lengths = _padded_tokens()
    y = (lengths > 15).long()
    model = build_model("transformer-classifier", vocab_size=10, d_model=8, nhead=2, num_layers=1, max_len=30)
    widths = []
    model.register_forward_pre_hook(lambda _, args: widths.append(args[0].shape[1]))

    # Execute
    result = train(model, x, y, epochs=2, batch_size=10, lr=0.01, optimizer="adam", seed=0, device="cpu")

    # Assert
    assert len(widths) == 2 * 12  # 120 rows in batches of 10, 2 epochs
    assert max(widths) == 30 and min(widths) < 30


def test_evaluate_by_length_buckets_equals_one_row_at_a_time():
    # Prepare
    torch.manual_seed(0)
    model = build_model("transformer-classifier", vocab_size=10, d_model=8, nhead=2, num_layers=1, max_len=30)
    x, lengths = _padded_tokens(n=40)
    y = (lengths % 2).long()

    # Execute
    bucketed = evaluate(model, x, y, batch_size=16, device="cpu")
    single = [evaluate(model, x[i : i + 1, : lengths[i]], y[i : i + 1], device="cpu") for i in range(40)]

    # Assert
    assert bucketed.accuracy == sum(r.accuracy for r in single) / 40
    assert bucketed.loss == pytest.approx(sum(r.loss for r in single) / 40, rel=1e-5)


def test_per_position_labels_score_every_label_but_ignored_ones():
    # Prepare: an identity embedding predicts each input token at its own position
    model = nn.Embedding(5, 5)
    with torch.no_grad():
        model.weight.copy_(torch.eye(5) * 10)
    x = torch.tensor([[1, 2, 3, 0], [4, 4, 0, 0]])
    y = torch.tensor([[1, 2, 4, IGNORE], [4, 3, IGNORE, IGNORE]])  # 5 scored: 3 right

    # Execute
    result = evaluate(model, x, y, device="cpu")
    fit = train(model, x, y, epochs=1, batch_size=2, lr=0.0, device="cpu")

    # Assert
    assert (result.accuracy, result.num_examples) == (0.6, 5)
    assert math.isfinite(fit.loss) and fit.num_examples == 2


def test_plain_sgd_gives_torch_sgds_weights_without_importing_dynamo() -> None:
    # torch.optim's first use imports torch._dynamo (seconds per process); PlainSGD must not,
    # and must give bit for bit what torch.optim.SGD gives (checked in a fresh interpreter).
    script = """
import sys, numpy as np, torch
from shared import task
def trained(optimizer_class):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 50)
    task.PlainSGD = optimizer_class
    task.train(model, x, y, epochs=2, batch_size=7, lr=0.1, seed=3, device="cpu", proximal_mu=0.1)
    return [p.detach() for p in model.parameters()]
plain = trained(task.PlainSGD)
assert "torch._dynamo" not in sys.modules
reference = trained(lambda params, lr: torch.optim.SGD(params, lr=lr))
assert all(torch.equal(a, b) for a, b in zip(plain, reference, strict=True))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2])


# --- sample-level DP-SGD (dp = "local-sgd") -------------------------------------------

from shared.privacy_local import SampleLevelDp  # noqa: E402

needs_opacus = pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="needs the opacus extra")


def _textbook_dp_sgd_step(model: nn.Module, x, y, *, lr: float, clip: float) -> None:
    """One full-batch DP-SGD step without noise, one example at a time: w -= lr * mean_i clip_C(g_i)."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for t, g in zip(total, grads, strict=True):
            t.add_(g * min(1.0, clip / (float(norm) + 1e-6)))
    with torch.no_grad():
        for p, t in zip(params, total, strict=True):
            p.sub_(t / len(x), alpha=lr)


@needs_opacus
def test_local_dp_clips_each_examples_gradient_not_the_batchs():
    # Prepare: one example far out makes its gradient dominate; the batch is the whole data (q = 1)
    x, y = _data(n=12)
    x[0] *= 1e4
    dp_trained, reference = _mlp(), _mlp()

    # Execute: z = 0 is clipping alone
    train(dp_trained, x, y, epochs=1, batch_size=12, lr=0.5, device="cpu", dp=SampleLevelDp(0.1, 0.0))
    _textbook_dp_sgd_step(reference, x, y, lr=0.5, clip=0.1)

    # Assert: each example clipped to C on its own, then averaged (clipping the batch's mean would differ)
    for p, q in zip(dp_trained.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@needs_opacus
def test_local_dp_update_is_bounded_by_lr_steps_and_clipping_norm():
    # Prepare: a huge learning signal, which moves the weights far without DP
    x, y = _data(n=30)
    x *= 1e3
    start, dp_trained, plain = _mlp(), _mlp(), _mlp()
    lr, clip, epochs = 0.1, 0.5, 3

    # Execute: full batches (B >= n, so q = 1 and one step an epoch)
    train(dp_trained, x, y, epochs=epochs, batch_size=64, lr=lr, device="cpu", dp=SampleLevelDp(clip, 0.0))
    train(plain, x, y, epochs=epochs, batch_size=64, lr=lr, device="cpu")

    # Assert: each step moves the weights by at most lr * C
    assert _distance(dp_trained, start) <= lr * epochs * clip * (1 + 1e-5)
    assert _distance(plain, start) > 10 * lr * epochs * clip


@needs_opacus
def test_local_dp_noise_changes_the_weights_and_does_not_come_from_the_seed():
    # Prepare
    x, y = _data(n=30)
    clipped, noisy_a, noisy_b = _mlp(), _mlp(), _mlp()

    # Execute
    train(clipped, x, y, epochs=1, batch_size=64, lr=0.1, seed=3, device="cpu", dp=SampleLevelDp(1.0, 0.0))
    train(noisy_a, x, y, epochs=1, batch_size=64, lr=0.1, seed=3, device="cpu", dp=SampleLevelDp(1.0, 1.0))
    train(noisy_b, x, y, epochs=1, batch_size=64, lr=0.1, seed=3, device="cpu", dp=SampleLevelDp(1.0, 1.0))

    # Assert: noise of std z*C/B = 1/30 a coordinate moves the weights; the server-known seed does not fix it
    assert _distance(clipped, noisy_a) > 0.01
    assert _distance(noisy_a, noisy_b) > 0.01


@needs_opacus
def test_local_dp_samples_poisson_batches_for_e_times_ceil_n_over_b_steps():
    # Prepare
    x, y = _data(n=200)
    model = _mlp()
    batches = _count_forwards(model)

    # Execute
    result = train(model, x, y, epochs=2, batch_size=20, lr=0.1, device="cpu", dp=SampleLevelDp(1.0, 1.0))

    # Assert: 2 * ceil(200/20) steps, each batch ~ Binomial(200, 0.1), not all of size 20; n is reported
    assert len(batches) == 20
    assert len(set(batches)) > 1 and 10 <= sum(batches) / len(batches) <= 30
    assert (result.num_examples, result.stopped_early) == (200, False)
    assert math.isfinite(result.loss)


@needs_opacus
@pytest.mark.parametrize(
    ("name", "options", "tokens"),
    [
        ("mlp", {"input_dim": 16, "hidden": [8], "num_classes": 3}, False),
        ("cnn", {"input_dim": 16, "hidden": 8, "num_classes": 3}, False),
        ("char-lm", {"vocab_size": 12, "d_model": 8, "nhead": 2, "num_layers": 1, "max_len": 8}, True),
    ],
)
def test_local_dp_keeps_the_state_dict_and_leaves_no_trace_on_the_model(name, options, tokens):
    # Prepare
    torch.manual_seed(0)
    model = build_model(name, **options)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 12, (24, 10), generator=g) if tokens else torch.randn(24, 16, generator=g)
    y = torch.randint(0, 12 if tokens else 3, (24, 10) if tokens else (24,), generator=g)

    # Execute
    result = train(model, x, y, epochs=1, batch_size=6, lr=0.1, seed=0, device="cpu", dp=SampleLevelDp(1.0, 0.5))
    twin = build_model(name, **options)
    twin.load_state_dict(model.state_dict())
    train(model, x, y, epochs=1, batch_size=6, lr=0.1, seed=0, device="cpu")
    train(twin, x, y, epochs=1, batch_size=6, lr=0.1, seed=0, device="cpu")

    # Assert: same keys and shapes; plain training afterwards is what it is on an untouched model
    assert math.isfinite(result.loss)
    assert {key: value.shape for key, value in model.state_dict().items()} == shapes
    assert all(vars(p) == {} for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


@needs_opacus
def test_local_dp_time_limit_reports_n_for_the_accountant():
    # Prepare
    x, y = _data(n=40)

    # Execute: a limit of 0 stops after the first step
    result = train(_mlp(), x, y, epochs=2, batch_size=5, lr=0.1, device="cpu", dp=SampleLevelDp(1.0, 1.0), time_limit=0)

    # Assert
    assert (result.num_examples, result.stopped_early) == (40, True)


def test_local_dp_without_opacus_names_the_extra(monkeypatch):
    # Prepare
    monkeypatch.setitem(sys.modules, "opacus", None)
    x, y = _data(n=10)

    # Execute / Assert
    with pytest.raises(ImportError, match=r"pip install 'flowerbed\[opacus\]'"):
        train(_mlp(), x, y, epochs=1, batch_size=5, lr=0.1, device="cpu", dp=SampleLevelDp(1.0, 1.0))


@needs_opacus
@pytest.mark.parametrize("tokens", [False, True])
def test_local_dp_takes_its_noise_step_on_an_empty_poisson_batch(tokens):
    # Prepare: B = 1 of n = 30 samples no example in about a third of the steps
    g = torch.Generator().manual_seed(0)
    if tokens:
        model = build_model("char-lm", vocab_size=12, d_model=8, nhead=2, num_layers=1, max_len=8)
        x, y = torch.randint(1, 12, (30, 10), generator=g), torch.randint(0, 12, (30, 10), generator=g)
    else:
        model, (x, y) = _mlp(), _data(n=30)
    start = copy.deepcopy(model.state_dict())
    batches = _count_forwards(model)

    # Execute
    result = train(model, x, y, epochs=1, batch_size=1, lr=0.1, device="cpu", dp=SampleLevelDp(1.0, 1.0))

    # Assert: 30 steps, some on no example, and the weights finite and moved
    assert len(batches) == 30 and 0 in batches
    assert math.isfinite(result.loss)
    assert all(torch.isfinite(v).all() and not torch.equal(v, start[k]) for k, v in model.state_dict().items())
