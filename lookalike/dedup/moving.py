"""Moving the duplicates of each group aside: planned first, applied only when asked.

Nothing is ever deleted. A duplicate keeps its path relative to the folder that was
deduplicated (or to the common folder of every group member) under the destination; a target
that already exists is never overwritten, and that move is skipped and reported instead.
Moved files leave the collection (their catalog entries are removed), so the next run does not
see them, and the destination must lie outside the deduplicated folder so that indexing that
folder again does not bring them back.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.dedup.finder import DuplicateGroup
from lookalike.errors import DedupError

if TYPE_CHECKING:
    from lookalike.core.collection import Collection

PLANNED = "planned"
MOVED = "moved"
EXISTS = "target exists"
MISSING = "source missing"


@dataclass(frozen=True)
class Move:
    """One duplicate's move; ``status`` is planned, moved, or why it was skipped."""

    source: str
    target: str
    status: str = PLANNED


def plan_moves(
    groups: Sequence[DuplicateGroup], destination: str | Path, root: str | Path | None = None
) -> list[Move]:
    """Where each duplicate (never a keeper) would go: ``destination`` / its path relative to
    ``root`` (default: the common folder of every group member). Targets that exist already
    and sources that are gone are marked so; nothing is touched."""
    sources = [d.path for g in groups for d in g.duplicates]
    if not sources:
        return []
    every = [m.path for g in groups for m in g.members]
    base = Path(root).resolve() if root is not None else Path(os.path.commonpath(every))
    if base.is_file():
        base = base.parent
    target_root = Path(destination).resolve()
    if target_root == base or base in target_root.parents:
        raise DedupError(
            f"the destination {target_root} is inside {base}, the folder being deduplicated: "
            "indexing it again would bring the moved files back; choose a folder outside it"
        )
    moves = []
    for source in sources:
        try:
            relative = Path(source).relative_to(base)
        except ValueError:
            raise DedupError(f"{source} is not under {base}") from None
        target = target_root / relative
        status = PLANNED
        if not os.path.lexists(source):
            status = MISSING
        elif os.path.lexists(target):
            status = EXISTS
        moves.append(Move(source, str(target), status))
    return moves


def apply_moves(collection: Collection, moves: Sequence[Move]) -> list[Move]:
    """Carry out the planned moves, never overwriting, and remove the moved files from the
    collection. Returns each move with its outcome."""
    done = []
    for move in moves:
        if move.status != PLANNED:
            done.append(move)
            continue
        done.append(replace(move, status=_move_file(move.source, move.target)))
    moved = [m.source for m in done if m.status == MOVED]
    if moved:
        collection.remove(moved)
    return done


def _move_file(source: str, target: str) -> str:
    """Move without ever replacing an existing file: a hard link then unlink on the same file
    system (the link fails if the target exists), else an exclusive-create copy then unlink."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except FileExistsError:
        return EXISTS
    except FileNotFoundError:
        return MISSING
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return f"failed: {error.strerror or error}"
        return _copy_then_unlink(source, target)
    os.unlink(source)
    return MOVED


def _copy_then_unlink(source: str, target: str) -> str:
    created = False
    try:
        with open(source, "rb") as reader:
            with open(target, "xb") as writer:
                created = True
                shutil.copyfileobj(reader, writer)
            shutil.copystat(source, target)
    except FileExistsError:
        return EXISTS
    except FileNotFoundError:
        return MISSING
    except OSError as error:
        if created:  # only ever our own partial copy
            Path(target).unlink(missing_ok=True)
        return f"failed: {error.strerror or error}"
    os.unlink(source)
    return MOVED
