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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import numpy as np

from lookalike.catalog import Catalog, FileState, SqliteCatalog, open_catalog
from lookalike.core.check import CheckReport, check_collection
from lookalike.core.derived import AUTO, DerivedFileStore, VectorIndexes
from lookalike.core.ingest import (
    DEFAULT_MAX_FILE_BYTES,
    EncoderRecipe,
    IndexReport,
    IngestExecutor,
    IngestJob,
    IngestPipeline,
    ProgressCallback,
    ScanRules,
    ThreadExecutor,
    content_hash,
    decode_file,
    embed_batch,
    scan_images,
)
from lookalike.core.local_store import LocalFeatureStore
from lookalike.core.locations import CATALOG_FILE, CATALOG_LINK, default_collection_dir
from lookalike.core.metadata import match_metadata, read_metadata_csv
from lookalike.core.models import (
    DEFAULT_MODEL,
    SWITCH_SETTING,
    ModelChoice,
    ModelView,
    active_choice,
    pending_switch,
    requested_choice,
)
from lookalike.core.pgvector import is_catalog_spec, resolve_spec
from lookalike.core.results import SearchResponse, SearchResult
from lookalike.core.search import Query, SearchArgs, Searcher, search_options
from lookalike.core.transform import WHITENING_SETTING, PreparedIndex, parse_whitening
from lookalike.encoders.base import Encoder
from lookalike.errors import ImageError, LookalikeError, NotAnImageError
from lookalike.images import ImageSource, load_image
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

