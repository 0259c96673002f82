"""Multi-layer perceptron over flattened inputs."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

# Architecture as (input_dim, hidden widths, num_classes).
_Arch = tuple[int, tuple[int, ...], int]

DEFAULT_ARCH: _Arch = (784, (200, 200), 10)
PRESETS: dict[str, _Arch] = {
    # "2NN" of McMahan et al. 2017 (FedAvg), MNIST: 784-200-200-10, 199,210 parameters.
    "2nn": (784, (200, 200), 10),
}


class MLP(nn.Module):
    """Fully connected ReLU network; flattens any (B, ...) input to (B, input_dim).

    ``preset`` picks a named architecture; options given explicitly override it
    (e.g. ``preset="2nn", num_classes=62`` for FEMNIST). The layers are plain
    ``nn.Linear`` modules in ``self.layers``, so ``torch.func.functional_call`` works.
    """

    def __init__(
        self,
        *,
        input_dim: int | None = None,
        hidden: Sequence[int] | None = None,
        num_classes: int | None = None,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        base_dim, base_hidden, base_classes = _base_arch(preset)
        self.input_dim = base_dim if input_dim is None else input_dim
        widths = [self.input_dim, *(base_hidden if hidden is None else hidden)]
        layers: list[nn.Module] = []
        for fan_in, fan_out in pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], base_classes if num_classes is None else num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, ...) with prod(...) == input_dim to logits (B, num_classes)."""
        return self.layers(x.reshape(x.shape[0], self.input_dim))  # (B, input_dim) -> (B, C)


def _base_arch(preset: str | None) -> _Arch:
    if preset is None:
        return DEFAULT_ARCH
    if preset not in PRESETS:
        raise ValueError(f"unknown mlp preset {preset!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[preset]
