"""Deep Cauchy Hashing (Cao et al., CVPR 2018): a Cauchy cross-entropy on the pairwise Hamming
distances, which penalises similar pairs heavily beyond a small Hamming radius, plus a Cauchy
quantization loss pulling the outputs towards binary codes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lookalike.errors import HashingError
from lookalike.hashing.head import HashHead
from lookalike.hashing.training import (
    DeepConfig,
    PairLoss,
    TrainLog,
    train_deep_head,
    weighted_pair_mean,
)

if TYPE_CHECKING:
    import torch

# Cosine is capped below 1 so that the distance of a pair, and log(1 + gamma / d), stay finite.
MAX_COSINE = 0.99


def cauchy_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)]: the relaxed Hamming distance d = K/2 (1 - cos(a_i, b_j))."""
    bits = a.shape[1]
    norms = a.norm(dim=1, keepdim=True) @ b.norm(dim=1, keepdim=True).T
    cosine = (a @ b.T) / norms.clamp(min=1e-4)
    distance: torch.Tensor = bits / 2.0 * (1.0 - cosine.clamp(max=MAX_COSINE))
    return distance


def cauchy_cross_entropy(
    outputs: torch.Tensor, similar: torch.Tensor, gamma: float
) -> torch.Tensor:
    """With sigma(d) = gamma / (gamma + d) the probability that a pair is similar:
    l_ij = s_ij log(d_ij / gamma) + log(1 + gamma / d_ij), averaged over the off-diagonal pairs
    with HashNet's balancing weights."""
    import torch

    distance = cauchy_distance(outputs, outputs)
    values = similar * torch.log(distance / gamma) + torch.log1p(gamma / distance)
    return weighted_pair_mean(values, similar)


def cauchy_quantization(outputs: torch.Tensor, gamma: float) -> torch.Tensor:
    """mean_i log(1 + d(|z_i|, 1) / gamma): the distance of each output from the nearest
    binary code, measured like the pairs."""
    import torch

    distance = cauchy_distance(outputs.abs(), torch.ones_like(outputs[:1]))
    return torch.log1p(distance / gamma).mean()


def dch_loss(gamma: float, quantization: float) -> PairLoss:
    """The training loss: Cauchy cross-entropy + ``quantization`` (lambda) times the Cauchy
    quantization loss."""

    def loss(
        outputs: torch.Tensor, similar: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        value = cauchy_cross_entropy(outputs, similar, gamma)
        return value + quantization * cauchy_quantization(outputs, gamma), {}

    return loss


def train_dch(
    raw: np.ndarray,
    labels: np.ndarray,
    bits: int,
    model_key: str,
    *,
    gamma: float = 20.0,
    quantization: float = 0.1,
    config: DeepConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[HashHead, TrainLog]:
    """Train a DCH head with Cauchy scale ``gamma`` and quantization weight ``quantization``
    (the paper's lambda)."""
    if not math.isfinite(gamma) or gamma <= 0:
        raise HashingError(f"gamma must be positive, got {gamma}")
    if not math.isfinite(quantization) or quantization < 0:
        raise HashingError(f"the quantization weight must be 0 or more, got {quantization}")
    return train_deep_head(
        "dch",
        raw,
        labels,
        bits,
        model_key,
        dch_loss(gamma, quantization),
        config or DeepConfig(),
        {"gamma": gamma, "quantization": quantization},
        progress,
    )
