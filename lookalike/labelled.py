"""Labelled features: a labelled dataset's images joined with the vectors a collection stores.

Training commands (hash heads, fine-tuned projection heads) learn from the features the
collection already holds, so they never decode an image twice: the dataset's folder is indexed
into the collection first (incrementally, so a second run embeds nothing), then every labelled
file is looked up in the catalog by path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.errors import LookalikeError

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.evaluation.datasets import ImageDataset


@dataclass(frozen=True)
class LabelledFeatures:
    """Raw vectors of labelled images, row-aligned with their catalog ids, labels and splits."""

    ids: np.ndarray  # int64 [n], catalog ids
    vectors: np.ndarray  # float32 [n, dim], raw as the collection stores them
    labels: np.ndarray  # object [n], label strings
    splits: np.ndarray  # object [n], split name or None
    model_key: str  # identity of the encoder that produced the vectors

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def classes(self) -> list[str]:
        """The labels present, sorted."""
        return sorted(set(self.labels.tolist()))

    def label_indices(self, classes: list[str] | None = None) -> np.ndarray:
        """int64 [n]: each row's label as a position in ``classes`` (default: ``self.classes``).

        Raises ``LookalikeError`` when a row's label is not in ``classes``.
        """
        classes = self.classes if classes is None else classes
        position = {label: i for i, label in enumerate(classes)}
        try:
            return np.array([position[label] for label in self.labels], dtype=np.int64)
        except KeyError as error:
            raise LookalikeError(f"label {error.args[0]!r} is not one of {classes}") from None

    def subset(self, mask: np.ndarray) -> LabelledFeatures:
        """The rows where ``mask`` is true (a boolean array or positions)."""
        return LabelledFeatures(
            self.ids[mask], self.vectors[mask], self.labels[mask], self.splits[mask], self.model_key
        )

    def split(self, name: str) -> LabelledFeatures:
        """The rows of one split; raises ``LookalikeError`` when the split has no rows."""
        mask = np.array([s == name for s in self.splits], dtype=bool)
        if not mask.any():
            present = sorted({s for s in self.splits.tolist() if s is not None})
            raise LookalikeError(f"no images in split {name!r}; the dataset has {present}")
        return self.subset(mask)


def labelled_features(
    collection: Collection,
    dataset: ImageDataset,
    *,
    index_missing: bool = True,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> LabelledFeatures:
    """The collection's vectors of every image in ``dataset``, with the dataset's labels.

    With ``index_missing`` the dataset's root folder is indexed into the collection first
    (only new or changed files are embedded). Files that could not be decoded are left out;
    raises ``LookalikeError`` when no labelled image has a vector.
    """
    if index_missing:
        collection.index(dataset.root, batch_size=batch_size, progress=progress)
    resolved = [str(Path(p).resolve()) for p in dataset.paths]
    found = collection.catalog.ids_for_paths(resolved)
    rows = [i for i, path in enumerate(resolved) if path in found]
    if not rows:
        raise LookalikeError(
            f"none of the {len(dataset)} labelled images of {dataset.root} is in the collection "
            f"at {collection.path}; index the folder first"
        )
    ids = np.array([found[resolved[i]] for i in rows], dtype=np.int64)
    vectors = collection.catalog.vectors_for(ids.tolist(), collection.model_id)
    labels = np.array([dataset.labels[i] for i in rows], dtype=object)
    splits = np.array([dataset.splits[i] for i in rows], dtype=object)
    return LabelledFeatures(ids, vectors, labels, splits, collection.encoder.identity.key)
