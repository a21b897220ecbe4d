"""Metric-learning losses on a batch of embeddings and their integer labels.

Every loss is a ``torch.nn.Module`` called as ``loss(embeddings, labels)``; ArcFace owns
trainable class centres, which is why they are modules. Embeddings reach the losses already
L2-normalised by the projection head, so Euclidean distances lie in [0, 2].
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lookalike.errors import FinetuneError
from lookalike.finetune import LOSSES
from lookalike.finetune.mining import (
    label_masks,
    mine_pairs,
    mine_triplets,
    pairwise_distances,
)


class ContrastiveLoss(nn.Module):
    """Hadsell, Chopra & LeCun (2006): mean of ``d^2 / 2`` over positive pairs plus mean of
    ``max(0, margin - d)^2 / 2`` over (mined) negative pairs, ``d`` the Euclidean distance.

    On unit-length embeddings the default margin of 2.0 (the Siamese networks' usual value)
    pushes every negative pair apart, as far as the sphere allows.
    """

    def __init__(self, margin: float = 2.0, mining: str = "hard") -> None:
        super().__init__()
        if margin <= 0:
            raise FinetuneError(f"the contrastive margin must be positive, got {margin}")
        mine_pairs(torch.zeros(2, 2), torch.tensor([0, 1]), mining)  # reject a bad name now
        self.margin = margin
        self.mining = mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distances = pairwise_distances(embeddings)
        positives, negatives = mine_pairs(distances, labels, self.mining)
        terms = []
        if len(positives):
            terms.append(distances[positives[:, 0], positives[:, 1]].pow(2).mean() / 2)
        if len(negatives):
            d = distances[negatives[:, 0], negatives[:, 1]]
            terms.append(F.relu(self.margin - d).pow(2).mean() / 2)
        return torch.stack(terms).sum() if terms else embeddings.sum() * 0.0


class TripletLoss(nn.Module):
    """Mean of ``max(0, d(a, p) - d(a, n) + margin)`` over mined triplets (see
    :func:`~lookalike.finetune.mining.mine_triplets` for the mining strategies)."""

    def __init__(self, margin: float = 0.2, mining: str = "batch-hard") -> None:
        super().__init__()
        if margin <= 0:
            raise FinetuneError(f"the triplet margin must be positive, got {margin}")
        mine_triplets(torch.zeros(2, 2), torch.tensor([0, 1]), mining, margin)
        self.margin = margin
        self.mining = mining

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distances = pairwise_distances(embeddings)
        triplets = mine_triplets(distances, labels, self.mining, self.margin)
        if not len(triplets):
            return embeddings.sum() * 0.0
        a, p, n = triplets.unbind(1)
        return F.relu(distances[a, p] - distances[a, n] + self.margin).mean()


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form): for each anchor,
    minus the mean over its positives of ``log softmax(sim / temperature)`` over all other
    items, averaged over anchors that have a positive."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise FinetuneError(f"the temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(embeddings, dim=1)
        logits = unit @ unit.T / self.temperature
        positive, _ = label_masks(labels)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        logits = logits.masked_fill(eye, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        counts = positive.sum(1)
        has_positive = counts > 0
        if not has_positive.any():
            return embeddings.sum() * 0.0
        per_anchor = log_prob.masked_fill(~positive, 0.0).sum(1) / counts.clamp(min=1)
        return -per_anchor[has_positive].mean()


class ArcFaceLoss(nn.Module):
    """Additive angular margin (Deng et al. 2019): cross-entropy over ``scale * cos`` of the
    angle to learned class centres, with ``margin`` added to the angle of the true class.

    Where ``theta + margin`` would pass pi the logit falls back to ``cos(theta) - m sin(m)``,
    which keeps it monotonic in theta (the reference implementation's rule).
    """

    def __init__(
        self, num_classes: int, dim: int, *, margin: float = 0.3, scale: float = 30.0
    ) -> None:
        super().__init__()
        if not 0 <= margin < math.pi / 2:
            raise FinetuneError(f"the ArcFace margin must be in [0, pi/2), got {margin}")
        if scale <= 0:
            raise FinetuneError(f"the ArcFace scale must be positive, got {scale}")
        self.margin = margin
        self.scale = scale
        self.centres = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.centres)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[n, classes] scaled logits with the margin applied to each item's true class."""
        cosine = F.normalize(embeddings, dim=1) @ F.normalize(self.centres, dim=1).T
        cosine = cosine.clamp(-1.0, 1.0)
        true = cosine.gather(1, labels[:, None])
        sine = (1.0 - true.pow(2)).clamp(min=0.0).sqrt()
        with_margin = true * math.cos(self.margin) - sine * math.sin(self.margin)
        fallback = true - math.sin(math.pi - self.margin) * self.margin
        with_margin = torch.where(true > math.cos(math.pi - self.margin), with_margin, fallback)
        return self.scale * cosine.scatter(1, labels[:, None], with_margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels)


def create_loss(
    name: str,
    *,
    num_classes: int,
    dim: int,
    margin: float | None = None,
    mining: str | None = None,
    temperature: float = 0.1,
    scale: float = 30.0,
) -> nn.Module:
    """A loss by name; ``margin`` and ``mining`` default to each loss's own defaults."""
    if name == "contrastive":
        return ContrastiveLoss(2.0 if margin is None else margin, mining or "hard")
    if name == "triplet":
        return TripletLoss(0.2 if margin is None else margin, mining or "batch-hard")
    if mining is not None:
        raise FinetuneError(f"--mining applies to the contrastive and triplet losses, not {name}")
    if name == "supcon":
        if margin is not None:
            raise FinetuneError("supcon has no margin; it has a temperature")
        return SupConLoss(temperature)
    if name == "arcface":
        return ArcFaceLoss(num_classes, dim, margin=0.3 if margin is None else margin, scale=scale)
    raise FinetuneError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
