"""A whole fine-tuning run on a collection: features of the labelled images, the splits,
training, and the saved encoder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lookalike.encoders.finetuned import (
    ENCODERS_DIR,
    BaseInfo,
    SavedEncoder,
    find_finetuned,
    finetuned_name,
    folder_name,
    install_finetuned,
    is_finetuned_name,
    load_saved,
    save_finetuned,
)
from lookalike.encoders.projection import HeadConfig, ProjectionHead
from lookalike.errors import FinetuneError
from lookalike.finetune.train import EpochCallback, TrainConfig, TrainResult, train_embedding

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.evaluation.datasets import ImageDataset
    from lookalike.labelled import LabelledFeatures

VALIDATION_SPLITS = ("validation", "val", "valid", "dev")
# Held out of the training images when the dataset has no validation split.
VALIDATION_FRACTION = 0.15

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Splits:
    """Training and validation rows (validation is used for early stopping only)."""

    train: LabelledFeatures
    validation: LabelledFeatures
    classes: list[str]
    validation_source: str  # the split's name, or "held out of <train split>"


def choose_splits(
    features: LabelledFeatures,
    *,
    train_split: str = "train",
    validation_split: str | None = None,
    seed: int = 0,
) -> Splits:
    """Train on ``train_split`` (every image when the dataset has no splits) and validate on
    ``validation_split`` (default: the first of validation/val/valid/dev present); without
    one, a stratified 15% of the training images is held out. Other splits (test) are never
    used. Validation images of classes absent from training are left out."""
    present = {s for s in features.splits.tolist() if s is not None}
    if not present:
        train, validation, source = *_hold_out(features, seed), "held out of the images"
    else:
        train = features.split(train_split)
        name = validation_split or next((s for s in VALIDATION_SPLITS if s in present), None)
        if name is not None:
            validation, source = features.split(name), name
        else:
            train, validation = _hold_out(train, seed)
            source = f"held out of {train_split}"
    classes = train.classes
    if len(classes) < 2:
        raise FinetuneError(f"fine-tuning needs at least 2 classes, training has {classes}")
    known = np.isin(validation.labels, classes)
    validation = validation.subset(known)
    if len(validation) == 0:
        raise FinetuneError("no validation image belongs to a training class")
    return Splits(train, validation, classes, source)


def _hold_out(features: LabelledFeatures, seed: int) -> tuple[LabelledFeatures, LabelledFeatures]:
    rng = np.random.default_rng(seed)
    held = np.zeros(len(features), dtype=bool)
    for label in features.classes:
        rows = np.flatnonzero(features.labels == label)
        count = round(len(rows) * VALIDATION_FRACTION)
        if len(rows) >= 2:
            held[rng.choice(rows, max(1, count), replace=False)] = True
    if held.all() or not held.any():
        raise FinetuneError("too few images to hold some out for validation")
    return features.subset(~held), features.subset(held)


@dataclass(frozen=True)
class FinetuneReport:
    """What a run trained and where it saved it."""

    encoder: SavedEncoder
    result: TrainResult
    splits: Splits
    base_key: str
    cache_seconds: float
    installed: Path | None

    @property
    def name(self) -> str:
        return self.encoder.name


def finetune_collection(
    collection_path: str | Path,
    dataset: ImageDataset,
    name: str,
    config: TrainConfig,
    *,
    dim: int = 128,
    hidden: int = 512,
    dropout: float = 0.2,
    unfreeze_last: int = 0,
    model: str | None = None,
    layer: str | None = None,
    train_split: str = "train",
    validation_split: str | None = None,
    runtime: str = "auto",
    db: str | None = None,
    install: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> FinetuneReport:
    """Train ``<base>+<name>`` on ``dataset`` and save it in the collection's ``encoders/``.

    The base is ``model`` (default: the collection's model, or the base of its fine-tuned
    model). The dataset's folder is indexed into the collection with the base first (only
    what is missing), and the collection's active model is left as it was. ``progress``
    gets (stage, done, total) for indexing and caching; ``on_epoch`` every epoch's report.
    ``install`` also copies the encoder to ``$LOOKALIKE_HOME/encoders``. ``db`` names the
    collection's catalog when it is not the folder's own (see :class:`Collection`).
    """
    from lookalike.core.collection import DEFAULT_MODEL, Collection
    from lookalike.labelled import labelled_features

    collection_path = Path(collection_path)
    with Collection(collection_path, db=db, runtime=runtime) as current:
        previous = (current.catalog.get_setting("model"), current.catalog.get_setting("layer"))
        base_model, base_layer = model or current.model_name, layer or current.layer
    if model is None and is_finetuned_name(base_model):
        saved_base = load_saved(find_finetuned(base_model, [collection_path / ENCODERS_DIR]))
        base_model, base_layer = saved_base.base.model, layer or saved_base.base.layer
    base_model = base_model or DEFAULT_MODEL
    full_name = finetuned_name(base_model, name)
    folder = collection_path / ENCODERS_DIR / folder_name(full_name)
    if folder.exists() and not overwrite:
        raise FinetuneError(f"{full_name} already exists in {folder.parent}; pass --overwrite")
    head_config = HeadConfig(in_dim=1, dim=dim, hidden=hidden, dropout=dropout)  # checks sizes

    with Collection(
        collection_path, db=db, model=base_model, layer=base_layer, runtime=runtime
    ) as coll:
        try:
            features = labelled_features(
                coll, dataset, progress=_stage(progress, "index") if progress else None
            )
            identity = coll.encoder.identity
            paths = _paths(coll, features) if unfreeze_last else {}
        finally:
            if previous[0] is not None and previous != (coll.model_name, coll.layer):
                coll.catalog.set_setting("model", previous[0])
                coll.catalog.set_setting("layer", previous[1] or base_layer)
    splits = choose_splits(
        features, train_split=train_split, validation_split=validation_split, seed=config.seed
    )
    train_y = splits.train.label_indices(splits.classes)
    val_y = splits.validation.label_indices(splits.classes)
    head = ProjectionHead(HeadConfig(identity.dim, head_config.dim, hidden, dropout))
    head.fit_input(splits.train.vectors)

    cache_started = time.perf_counter()
    backbone = None
    if unfreeze_last:
        from lookalike.encoders.efficientnet_lite import load_pretrained
        from lookalike.finetune.backbone import (
            BackboneTail,
            cache_activations,
            first_trained_stage,
            lite_variant,
        )

        variant = lite_variant(identity)
        network = load_pretrained(variant)
        stage = first_trained_stage(network, unfreeze_last)
        cache = _stage(progress, "cache") if progress else None
        all_paths = [paths[i] for i in splits.train.ids] + [paths[i] for i in splits.validation.ids]
        activations = cache_activations(network, variant, all_paths, stage, progress=cache)
        train_x, val_x = activations[: len(train_y)], activations[len(train_y) :]
        backbone = BackboneTail(network, stage, identity.pooling)
        model_to_train: torch.nn.Module = torch.nn.Sequential(backbone, head)
    else:
        train_x = torch.from_numpy(splits.train.vectors)
        val_x = torch.from_numpy(splits.validation.vectors)
        model_to_train = head
    cache_seconds = time.perf_counter() - cache_started

    result = train_embedding(
        model_to_train, train_x, train_y, val_x, val_y, config,
        embedding_dim=dim, backbone=backbone, progress=on_epoch,
    )  # fmt: skip
    training = {
        "config": config.to_dict(),
        "dataset": str(dataset.root),
        "classes": splits.classes,
        "train_images": len(splits.train),
        "validation_images": len(splits.validation),
        "validation": splits.validation_source,
        "best_epoch": result.best_epoch,
        "validation_map": result.best_validation_map,
        "history": [r.__dict__ for r in result.history],
        "seconds": result.seconds,
        "created_at": time.time(),
    }
    saved = save_finetuned(
        folder, full_name, BaseInfo.of(identity), head,
        backbone_state=backbone.trained_state() if backbone is not None else None,
        unfrozen_stages=unfreeze_last, training=training,
    )  # fmt: skip
    installed = install_finetuned(saved) if install else None
    return FinetuneReport(saved, result, splits, identity.key, cache_seconds, installed)


def _paths(collection: Collection, features: LabelledFeatures) -> dict[int, str]:
    records = collection.catalog.images(features.ids.tolist())
    return {int(i): records[int(i)].path for i in features.ids}


def _stage(progress: ProgressCallback, stage: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(stage, done, total)
