"""What a metric-learning batch is made of: class-balanced batches, and the pairs and triplets
mined from them.

Every miner works on a batch's [n x n] distance matrix and its labels, and returns index
tensors, so the losses stay plain formulas over the mined items.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lookalike.errors import FinetuneError
from lookalike.finetune import PAIR_MINING, TRIPLET_MINING


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """[n, d] -> [n, n] Euclidean distances, with a gradient that stays finite at zero."""
    squared = (embeddings[:, None, :] - embeddings[None, :, :]).pow(2).sum(-1)
    return squared.clamp(min=1e-12).sqrt()


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean [n, n] masks; an item is never its own positive."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def mine_pairs(
    distances: torch.Tensor, labels: torch.Tensor, mining: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive pairs, negative pairs), each a [m, 2] tensor of (anchor, other) indices.

    ``all`` keeps every ordered pair. ``hard`` keeps every positive pair and, per anchor, only
    its closest negatives, as many as it has positives (at least one): the negatives that
    still look alike, instead of the many easy ones that would dilute the loss.
    """
    if mining not in PAIR_MINING:
        raise FinetuneError(f"unknown pair mining {mining!r}; choose one of {PAIR_MINING}")
    positive, negative = label_masks(labels)
    positives = positive.nonzero()
    if mining == "all":
        return positives, negative.nonzero()
    masked = distances.detach().masked_fill(~negative, float("inf"))
    order = masked.argsort(dim=1)
    wanted = positive.sum(1).clamp(min=1)
    ranks = torch.arange(len(labels), device=labels.device)[None, :]
    keep = (ranks < wanted[:, None]) & torch.isfinite(masked.gather(1, order))
    anchors = torch.arange(len(labels), device=labels.device)[:, None].expand_as(order)
    return positives, torch.stack([anchors[keep], order[keep]], dim=1)


def mine_triplets(
    distances: torch.Tensor, labels: torch.Tensor, mining: str, margin: float
) -> torch.Tensor:
    """[m, 3] (anchor, positive, negative) index triplets.

    - ``batch-hard`` (Hermans et al. 2017): per anchor, its farthest positive and closest
      negative;
    - ``semi-hard`` (Schroff et al. 2015): per positive pair, the closest negative that is
      farther than the positive (the margin may still be violated); when there is none, the
      farthest negative;
    - ``all``: every valid triplet.
    Anchors without a positive or a negative in the batch are skipped.
    """
    if mining not in TRIPLET_MINING:
        raise FinetuneError(f"unknown triplet mining {mining!r}; choose one of {TRIPLET_MINING}")
    positive, negative = label_masks(labels)
    d = distances.detach()
    if mining == "batch-hard":
        valid = positive.any(1) & negative.any(1)
        hardest_positive = d.masked_fill(~positive, -1.0).argmax(1)
        hardest_negative = d.masked_fill(~negative, float("inf")).argmin(1)
        anchors = valid.nonzero().squeeze(1)
        return torch.stack([anchors, hardest_positive[anchors], hardest_negative[anchors]], dim=1)
    pairs = positive.nonzero()
    pairs = pairs[negative[pairs[:, 0]].any(1)]
    if mining == "all":
        anchor, other = pairs[:, 0], pairs[:, 1]
        candidates = negative[anchor]
        rows, negatives = candidates.nonzero(as_tuple=True)
        return torch.stack([anchor[rows], other[rows], negatives], dim=1)
    anchor, other = pairs[:, 0], pairs[:, 1]
    to_negatives = d[anchor]  # [pairs, n]
    d_positive = d[anchor, other][:, None]
    is_negative = negative[anchor]
    farther = is_negative & (to_negatives > d_positive)
    closest_farther = to_negatives.masked_fill(~farther, float("inf")).argmin(1)
    farthest = to_negatives.masked_fill(~is_negative, -1.0).argmax(1)
    chosen = torch.where(farther.any(1), closest_farther, farthest)
    return torch.stack([anchor, other, chosen], dim=1)


class ClassBalancedSampler:
    """Batches of ``classes_per_batch`` classes x ``per_class`` items each.

    Metric losses need positives and negatives in every batch, which plain shuffling does not
    guarantee for small classes. Each class's items are shuffled and taken in turn (wrapping
    around when a class runs out), so small classes are seen more often than once per epoch
    and large ones are still covered over epochs. An epoch has as many batches as the data
    has items / batch size (at least one).
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        classes_per_batch: int = 16,
        per_class: int = 16,
        seed: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        classes, inverse = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise FinetuneError(
                f"metric learning needs at least 2 classes, the training data has {len(classes)}"
            )
        if classes_per_batch < 2 or per_class < 2:
            raise FinetuneError("a batch needs at least 2 classes and 2 items of each")
        self.members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self.classes_per_batch = min(classes_per_batch, len(classes))
        self.per_class = per_class
        self.rng = np.random.default_rng(seed)
        self._queues = [self.rng.permutation(m) for m in self.members]
        self._cursor = [0] * len(self.members)
        self.batches_per_epoch = max(1, len(labels) // (self.classes_per_batch * per_class))

    def _take(self, label: int) -> np.ndarray:
        taken: list[int] = []
        while len(taken) < self.per_class:
            queue = self._queues[label]
            if self._cursor[label] >= len(queue):
                self._queues[label] = queue = self.rng.permutation(self.members[label])
                self._cursor[label] = 0
            start = self._cursor[label]
            step = min(self.per_class - len(taken), len(queue) - start)
            taken.extend(queue[start : start + step].tolist())
            self._cursor[label] += step
        return np.array(taken, dtype=np.int64)

    def epoch(self) -> Iterator[np.ndarray]:
        """The batches of one epoch, as index arrays into the training items."""
        for _ in range(self.batches_per_epoch):
            chosen = self.rng.choice(len(self.members), self.classes_per_batch, replace=False)
            yield np.concatenate([self._take(int(c)) for c in chosen])
