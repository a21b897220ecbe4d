"""HashNet (Cao et al., ICCV 2017): a weighted pairwise likelihood loss on tanh(beta * z), with
beta raised during training (continuation) so that the tanh approaches the sign function."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


def hashnet_pair_loss(codes: torch.Tensor, similar: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weighted pairwise negative log-likelihood of the batch's relaxed codes ``codes``:

    l_ij = log(1 + exp(alpha <h_i, h_j>)) - alpha s_ij <h_i, h_j>, averaged over the
    off-diagonal pairs with weights |S|/|S1| (similar) and |S|/|S0| (dissimilar).
    """
    import torch

    inner = alpha * (codes @ codes.T)
    # softplus is log(1 + exp(x)) without overflow for large x
    return weighted_pair_mean(torch.nn.functional.softplus(inner) - similar * inner, similar)


@dataclass(frozen=True)
class Continuation:
    """beta = (1 + growth * epoch) ** power, raised at the start of every epoch (epoch 0 has
    beta 1): early epochs learn through a smooth tanh, late ones through a near-sign."""

    growth: float = 0.5
    power: float = 0.5

    def beta(self, epoch: int) -> float:
        return float((1.0 + self.growth * epoch) ** self.power)


def hashnet_loss(alpha: float, continuation: Continuation) -> PairLoss:
    """The training loss: tanh(beta(epoch) * z) fed to :func:`hashnet_pair_loss`."""
    import torch

    def loss(
        outputs: torch.Tensor, similar: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        beta = continuation.beta(epoch)
        return hashnet_pair_loss(torch.tanh(beta * outputs), similar, alpha), {"beta": beta}

    return loss


def train_hashnet(
    raw: np.ndarray,
    labels: np.ndarray,
    bits: int,
    model_key: str,
    *,
    alpha: float | None = None,
    continuation: Continuation | None = None,
    config: DeepConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[HashHead, TrainLog]:
    """Train a HashNet head; ``alpha`` (default 10 / bits) scales the inner products so that
    the likelihood's sigmoid is not saturated for any code length."""
    alpha = 10.0 / bits if alpha is None else float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise HashingError(f"alpha must be positive, got {alpha}")
    continuation = continuation or Continuation()
    options = {
        "alpha": alpha,
        "beta_growth": continuation.growth,
        "beta_power": continuation.power,
    }
    return train_deep_head(
        "hashnet",
        raw,
        labels,
        bits,
        model_key,
        hashnet_loss(alpha, continuation),
        config or DeepConfig(),
        options,
        progress,
    )
