"""A collection: a catalog of images, the encoder that embeds them, and search over them.

:class:`Collection` is a façade. The work is done by parts with narrow interfaces: the
catalog, the encoder (built by name through the registry), :class:`~lookalike.core.ingest.
IngestPipeline` for writes, :class:`~lookalike.core.search.Searcher` for queries,
:class:`~lookalike.core.derived.DerivedFileStore` for index files, and
:class:`~lookalike.core.local_store.LocalFeatureStore` for local features.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.catalog import Catalog, FileState, SqliteCatalog, open_catalog
from lookalike.core.derived import AUTO, DerivedFileStore, VectorIndexes
from lookalike.core.filters import Where
from lookalike.core.ingest import (
    EncoderRecipe,
    IndexReport,
    IngestExecutor,
    IngestPipeline,
    ProgressCallback,
    ThreadExecutor,
    decode_file,
    embed_batch,
    scan_folder,
)
from lookalike.core.local_store import LocalFeatureStore
from lookalike.core.metadata import match_metadata, read_metadata_csv
from lookalike.core.results import SearchResponse, SearchResult
from lookalike.core.search import Searcher, SearchOptions
from lookalike.core.transform import WHITENING_SETTING, PreparedIndex, parse_whitening
from lookalike.encoders.base import Encoder
from lookalike.encoders.registry import accepted_options, supported_options
from lookalike.errors import LookalikeError, NotAnImageError
from lookalike.images import ImageSource
from lookalike.knn.base import Metric

__all__ = [
    "CATALOG_FILE",
    "CATALOG_LINK",
    "DEFAULT_MODEL",
    "Collection",
    "CollectionInfo",
    "SearchResponse",
    "SearchResult",
    "default_collection_dir",
]

DEFAULT_MODEL = "efficientnet-lite0"
DEFAULT_LAYER = "head"
DEFAULT_POOLING = "gem"
CATALOG_FILE = "catalog.sqlite"
# Names the catalog a collection folder uses when it is not the folder's own SQLite file.
CATALOG_LINK = "catalog.url"
# Fine-tuned encoders saved with a collection live here (looked for before the user's own).
ENCODERS_DIR = "encoders"


def default_collection_dir(name: str = "default") -> Path:
    """Where a named collection lives: $LOOKALIKE_HOME/NAME, else ~/.local/share/lookalike/NAME."""
    home = os.environ.get("LOOKALIKE_HOME")
    if home:
        return Path(home) / name
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "lookalike" / name


@dataclass(frozen=True)
class CollectionInfo:
    """A summary for ``lookalike info``."""

    path: str
    images: int
    model: str
    layer: str
    dim: int
    models: list[dict[str, Any]]
    failures: list[tuple[str, str]]
    schema_version: int
    index_spec: str


class Collection:
    """Images, their vectors and metadata in one folder, searchable by image or text.

    The encoder is chosen when the collection is first indexed and remembered; passing another
    ``model`` or ``layer`` later switches the collection to it (the next ``index`` run embeds
    every image again with it). Vectors of different models are stored apart and never mixed.

    ``db`` puts the catalog elsewhere: a ``postgresql://`` URL (a database that several
    servers share), a SQLite file, or an opened :class:`~lookalike.catalog.Catalog`, which the
    collection then owns. The folder keeps the index files and remembers the catalog (without
    its password) in ``catalog.url``, so later opens without ``db`` find it again.

    ``encoder`` uses an already built encoder (it must be the one ``model`` names).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        db: str | Path | Catalog | None = None,
        model: str | None = None,
        layer: str | None = None,
        index_spec: str | None = None,
        whitening: int | None = None,
        pooling: str | None = None,
        scales: str | None = None,
        runtime: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        encoder: Encoder | None = None,
    ) -> None:
        self.path = Path(path)
        self.catalog = _open_catalog(self.path, db)
        settings = self.catalog.get_setting
        self.model_name = model or settings("model") or DEFAULT_MODEL
        self.layer = layer or settings("layer") or DEFAULT_LAYER
        self.pooling = pooling or settings("pooling") or None
        self.scales = scales or settings("scales") or None
        if index_spec is not None and index_spec != AUTO:
            from lookalike.knn import parse_spec

            parse_spec(index_spec)  # a bad spec fails now, not at the first search
        if index_spec is not None:
            self.catalog.set_setting("index_spec", index_spec)
        if whitening is not None:
            self.catalog.set_setting(WHITENING_SETTING, str(parse_whitening(whitening)))
        self.derived = DerivedFileStore(self.catalog, self.path)
        self.indexes = VectorIndexes(
            self.derived,
            self.catalog.vectors,
            spec=settings("index_spec") or AUTO,
            whitening=parse_whitening(settings(WHITENING_SETTING)),
        )
        self.local_store = LocalFeatureStore(self.catalog)
        self._runtime_options: dict[str, Any] = {
            "runtime": runtime,
            "device": device,
            "threads": threads,
        }
        self._encoder: Encoder | None = encoder
        self._model_id: int | None = None

    def close(self) -> None:
        """Release the catalog connection."""
        self.catalog.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the encoder ----------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """The collection's encoder, built on first use (it loads a model)."""
        if self._encoder is None:
            self._encoder = self.encoder_recipe().build()
        return self._encoder

    def encoder_recipe(self) -> EncoderRecipe:
        """How to build this collection's encoder, here or in another process."""
        return EncoderRecipe(self.model_name, self.encoder_options())

    def encoder_options(self) -> dict[str, Any]:
        """The options this collection's encoder is built with (those its family takes)."""
        wanted: dict[str, Any] = {
            "layer": self.layer,
            # Raw vectors are stored; cosine search normalises, so both views stay available.
            "normalize": False,
            "pooling": self.pooling or self._default_pooling(),
            "scales": self.scales,
            "search_dirs": [self.path / ENCODERS_DIR],
            **self._runtime_options,
        }
        return supported_options(self.model_name, wanted)

    def _default_pooling(self) -> str | None:
        """GeM for a new collection whose encoder takes a pooling (it measured better on
        class-level and copy-detection retrieval at the same cost, see
        benchmarks/results/features.md); average pooling for one indexed before pooling was
        an option, so its stored vectors stay valid."""
        accepted = accepted_options(self.model_name)
        if accepted is not None and "pooling" not in accepted:
            return None
        return "avg" if self.catalog.get_setting("model") else DEFAULT_POOLING

    @property
    def model_id(self) -> int:
        """Catalog id of the active encoder identity; makes it the collection's active model."""
        if self._model_id is None:
            identity = self.encoder.identity
            self._model_id = self.catalog.register_model(identity)
            self.catalog.set_setting("model", self.model_name)
            self.catalog.set_setting("layer", self.layer)
            if "pooling" in self.encoder_options():
                self.catalog.set_setting("pooling", identity.pooling)
            if self.scales is not None:
                self.catalog.set_setting("scales", self.scales)
        return self._model_id

    # -- the parts --------------------------------------------------------------------------

    @property
    def searcher(self) -> Searcher:
        """The query path over this collection's active model."""
        return Searcher(
            encoder=self.encoder,
            catalog=self.catalog,
            model_id=self.model_id,
            index_for=self.vector_index,
            local_store=self.local_store,
        )

    def _pipeline(self) -> IngestPipeline:
        return IngestPipeline(
            self.catalog,
            self.indexes,
            self.local_store,
            model_id=self.model_id,
            model_key=self.encoder.identity.key,
        )

    # -- indexing -------------------------------------------------------------------------

    def index(
        self,
        folder: str | Path,
        *,
        batch_size: int = 32,
        workers: int | None = None,
        metadata_csv: str | Path | None = None,
        progress: ProgressCallback | None = None,
        local_features: bool | None = None,
        executor: IngestExecutor | None = None,
    ) -> IndexReport:
        """Bring the collection in line with ``folder``: embed new and changed images, drop
        deleted ones, keep the rest. Unreadable files are skipped and listed in the report.

        ``local_features=True`` also stores local features of every image (SIFT, or patch
        tokens with a ViT-family encoder), for ``search(..., rerank=n)``; the choice is
        remembered, so ``None`` keeps what the collection was last told. Images indexed before
        without them are decoded again once to add them.

        ``executor`` decodes and embeds elsewhere (e.g. :class:`lookalike.distributed.
        RayExecutor`); by default ``workers`` threads decode here. The catalog is written
        here either way.
        """
        started = time.perf_counter()
        root = Path(folder).resolve()
        if not root.is_dir():
            raise LookalikeError(f"{folder}: not a folder")
        if batch_size < 1:
            raise LookalikeError(f"batch size must be at least 1, got {batch_size}")
        encoder = self.encoder
        model_id = self.model_id
        local = self.local_store.choose(local_features, encoder)
        report = IndexReport()

        on_disk = {str(p): p.stat() for p in scan_folder(root)}
        prefix = str(root) + os.sep
        known = self.catalog.file_states(prefix)
        self.indexes.load_existing(encoder.identity.key, encoder.dim)
        gone = [state.id for path, state in known.items() if path not in on_disk]
        report.removed = self._remove_ids(gone)
        self.catalog.clear_failures(
            p for p, _ in self.catalog.failures() if p.startswith(prefix) and p not in on_disk
        )
        missing = {i for i, _ in self.catalog.ids_missing_vectors(model_id)}
        missing |= self.local_store.missing()
        todo = []
        for path, stat in on_disk.items():
            state = known.get(path)
            if state is None or _changed(state, stat) or state.id in missing:
                todo.append(path)
            else:
                report.unchanged += 1

        executor = executor or ThreadExecutor(workers)
        batches = executor.batches(
            todo,
            encoder=encoder,
            recipe=self.encoder_recipe(),
            local=local,
            batch_size=batch_size,
        )
        self._pipeline().run(
            batches, known, report, local=local, total=len(todo), progress=progress
        )
        if metadata_csv is not None:
            self.import_metadata(metadata_csv)
        report.seconds = time.perf_counter() - started
        return report

    def add_file(self, path: str | Path, *, metadata: dict[str, Any] | None = None) -> int:
        """Index one image file (or re-index it if it changed) and return its catalog id.

        Raises ``ImageError`` naming the file when it cannot be decoded; nothing is stored then.
        """
        resolved = str(Path(path).resolve())
        encoder = self.encoder
        local = self.local_store.choose(None, encoder)
        decoded = decode_file(resolved, encoder.preprocess, local.sift if local else None)
        if decoded.error is not None:
            raise NotAnImageError(resolved, decoded.error)
        known = self.catalog.file_states(resolved)
        self.indexes.load_existing(encoder.identity.key, encoder.dim)
        pipeline = self._pipeline()
        (image_id,) = pipeline.store(
            embed_batch(encoder, [decoded], local), known, IndexReport(), local
        )
        self.indexes.flush()
        if metadata:
            self.catalog.update_metadata(image_id, metadata)
        return image_id

    def import_metadata(self, csv_path: str | Path, *, key: str | None = None) -> int:
        """Attach CSV columns to images whose relative path or file name is in the key column.
        Returns how many images received metadata."""
        matched = match_metadata(self.catalog.paths(), read_metadata_csv(csv_path, key=key))
        for image_id, metadata in matched.items():
            self.catalog.update_metadata(image_id, metadata)
        return len(matched)

    def remove(self, targets: Sequence[int | str | Path]) -> int:
        """Remove images by catalog id or file path; returns how many were removed."""
        ids = [t for t in targets if isinstance(t, int)]
        paths = [str(Path(t).resolve()) for t in targets if not isinstance(t, int)]
        ids += self.catalog.ids_for_paths(paths).values()
        self.indexes.load_existing(self.encoder.identity.key, self.encoder.dim)
        removed = self._remove_ids(ids)
        self.indexes.flush()
        return removed

    def _remove_ids(self, ids: list[int]) -> int:
        before = self.catalog.generation
        removed = self.catalog.remove(ids)
        self.indexes.apply(
            self.encoder.identity.key,
            before=before,
            after=self.catalog.last_written_generation if removed else None,
            changes=1 if removed else 0,
            removed=np.asarray(ids, dtype=np.int64),
        )
        return removed

    # -- search ---------------------------------------------------------------------------

    def embed(self, query: ImageSource) -> np.ndarray:
        """The raw vector of one image, as stored for indexed images."""
        return self.encoder.embed([query])[0]

    def search(
        self,
        query: ImageSource,
        *,
        k: int = 10,
        metric: str | Metric = Metric.COSINE,
        threshold: float | None = None,
        where: Where | None = None,
        query_expansion: int = 0,
        rerank: int = 0,
        multi_crop: bool = False,
    ) -> SearchResponse:
        """The ``k`` indexed images most like ``query`` (any image, indexed or not); see
        :class:`~lookalike.core.search.SearchOptions` for the options."""
        options = SearchOptions(
            k=k,
            metric=Metric.parse(metric),
            threshold=threshold,
            where=where,
            query_expansion=query_expansion,
            rerank=rerank,
            multi_crop=multi_crop,
        )
        return self.searcher.search_image(query, options)

    def search_text(
        self,
        text: str,
        *,
        k: int = 10,
        threshold: float | None = None,
        where: Where | None = None,
        query_expansion: int = 0,
    ) -> SearchResponse:
        """The ``k`` indexed images that best match a text query, by cosine. Needs an encoder
        that embeds text into its image space (``encoder.capabilities.text``, e.g. a CLIP
        model); others raise ``EncoderError``."""
        options = SearchOptions(
            k=k, threshold=threshold, where=where, query_expansion=query_expansion
        )
        return self.searcher.search_text(text, options)

    def search_vector(
        self,
        vector: np.ndarray,
        *,
        k: int = 10,
        metric: str | Metric = Metric.COSINE,
        threshold: float | None = None,
        where: Where | None = None,
        query_expansion: int = 0,
    ) -> SearchResponse:
        """Like ``search`` for a raw vector of this collection's encoder."""
        options = SearchOptions(
            k=k,
            metric=Metric.parse(metric),
            threshold=threshold,
            where=where,
            query_expansion=query_expansion,
        )
        return self.searcher.search_views(np.asarray(vector, dtype=np.float32), options)

    def vector_index(self, metric: str | Metric = Metric.COSINE) -> PreparedIndex:
        """The index used to search this collection's vectors by ``metric``, up to date with
        the catalog (loaded from its file, or rebuilt when that file is stale or corrupt)."""
        identity = self.encoder.identity
        return self.indexes.get(self.model_id, identity.key, identity.dim, Metric.parse(metric))

    # -- information ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.catalog.count()

    def info(self) -> CollectionInfo:
        """Counts, the active model, and files that failed to index."""
        models = self.catalog.models()
        active = next(
            (m for m in models if m["name"] == self.model_name and m["layer"] == self.layer), None
        )
        return CollectionInfo(
            path=str(self.path),
            images=self.catalog.count(),
            model=self.model_name,
            layer=self.layer,
            dim=active["dim"] if active else 0,
            models=models,
            failures=self.catalog.failures(),
            schema_version=self.catalog.schema_version,
            index_spec=self.indexes.spec,
        )


def _open_catalog(folder: Path, db: str | Path | Catalog | None) -> Catalog:
    """The catalog of the collection in ``folder``: ``db``, else the one the folder links
    to, else the folder's own SQLite file."""
    link = folder / CATALOG_LINK
    if db is None:
        if not link.is_file():
            return SqliteCatalog(folder / CATALOG_FILE)
        db = link.read_text(encoding="utf-8").strip()
    catalog = open_catalog(db) if isinstance(db, str | Path) else db
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not link.is_file() or link.read_text(encoding="utf-8").strip() != catalog.location:
            link.write_text(catalog.location + "\n", encoding="utf-8")
    except OSError as error:
        catalog.close()
        raise LookalikeError(f"{folder}: cannot hold the collection ({error})") from error
    return catalog


def _changed(state: FileState, stat: os.stat_result) -> bool:
    return state.size != stat.st_size or state.mtime != stat.st_mtime
