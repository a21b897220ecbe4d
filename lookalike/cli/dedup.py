"""``lookalike dedup``: groups of duplicate images, as a table, JSON or CSV, and moving the
duplicates aside.

Wired into the main command as::

    dedup = commands.add_parser("dedup", help="find groups of duplicate images")
    add_dedup_arguments(dedup)
    dedup.set_defaults(run=run_dedup)

This module prints (it is command-line code); the library functions it calls do not.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.dedup.finder import (
    DEFAULT_METHOD,
    DEFAULT_MIN_INLIERS,
    DEFAULT_THRESHOLDS,
    DedupReport,
    Method,
)
from lookalike.dedup.moving import Move

if TYPE_CHECKING:
    from lookalike.core.collection import Collection
    from lookalike.dedup.against import AgainstReport, ReferenceMatch
    from lookalike.local.matching import EstimatedTransform

_CSV_FIELDS = ("group", "role", "path", "width", "height", "size", "mtime", "score", "inliers")
# The estimated transform of a verified duplicate, flattened into CSV columns.
_TRANSFORM_FIELDS = ("rotation_degrees", "scale", "mirrored")


def add_dedup_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``lookalike dedup`` to ``parser`` (a subcommand parser)."""
    thresholds = ", ".join(f"{m.value} {v}" for m, v in DEFAULT_THRESHOLDS.items() if v is not None)
    parser.add_argument(
        "target",
        nargs="?",
        help="a folder of images (indexed into the collection first, incrementally, then "
        "deduplicated alone), or a collection folder or name (default: the whole active "
        "collection)",
    )
    parser.add_argument(
        "--against",
        metavar="REFERENCE",
        help="check the images of TARGET (a folder or one image file) against REFERENCE (a "
        "collection folder or name, or a folder of images, indexed into the collection "
        "first) and report which already exist there; the reference is never grouped "
        "against itself and TARGET is not indexed",
    )
    parser.add_argument(
        "--method",
        choices=[m.value for m in Method],
        default=DEFAULT_METHOD.value,
        help=f"exact: same bytes; perceptual: pHash bits; embedding: cosine of the stored "
        f"vectors; verified: copies confirmed by SIFT + RANSAC (one transform: rotation, "
        f"scale, mirror, reported), candidates from the embedding and from shared local "
        f"features (default: {DEFAULT_METHOD.value})",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help=f"perceptual: most differing bits; embedding: least cosine; verified: least "
        f"cosine of the embedding candidates (defaults: {thresholds})",
    )
    parser.add_argument(
        "--min-inliers",
        type=int,
        help=f"verified: RANSAC inliers that confirm a pair by its keypoints (default "
        f"{DEFAULT_MIN_INLIERS}); a pair with fewer, down to 3 in 10, is confirmed only when "
        "its pixels, aligned by them, follow one motion",
    )
    parser.add_argument(
        "--format",
        choices=("table", "json", "csv", "paths"),
        default="table",
        help="table: for people; json: one object; csv: one row an image with a header; "
        "paths: the paths of the duplicates only (never the keepers), one a line, for xargs "
        "(with --against: the new images that already exist in the reference)",
    )
    parser.add_argument(
        "--move-to",
        metavar="DIR",
        help="move every duplicate (never a keeper) under DIR, keeping its relative path; "
        "a dry run unless --apply; never deletes, never overwrites",
    )
    parser.add_argument("--apply", action="store_true", help="carry out --move-to")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads")
    parser.add_argument("--runtime", choices=("auto", "onnx", "torch"), default="auto")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run_dedup(args: argparse.Namespace) -> int:
    """Run ``lookalike dedup`` with parsed arguments; prints the groups."""
    from lookalike.cli.common import collection_path, database_url
    from lookalike.core.collection import Collection
    from lookalike.dedup.finder import find_duplicates
    from lookalike.dedup.moving import apply_moves, plan_moves
    from lookalike.errors import DedupError

    if args.apply and not args.move_to:
        raise DedupError("--apply carries out --move-to; give --move-to DIR too")
    if args.against is not None:
        return _run_against(args)
    folder, location = _target(args, collection_path)
    with Collection(location, db=database_url(args), runtime=args.runtime) as collection:
        if folder is not None:
            _index(collection, folder, args)
        report = find_duplicates(
            collection,
            method=args.method,
            threshold=args.threshold,
            under=folder,
            min_inliers=args.min_inliers,
            workers=args.workers,
        )
        moves: list[Move] | None = None
        if args.move_to:
            moves = plan_moves(report.groups, args.move_to, root=folder)
            if args.apply:
                moves = apply_moves(collection, moves)
    printer = {
        "table": _print_table,
        "json": _print_json,
        "csv": _print_csv,
        "paths": _print_paths,
    }[args.format]
    printer(report, moves, applied=args.apply)
    return 0


