"""What every ``lookalike`` subcommand shares: finding and opening the collection (with the
catalog that ``--db`` or ``$LOOKALIKE_DB`` names) and progress bars."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.errors import LookalikeError

if TYPE_CHECKING:
    from lookalike.core.collection import Collection

COLLECTION_ENV = "LOOKALIKE_COLLECTION"
DB_ENV = "LOOKALIKE_DB"


def is_collection_name(value: str) -> bool:
    """Whether ``-c VALUE`` is a bare name (no path separator, not starting with '.', '~' or
    '/'): always a named collection under the data folder, even where the current folder has
    a folder of that name (a photo folder must never receive a catalog by accident)."""
    separators = [os.sep, "/", *([os.altsep] if os.altsep else [])]
    return not any(s in value for s in separators) and not value.startswith((".", "~", "/"))


def collection_path(value: str | None) -> Path:
    """The collection folder ``-c VALUE`` (else $LOOKALIKE_COLLECTION, else 'default') names:
    a bare name is a collection under $LOOKALIKE_HOME (or ~/.local/share/lookalike), anything
    path-like is a folder, used as given ('~' expanded)."""
    from lookalike.core.locations import default_collection_dir

    value = value or os.environ.get(COLLECTION_ENV)
    if not value:
        return default_collection_dir()
    if is_collection_name(value):
        return default_collection_dir(value)
    return Path(value).expanduser()


def open_collection(args: argparse.Namespace, *, create: bool = True, **options: Any) -> Collection:
    """The collection the arguments name. ``create=False`` (commands that only read it)
    raises LookalikeError, creating nothing, when no such collection exists."""
    from lookalike.core.collection import Collection

    path = collection_path(args.collection)
    db = database_url(args)
    if not create:
        require_collection(path, db, args.collection)
    return Collection(path, db=db, **options)


def require_collection(path: Path, db: str | None, name: str | None = None) -> None:
    """Raise LookalikeError unless a collection exists at ``path`` (its own catalog file or
    a link to its catalog) or ``db`` names its catalog (a PostgreSQL URL, or a SQLite file
    that exists). The message says what exists instead; nothing is created."""
    from lookalike.catalog import is_postgres_url
    from lookalike.core.locations import CATALOG_FILE, CATALOG_LINK, default_collection_dir

    if db is not None:
        if is_postgres_url(db) or Path(db).expanduser().is_file():
            return
        raise LookalikeError(f"no catalog at {db}; run 'lookalike --db {db} index FOLDER' first")
    if _holds_collection(path, CATALOG_FILE, CATALOG_LINK):
        return
    value = name or os.environ.get(COLLECTION_ENV) or ""
    if value and not is_collection_name(value):
        raise LookalikeError(
            f"no collection at {path} (no indexed images there); run "
            f"'lookalike -c {value} index FOLDER' to create it"
        )
    value = value or "default"
    home = default_collection_dir(value).parent
    existing = sorted(
        folder.name
        for folder in (home.iterdir() if home.is_dir() else ())
        if _holds_collection(folder, CATALOG_FILE, CATALOG_LINK)
    )
    found = (
        f"collections under {home}: {', '.join(existing)}"
        if existing
        else f"there are no collections under {home} yet"
    )
    message = f"no collection named {value!r} (no indexed images); {found}"
    if _holds_collection(Path(value), CATALOG_FILE, CATALOG_LINK):
        message += f"; to use the collection folder ./{value}, pass -c ./{value}"
    raise LookalikeError(f"{message}; 'lookalike -c {value} index FOLDER' creates it")


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that may add its arguments only when that subcommand is used or
    its help shown (:meth:`defer`), so that ``lookalike search`` never imports the modules of
    the other subcommands (a cold query pays for every import)."""

    _deferred: Callable[[argparse.ArgumentParser], None] | None = None

    def defer(self, module: str, add_arguments: str, run: str) -> None:
        """Add the arguments with ``module.add_arguments(parser)`` and run the subcommand
        with ``module.run``, imported on first use."""

        def complete(parser: argparse.ArgumentParser) -> None:
            loaded = importlib.import_module(module)
            getattr(loaded, add_arguments)(parser)
            parser.set_defaults(run=getattr(loaded, run))

        self._deferred = complete

    def _complete(self) -> None:
        if self._deferred is not None:
            complete, self._deferred = self._deferred, None
            complete(self)

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads, same behaviour
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._complete()
        return super().format_help()

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()


def _holds_collection(folder: Path, *names: str) -> bool:
    return any((folder / name).is_file() for name in names)


def database_url(args: argparse.Namespace) -> str | None:
    return args.db or os.environ.get(DB_ENV) or None


class ProgressBars:
    """Progress bars on stderr for the library's progress callbacks, one a stage, each shown
    from its stage's first report; none at all when ``quiet``. Every ``lookalike`` subcommand
    shows its progress through one of these."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bars: dict[str | None, Any] = {}

    def update(self, stage: str | None, done: int, total: int, *, unit: str = "img") -> None:
        """Show ``done`` of ``total`` on the bar of ``stage`` (a ``(stage, done, total)``
        progress callback)."""
        if self.quiet:
            return
        bar = self._bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            bar = self._bars[stage] = tqdm(
                total=total, desc=stage, unit=unit, dynamic_ncols=True, file=sys.stderr
            )
        bar.total = total
        bar.update(done - bar.n)  # tqdm itself limits how often it redraws

    def stage(self, stage: str | None = None, *, unit: str = "img") -> Callable[[int, int], None]:
        """A ``(done, total)`` progress callback for the bar of one stage."""
        return lambda done, total: self.update(stage, done, total, unit=unit)

    def close(self) -> None:
        """End every bar shown so far; a later report starts a new one."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
