"""Labelled image datasets for evaluation, and the protocols that split them into queries and
a database.

Layouts:

- a folder per class: ``root/<label>/*.jpg``, or ``root/<split>/<label>/*.jpg`` when every
  top-level folder is a split name (train, test, val, ...);
- a CSV with a path and a label column (and optionally a split column), paths relative to the
  CSV's folder.

Protocols:

- ``split``: queries from one split (e.g. test), the database from another (e.g. train);
- ``leave-one-out``: every image queries all the others (the query itself is excluded).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.core.ingest import scan_folder
from lookalike.errors import LookalikeError

PROTOCOLS: tuple[str, ...] = ("split", "leave-one-out")

# Top-level folder names that mark a root/<split>/<label>/ layout rather than root/<label>/.
SPLIT_NAMES = frozenset(
    {"train", "training", "test", "testing", "val", "valid", "validation", "dev", "query",
     "queries", "database", "db", "gallery", "index"}
)  # fmt: skip

_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path", "name")
_LABEL_COLUMNS = ("label", "class", "category", "class_name", "target")
_SPLIT_COLUMNS = ("split", "subset", "set", "partition", "fold")


@dataclass(frozen=True)
class ImageDataset:
    """Image files with a label each, and a split each (None when the dataset has none)."""

    root: Path
    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    splits: tuple[str | None, ...]

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.labels) == len(self.splits):
            raise LookalikeError("a dataset needs exactly one label and one split per path")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_splits(self) -> bool:
        return any(s is not None for s in self.splits)

    def split_names(self) -> list[str]:
        """The splits present, sorted."""
        return sorted({s for s in self.splits if s is not None})

    def class_counts(self) -> dict[str, int]:
        """Number of images per label, sorted by label."""
        return dict(sorted(Counter(self.labels).items()))

    def indices(self, split: str | None = None) -> np.ndarray:
        """Positions of the images of ``split`` (all images when None)."""
        if split is None:
            return np.arange(len(self.paths))
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)


@dataclass(frozen=True)
class RetrievalTask:
    """Queries and a database drawn from one dataset, as positions into ``dataset``.

    With ``exclude_self`` (leave-one-out) a query never counts as a candidate for itself:
    :meth:`exclude_mask` is the ``exclude`` argument of the metrics.
    """

    dataset: ImageDataset
    protocol: str
    query_indices: np.ndarray
    database_indices: np.ndarray
    exclude_self: bool
    query_split: str | None = None
    database_split: str | None = None

    @property
    def query_paths(self) -> list[Path]:
        return [self.dataset.paths[i] for i in self.query_indices]

    @property
    def database_paths(self) -> list[Path]:
        return [self.dataset.paths[i] for i in self.database_indices]

    @property
    def query_labels(self) -> np.ndarray:
        return np.array([self.dataset.labels[i] for i in self.query_indices], dtype=object)

    @property
    def database_labels(self) -> np.ndarray:
        return np.array([self.dataset.labels[i] for i in self.database_indices], dtype=object)

    def exclude_mask(self) -> np.ndarray | None:
        """[queries x database] pairs that are the same image, or None when none can be."""
        if not self.exclude_self:
            return None
        mask: np.ndarray = self.query_indices[:, None] == self.database_indices[None, :]
        return mask

    def describe(self) -> dict[str, object]:
        """Plain-JSON summary for reports."""
        return {
            "root": str(self.dataset.root),
            "protocol": self.protocol,
            "query_split": self.query_split,
            "database_split": self.database_split,
            "queries": len(self.query_indices),
            "database": len(self.database_indices),
            "classes": len(set(self.dataset.labels)),
        }


def load_folder_dataset(root: str | Path, *, split_folders: bool | None = None) -> ImageDataset:
    """A dataset from ``root/<label>/...`` or ``root/<split>/<label>/...``.

    ``split_folders=None`` detects the layout: split folders when every top-level folder is a
    known split name (see ``SPLIT_NAMES``) and every image is at least two folders deep.
    Images below the class folder (in sub-folders) keep that class.
    """
    root = Path(root)
    if not root.is_dir():
        raise LookalikeError(f"dataset folder {root} does not exist")
    relative = [path.relative_to(root) for path in scan_folder(root)]
    if not relative:
        raise LookalikeError(f"no images found under {root}")
    loose = [str(r) for r in relative if len(r.parts) < 2]
    if loose:
        raise LookalikeError(
            f"{len(loose)} image(s) directly in {root} have no class folder (e.g. {loose[0]}); "
            "expected root/<label>/image or root/<split>/<label>/image"
        )
    if split_folders is None:
        top = {r.parts[0] for r in relative}
        split_folders = top <= SPLIT_NAMES and all(len(r.parts) >= 3 for r in relative)
    if split_folders:
        shallow = [str(r) for r in relative if len(r.parts) < 3]
        if shallow:
            raise LookalikeError(
                f"{len(shallow)} image(s) are not in root/<split>/<label>/ (e.g. {shallow[0]})"
            )
        splits: list[str | None] = [r.parts[0] for r in relative]
        labels = [r.parts[1] for r in relative]
    else:
        splits = [None] * len(relative)
        labels = [r.parts[0] for r in relative]
    return ImageDataset(
        root=root,
        paths=tuple(root / r for r in relative),
        labels=tuple(labels),
        splits=tuple(splits),
    )


def _pick_column(
    columns: Sequence[str], wanted: str | None, preferred: Sequence[str], what: str, path: Path
) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise LookalikeError(f"{path}: no {what} column {wanted!r}; columns are {columns}")
        return wanted
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[p] for p in preferred if p in lowered), None)


def load_csv_dataset(
    csv_path: str | Path,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    split_column: str | None = None,
    check_files: bool = True,
) -> ImageDataset:
    """A dataset from a CSV with a path and a label column and an optional split column.

    Columns are found by name unless given (path: path/file/filename/image/...; label:
    label/class/category/...; split: split/subset/set/...). Relative paths are relative to
    the CSV's folder. Rows with an empty path are skipped; an empty label is an error, and so
    are missing files when ``check_files`` is set.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            if not columns:
                raise LookalikeError(f"{csv_path}: the CSV has no header row")
            path_key = _pick_column(columns, path_column, _PATH_COLUMNS, "path", csv_path)
            label_key = _pick_column(columns, label_column, _LABEL_COLUMNS, "label", csv_path)
            split_key = _pick_column(columns, split_column, _SPLIT_COLUMNS, "split", csv_path)
            if path_key is None or label_key is None:
                raise LookalikeError(
                    f"{csv_path}: cannot tell the path and label columns apart among {columns}; "
                    "name them path and label"
                )
            rows = list(reader)
    except OSError as error:
        raise LookalikeError(f"cannot read dataset CSV {csv_path}: {error}") from error
    except (csv.Error, UnicodeDecodeError) as error:
        raise LookalikeError(f"{csv_path}: not a readable CSV ({error})") from error

    base = csv_path.parent
    paths: list[Path] = []
    labels: list[str] = []
    splits: list[str | None] = []
    for line, row in enumerate(rows, start=2):
        name = (row.get(path_key) or "").strip()
        if not name:
            continue
        label = (row.get(label_key) or "").strip()
        if not label:
            raise LookalikeError(f"{csv_path}:{line}: {name} has an empty label")
        split = (row.get(split_key) or "").strip() if split_key else ""
        paths.append(base / name)  # an absolute name replaces the base
        labels.append(label)
        splits.append(split or None)
    if not paths:
        raise LookalikeError(f"{csv_path}: no rows with a path")
    if check_files:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise LookalikeError(
                f"{csv_path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]}"
            )
    return ImageDataset(root=base, paths=tuple(paths), labels=tuple(labels), splits=tuple(splits))


