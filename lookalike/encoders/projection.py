"""The projection head: base features in, a unit-length embedding of ``dim`` values out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lookalike.errors import FinetuneError


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a projection head. ``hidden=0`` makes it linear; otherwise one hidden layer
    (batch norm, ReLU, dropout) of that width, which measured well above a linear head on
    clothing-small (see benchmarks/results/finetune.md)."""

    in_dim: int
    dim: int = 128
    hidden: int = 512
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.in_dim < 1 or self.dim < 1 or self.hidden < 0:
            raise FinetuneError(f"head sizes must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise FinetuneError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, saved next to the weights."""
        return asdict(self)


class ProjectionHead(nn.Module):
    """Standardise the input with the training set's statistics, project, L2-normalise.

    The statistics are buffers, so they travel with the weights and the head needs nothing
    else to reproduce its vectors.
    """

    input_mean: torch.Tensor  # buffers, registered in __init__
    input_scale: torch.Tensor

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("input_mean", torch.zeros(config.in_dim))
        self.register_buffer("input_scale", torch.ones(config.in_dim))
        layers: list[nn.Module] = []
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
        if config.hidden:
            layers += [
                nn.Linear(config.in_dim, config.hidden),
                nn.BatchNorm1d(config.hidden),
                nn.ReLU(),
            ]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            layers.append(nn.Linear(config.hidden, config.dim))
        else:
            layers.append(nn.Linear(config.in_dim, config.dim))
        self.layers = nn.Sequential(*layers)

    def fit_input(self, features: np.ndarray) -> None:
        """Set the standardisation from training features (float [n, in_dim])."""
        features = np.asarray(features, dtype=np.float64)
        self.input_mean.copy_(torch.from_numpy(features.mean(0)).float())
        self.input_scale.copy_(torch.from_numpy(1.0 / (features.std(0) + 1e-6)).float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.input_mean) * self.input_scale
        return F.normalize(self.layers(x), dim=1)
