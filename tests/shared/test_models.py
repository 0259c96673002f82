"""Tests for shared.models: registry, forward shapes, masking/causality, learnability."""

from __future__ import annotations

import pytest
import torch

from shared.models import build_model
from shared.task import evaluate, train


def _tiny_classifier(**overrides):
    options = dict(vocab_size=12, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, max_len=16)
    return build_model("transformer-classifier", **(options | overrides))


def _tiny_lm(**overrides):
    options = dict(vocab_size=6, d_model=16, nhead=2, num_layers=1, dim_feedforward=32, max_len=16)
    return build_model("char-lm", **(options | overrides))


def test_mlp_flattens_any_input_shape():
    # Prepare
    model = build_model("mlp", input_dim=12, hidden=[5, 4], num_classes=3)
    x = torch.randn(4, 3, 4)

    # Execute
    logits = model(x)

    # Assert
    assert logits.shape == (4, 3)


def test_2nn_preset_has_mcmahan_parameter_count():
    # Execute
    model = build_model("mlp", preset="2nn")

    # Assert
    assert sum(p.numel() for p in model.parameters()) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == 199_210
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_preset_options_can_be_overridden():
    # Execute
    model = build_model("mlp", preset="2nn", num_classes=62)

    # Assert
    assert model(torch.rand(2, 784)).shape == (2, 62)


def test_mlp_works_with_functional_call():
    # Prepare
    model = build_model("mlp", input_dim=6, hidden=[4], num_classes=2)
    params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    x = torch.randn(3, 6)

    # Execute
    out = torch.func.functional_call(model, params, (x,))

    # Assert
    assert torch.equal(out, torch.zeros(3, 2))


def test_cnn_has_mcmahan_parameter_count_with_same_padding():
    # Execute
    model = build_model("cnn")

    # Assert: conv 5x5x1x32, conv 5x5x32x64, dense 7*7*64 -> 512 -> 10 (28 -> 14 -> 7 with 'same' padding)
    expected = (25 * 32 + 32) + (25 * 32 * 64 + 64) + (7 * 7 * 64 * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 1_663_370
    assert model(torch.rand(2, 784)).shape == (2, 10)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_cnn_femnist_preset_has_leaf_shape():
    # Execute
    model = build_model("cnn", preset="femnist")

    # Assert: LEAF's dense layer of 2048 and 62 classes
    assert model.classifier[0].out_features == 2048
    assert sum(p.numel() for p in model.parameters()) == 832 + 51_264 + (3136 * 2048 + 2048) + (2048 * 62 + 62)
    assert model(torch.rand(3, 784)).shape == (3, 62)


def test_cnn_takes_any_square_image():
    # Execute
    model = build_model("cnn", input_dim=64, hidden=16, num_classes=3)

    # Assert: 8x8 -> 4x4 -> 2x2, 64 channels
    assert model.classifier[0].in_features == 64 * 2 * 2
    assert model(torch.rand(5, 64)).shape == (5, 3)


@pytest.mark.parametrize("input_dim", [60, 785, 9, 0])
def test_cnn_refuses_inputs_that_are_no_square_image(input_dim):
    message = rf"square one-channel images \(side >= 4\): {input_dim} input features are not"
    with pytest.raises(ValueError, match=message):
        build_model("cnn", input_dim=input_dim)


def test_cnn_works_with_vmap_over_functional_call():
    # Prepare: two copies of the weights, the second scaled, stacked on a leading client dimension
    model = build_model("cnn", input_dim=16, hidden=4, num_classes=2)
    params = {k: torch.stack([v.detach(), 2 * v.detach()]) for k, v in model.named_parameters()}
    x = torch.randn(2, 3, 16)

    # Execute
    out = torch.func.vmap(lambda p, xb: torch.func.functional_call(model, p, (xb,)))(params, x)

    # Assert
    second = {k: v[1] for k, v in params.items()}
    assert out.shape == (2, 3, 2)
    torch.testing.assert_close(out[0], model(x[0]))
    torch.testing.assert_close(out[1], torch.func.functional_call(model, second, (x[1],)))


def test_classifier_output_shape():
    # Prepare
    model = _tiny_classifier(num_classes=5)
    x = torch.randint(1, 12, (4, 10))

    # Execute
    logits = model(x)

    # Assert
    assert logits.shape == (4, 5)


def test_classifier_ignores_trailing_padding():
    # Prepare
    model = _tiny_classifier().eval()
    x = torch.randint(1, 12, (3, 6))
    padded = torch.cat([x, torch.zeros(3, 4, dtype=torch.long)], dim=1)

    # Execute
    with torch.inference_mode():
        plain, with_pad = model(x), model(padded)

    # Assert
    torch.testing.assert_close(with_pad, plain, atol=1e-5, rtol=1e-5)


def test_classifier_all_padding_row_is_finite():
    # Prepare
    model = _tiny_classifier()
    x = torch.zeros(2, 5, dtype=torch.long)

    # Execute
    logits = model(x)

    # Assert
    assert torch.isfinite(logits).all()


def test_classifier_rejects_sequences_longer_than_max_len():
    # Prepare
    model = _tiny_classifier(max_len=4)

    # Execute / Assert
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 5, dtype=torch.long))


