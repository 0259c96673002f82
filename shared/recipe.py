"""What both sides derive from a run configuration: the model, built the same way everywhere."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shared.config import ConfigError, RunConfig
from shared.data.federation import DataSpec
from shared.models import build_model

TWO_NN_HIDDEN = (200, 200)  # McMahan et al. 2017


def model_from_config(cfg: RunConfig, spec: DataSpec) -> torch.nn.Module:
    """The model named by `model`, shaped for the data; weights drawn from `seed`.

    With `compile`, the model's forward is compiled (`nn.Module.compile`: weights and
    state_dict keys stay as they are).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = BUILDERS[cfg.model](cfg, spec)
    if cfg.compile:
        model.compile()
    return model


def parameter_count(cfg: RunConfig, spec: DataSpec) -> int:
    """How many parameters `model_from_config(cfg, spec)` has, found without allocating them.

    The model is built on PyTorch's meta device (shapes only, no memory), so a device can refuse
    a model too large for it before it builds one.
    """
    with torch.device("meta"):
        model = BUILDERS[cfg.model](cfg, spec)
    return sum(p.numel() for p in model.parameters())


def _mlp(cfg: RunConfig, spec: DataSpec) -> torch.nn.Module:
    hidden = TWO_NN_HIDDEN if cfg.model == "2nn" else cfg.hidden_sizes
    return build_model("mlp", input_dim=spec.input_dim, hidden=tuple(hidden), num_classes=spec.num_classes)


def _cnn(cfg: RunConfig, spec: DataSpec) -> torch.nn.Module:
    """McMahan et al.'s MNIST CNN, or LEAF's on `femnist`; a ConfigError where the data is no square image."""
    preset = "femnist" if cfg.dataset == "femnist" else "mnist"
    options = dict(preset=preset, input_dim=spec.input_dim, num_classes=spec.num_classes)
    if cfg.cnn_hidden:
        options["hidden"] = cfg.cnn_hidden
    try:
        return build_model("cnn", **options)
    except ValueError as err:
        raise ConfigError(f"model 'cnn' cannot take dataset '{cfg.dataset}': {err}") from None


def _transformer(cfg: RunConfig, spec: DataSpec) -> torch.nn.Module:
    """`transformer-classifier` or `char-lm`: token ids of up to `spec.input_dim` (max-len) positions."""
    options = dict(
        vocab_size=spec.vocab_size,
        d_model=cfg.d_model,
        nhead=cfg.num_heads,
        num_layers=cfg.num_layers,
        dim_feedforward=cfg.ff_dim or 4 * cfg.d_model,
        max_len=spec.input_dim,
        dropout=cfg.dropout,
    )
    if cfg.model == "transformer-classifier":
        options["num_classes"] = spec.num_classes
    return build_model(cfg.model, **options)


# config `model` -> builder
BUILDERS: dict[str, Callable[[RunConfig, DataSpec], torch.nn.Module]] = {
    "mlp": _mlp,
    "2nn": _mlp,
    "cnn": _cnn,
    "transformer-classifier": _transformer,
    "char-lm": _transformer,
}