def load_dataset(source: str | Path, *, csv_file: str | Path | None = None) -> ImageDataset:
    """A dataset from a folder (folder-per-class layout) or a CSV.

    ``csv_file`` (or ``source`` itself being a ``.csv`` file) selects the CSV layout; a
    relative ``csv_file`` that does not exist as given is looked for inside ``source``.
    """
    source = Path(source)
    if csv_file is not None:
        csv_path = Path(csv_file)
        if not csv_path.is_absolute() and not csv_path.exists() and source.is_dir():
            csv_path = source / csv_path
        return load_csv_dataset(csv_path)
    if source.is_file() and source.suffix.lower() == ".csv":
        return load_csv_dataset(source)
    return load_folder_dataset(source)


def split_protocol(
    dataset: ImageDataset, *, query_split: str = "test", database_split: str = "train"
) -> RetrievalTask:
    """Queries from ``query_split``, the database from ``database_split``."""
    if not dataset.has_splits:
        raise LookalikeError(
            f"the dataset at {dataset.root} has no splits; use the leave-one-out protocol"
        )
    if query_split == database_split:
        raise LookalikeError(
            f"query and database split are both {query_split!r}; use leave-one-out to search a "
            "split against itself"
        )
    queries = dataset.indices(query_split)
    database = dataset.indices(database_split)
    for name, found in ((query_split, queries), (database_split, database)):
        if len(found) == 0:
            raise LookalikeError(
                f"no images in split {name!r}; splits are {', '.join(dataset.split_names())}"
            )
    return RetrievalTask(
        dataset=dataset,
        protocol="split",
        query_indices=queries,
        database_indices=database,
        exclude_self=False,
        query_split=query_split,
        database_split=database_split,
    )


def leave_one_out_protocol(dataset: ImageDataset, *, split: str | None = None) -> RetrievalTask:
    """Every image (of ``split``, or all) queries all the others."""
    indices = dataset.indices(split)
    if len(indices) < 2:
        where = f" in split {split!r}" if split is not None else ""
        raise LookalikeError(f"leave-one-out needs at least 2 images{where}, got {len(indices)}")
    return RetrievalTask(
        dataset=dataset,
        protocol="leave-one-out",
        query_indices=indices,
        database_indices=indices,
        exclude_self=True,
        query_split=split,
        database_split=split,
    )


def make_task(
    dataset: ImageDataset,
    protocol: str | None = None,
    *,
    query_split: str = "test",
    database_split: str = "train",
) -> RetrievalTask:
    """The task of a protocol by name; ``None`` picks ``split`` when the dataset has both
    splits and ``leave-one-out`` otherwise."""
    if protocol is None:
        available = set(dataset.split_names())
        protocol = "split" if {query_split, database_split} <= available else "leave-one-out"
    if protocol == "split":
        return split_protocol(dataset, query_split=query_split, database_split=database_split)
    if protocol == "leave-one-out":
        return leave_one_out_protocol(dataset)
    raise LookalikeError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