def test_char_lm_predicts_at_every_position():
    # Prepare
    model = _tiny_lm().eval()
    x = torch.randint(0, 6, (3, 9))

    # Execute
    with torch.inference_mode():
        logits = model(x)

    # Assert
    assert logits.shape == (3, 9, 6)


def test_char_lm_is_causal():
    # Prepare
    model = _tiny_lm().eval()
    x = torch.randint(0, 6, (2, 8))
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 6

    # Execute
    with torch.inference_mode():
        before, after = model(x), model(changed)

    # Assert: positions before the change are unaffected, later ones are
    torch.testing.assert_close(after[:, :5], before[:, :5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[:, 5:], before[:, 5:])


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_char_lm_sees_at_most_max_len_tokens(num_layers):
    # Prepare: random weights everywhere, a long sequence
    torch.manual_seed(0)
    model = _tiny_lm(vocab_size=20, num_layers=num_layers, max_len=10).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(0, 20, (2, 47))
    t, field = 40, model.receptive_field
    beyond, inside = x.clone(), x.clone()
    beyond[:, t - field] = (beyond[:, t - field] + 1) % 20
    inside[:, t - field + 1] = (inside[:, t - field + 1] + 1) % 20

    # Execute
    with torch.inference_mode():
        full = model(x)
        windows = torch.stack([model(x[:, s - 9 : s + 1])[:, -1] for s in range(9, 47)], dim=1)
        changed_beyond, changed_inside = model(beyond)[:, t], model(inside)[:, t]

    # Assert: each position's logits are those of its 10-token window alone
    assert field <= 10
    torch.testing.assert_close(windows, full[:, 9:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed_beyond, full[:, t], atol=1e-6, rtol=0)
    assert not torch.allclose(changed_inside, full[:, t])


def test_unknown_model_lists_allowed():
    with pytest.raises(ValueError, match=r"'resnet'.*char-lm.*cnn.*mlp.*transformer-classifier"):
        build_model("resnet")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r"hiden.*allowed.*hidden"):
        build_model("mlp", hiden=[10])


def test_missing_required_option_is_named():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("char-lm")


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match=r"'cnn'.*2nn"):
        build_model("mlp", preset="cnn")


def _blobs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


def _bright_quadrant(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images, flattened; the class is which quadrant is brightest."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    images = 0.2 * torch.rand(n, 8, 8, generator=g)
    for i, quadrant in enumerate(y.tolist()):
        row, col = divmod(quadrant, 2)
        images[i, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] += 1.0
    return images.reshape(n, 64), y


def _token_classes(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 sequences use tokens 1..5, class 1 tokens 6..11; trailing padding."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(1, 6, (n, 8), generator=g) + 5 * y[:, None]  # (n, 8)
    x[::2, 6:] = 0
    return x, y


def _cyclic_text(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of "012345012345..." at random offsets; the label at each position is the next character."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 6, (n, 1), generator=g)
    seq = (start + torch.arange(11)) % 6  # (n, 11)
    return seq[:, :10], seq[:, 1:]


@pytest.mark.parametrize(
    ("make_model", "make_data", "optimizer", "lr"),
    [
        (lambda: build_model("mlp", input_dim=8, hidden=[16], num_classes=2), _blobs, "sgd", 0.5),
        (lambda: build_model("cnn", input_dim=64, hidden=16, num_classes=4), _bright_quadrant, "sgd", 0.05),
        (_tiny_classifier, _token_classes, "adam", 3e-3),
        (_tiny_lm, _cyclic_text, "adam", 3e-3),
    ],
    ids=["mlp", "cnn", "transformer-classifier", "char-lm"],
)
def test_training_lowers_loss(make_model, make_data, optimizer, lr):
    # Prepare
    torch.manual_seed(0)
    model = make_model()
    x, y = make_data()
    before = evaluate(model, x, y, device="cpu").loss

    # Execute
    train(model, x, y, epochs=10, batch_size=16, lr=lr, optimizer=optimizer, device="cpu", seed=0)

    # Assert
    assert evaluate(model, x, y, device="cpu").loss < 0.5 * before