# The text model paired with the image model for text queries (hf:<id or folder>), if any.
TEXT_MODEL_SETTING = "text_model"


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
    # recall@10 of the cosine index as measured when it was tuned (``auto``), 1.0 for exact
    # search, None when unknown (another spec, or not built since the last change)
    index_recall: float | None = None
    index_tuning: dict[str, Any] | None = None  # lookalike.knn.tuning.Tuning as JSON


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

    ``precision`` (fp32, bf16 or auto) is the arithmetic of the vectors, chosen like the
    model: a new collection takes ``auto`` (bf16 where the CPU runs it natively, about twice
    as fast), records what it took, and keeps it; naming another one later is a model switch.
    ``runtime`` only says where the encoder runs and never changes the vectors.

    ``text_model`` (remembered; ``"none"`` forgets it) embeds text queries instead of the image
    model: a sentence-transformers model trained into its space, e.g. a multilingual one for a
    CLIP collection (:mod:`lookalike.encoders.text`).
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
        precision: str | None = None,
        runtime: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        encoder: Encoder | None = None,
        text_model: str | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.catalog = _open_catalog(self.path, db)
        settings = self.catalog.get_setting
        self._runtime_options: dict[str, Any] = {
            "runtime": runtime,
            "device": device,
            "threads": threads,
        }
        active = active_choice(self.catalog)
        requested = requested_choice(
            active, model=model, layer=layer, pooling=pooling, scales=scales, precision=precision
        )
        if active is None:
            # A new collection: the model asked for is active from the start.
            self._active = self._view(requested, encoder=encoder)
            self._target: ModelView | None = None
        else:
            legacy = settings("pooling") is None
            self._active = self._view(
                active, legacy_pooling=legacy, legacy_precision=settings("precision") is None
            )
            if requested != active:
                self._target = self._view(requested, encoder=encoder)
            else:
                pending = pending_switch(self.catalog)
                self._target = self._view(pending) if pending else None
                if encoder is not None:
                    self._active.use_encoder(encoder)
        self._checked_generation = self.catalog.generation
        # An index this catalog cannot hold (pgvector on SQLite) fails now, before anything
        # is remembered, not at the first search.
        spec = self._checked_spec(index_spec or settings("index_spec") or AUTO, whitening)
        if index_spec is not None and not is_catalog_spec(index_spec):
            from lookalike.knn import parse_auto, parse_spec

            if parse_auto(index_spec) is None:  # a bad spec fails now, not at the first search
                parse_spec(index_spec)
        if index_spec is not None:
            self.catalog.set_setting("index_spec", index_spec)
        if whitening is not None:
            self.catalog.set_setting(WHITENING_SETTING, str(parse_whitening(whitening)))
        self._text_models: dict[str, Any] = {}
        self._text_override: str | None = None
        self._paired: tuple[Encoder, str, Encoder] | None = None
        if text_model is not None:
            try:
                self._remember_text_model(text_model)
            except BaseException:
                self.catalog.close()  # the caller never gets this object to close
                raise
        self.derived = DerivedFileStore(self.catalog, self.path)
        self.indexes = VectorIndexes(
            self.derived,
            self.catalog.vectors,
            spec=spec,
            whitening=parse_whitening(settings(WHITENING_SETTING)),
        )
        self.local_store = LocalFeatureStore(self.catalog)

    def _checked_spec(self, spec: str, whitening: int | None) -> str:
        """``spec`` as the indexes take it (``pgvector``/``shared`` resolved against this
        catalog, with the whitening asked for or remembered); one the catalog cannot hold
        raises ``IndexSpecError``, closing the catalog (the caller never gets this object)."""
        if whitening is None:
            whitening = parse_whitening(self.catalog.get_setting(WHITENING_SETTING))
        try:
            return resolve_spec(spec, self.catalog, whitening=parse_whitening(whitening))
        except BaseException:
            self.catalog.close()
            raise

    def use_index(self, spec: str | None) -> None:
        """Search with index ``spec`` in this object only, not remembered (None: the
        remembered one again), e.g. ``pgvector`` to search inside a PostgreSQL catalog; one
        this catalog cannot hold raises ``IndexSpecError``."""
        configured = spec or self.catalog.get_setting("index_spec") or AUTO
        resolved = resolve_spec(configured, self.catalog, whitening=self.indexes.whitening)
        if not is_catalog_spec(configured):
            from lookalike.knn import parse_auto, parse_spec

            if parse_auto(configured) is None:
                parse_spec(configured)
        self.indexes.forget()
        self.indexes.spec = resolved

    def close(self) -> None:
        """Release the catalog connection."""
        self.catalog.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the model ----------------------------------------------------------------------

    def _view(
        self,
        choice: ModelChoice,
        *,
        legacy_pooling: bool = False,
        legacy_precision: bool = False,
        encoder: Encoder | None = None,
    ) -> ModelView:
        return ModelView(
            choice,
            self.catalog,
            self.path,
            self._runtime_options,
            legacy_pooling=legacy_pooling,
            legacy_precision=legacy_precision,
            encoder=encoder,
        )

    @property
    def model_name(self) -> str:
        """The registry name of the model searches use."""
        return self._active.choice.name

    @property
    def layer(self) -> str:
        return self._active.choice.layer

    @property
    def pooling(self) -> str | None:
        return self._active.choice.pooling

    @property
    def scales(self) -> str | None:
        return self._active.choice.scales

    @property
    def switching_to(self) -> ModelChoice | None:
        """The model this collection is switching to (built by ``index``), if any."""
        return self._target.choice if self._target is not None else None

    @property
    def encoder(self) -> Encoder:
        """The encoder searches use, built on first use (it loads a model)."""
        return self._active.encoder

    def use_encoder(self, encoder: Encoder) -> None:
        """Use an already built encoder for the model this collection indexes next (the
        target of a switch, else the active model)."""
        (self._target or self._active).use_encoder(encoder)

    def encoder_recipe(self) -> EncoderRecipe:
        """How to build the active encoder, here or in another process."""
        return self._active.recipe()

    def encoder_options(self) -> dict[str, Any]:
        """The options the active encoder is built with (those its family takes)."""
        return self._active.options()

    @property
    def model_id(self) -> int:
        """Catalog id of the active encoder identity (a new collection records it as its
        model on first use)."""
        model_id = self._active.model_id
        if active_choice(self.catalog) is None:
            self._record_active(self._active)
        return model_id

    def _record_active(self, view: ModelView) -> None:
        """Make ``view`` the active model in one catalog transaction (which also ends a
        switch to it); other processes follow at their next ``refresh``."""
        view.choice = view.resolved()
        values: dict[str, str | None] = dict(view.choice.settings())
        values[SWITCH_SETTING] = None
        self.catalog.set_settings(values)

    def refresh(self) -> bool:
        """Follow a model switch made by another process (a finished ``index --model``):
        when the catalog names another active model, searches use it from now on. Cheap when
        nothing was written. Returns whether the model changed."""
        generation = self.catalog.generation
        if generation == self._checked_generation:
            return False
        self._checked_generation = generation
        active = active_choice(self.catalog)
        if active is None or active == self._active.choice:
            return False
        self._active = self._view(
            active, legacy_precision=self.catalog.get_setting("precision") is None
        )
        self._target = None
        self.indexes.forget()
        return True

    # -- the parts --------------------------------------------------------------------------

    @property
    def text_model(self) -> str | None:
        """The text model text queries use (``use_text_model``'s, else the remembered one),
        or None: the image model embeds text itself, if it can."""
        return self._text_override or self.catalog.get_setting(TEXT_MODEL_SETTING) or None

    def use_text_model(self, name: str | None) -> None:
        """Embed text queries with text model ``name`` in this object only (not remembered);
        None goes back to the remembered one. It is built now, and a dimension mismatch with
        the image model is a ``ModelMismatchError`` now."""
        if name:
            self._paired_encoder(self.encoder, name, check=True)
        self._text_override = name or None

    def _remember_text_model(self, name: str) -> None:
        if name.strip().lower() in ("", "none"):
            self.catalog.set_settings({TEXT_MODEL_SETTING: None})
            return
        # Checked against the model being indexed now, not at the first text search.
        self._paired_encoder((self._target or self._active).encoder, name, check=True)
        self.catalog.set_setting(TEXT_MODEL_SETTING, name)

    def _paired_encoder(self, encoder: Encoder, name: str, *, check: bool = False) -> Encoder:
        """``encoder`` with text model ``name``, built once per collection object: now with
        ``check``, else at the first text query (image queries never wait for it)."""
        from lookalike.encoders.text import TextPairedEncoder, create_text_model

        if self._paired is None or self._paired[0] is not encoder or self._paired[1] != name:

            def build() -> Any:
                if name not in self._text_models:
                    device = self._runtime_options["device"]
                    self._text_models[name] = create_text_model(name, device=device)
                return self._text_models[name]

            self._paired = (encoder, name, TextPairedEncoder(encoder, build))
        paired = self._paired[2]
        if check:
            assert isinstance(paired, TextPairedEncoder)
            _ = paired.text_model
        return paired

    def _query_encoder(self) -> Encoder:
        """The encoder queries use: the active one, paired with the text model if any."""
        name = self.text_model
        return self._paired_encoder(self.encoder, name) if name else self.encoder

    @property
    def searcher(self) -> Searcher:
        """The query path over this collection's active model."""
        return Searcher(
            encoder=self._query_encoder(),
            catalog=self.catalog,
            model_id=self.model_id,
            index_for=self.vector_index,
            local_store=self.local_store,
        )

    def _pipeline(self, view: ModelView) -> IngestPipeline:
        return IngestPipeline(
            self.catalog,
            self.indexes,
            self.local_store,
            model_id=view.model_id,
            model_key=view.encoder.identity.key,
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
        follow_symlinks: bool = True,
        max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
        rules: ScanRules | None = None,
    ) -> IndexReport:
        """Bring the collection in line with ``folder``: embed new and changed images, drop
        deleted ones, keep the rest. Entries that cannot be indexed never stop the run: they
        are listed with the reason in the report's ``failed`` and in ``info`` (files that do
        not decode, dangling symlinks, symlink loops, FIFOs and devices, files larger than
        ``max_file_bytes``, None for no limit). Symlinks to files and folders are followed
        unless ``follow_symlinks=False`` (then they are listed as not followed).

        ``rules`` (:class:`ScanRules`) says what is left out on purpose, listed in the
        report's ``skipped``: by default hidden files and folders, system folders (``.git``,
        ``@eaDir``...), RAW files with a JPEG beside them, and the patterns of the folder's
        ``.lookalikeignore``; images above its megapixel cap are listed in ``failed``. A file
        indexed before and skipped now is removed, as if deleted.

        ``local_features=True`` also stores local features of every image (SIFT, or patch
        tokens with a ViT-family encoder), for ``search(..., rerank=n)``; the choice is
        remembered, so ``None`` keeps what the collection was last told. Images indexed before
        without them are decoded again once to add them.

        ``executor`` decodes and embeds elsewhere (e.g. :class:`lookalike.distributed.
        RayExecutor`); by default ``workers`` threads decode here. The catalog is written
        here either way.
        """
        started = time.perf_counter()
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise LookalikeError(f"{folder}: not a folder")
        if batch_size < 1:
            raise LookalikeError(f"batch size must be at least 1, got {batch_size}")
        if self._target is None:
            _ = self.model_id  # a new collection records its model now
        view = self._target or self._active
        if self._target is not None:
            # Recorded first, so a run killed before the switch completes resumes it.
            self.catalog.set_setting(SWITCH_SETTING, self._target.choice.to_json())
        encoder = view.encoder
        local = self.local_store.choose(local_features, encoder)
        report = IndexReport()

        rules = rules or ScanRules()
        scan = scan_images(
            root, follow_symlinks=follow_symlinks, max_file_bytes=max_file_bytes, rules=rules
        )
        report.skipped = scan.skipped
        on_disk = scan.files
        prefix = str(root) + os.sep
        known = self.catalog.file_states(prefix)
        self.indexes.load_existing(encoder.identity.key, encoder.dim)
        report.moved = self._record_moves(known, on_disk)
        gone = [state.id for path, state in known.items() if path not in on_disk]
        report.removed = self._remove_ids(gone)
        # Failures of files gone are forgotten; those of the scan are recorded again now, and
        # files read below forget theirs when they are stored.
        still_failing = {path for path, _ in scan.failed}
        self.catalog.clear_failures(
            p
            for p, _ in self.catalog.failures()
            if p.startswith(prefix) and p not in on_disk and p not in still_failing
        )
        pipeline = self._pipeline(view)
        pipeline.record_failures(scan.failed, report)
        missing_vectors = dict(self.catalog.ids_missing_vectors(view.model_id))
        missing = set(missing_vectors) | self.local_store.missing()
        todo = []
        for path, stat in on_disk.items():
            state = known.get(path)
            if state is None or _changed(state, stat) or state.id in missing:
                todo.append(path)
            else:
                report.unchanged += 1
        if self._target is not None:
            # A switch covers every image of the collection, also those of other folders.
            elsewhere = [p for p in missing_vectors.values() if not p.startswith(prefix)]
            todo += [p for p in elsewhere if os.path.isfile(p)]

        executor = executor or ThreadExecutor(workers)
        job = IngestJob(todo, encoder, view.recipe(), local, batch_size, rules.max_pixels)
        batches = executor.batches(job)
        pipeline.run(batches, known, report, local=local, total=len(todo), progress=progress)
        report.thumbnails = self.fill_thumbnails(on_disk, workers=workers)
        if self._target is not None:
            report.switch = self._finish_switch()
        if metadata_csv is not None:
            self.import_metadata(metadata_csv)
        report.seconds = time.perf_counter() - started
        return report

    def add_file(self, path: str | Path, *, metadata: dict[str, Any] | None = None) -> int:
        """Index one image file (or re-index it if it changed) and return its catalog id.

        Raises ``ImageError`` naming the file when it cannot be decoded; nothing is stored then.
        """
        resolved = str(Path(path).resolve())
        _ = self.model_id  # a new collection records its model now
        encoder = self.encoder
        local = self.local_store.choose(None, encoder)
        decoded = decode_file(resolved, encoder.preprocess, local.sift if local else None)
        if decoded.error is not None:
            raise NotAnImageError(resolved, decoded.error)
        known = self.catalog.file_states(resolved)
        self.indexes.load_existing(encoder.identity.key, encoder.dim)
        pipeline = self._pipeline(self._active)
        (image_id,) = pipeline.store(
            embed_batch(encoder, [decoded], local), known, IndexReport(), local
        )
        self.indexes.flush()
        if metadata:
            self.catalog.update_metadata(image_id, metadata)
        return image_id

    def index_files(
        self,
        paths: Sequence[str | Path],
        *,
        batch_size: int = 32,
        workers: int | None = None,
        progress: ProgressCallback | None = None,
        executor: IngestExecutor | None = None,
        rules: ScanRules | None = None,
    ) -> IndexReport:
        """Embed the given files (new ones, or changed ones again: a catalogued path keeps
        its id) with the model searches use, through the same pipeline as :meth:`index`,
        one transaction per batch. Files that cannot be indexed are listed in the report's
        ``failed`` and in ``info``; of ``rules`` only the megapixel cap applies (the caller
        chose the files). ``watch`` uses this."""
        started = time.perf_counter()
        todo = [os.fspath(p) for p in paths]
        _ = self.model_id  # a new collection records its model now
        view = self._active
        encoder = view.encoder
        local = self.local_store.choose(None, encoder)
        ids = self.catalog.ids_for_paths(todo)
        records = self.catalog.images(list(ids.values()))
        known = {r.path: FileState(i, r.size, r.mtime, r.content_hash) for i, r in records.items()}
        self.indexes.load_existing(encoder.identity.key, encoder.dim)
        report = IndexReport()
        executor = executor or ThreadExecutor(workers)
        cap = (rules or ScanRules()).max_pixels
        job = IngestJob(todo, encoder, view.recipe(), local, batch_size, max_pixels=cap)
        self._pipeline(view).run(
            executor.batches(job), known, report, local=local, total=len(todo), progress=progress
        )
        report.seconds = time.perf_counter() - started
        return report

    def fill_thumbnails(self, paths: Iterable[str], *, workers: int | None = None) -> int:
        """Store the thumbnail (for the search's pixel check) of each catalogued image of
        ``paths`` that lacks one, reading just the file: an image indexed before lookalike
        kept thumbnails is not embedded again for it. Files that cannot be read are left
        without (a later run tries again). Returns how many were stored."""
        from concurrent.futures import ThreadPoolExecutor

        wanted = set(paths)
        todo = [(i, p) for i, p in self.local_store.missing_thumbnails() if p in wanted]
        if not todo:
            return 0
        workers = min(os.cpu_count() or 1, 4) if workers is None else max(1, workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="lookalike-thumbnail") as pool:
            made = list(pool.map(_thumbnail_of_file, [p for _, p in todo]))
        ids = [i for (i, _), data in zip(todo, made, strict=True) if data is not None]
        data = [d for d in made if d is not None]
        self.local_store.save_thumbnails(ids, data, {})
        return len(ids)

    def _record_moves(self, known: dict[str, FileState], on_disk: dict[str, os.stat_result]) -> int:
        """Find files renamed or moved within the folder since the last run (while no watcher
        ran) and move their catalog entries instead of removing and embedding them again.

        A vanished file and a new one are the same file when their sizes agree and the new
        file's bytes hash to the stored content hash; only new files whose size matches a
        vanished one are read. ``known`` is updated in place. Returns how many moved."""
        gone: dict[tuple[int, str], list[str]] = {}
        sizes = {state.size for path, state in known.items() if path not in on_disk}
        if not sizes:
            return 0
        for path, state in known.items():
            if path not in on_disk:
                gone.setdefault((state.size, state.content_hash), []).append(path)
        moves: dict[str, str] = {}
        for path, stat in on_disk.items():
            if path in known or stat.st_size not in sizes:
                continue
            digest = content_hash(path)
            candidates = gone.get((stat.st_size, digest or ""))
            if candidates:
                moves[candidates.pop()] = path
        if not moves:
            return 0
        moved = self.move_files(moves)
        for old, new in moves.items():
            state = known.pop(old)
            stat = on_disk[new]
            if new in moved:
                # A copy-then-delete gives the file a new mtime: record it, so the next run
                # sees the file unchanged.
                self.catalog.touch(state.id, stat.st_size, stat.st_mtime)
                known[new] = FileState(state.id, stat.st_size, stat.st_mtime, state.content_hash)
        return len(moved)

    def move_files(self, moves: dict[str, str]) -> dict[str, int]:
        """Record files renamed on disk, old path -> new path: each keeps its id, vectors,
        local features and metadata, with nothing embedded again (see
        :meth:`~lookalike.catalog.Catalog.move_paths`). Returns new path -> id of the images
        moved; a catalogued image at a new path that is not moved away too is replaced."""
        leaving = self.catalog.ids_for_paths(old for old, new in moves.items() if old != new)
        replaced = self.catalog.ids_for_paths(
            moves[old] for old in leaving if moves[old] not in leaving
        )
        if replaced:
            # Loaded first, so the replacement updates the index files instead of a rebuild.
            self.indexes.load_existing(self.encoder.identity.key, self.encoder.dim)
        before, written = self.catalog.state, self.catalog.last_written_state
        moved = self.catalog.move_paths(moves)
        if self.catalog.last_written_state != written:  # images were replaced
            self.indexes.apply(
                "",
                before=before,
                after=self.catalog.last_written_state,
                changes=1,
                removed=np.asarray(list(replaced.values()), dtype=np.int64),
            )
            self.indexes.flush()
        return moved

    def _finish_switch(self) -> str:
        """Make the switch target active if it covers every image: "done", else "pending"
        (the old model keeps answering; the next ``index`` run goes on)."""
        target = self._target
        assert target is not None
        if self.catalog.ids_missing_vectors(target.model_id):
            return "pending"
        previous = self._active
        self._record_active(target)  # one transaction: the new model answers from now on
        self._active, self._target = target, None
        if previous.choice != target.choice:
            self.catalog.drop_vectors_except(target.model_id)
            self.indexes.forget()
        self._checked_generation = self.catalog.generation
        return "done"

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
        # Loaded first, so the removal updates the index files instead of forcing a rebuild.
        self.indexes.load_existing(self.encoder.identity.key, self.encoder.dim)
        removed = self._remove_ids(ids)
        self.indexes.flush()
        return removed

    def _remove_ids(self, ids: list[int]) -> int:
        """Remove images from the catalog and from every loaded index (whichever model: a
        removal applies to all, so it needs no encoder)."""
        before = self.catalog.state
        removed = self.catalog.remove(ids)
        self.indexes.apply(
            "",
            before=before,
            after=self.catalog.last_written_state if removed else None,
            changes=1 if removed else 0,
            removed=np.asarray(ids, dtype=np.int64),
        )
        return removed

    # -- search ---------------------------------------------------------------------------

    def embed(self, query: ImageSource) -> np.ndarray:
        """The raw vector of one image, as stored for indexed images."""
        vector: np.ndarray = self.encoder.embed([query])[0]
        return vector

    def search(self, query: ImageSource, **options: Unpack[SearchArgs]) -> SearchResponse:
        """The ``k`` indexed images most like ``query`` (any image, indexed or not); the
        options (``k``, ``metric``, ``threshold``, ``where``, ``query_expansion``,
        ``rerank``, ``multi_crop``, ``copy_views``, ``copies``) are
        :class:`~lookalike.core.search.SearchOptions`'. ``copies=True`` returns only verified
        copies of ``query``, each with ``copy_probability`` and ``transform``."""
        return self.searcher.search_image(query, search_options(**options))

    def search_many(
        self,
        positives: Sequence[ImageSource] = (),
        *,
        negatives: Sequence[ImageSource] = (),
        text: str | None = None,
        weights: Sequence[float] | None = None,
        **options: Unpack[SearchArgs],
    ) -> SearchResponse:
        """The ``k`` indexed images most like a combined query: several ``positives``,
        ``negatives`` to move away from, and a ``text`` (encoders with
        ``capabilities.text`` only), weighted by ``weights`` in that order (default all 1).
        The query vector is the weighted sum of the parts' L2-normalised vectors, negatives
        subtracted, renormalised; filters, threshold and query expansion apply to it,
        re-ranking compares with the first positive, and ``multi_crop`` needs a query of
        one image. Bad weights or an empty query raise ``RequestError``."""
        query = Query.of(positives, negatives=negatives, text=text, weights=weights)
        return self.searcher.search_query(query, search_options(**options))

    def search_text(self, text: str, **options: Unpack[SearchArgs]) -> SearchResponse:
        """The ``k`` indexed images that best match a text query, by cosine. Needs an encoder
        that embeds text into its image space (``encoder.capabilities.text``, e.g. a CLIP
        model); others raise ``EncoderError``."""
        return self.searcher.search_text(text, search_options(**options))

    def search_vector(self, vector: np.ndarray, **options: Unpack[SearchArgs]) -> SearchResponse:
        """Like ``search`` for a raw vector of this collection's encoder."""
        vector = np.asarray(vector, dtype=np.float32)
        return self.searcher.search_views(vector, search_options(**options))

    def vector_index(self, metric: str | Metric = Metric.COSINE) -> PreparedIndex:
        """The index used to search this collection's vectors by ``metric``, up to date with
        the catalog (loaded from its file, or rebuilt when that file is stale or corrupt)."""
        identity = self.encoder.identity
        return self.indexes.get(self.model_id, identity.key, identity.dim, Metric.parse(metric))

    # -- information ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.catalog.count()

    def check(
        self, repair: bool = False, *, progress: ProgressCallback | None = None
    ) -> CheckReport:
        """Verify the whole collection (the catalog file, vector checksums, derived files,
        files changed on disk) and, with ``repair``, repair what can be: see
        :mod:`lookalike.core.check`."""
        return check_collection(self, repair=repair, progress=progress)

    def info(self) -> CollectionInfo:
        """Counts, the active model, and files that failed to index."""
        models = self.catalog.models()
        active = next(
            (m for m in models if m["name"] == self.model_name and m["layer"] == self.layer), None
        )
        if active is None and models:
            # An hf: model is stored under its checkpoint's name and its real layer, not the
            # name the user typed: ask the encoder for its catalog id (this loads it).
            active = next((m for m in models if m["id"] == self.model_id), None)
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
            **self._index_measure(active),
        )

    def _index_measure(self, model: dict[str, Any] | None) -> dict[str, Any]:
        """``index_recall`` and ``index_tuning`` of the active model's cosine index."""
        if model is None:
            return {}
        recall, tuning = self.indexes.tuning(model["key"], Metric.COSINE)
        return {
            "index_recall": recall,
            "index_tuning": None if tuning is None else tuning.to_json(),
        }


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


# Thumbnails are made from a decode of at least this many pixels a side (JPEG draft mode):
# plenty for a 32-pixel thumbnail, and what ingest's decode for the encoder gives.
_THUMBNAIL_DRAFT = 256


def _thumbnail_of_file(path: str) -> bytes | None:
    """The serialised thumbnail of an image file, or None when it cannot be read."""
    from lookalike.local.pixels import Thumbnail

    try:
        return Thumbnail.of(load_image(path, draft_size=_THUMBNAIL_DRAFT)).to_bytes()
    except (ImageError, OSError):
        return None
