"""What both sides derive from a run configuration: the model, built the same way everywhere."""

from __future__ import annotations

import torch

from shared.config import RunConfig
from shared.data.federation import DataSpec
from shared.models import build_model

TWO_NN_HIDDEN = (200, 200)  # McMahan et al. 2017


def model_from_config(cfg: RunConfig, spec: DataSpec) -> torch.nn.Module:
    """The model named by `model`, shaped for the data; weights drawn from `seed`."""
    hidden = TWO_NN_HIDDEN if cfg.model == "2nn" else cfg.hidden_sizes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(
            "mlp", input_dim=spec.input_dim, hidden=tuple(hidden), num_classes=spec.num_classes
        )