def _target(
    args: argparse.Namespace, collection_path: Callable[[str | None], Path]
) -> tuple[Path | None, Path]:
    """(folder to index and deduplicate or None, collection folder) from the arguments."""
    target = args.target
    if target is None:
        return None, collection_path(args.collection)
    path = Path(target)
    if path.is_dir() and not (path / "catalog.sqlite").exists():
        return path.resolve(), collection_path(args.collection)
    if args.collection:
        from lookalike.errors import DedupError

        raise DedupError(f"{target} is a collection; leave out --collection or give a folder")
    # A collection folder given by its path stays that folder; a bare name is a named one.
    return None, path if path.is_dir() else collection_path(target)


def _index(collection: Collection, folder: Path, args: argparse.Namespace) -> None:
    from lookalike.cli.common import ProgressBars

    with ProgressBars(quiet=args.quiet) as bars:
        report = collection.index(folder, workers=args.workers, progress=bars.stage())
    if not args.quiet:
        print(
            f"indexed {folder}: {report.added} added, {report.updated} updated, "
            f"{report.removed} removed, {report.unchanged} unchanged, "
            f"{len(report.failed)} failed",
            file=sys.stderr,
        )


def _describe(report: DedupReport) -> str:
    if report.method is Method.EXACT:
        return "exact: same content hash"
    if report.method is Method.PERCEPTUAL:
        return f"perceptual: pHash within {report.threshold:g} bits"
    if report.method is Method.VERIFIED:
        return _verified_method(report.threshold, report.min_inliers)
    return f"embedding: cosine >= {report.threshold:g}"


def _verified_method(threshold: float | None, min_inliers: int | None) -> str:
    return (
        f"verified: copies confirmed by >= {min_inliers} SIFT inliers of one transform, "
        f"candidates at cosine >= {threshold:g} or sharing local features"
    )


def _score(
    report: DedupReport,
    score: float | None,
    inliers: int | None,
    transform: EstimatedTransform | None = None,
) -> str:
    if score is None:
        return "identical"
    text = f"{score:.0f} bits" if report.method is Method.PERCEPTUAL else f"cosine {score:.3f}"
    return _verified_text(text, inliers, transform)


def _verified_text(text: str, inliers: int | None, transform: EstimatedTransform | None) -> str:
    """A score with the verified inliers and transform, when there are some."""
    if inliers is not None:
        text = f"{text}, {inliers} inliers"
    if transform is not None:
        text = f"{text}, {transform.describe()}"
    return text


def _print_table(report: DedupReport, moves: list[Move] | None, *, applied: bool) -> None:
    print(
        f"{len(report.groups)} group(s), {report.duplicates} duplicate(s) among "
        f"{report.images} image(s) ({_describe(report)}) in {report.seconds:.1f}s"
    )
    for number, group in enumerate(report.groups, 1):
        keeper = group.keeper
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(keeper.mtime))
        print(f"\ngroup {number}")
        print(f"  keep       {keeper.width}x{keeper.height}  {stamp}  {keeper.path}")
        for duplicate in group.duplicates:
            size = f"{duplicate.width}x{duplicate.height}"
            print(
                f"  duplicate  {size}  "
                f"{_score(report, duplicate.score, duplicate.inliers, duplicate.transform)}  "
                f"{duplicate.path}"
            )
    if report.failed:
        print(f"\n{len(report.failed)} file(s) could not be read and were left out:")
        for path, reason in report.failed:
            print(f"  {path}: {reason}")
    if moves is not None:
        moved = sum(1 for m in moves if m.status == "moved")
        if applied:
            print(f"\nmoved {moved} of {len(moves)} duplicate(s):")
        else:
            print(f"\ndry run: {len(moves)} duplicate(s) would move (add --apply to move):")
        for move in moves:
            print(f"  {move.source} -> {move.target}  [{move.status}]")


