"""Verifying a whole collection, and repairing what can be (``lookalike check [--repair]``).

What is checked:

* the catalog itself (:meth:`Catalog.integrity`: SQLite's page-level check of its file);
* every stored vector of every model against its checksum (:meth:`Catalog.verify_vectors`),
  and images that lack a vector of the active model (searches cannot find them);
* every derived file under the collection folder (vector indexes under ``indexes/``, hash
  codes under ``hashing/``): every byte against its checksums, and its stamp against the
  catalog (a stale file is only a note: it is rebuilt on next use), plus temporary files a
  killed writer left behind;
* every indexed file on disk: changed since it was indexed (size or modification time differ
  from the catalog's), missing, or unreadable.

What ``repair`` does: corrupt vectors are dropped (:meth:`Catalog.drop_vectors`) and, for
the active model, embedded again right away from their files through the ingest pipeline,
as are changed files and images lacking vectors; images whose file is gone are removed
(when the folder that held them is still there: an unmounted disk is not taken for deleted
files); corrupt, stale and temporary derived files are deleted and the active model's
indexes rebuilt. A catalog file with damaged pages is not written at all (that could spread
the damage): restoring a backup is the fix. Nothing here prints: the report says it all.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lookalike.catalog import Catalog, FileState
from lookalike.catalog.base import checksum_summary
from lookalike.core.derived import DerivedFileStore, VectorIndexes
from lookalike.core.ingest import (
    EncoderRecipe,
    IndexReport,
    IngestJob,
    IngestPipeline,
    ProgressCallback,
    ThreadExecutor,
)
from lookalike.core.local_store import LocalFeatureStore
from lookalike.core.transform import PreparedIndex
from lookalike.encoders.base import Encoder
from lookalike.errors import CatalogError, LookalikeError, VectorIndexError
from lookalike.knn._format import verify_index_file
from lookalike.knn.base import Metric

__all__ = ["CATALOG", "DERIVED", "FILE", "VECTORS", "CheckReport", "Finding", "check_collection"]

# What a finding is about.
CATALOG = "catalog"  # the catalog's database file
VECTORS = "vectors"  # stored vectors of one model
DERIVED = "derived"  # a derived file (index, hash codes) or a temporary file beside them
FILE = "file"  # an indexed image file on disk

REPAIR_HINT = "run `lookalike check --repair`"
_VECTOR_METRICS = (Metric.COSINE, Metric.EUCLIDEAN, Metric.DOT)
_SHOWN_IDS = 10


class CheckedCollection(Protocol):
    """What checking needs of a collection (:class:`~lookalike.core.collection.Collection`)."""

    @property
    def path(self) -> Path: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def derived(self) -> DerivedFileStore: ...
    @property
    def indexes(self) -> VectorIndexes: ...
    @property
    def local_store(self) -> LocalFeatureStore: ...
    @property
    def encoder(self) -> Encoder: ...
    @property
    def model_id(self) -> int: ...
    def encoder_recipe(self) -> EncoderRecipe: ...
    def vector_index(self, metric: str | Metric = Metric.COSINE) -> PreparedIndex: ...
    def remove(self, targets: Sequence[int | str | Path]) -> int: ...


@dataclass
class Finding:
    """One thing found: a ``problem`` (the collection is not healthy until it is repaired)
    or a note (``problem=False``: nothing is wrong, e.g. a stale index rebuilt on next use).

    ``subject`` is what it is about (a file, the catalog, a model's vectors), ``detail``
    what is wrong, ``ids`` the images concerned, ``advice`` what fixes it, and ``repaired``
    what ``--repair`` did (None: not repaired)."""

    kind: str
    subject: str
    detail: str
    problem: bool = True
    ids: list[int] = field(default_factory=list)
    advice: str = ""
    repaired: str | None = None


@dataclass
class CheckReport:
    """What :func:`check_collection` found and, with ``repair``, did."""

    collection: str
    catalog: str
    repair: bool = False
    images: int = 0
    findings: list[Finding] = field(default_factory=list)
    re_embedded: int = 0  # images embedded again from their files
    removed: int = 0  # images removed because their file is gone
    deleted: list[str] = field(default_factory=list)  # derived or temporary files deleted
    rebuilt: list[str] = field(default_factory=list)  # index files rebuilt from the catalog

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.problem]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if not f.problem]

    @property
    def unrepaired(self) -> list[Finding]:
        """Problems still there (all of them when repair was not asked)."""
        return [f for f in self.problems if f.repaired is None]

    @property
    def healthy(self) -> bool:
        """No problem left: none found, or every one repaired."""
        return not self.unrepaired

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``lookalike check --json``)."""

        def entry(finding: Finding) -> dict[str, Any]:
            return {
                "kind": finding.kind,
                "subject": finding.subject,
                "detail": finding.detail,
                "ids": list(finding.ids),
                "advice": finding.advice,
                "repaired": finding.repaired,
            }

        return {
            "collection": self.collection,
            "catalog": self.catalog,
            "repair": self.repair,
            "healthy": self.healthy,
            "images": self.images,
            "problems": [entry(f) for f in self.problems],
            "notes": [entry(f) for f in self.notes],
            "re_embedded": self.re_embedded,
            "removed": self.removed,
            "deleted": list(self.deleted),
            "rebuilt": list(self.rebuilt),
        }


@dataclass
class _Found:
    """What the checks found, kept for the repairs."""

    catalog_damaged: bool = False
    bad_vectors: dict[int, tuple[str, list[int], Finding]] = field(default_factory=dict)
    lacking: tuple[list[int], Finding] | None = None
    changed: dict[str, tuple[FileState, Finding]] = field(default_factory=dict)
    missing: dict[str, tuple[FileState, Finding]] = field(default_factory=dict)
    # Files to delete on repair, and what the finding then says was done.
    derived: list[tuple[Path, Finding, str]] = field(default_factory=list)
    index_files: set[Path] = field(default_factory=set)  # every vector index file seen
    active: tuple[int, str] | None = None  # (model id, key) of the active model


def check_collection(
    collection: CheckedCollection,
    *,
    repair: bool = False,
    progress: ProgressCallback | None = None,
) -> CheckReport:
    """Verify ``collection`` and, with ``repair``, repair what can be (see the module's
    docstring); ``progress`` follows the re-embedding. A catalog too damaged to open never
    gets here: opening it raises ``CatalogCorruptError``."""
    catalog = collection.catalog
    report = CheckReport(str(collection.path), catalog.location, repair=repair)
    found = _Found()
    try:
        report.images = catalog.count()
    except CatalogError as error:
        _catalog_problem(report, found, str(error))
    _check_catalog(collection, report, found)
    _check_files(collection, report, found)
    _check_derived(collection, report, found)
    if repair:
        _repair(collection, report, found, progress)
        with contextlib.suppress(CatalogError):
            report.images = catalog.count()
    return report


# -- the checks --------------------------------------------------------------------------------


def _catalog_problem(report: CheckReport, found: _Found, detail: str) -> None:
    found.catalog_damaged = True
    report.findings.append(
        Finding(
            CATALOG,
            report.catalog,
            detail,
            advice="the catalog file itself is damaged, which check cannot repair: restore it "
            "from a backup, or move it aside and index your folders again",
        )
    )


def _shown(ids: Sequence[int]) -> str:
    more = f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
    return ", ".join(map(str, ids[:_SHOWN_IDS])) + more


def _check_catalog(collection: CheckedCollection, report: CheckReport, found: _Found) -> None:
    """The catalog file, every model's vector checksums, and vectors the active model lacks."""
    catalog = collection.catalog
    try:
        models = catalog.models()
    except CatalogError as error:
        _catalog_problem(report, found, str(error))
        return
    every_bad: set[int] = set()
    for model in models:
        model_id, key = int(model["id"]), str(model["key"])
        try:
            bad = catalog.verify_vectors(model_id)
        except CatalogError as error:
            _catalog_problem(report, found, f"the vectors of model {key} cannot be read: {error}")
            continue
        every_bad.update(bad)
        if bad:
            finding = Finding(
                VECTORS,
                f"vectors of model {key}",
                f"{len(bad)} image(s) fail their checksum (ids {_shown(bad)}): changed outside "
                "lookalike or damaged on disk; searches that read them refuse to answer",
                ids=list(bad),
                advice=f"{REPAIR_HINT} to re-embed them",
            )
            report.findings.append(finding)
            found.bad_vectors[model_id] = (key, bad, finding)
    try:
        summary = set(checksum_summary(sorted(every_bad)))
        for problem in catalog.integrity():
            if problem not in summary:  # the checksums are reported above, by model
                _catalog_problem(report, found, problem)
    except CatalogError as error:
        _catalog_problem(report, found, str(error))
    if report.images == 0 or found.catalog_damaged:
        return
    try:
        found.active = (collection.model_id, collection.encoder.identity.key)
    except LookalikeError as error:  # the encoder cannot be built here
        report.findings.append(
            Finding(
                VECTORS,
                "active model",
                f"not checked for images without vectors: its encoder cannot be built ({error})",
                problem=False,
            )
        )
        return
    model_id, key = found.active
    try:
        lacking = [i for i, _ in catalog.ids_missing_vectors(model_id)]
    except CatalogError as error:
        _catalog_problem(report, found, str(error))
        return
    if lacking:
        finding = Finding(
            VECTORS,
            f"vectors of model {key}",
            f"{len(lacking)} image(s) have no vector of the active model (ids "
            f"{_shown(lacking)}), so searches cannot find them",
            ids=lacking,
            advice=f"{REPAIR_HINT}, or `lookalike index` their folders, to embed them",
        )
        report.findings.append(finding)
        found.lacking = (lacking, finding)


def _check_files(collection: CheckedCollection, report: CheckReport, found: _Found) -> None:
    """Indexed files changed, missing or unreadable on disk."""
    try:
        states = collection.catalog.file_states("")
    except CatalogError as error:
        _catalog_problem(report, found, str(error))
        return
    for path, state in sorted(states.items()):
        try:
            status = os.stat(path)
        except FileNotFoundError:
            status = None
        except OSError as error:
            report.findings.append(
                Finding(
                    FILE,
                    path,
                    f"cannot be read ({error.strerror or error})",
                    ids=[state.id],
                    advice="make it readable, or remove it with `lookalike remove`",
                )
            )
            continue
        if status is None or not stat.S_ISREG(status.st_mode):
            finding = Finding(
                FILE,
                path,
                "missing: the file is gone since it was indexed",
                ids=[state.id],
                advice=f"{REPAIR_HINT} (or `lookalike index` its folder) to remove it",
            )
            found.missing[path] = (state, finding)
        elif status.st_size != state.size or status.st_mtime != state.mtime:
            finding = Finding(
                FILE,
                path,
                "changed since it was indexed (its size or modification time differ)",
                ids=[state.id],
                advice=f"{REPAIR_HINT} (or `lookalike index` its folder) to embed it again",
            )
            found.changed[path] = (state, finding)
        else:
            continue
        report.findings.append(finding)


def _check_derived(collection: CheckedCollection, report: CheckReport, found: _Found) -> None:
    """Every derived file: whole (every checksum), and stamped for the catalog as it is."""
    store = collection.derived
    index_folder = store.path("indexes")
    for path in store.files():
        if path.parent == index_folder:
            found.index_files.add(path)
        try:
            header = verify_index_file(path)
        except (VectorIndexError, OSError) as error:
            reason = str(error).removeprefix(f"{path}: ")
            finding = Finding(
                DERIVED,
                str(path),
                f"corrupt or unreadable: {reason}",
                advice=f"{REPAIR_HINT} to delete it (a search also rebuilds it)",
            )
            report.findings.append(finding)
            found.derived.append((path, finding, "deleted: rebuilt on next use"))
            continue
        try:
            current = store.stamped_now(header.get("metadata", {}))
        except CatalogError as error:
            _catalog_problem(report, found, str(error))
            return
        if not current:
            finding = Finding(
                DERIVED,
                str(path),
                "stale (made from an older state of the catalog, or another catalog): rebuilt "
                "on next use",
                problem=False,
            )
            report.findings.append(finding)
            found.derived.append((path, finding, "deleted: rebuilt on next use"))
    for path in store.leftovers():
        finding = Finding(
            DERIVED, str(path), "a temporary file left by an interrupted write", problem=False
        )
        report.findings.append(finding)
        found.derived.append((path, finding, "deleted"))


# -- the repairs ----------------------------------------------------------------------------


def _repair(
    collection: CheckedCollection,
    report: CheckReport,
    found: _Found,
    progress: ProgressCallback | None,
) -> None:
    _repair_derived(collection, report, found)
    if found.catalog_damaged:
        for finding in report.unrepaired:
            if finding.kind in (VECTORS, FILE):
                finding.advice = (
                    "not repaired while the catalog file is damaged (writing to it could spread "
                    "the damage): restore the catalog from a backup first"
                )
        return
    catalog = collection.catalog
    to_embed: set[int] = set()
    vector_findings: list[tuple[list[int], Finding]] = []
    for model_id, (_, bad, finding) in found.bad_vectors.items():
        catalog.drop_vectors(bad, model_id)
        if found.active is not None and model_id == found.active[0]:
            to_embed.update(bad)
            vector_findings.append((bad, finding))
        else:
            finding.repaired = (
                f"dropped {len(bad)}: the next `lookalike index` of their folders embeds them again"
            )
    if found.lacking is not None:
        to_embed.update(found.lacking[0])
        vector_findings.append(found.lacking)
    removed = _remove_missing(collection, report, found)
    report.re_embedded, failed = _re_embed(collection, found, to_embed, removed, progress)
    for path, (_, finding) in found.changed.items():
        if path in failed:
            finding.detail += f"; cannot be embedded again: {failed[path]}"
        else:
            finding.repaired = "embedded again"
    if vector_findings and found.active is not None:
        lacking = {i for i, _ in catalog.ids_missing_vectors(found.active[0])}
        for ids, finding in vector_findings:
            _settle(catalog, finding, ids, lacking, removed, failed)
    _rebuild_indexes(collection, report, found)


def _settle(
    catalog: Catalog,
    finding: Finding,
    ids: list[int],
    lacking: set[int],
    removed: set[int],
    failed: dict[str, str],
) -> None:
    """Mark a vectors finding repaired when each of its images has a vector again or was
    removed; else say which could not be embedded again, and why."""
    gone = [i for i in ids if i in removed]
    left = [i for i in ids if i in lacking and i not in removed]
    if not left:
        finding.repaired = f"re-embedded {len(ids) - len(gone)} from their files" + (
            f", removed {len(gone)} whose file is gone" if gone else ""
        )
        return
    records = catalog.images(left[:3])
    reasons = [f"{r.path}: {failed.get(r.path, 'not embedded')}" for r in records.values()]
    finding.detail += (
        f"; {len(left)} could not be embedded again (ids {_shown(left)}): " + "; ".join(reasons)
    )


def _repair_derived(collection: CheckedCollection, report: CheckReport, found: _Found) -> None:
    """Delete corrupt, stale and temporary derived files (they are rebuilt from the catalog)."""
    for path, finding, done in found.derived:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            finding.detail += f"; cannot be deleted ({error.strerror or error})"
            continue
        report.deleted.append(str(path))
        finding.repaired = done
    if found.derived:
        collection.derived.forget()  # no copy in memory outlives its file


def _remove_missing(collection: CheckedCollection, report: CheckReport, found: _Found) -> set[int]:
    """Remove the images whose file is gone, where the folder that held it is still there."""
    gone: list[int] = []
    for path, (state, finding) in found.missing.items():
        folder = os.path.dirname(path)
        if os.path.isdir(folder):
            gone.append(state.id)
            finding.repaired = "removed from the collection"
        else:
            finding.advice = (
                f"its folder {folder} is missing too (an unmounted disk?): mount it again, or "
                f"remove the image with `lookalike remove {state.id}`"
            )
    if gone:
        report.removed = collection.remove(gone)
    return set(gone)


def _re_embed(
    collection: CheckedCollection,
    found: _Found,
    ids: set[int],
    removed: set[int],
    progress: ProgressCallback | None,
) -> tuple[int, dict[str, str]]:
    """Embed again the changed files and the files of ``ids`` with the active model, through
    the ingest pipeline; returns how many were stored and (path -> reason) of failures."""
    catalog = collection.catalog
    records = catalog.images(sorted(ids - removed))
    paths = {record.path for record in records.values()} | set(found.changed)
    failed: dict[str, str] = {}
    for path in sorted(paths):
        if not os.path.isfile(path):
            failed[path] = "the file is gone"
    todo = sorted(paths - set(failed))
    if not todo:
        return 0, failed
    encoder = collection.encoder
    model_id = collection.model_id
    local = collection.local_store.choose(None, encoder)
    known = {p: s for p, s in catalog.file_states("").items() if p in paths}
    pipeline = IngestPipeline(
        catalog,
        collection.indexes,
        collection.local_store,
        model_id=model_id,
        model_key=encoder.identity.key,
    )
    job = IngestJob(todo, encoder, collection.encoder_recipe(), local, batch_size=32)
    batches = ThreadExecutor().batches(job)
    outcome = IndexReport()
    pipeline.run(batches, known, outcome, local=local, total=len(todo), progress=progress)
    failed.update(outcome.failed)
    return outcome.embedded, failed


def _rebuild_indexes(collection: CheckedCollection, report: CheckReport, found: _Found) -> None:
    """Rebuild the active model's index files that were there but are now gone or stale."""
    if found.active is None or collection.catalog.count() == 0:
        return
    for metric in _VECTOR_METRICS:
        path = collection.indexes.path(found.active[1], metric)
        if path not in found.index_files or _fresh(collection, path):
            continue
        try:
            collection.vector_index(metric)  # rebuilt and saved (a full disk: memory only)
        except LookalikeError as error:
            for finding in report.findings:
                if finding.subject == str(path):
                    finding.detail += f"; cannot be rebuilt now: {error}"
            continue
        if _fresh(collection, path):
            report.rebuilt.append(str(path))
            for finding in report.findings:
                if finding.subject == str(path) and finding.repaired is not None:
                    finding.repaired = "deleted and rebuilt from the catalog"


def _fresh(collection: CheckedCollection, path: Path) -> bool:
    try:
        header = verify_index_file(path)
    except (VectorIndexError, OSError):
        return False
    return collection.derived.stamped_now(header.get("metadata", {}))
