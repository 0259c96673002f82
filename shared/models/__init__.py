"""Model registry: ``build_model(name, **options)`` is the one way to construct a model."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from shared.models.cnn import CNN
from shared.models.mlp import MLP
from shared.models.transformer import CharLM, TransformerClassifier

# name -> builder; a builder's keyword parameters are exactly the options it accepts.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "transformer-classifier": TransformerClassifier,
    "char-lm": CharLM,
}


def build_model(name: str, **options: Any) -> nn.Module:
    """Build model ``name``; unknown names, unknown options and missing required options raise ValueError."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    builder = MODELS[name]
    params = inspect.signature(builder).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; allowed: {sorted(params)}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"model {name!r} requires option(s) {missing}")
    return builder(**options)


__all__ = ["CNN", "MLP", "MODELS", "CharLM", "TransformerClassifier", "build_model"]