def _print_json(report: DedupReport, moves: list[Move] | None, *, applied: bool) -> None:
    payload: dict[str, Any] = {
        "method": report.method.value,
        "threshold": report.threshold,
        "min_inliers": report.min_inliers,
        "images": report.images,
        "duplicates": report.duplicates,
        "seconds": round(report.seconds, 3),
        "groups": [
            {"keeper": asdict(g.keeper), "duplicates": [asdict(d) for d in g.duplicates]}
            for g in report.groups
        ],
        "failed": [{"path": p, "reason": r} for p, r in report.failed],
    }
    if moves is not None:
        payload["moves"] = {"applied": applied, "items": [asdict(m) for m in moves]}
    print(json.dumps(payload, indent=2))


def _print_csv(report: DedupReport, moves: list[Move] | None, *, applied: bool) -> None:
    fields = list(_CSV_FIELDS) + list(_TRANSFORM_FIELDS)
    target_of = {}
    if moves is not None:
        fields += ["target", "status"]
        target_of = {m.source: m for m in moves}
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for number, group in enumerate(report.groups, 1):
        for role, image in [("keeper", group.keeper)] + [
            ("duplicate", d) for d in group.duplicates
        ]:
            row = {k: v for k, v in asdict(image).items() if k in fields}
            if image.transform is not None:
                row.update({k: getattr(image.transform, k) for k in _TRANSFORM_FIELDS})
            row.update(group=number, role=role)
            move = target_of.get(image.path)
            if move is not None:
                row.update(target=move.target, status=move.status)
            writer.writerow(row)
    for path, reason in report.failed:
        print(f"lookalike: could not read {path}: {reason}", file=sys.stderr)


def _print_paths(report: DedupReport, moves: list[Move] | None, *, applied: bool) -> None:
    """The duplicates' paths, one a line (the keepers are left out: what to act on)."""
    for group in report.groups:
        for duplicate in group.duplicates:
            print(duplicate.path)
    for path, reason in report.failed:
        print(f"lookalike: could not read {path}: {reason}", file=sys.stderr)


# -- --against: new images checked against a reference ----------------------------------------


def _run_against(args: argparse.Namespace) -> int:
    """``lookalike dedup NEW --against REFERENCE``: which new images the reference holds."""
    from lookalike.cli.common import database_url
    from lookalike.core.collection import Collection
    from lookalike.dedup.against import find_in_reference
    from lookalike.errors import DedupError

    if args.target is None:
        raise DedupError("--against needs the new images: give a folder or an image file")
    if args.move_to:
        raise DedupError("--move-to does not apply to --against (nothing is grouped)")
    if not Path(args.target).expanduser().exists():
        raise DedupError(f"{args.target}: no such image file or folder")
    folder, location = _reference(args)
    with Collection(location, db=database_url(args), runtime=args.runtime) as collection:
        if folder is not None:
            _index(collection, folder, args)
        report = find_in_reference(
            args.target,
            collection,
            under=folder,
            method=args.method,
            threshold=args.threshold,
            min_inliers=args.min_inliers,
            workers=args.workers,
        )
    printer = {
        "table": _print_against_table,
        "json": _print_against_json,
        "csv": _print_against_csv,
        "paths": _print_against_paths,
    }[args.format]
    printer(report)
    return 0


