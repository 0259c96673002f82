"""Convolutional network over square one-channel images that arrive flattened.

Two 5×5 convolutions of 32 and 64 channels with 'same' padding, each followed by ReLU and 2×2 max
pooling, one ReLU layer of `hidden` units, and `num_classes` logits (the softmax is in the loss).
With 'same' padding a 28×28 image leaves 7×7×64 features after the second pooling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Architecture as (input_dim, hidden units, num_classes).
_Arch = tuple[int, int, int]

KERNEL, CHANNELS = 5, (32, 64)
MIN_SIDE = 4  # two 2×2 poolings leave at least one pixel
PRESETS: dict[str, _Arch] = {
    # McMahan et al. 2017 (FedAvg), MNIST: 1,663,370 parameters.
    "mnist": (784, 512, 10),
    # LEAF (Caldas et al. 2018), FEMNIST: 6,603,710 parameters.
    "femnist": (784, 2048, 62),
}


class CNN(nn.Module):
    """The FedAvg paper's MNIST CNN (``preset="mnist"``) or LEAF's FEMNIST CNN (``preset="femnist"``).

    Options given explicitly override the preset's. The input is (B, input_dim), or any (B, ...)
    with input_dim values, read as one channel of side √input_dim; a non-square input_dim or a side
    below 4 raises ValueError. Only Conv2d, ReLU, MaxPool2d, Flatten and Linear layers, no buffers,
    so ``torch.func.functional_call`` and ``vmap`` work.
    """

    def __init__(
        self,
        *,
        preset: str = "mnist",
        input_dim: int | None = None,
        hidden: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown cnn preset {preset!r}; allowed: {sorted(PRESETS)}")
        base_dim, base_hidden, base_classes = PRESETS[preset]
        self.input_dim = base_dim if input_dim is None else input_dim
        self.side = image_side(self.input_dim)
        first, second = CHANNELS
        pooled = self.side // 2 // 2
        self.features = nn.Sequential(
            nn.Conv2d(1, first, KERNEL, padding="same"),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, KERNEL, padding="same"),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        width = base_hidden if hidden is None else hidden
        self.classifier = nn.Sequential(
            nn.Linear(second * pooled * pooled, width),
            nn.ReLU(),
            nn.Linear(width, base_classes if num_classes is None else num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, ...) with prod(...) == input_dim to logits (B, num_classes)."""
        images = x.reshape(x.shape[0], 1, self.side, self.side)  # (B, 1, S, S)
        return self.classifier(self.features(images))  # (B, 64·(S/4)²) -> (B, C)


def image_side(input_dim: int) -> int:
    """The side of the square image of `input_dim` pixels; ValueError where there is none."""
    side = math.isqrt(max(input_dim, 0))
    if side * side != input_dim or side < MIN_SIDE:
        raise ValueError(
            f"the cnn reads square one-channel images (side >= {MIN_SIDE}): {input_dim} input features "
            "are not the pixels of one (a 28×28 image has 784)"
        )
    return side
