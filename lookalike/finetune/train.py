"""The training loop: class-balanced batches, a metric loss, validation mAP after each epoch,
early stopping, and the best epoch's weights restored at the end."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lookalike.errors import FinetuneError
from lookalike.evaluation.metrics import mean_average_precision
from lookalike.finetune.losses import create_loss
from lookalike.finetune.mining import ClassBalancedSampler
from lookalike.hashing.training import torch_threads


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``margin`` and ``mining`` default to the loss's own defaults
    (contrastive: 2.0, hard; triplet: 0.2, batch-hard; ArcFace margin: 0.3)."""

    loss: str = "supcon"
    epochs: int = 30
    patience: int = 5
    learning_rate: float = 1e-3
    backbone_learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    classes_per_batch: int = 16
    per_class: int = 16
    margin: float | None = None
    mining: str | None = None
    temperature: float = 0.1
    scale: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise FinetuneError(f"epochs must be at least 1, got {self.epochs}")
        if self.patience < 1:
            raise FinetuneError(f"patience must be at least 1, got {self.patience}")
        if self.learning_rate <= 0 or self.backbone_learning_rate <= 0:
            raise FinetuneError("learning rates must be positive")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, saved with the trained encoder."""
        return asdict(self)


@dataclass(frozen=True)
class EpochReport:
    """One epoch: its mean training loss, the validation mAP after it, and its duration."""

    epoch: int
    epochs: int
    loss: float
    validation_map: float
    seconds: float
    best: bool


@dataclass
class TrainResult:
    """Every epoch's report, and which epoch's weights the model now holds."""

    history: list[EpochReport] = field(default_factory=list)
    best_epoch: int = 0
    best_validation_map: float = 0.0
    seconds: float = 0.0

    @property
    def stopped_early(self) -> bool:
        return bool(self.history) and self.history[-1].epoch < self.history[-1].epochs


EpochCallback = Callable[[EpochReport], None]


def embed_inputs(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """The model's embeddings of every input row, in eval mode, as float32 numpy."""
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            parts.append(model(inputs[start : start + batch_size].float()))
    return torch.cat(parts).numpy()


def validation_map(
    model: nn.Module,
    database: torch.Tensor,
    database_labels: np.ndarray,
    queries: torch.Tensor,
    query_labels: np.ndarray,
) -> float:
    """Class mAP of the queries against the database, by cosine, in the model's space."""
    database_vectors = embed_inputs(model, database)
    query_vectors = embed_inputs(model, queries)
    return mean_average_precision(query_vectors @ database_vectors.T, query_labels, database_labels)


def train_embedding(
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: np.ndarray,
    validation_inputs: torch.Tensor,
    validation_labels: np.ndarray,
    config: TrainConfig,
    *,
    embedding_dim: int,
    backbone: nn.Module | None = None,
    progress: EpochCallback | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Train ``model`` (inputs -> unit embeddings of ``embedding_dim``) in place and leave it
    holding the weights of the epoch with the best validation mAP (validation images as
    queries, training images as the database).

    ``train_labels`` and ``validation_labels`` are int class indices. ``backbone`` names a
    sub-module trained at ``config.backbone_learning_rate`` whose batch-norm statistics stay
    frozen (class-balanced batches are not the population they were measured on).
    Training stops early after ``config.patience`` epochs without a better validation mAP.

    ``threads`` sets torch's threads while training. The default is one for a head alone:
    its matrices are small, and extra threads only wait on each other (measured 20x slower
    with two threads on a busy two-core machine); with backbone stages, torch's default.
    """
    wanted = threads or (torch.get_num_threads() if backbone is not None else 1)
    with torch_threads(wanted):
        train_labels = np.asarray(train_labels, dtype=np.int64)
        validation_labels = np.asarray(validation_labels, dtype=np.int64)
        if len(validation_labels) == 0:
            raise FinetuneError("early stopping needs validation images; none were given")
        torch.manual_seed(config.seed)
        sampler = ClassBalancedSampler(
            train_labels,
            classes_per_batch=config.classes_per_batch,
            per_class=config.per_class,
            seed=config.seed,
        )
        loss_fn = create_loss(
            config.loss,
            num_classes=int(train_labels.max()) + 1,
            dim=embedding_dim,
            margin=config.margin,
            mining=config.mining,
            temperature=config.temperature,
            scale=config.scale,
        )
        trained = [p for p in backbone.parameters() if p.requires_grad] if backbone else []
        trained_ids = {id(p) for p in trained}
        head = [p for p in model.parameters() if p.requires_grad and id(p) not in trained_ids]
        groups = [{"params": head + list(loss_fn.parameters()), "lr": config.learning_rate}]
        if trained:
            groups.append({"params": trained, "lr": config.backbone_learning_rate})
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        labels_tensor = torch.from_numpy(train_labels)

        result = TrainResult()
        best_state = copy.deepcopy(model.state_dict())
        started = time.perf_counter()
        stale = 0
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            _train_mode(model, backbone)
            losses = []
            for batch in sampler.epoch():
                index = torch.from_numpy(batch)
                loss = loss_fn(model(train_inputs[index].float()), labels_tensor[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            score = validation_map(
                model, train_inputs, train_labels, validation_inputs, validation_labels
            )
            improved = epoch == 1 or score > result.best_validation_map + 1e-6
            if improved:
                result.best_epoch, result.best_validation_map = epoch, score
                best_state = copy.deepcopy(model.state_dict())
                stale = 0
            else:
                stale += 1
            report = EpochReport(
                epoch, config.epochs, float(np.mean(losses)), score,
                time.perf_counter() - epoch_start, improved,
            )  # fmt: skip
            result.history.append(report)
            if progress:
                progress(report)
            if stale >= config.patience:
                break
        model.load_state_dict(best_state)
        model.eval()
        result.seconds = time.perf_counter() - started
        return result


def _train_mode(model: nn.Module, backbone: nn.Module | None) -> None:
    model.train()
    if backbone is not None:
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
