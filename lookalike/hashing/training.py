"""The training loop shared by the deep methods: a small network on frozen features, trained
with a pairwise loss on random mini-batches, then exported as a numpy :class:`HashHead`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import HashingError
from lookalike.hashing.head import HashHead, Preprocessing

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DeepConfig:
    """Options of the network and its optimisation."""

    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 256  # width of the hidden layer; 0 makes the head a single linear layer
    dropout: float = 0.2
    seed: int = 0
    # Batches are small: one thread avoids the synchronisation cost that dominates with more,
    # most of all on a busy machine.
    threads: int = 1

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.hidden < 0 or self.threads < 1:
            raise HashingError(
                f"need epochs >= 1, batch size >= 2, hidden >= 0 and threads >= 1, got "
                f"{asdict(self)}"
            )
        if not 0 <= self.dropout < 1 or self.learning_rate <= 0:
            raise HashingError(f"need 0 <= dropout < 1 and learning rate > 0, got {asdict(self)}")


@dataclass
class TrainLog:
    """What happened during training: mean loss per epoch, and any schedule values per epoch."""

    losses: list[float] = field(default_factory=list)
    schedule: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0


# loss(outputs [B, bits], similar [B, B] in {0, 1}, epoch) -> (scalar loss, schedule values)
PairLoss = Callable[["torch.Tensor", "torch.Tensor", int], tuple["torch.Tensor", dict[str, float]]]


def balanced_pair_weights(similar: torch.Tensor) -> torch.Tensor:
    """HashNet's weights over the off-diagonal pairs of a batch: |S|/|S1| for similar pairs and
    |S|/|S0| for dissimilar ones, so both kinds weigh the same in total however rare similar
    pairs are; 0 on the diagonal. When one kind is absent every pair weighs 1."""
    import torch

    n = similar.shape[0]
    off_diagonal = 1.0 - torch.eye(n, dtype=similar.dtype, device=similar.device)
    positive = similar * off_diagonal
    negative = (1.0 - similar) * off_diagonal
    pairs = off_diagonal.sum()
    n_positive, n_negative = positive.sum(), negative.sum()
    if n_positive == 0 or n_negative == 0:
        return off_diagonal
    return positive * (pairs / n_positive) + negative * (pairs / n_negative)


def weighted_pair_mean(values: torch.Tensor, similar: torch.Tensor) -> torch.Tensor:
    """(1/|S|) * sum of w_ij * values_ij over the off-diagonal pairs, w from
    :func:`balanced_pair_weights`: the mean over similar pairs plus the mean over dissimilar."""
    weights = balanced_pair_weights(similar.to(values.dtype))
    n = similar.shape[0]
    return (weights * values).sum() / (n * (n - 1))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch on ``threads`` threads for a while, then restore the previous number."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _network(dim: int, bits: int, config: DeepConfig) -> torch.nn.Sequential:
    from torch import nn

    if config.hidden == 0:
        return nn.Sequential(nn.Dropout(config.dropout), nn.Linear(dim, bits))
    return nn.Sequential(
        nn.Dropout(config.dropout),
        nn.Linear(dim, config.hidden),
        nn.ReLU(),
        nn.Dropout(config.dropout),
        nn.Linear(config.hidden, bits),
    )


def train_deep_head(
    method: str,
    raw: np.ndarray,
    labels: np.ndarray,
    bits: int,
    model_key: str,
    loss: PairLoss,
    config: DeepConfig,
    options: dict[str, Any],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[HashHead, TrainLog]:
    """Train a head on raw vectors with integer class labels; return it and its log."""
    import torch

    config.check()
    raw = np.asarray(raw, dtype=np.float32)
    labels = np.asarray(labels)
    if raw.ndim != 2 or len(raw) != len(labels) or len(raw) < 2:
        raise HashingError(
            f"need at least 2 training vectors with one label each, got {raw.shape} vectors "
            f"and {labels.shape} labels"
        )
    if len(np.unique(labels)) < 2:
        raise HashingError("supervised hashing needs at least two distinct labels")
    started = time.perf_counter()
    with torch_threads(config.threads):
        preprocessing = Preprocessing.fit(raw)
        network, log = _optimise(preprocessing(raw), labels, bits, loss, config, progress)
    linears = [m for m in network if isinstance(m, torch.nn.Linear)]
    log.seconds = time.perf_counter() - started
    info = {
        **asdict(config),
        **options,
        "train_vectors": len(raw),
        "final_loss": log.losses[-1],
        "train_seconds": round(log.seconds, 3),
    }
    head = HashHead(
        method=method,
        bits=bits,
        model_key=model_key,
        preprocessing=preprocessing,
        weights=tuple(m.weight.detach().numpy().T.copy() for m in linears),
        biases=tuple(m.bias.detach().numpy().copy() for m in linears),
        info=info,
    )
    return head, log


def _optimise(
    inputs: np.ndarray,
    labels: np.ndarray,
    bits: int,
    loss: PairLoss,
    config: DeepConfig,
    progress: Callable[[int, int], None] | None,
) -> tuple[torch.nn.Sequential, TrainLog]:
    """Adam on random mini-batches; similar pairs are the pairs of rows with equal labels."""
    import torch

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    features = torch.from_numpy(inputs)
    targets = torch.from_numpy(np.unique(labels, return_inverse=True)[1].astype(np.int64))
    network = _network(inputs.shape[1], bits, config)
    optimizer = torch.optim.Adam(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    log = TrainLog()
    batch = min(config.batch_size, len(inputs))
    network.train()
    values: dict[str, float]
    for epoch in range(config.epochs):
        order = torch.from_numpy(rng.permutation(len(inputs)))
        total, batches, values = 0.0, 0, {}
        # Full batches only: a last batch of a few rows has too few pairs to learn from.
        for start in range(0, len(inputs) - batch + 1, batch):
            rows = order[start : start + batch]
            rows_labels = targets[rows]
            similar = (rows_labels[:, None] == rows_labels[None, :]).float()
            value, values = loss(network(features[rows]), similar, epoch)
            optimizer.zero_grad()
            value.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            optimizer.step()
            total += float(value.detach())
            batches += 1
        log.losses.append(total / max(batches, 1))
        for name, number in values.items():
            log.schedule.setdefault(name, []).append(number)
        if progress:
            progress(epoch + 1, config.epochs)
    network.eval()
    return network, log
