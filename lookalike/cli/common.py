"""What every ``lookalike`` subcommand shares: finding and opening the collection (with the
catalog that ``--db`` or ``$LOOKALIKE_DB`` names) and progress bars."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lookalike.core.collection import Collection

COLLECTION_ENV = "LOOKALIKE_COLLECTION"
DB_ENV = "LOOKALIKE_DB"


def collection_path(value: str | None) -> Path:
    from lookalike.core.collection import default_collection_dir

    value = value or os.environ.get(COLLECTION_ENV)
    if not value:
        return default_collection_dir()
    # A bare name is a collection under the data folder; anything path-like is used as given.
    if os.sep in value or value.startswith(".") or Path(value).is_dir():
        return Path(value)
    return default_collection_dir(value)


def open_collection(args: argparse.Namespace, **options: Any) -> Collection:
    from lookalike.core.collection import Collection

    return Collection(collection_path(args.collection), db=database_url(args), **options)


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