def _reference(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """(folder to index and check against or None, collection folder) for ``--against``: a
    collection folder, a plain folder (indexed into the active collection, as ``dedup
    FOLDER`` does) or a collection name."""
    from lookalike.cli.common import (
        collection_path,
        database_url,
        is_collection_name,
        require_collection,
    )
    from lookalike.core.locations import CATALOG_FILE, CATALOG_LINK
    from lookalike.errors import DedupError

    value = args.against
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in (CATALOG_FILE, CATALOG_LINK)):
            return path.resolve(), collection_path(args.collection)
        if args.collection:
            raise DedupError(f"{value} is a collection; leave out --collection or give a folder")
        return None, path
    if path.exists():
        raise DedupError(f"--against {value}: a reference is a folder or a collection, not a file")
    if not is_collection_name(value):
        raise DedupError(f"--against {value}: no such folder or collection")
    if args.collection:
        raise DedupError(f"{value} is a collection; leave out --collection or give a folder")
    location = collection_path(value)
    # A named reference must exist: checking against a fresh, empty one would call every
    # image new.
    require_collection(location, database_url(args), value)
    return None, location


def _against_method(report: AgainstReport) -> str:
    if report.method is Method.EXACT:
        return "exact: same content hash"
    if report.method is Method.PERCEPTUAL:
        return f"perceptual: pHash within {report.threshold:g} bits"
    if report.method is Method.VERIFIED:
        return _verified_method(report.threshold, report.min_inliers)
    return f"embedding: cosine >= {report.threshold:g}"


def _match_score(report: AgainstReport, match: ReferenceMatch) -> str:
    if match.score is None:
        return "identical"
    if report.method is Method.PERCEPTUAL:
        return f"{match.score:.0f} bits"
    return _verified_text(f"cosine {match.score:.3f}", match.inliers, match.transform)


def _print_against_table(report: AgainstReport) -> None:
    print(
        f"{len(report.found)} of {len(report.results)} image(s) already in the reference "
        f"({report.reference_images} image(s); {_against_method(report)}) "
        f"in {report.seconds:.1f}s"
    )
    for result in report.results:
        if not result.found:
            print(f"  new    {result.path}")
            continue
        print(f"  found  {result.path}")
        for match in result.matches:
            print(f"           = {match.path}  ({_match_score(report, match)})")
    if report.failed:
        print(f"\n{len(report.failed)} file(s) could not be read and were left out:")
        for path, reason in report.failed:
            print(f"  {path}: {reason}")


def _print_against_json(report: AgainstReport) -> None:
    payload: dict[str, Any] = {
        "method": report.method.value,
        "threshold": report.threshold,
        "min_inliers": report.min_inliers,
        "reference_images": report.reference_images,
        "images": len(report.results),
        "found": len(report.found),
        "seconds": round(report.seconds, 3),
        "results": [
            {
                "path": r.path,
                "status": "found" if r.found else "new",
                "matches": [asdict(m) for m in r.matches],
            }
            for r in report.results
        ],
        "failed": [{"path": p, "reason": r} for p, r in report.failed],
    }
    print(json.dumps(payload, indent=2))


def _print_against_csv(report: AgainstReport) -> None:
    """One row per (query, match), and one row with status ``new`` per new image."""
    fields = ("path", "status", "match", "match_id", "score", "inliers", *_TRANSFORM_FIELDS)
    writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for result in report.results:
        if not result.found:
            writer.writerow({"path": result.path, "status": "new"})
        for match in result.matches:
            writer.writerow(
                {
                    "path": result.path,
                    "status": "found",
                    "match": match.path,
                    "match_id": match.id,
                    "score": match.score,
                    "inliers": match.inliers,
                    **(
                        {k: getattr(match.transform, k) for k in _TRANSFORM_FIELDS}
                        if match.transform is not None
                        else {}
                    ),
                }
            )
    for path, reason in report.failed:
        print(f"lookalike: could not read {path}: {reason}", file=sys.stderr)


def _print_against_paths(report: AgainstReport) -> None:
    """The new images that already exist in the reference, one a line."""
    for result in report.found:
        print(result.path)
    for path, reason in report.failed:
        print(f"lookalike: could not read {path}: {reason}", file=sys.stderr)
