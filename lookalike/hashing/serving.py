"""Hash heads stored with a collection, and Hamming search over the codes of its images.

Layout: ``<collection>/hashing/<model key>/<name>.npz`` holds a head trained on that model's
vectors; ``<name>.codes.lkx`` beside it holds the packed codes of every image of the collection
(a ``binary:packed=true`` index). The codes file records the catalog state and the head's
fingerprint, so after images are added or removed, or the head is retrained, the codes are
recomputed from the stored vectors instead of being trusted. Heads of a model the collection no
longer uses stay in their own folder and are never applied to another model's vectors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.errors import (
    CorruptIndexError,
    EmptyCollectionError,
    HashingError,
    LookalikeError,
    VectorIndexError,
)
from lookalike.hashing import METHODS, TrainLog, train_head
from lookalike.hashing.evaluate import hamming_map
from lookalike.hashing.head import HashHead, l2_normalize
from lookalike.knn.base import Metric

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.core.derived import State
    from lookalike.core.results import SearchResponse, SearchResult
    from lookalike.evaluation.datasets import ImageDataset
    from lookalike.knn.binary import BinaryIndex

HASHING_FOLDER = "hashing"
HEAD_SUFFIX = ".npz"
CODES_SUFFIX = ".codes.lkx"
# Below this many codes numpy's exact popcount scan takes a few ms (ties in catalog order);
# above, faiss's SIMD scan: exact as well, ~11x faster at 1M codes (results/hashing.md).
FAISS_FROM = 20_000
_ENCODE_CHUNK = 65_536
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VALIDATION_SPLITS = ("validation", "val", "valid", "dev")


def default_name(method: str, bits: int) -> str:
    """The name a head is stored under unless given one: ``<method>-<bits>``."""
    return f"{method}-{bits}"


def check_name(name: str) -> str:
    """A head name: letters, digits, '.', '_' and '-', at most 64 characters."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(CODES_SUFFIX):
        raise HashingError(
            f"bad hash head name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)"
        )
    return name


def engine_for(n: int) -> str:
    """The binary index engine for n codes: numpy's scan when small, faiss's when large."""
    return "numpy" if n < FAISS_FROM else "faiss"


@dataclass(frozen=True)
class TrainedHead:
    """The outcome of :meth:`CollectionHashing.train`."""

    name: str
    path: Path
    head: HashHead
    log: TrainLog
    train_images: int
    validation_split: str | None = None
    validation_map: float | None = None


class CollectionHashing:
    """The hash heads of one collection and the Hamming search that serves them."""

    def __init__(self, collection: Collection) -> None:
        self.collection = collection

    @property
    def model_key(self) -> str:
        return self.collection.encoder.identity.key

    @property
    def folder(self) -> Path:
        """Where heads of the collection's current model live."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model_key)
        return self.collection.path / HASHING_FOLDER / safe

    def head_path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{HEAD_SUFFIX}"

    def codes_path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{CODES_SUFFIX}"

    # -- heads ------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the heads stored for the collection's current model, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(
            p.name[: -len(HEAD_SUFFIX)]
            for p in self.folder.glob(f"*{HEAD_SUFFIX}")
            if not p.name.endswith(".partial")
        )

    def save(self, head: HashHead, name: str) -> Path:
        """Store ``head`` under ``name`` (replacing any head of that name)."""
        head.check_model(self.model_key)
        return head.save(self.head_path(name))

    def load(self, name: str) -> HashHead:
        """The head stored under ``name``; ``HashingError`` names the stored ones if absent."""
        path = self.head_path(name)
        if not path.exists():
            stored = ", ".join(self.names()) or "none"
            raise HashingError(
                f"no hash head {name!r} for model {self.model_key} in this collection "
                f"(stored: {stored}); train one with 'lookalike hash train'"
            )
        head = HashHead.load(path)
        head.check_model(self.model_key)
        return head

    def train(
        self,
        dataset: ImageDataset,
        *,
        method: str,
        bits: int,
        name: str | None = None,
        split: str | None = "train",
        index_progress: Callable[[int, int], None] | None = None,
        train_progress: Callable[[int, int], None] | None = None,
        **options: Any,
    ) -> TrainedHead:
        """Train a head on the collection's vectors of a labelled dataset and store it.

        The dataset's folder is indexed into the collection first (only new files are
        embedded). With ``split`` set and present in the dataset, only that split trains; a
        dataset without splits trains on every image. When the dataset also has a validation
        split, the mAP of validation queries against the training images is measured.
        """
        from lookalike.labelled import labelled_features

        if method not in METHODS:
            raise HashingError(f"unknown hashing method {method!r}; expected one of {METHODS}")
        name = check_name(name or default_name(method, bits))
        features = labelled_features(self.collection, dataset, progress=index_progress)
        present = {s for s in features.splits.tolist() if s is not None}
        training = features.split(split) if split and present else features
        head, log = train_head(
            method,
            training.vectors,
            training.label_indices(features.classes),
            bits,
            features.model_key,
            progress=train_progress,
            **options,
        )
        validation = next((s for s in VALIDATION_SPLITS if s in present and s != split), None)
        score = None
        if validation is not None:
            queries = features.split(validation)
            score = hamming_map(
                head.encode(queries.vectors, model_key=features.model_key),
                queries.labels,
                head.encode(training.vectors, model_key=features.model_key),
                training.labels,
            )
        path = self.save(head, name)
        return TrainedHead(name, path, head, log, len(training), validation, score)

    # -- codes and search -------------------------------------------------------------------

    def code_index(self, name: str, head: HashHead | None = None) -> BinaryIndex:
        """The packed codes of every image, up to date with the catalog and the head (kept
        in the collection's derived-file store, like its vector indexes)."""
        head = head or self.load(name)
        return self.collection.derived.get(
            ("hash-codes", self.model_key, name, head.fingerprint),
            load=lambda state: self._load_codes(name, head, state),
            build=lambda state: self._rebuild_codes(name, head, state),
        )

    def _load_codes(self, name: str, head: HashHead, state: State) -> BinaryIndex | None:
        from lookalike.knn import load_index, read_index_header
        from lookalike.knn.binary import BinaryIndex

        path = self.codes_path(name)
        if not path.exists():
            return None
        try:
            meta = read_index_header(path).get("metadata", {})
            if not self.collection.derived.is_current(meta, state):
                return None
            if meta.get("head") != head.fingerprint:
                return None
            index = load_index(path)
        except (CorruptIndexError, VectorIndexError, OSError):
            return None  # recomputed from the stored vectors instead
        if not isinstance(index, BinaryIndex) or index.dim != head.bits:
            return None
        return index

    def _rebuild_codes(self, name: str, head: HashHead, state: State) -> BinaryIndex:
        from lookalike.knn.binary import BinaryIndex

        ids, vectors = self.collection.catalog.vectors(self.collection.model_id)
        index = BinaryIndex(dim=head.bits, packed=True, engine=engine_for(len(ids)))
        for start in range(0, len(ids), _ENCODE_CHUNK):
            chunk = slice(start, start + _ENCODE_CHUNK)
            index.add(ids[chunk], head.encode(vectors[chunk], model_key=self.model_key))
        metadata = {
            **self.collection.derived.stamp(state),
            "head": head.fingerprint,
            "model": self.model_key,
        }
        path = self.codes_path(name)
        # On a full disk the codes in memory still answer (the store logs a warning).
        self.collection.derived.save(path, lambda: index.save(path, metadata=metadata))
        return index

    def search(self, query: Any, *, name: str, k: int = 10, rerank: int = 0) -> SearchResponse:
        """The ``k`` images whose codes are nearest to the query image's code.

        Scores are Hamming distances (lower is better). ``rerank=n`` takes the ``n`` nearest
        codes and orders them by the cosine similarity of their stored float vectors to the
        query's (centred like the head's inputs); scores are then those similarities.
        """
        return self.search_vector(self.collection.embed(query), name=name, k=k, rerank=rerank)

    def search_vector(
        self, vector: np.ndarray, *, name: str, k: int = 10, rerank: int = 0
    ) -> SearchResponse:
        """Like :meth:`search` for a raw vector of the collection's encoder."""
        from lookalike.core.results import SearchResponse

        if k < 1:
            raise LookalikeError(f"k must be at least 1, got {k}")
        if rerank < 0:
            raise LookalikeError(f"rerank must be 0 or more, got {rerank}")
        head = self.load(name)
        index = self.code_index(name, head)
        if len(index) == 0:
            raise EmptyCollectionError("the collection has no indexed images yet")
        code = head.encode(vector, model_key=self.model_key)
        hits = index.search(code, max(k, rerank))
        ids, scores = hits.ids[0], hits.scores[0].astype(np.float64)
        valid = ids >= 0
        ids, scores = ids[valid], scores[valid]
        metric = Metric.HAMMING
        if rerank and len(ids):
            raw = self.collection.catalog.vectors_for(ids.tolist(), self.collection.model_id)
            centred = l2_normalize(head.preprocessing(raw))
            query = l2_normalize(head.preprocessing(np.asarray(vector).reshape(1, -1)))[0]
            scores = (centred @ query).astype(np.float64)
            order = np.argsort(-scores, kind="stable")
            ids, scores = ids[order], scores[order]
            metric = Metric.COSINE
        return SearchResponse(self._results(ids[:k], scores[:k]), metric)

    def _results(self, ids: np.ndarray, scores: np.ndarray) -> list[SearchResult]:
        from lookalike.core.results import SearchResult

        records = self.collection.catalog.images(ids.tolist())
        return [
            SearchResult.from_record(records[image_id], score)
            for image_id, score in zip(ids.tolist(), scores.tolist(), strict=True)
            if image_id in records
        ]
