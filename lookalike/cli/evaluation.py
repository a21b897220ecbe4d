"""``lookalike eval``: measure retrieval quality on a labelled dataset, or copy detection.

Wired into the main command as::

    evaluate = commands.add_parser("eval", help="measure retrieval quality on a dataset")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=run_eval)

This module prints (it is command-line code); the library functions it calls do not.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.errors import LookalikeError
from lookalike.evaluation.metrics import DEFAULT_KS, SCORE_METRICS

if TYPE_CHECKING:
    from lookalike.encoders.base import Encoder
    from lookalike.evaluation.copydetect import CopyDetectionResult
    from lookalike.evaluation.report import EvaluationResult

DEFAULT_OUT = "eval-report"


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``lookalike eval`` to ``parser`` (a subcommand parser)."""
    from lookalike.evaluation.copydetect import ALL_ATTACKS

    parser.add_argument(
        "dataset",
        help="dataset folder: DATASET/<label>/*.jpg or DATASET/<split>/<label>/*.jpg, "
        "or a CSV of path,label[,split]",
    )
    parser.add_argument(
        "--csv",
        metavar="FILE",
        help="CSV with path and label (and optional split) columns, paths relative to the "
        "CSV's folder; a relative FILE not found as given is looked for in DATASET",
    )
    parser.add_argument(
        "--protocol",
        choices=("split", "leave-one-out"),
        help="split: queries from --query-split against --database-split; leave-one-out: every "
        "image against all others (default: split when both splits exist)",
    )
    parser.add_argument("--query-split", default="test", metavar="NAME")
    parser.add_argument("--database-split", default="train", metavar="NAME")
    parser.add_argument(
        "--model",
        help="encoder name (default: efficientnet-lite0; for copy detection, a new collection's "
        "default model)",
    )
    parser.add_argument(
        "--layer", help="layer to pool: head or stage4..stage7 (default: the model's head)"
    )
    parser.add_argument("--metric", choices=SCORE_METRICS, default="cosine")
    parser.add_argument("--runtime", choices=("auto", "onnx", "openvino", "torch"), default="auto")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="EfficientNet-Lite arithmetic (default: the encoder's own, fp32; for copy "
        "detection, a new collection's: auto)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for report.json and pr_curve.png (default: ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--copy-detection",
        action="store_true",
        help="find attacked copies of database images among the database instead of "
        "measuring class-level retrieval: the database (--database-split when the dataset has "
        "it) is indexed into a collection and every copy is searched through it, as `lookalike "
        "search` does",
    )
    parser.add_argument(
        "--attacks",
        default="all",
        metavar="LIST",
        help=f"comma-separated copy-detection attacks (default: all {len(ALL_ATTACKS)}: "
        f"{','.join(ALL_ATTACKS)}); 'classic' and 'hard' name the first 10 and the last 6",
    )
    parser.add_argument(
        "--collection",
        metavar="DIR",
        help="copy detection: the collection to index the database into and search (kept, so "
        "a later run indexes nothing again; default: a temporary one)",
    )
    parser.add_argument(
        "--local-features",
        action="store_true",
        help="copy detection: also store local features of the database (for --rerank)",
    )
    parser.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="copy detection: verify the N best candidates by local features, as `search "
        "--rerank N` (needs --local-features, or a --collection that has them)",
    )
    parser.add_argument(
        "--no-copy-views",
        dest="copy_views",
        action="store_false",
        help="copy detection: search with each copy as it is only (no pixel check, no "
        "upright or trimmed views: the search before they were the default)",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=200,
        metavar="N",
        help="database images attacked, each by every attack (default: 200)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and the attacks")
    parser.add_argument(
        "--top-k",
        type=int,
        default=10,
        metavar="K",
        help="copy-detection candidates kept per query (recall@K, micro-AP)",
    )
    parser.add_argument(
        "--save-copies",
        metavar="DIR",
        help="also write the attacked copies as PNG files into DIR",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``lookalike eval``; returns the exit status (errors raise LookalikeError)."""
    from lookalike.cli.common import ProgressBars
    from lookalike.evaluation.datasets import load_dataset, make_task
    from lookalike.evaluation.report import run_evaluation

    for name in ("batch_size", "copies", "top_k"):
        if getattr(args, name) < 1:
            raise LookalikeError(f"--{name.replace('_', '-')} must be at least 1")
    if args.rerank < 0:
        raise LookalikeError("--rerank must be 0 or more")
    if args.seed < 0:
        raise LookalikeError("--seed must be non-negative")

    if args.copy_detection:
        return _run_copy_detection(args)
    dataset = load_dataset(args.dataset, csv_file=args.csv)
    task = make_task(
        dataset,
        args.protocol,
        query_split=args.query_split,
        database_split=args.database_split,
    )
    encoder = _encoder(args)
    with ProgressBars(quiet=args.quiet) as bars:
        result = run_evaluation(
            task,
            encoder,
            metric=args.metric,
            ks=DEFAULT_KS,
            out_dir=Path(args.out),
            batch_size=args.batch_size,
            progress=bars.update,
        )
    _print_retrieval(args, task.describe(), result)
    print(f"wrote {result.report_path} and {result.plot_path}")
    return 0


def _copy_detection_database(args: argparse.Namespace) -> tuple[list[Path], dict[str, object]]:
    """The images to attack and search among: the database split when the dataset has it
    (unless --protocol leave-one-out), else every image; a folder needs no class layout."""
    from lookalike.core.ingest import scan_folder
    from lookalike.evaluation.datasets import load_dataset

    source = Path(args.dataset)
    try:
        dataset = load_dataset(source, csv_file=args.csv)
    except LookalikeError:
        if args.csv is not None or not source.is_dir():
            raise
        # Copy detection needs no labels: any folder of images will do.
        paths = list(scan_folder(source))
        if not paths:
            raise LookalikeError(f"no images found under {source}") from None
        return paths, {"root": str(source), "database_split": None, "database": len(paths)}
    split = args.database_split
    if args.protocol == "leave-one-out" or split not in dataset.split_names():
        if args.protocol == "split":
            raise LookalikeError(
                f"no split {split!r} in {source}; splits are {dataset.split_names() or 'none'}"
            )
        split = None
    paths = [dataset.paths[i] for i in dataset.indices(split)]
    return paths, {"root": str(dataset.root), "database_split": split, "database": len(paths)}


def _run_copy_detection(args: argparse.Namespace) -> int:
    import tempfile

    from lookalike.cli.common import ProgressBars
    from lookalike.core.collection import Collection
    from lookalike.evaluation.copydetect import (
        CollectionSearch,
        parse_attacks,
        run_copy_detection,
    )
    from lookalike.evaluation.report import encoder_info, write_report

    attacks = parse_attacks(args.attacks)
    database, described = _copy_detection_database(args)
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as scratch:
        folder = Path(args.collection).expanduser() if args.collection else Path(scratch)
        collection = Collection(
            folder,
            model=args.model,
            layer=args.layer,
            precision=args.precision,
            runtime=args.runtime,
        )
        with collection, ProgressBars(quiet=args.quiet) as bars:
            search = CollectionSearch(
                collection,
                database,
                local_features=args.local_features,
                progress=bars.update,
                metric=args.metric,
                rerank=args.rerank,
                copy_views=args.copy_views,
            )
            copies = run_copy_detection(
                database,
                search=search,
                attacks=attacks,
                copies=args.copies,
                seed=args.seed,
                k=args.top_k,
                metric=args.metric,
                batch_size=args.batch_size,
                save_dir=args.save_copies,
                progress=bars.update,
            )
            encoder = collection.encoder
            described["collection"] = str(folder) if args.collection else None
            described["indexed_now"] = search.indexed
            kind = collection.local_store.kind()
            search_info = {
                "rerank": args.rerank,
                "copy_views": args.copy_views,
                "local_features": kind.name if kind is not None else None,
            }
    extra = {"dataset": described, "encoder": encoder_info(encoder), "search": search_info}
    report_path, plot_path = write_report(Path(args.out), copy_detection=copies, extra=extra)
    _print_copy_detection(args, encoder, len(database), copies)
    print(f"wrote {report_path} and {plot_path}")
    return 0


def _encoder(args: argparse.Namespace) -> Encoder:
    """The encoder the arguments name (``--precision`` only when given: not every family
    takes it)."""
    from lookalike.encoders import create_encoder

    options: dict[str, Any] = {
        "layer": args.layer or "head",
        "normalize": False,
        "runtime": args.runtime,
    }
    if args.precision is not None:
        options["precision"] = args.precision
    return create_encoder(args.model or "efficientnet-lite0", **options)


def _print_retrieval(
    args: argparse.Namespace, task: dict[str, Any], result: EvaluationResult
) -> None:
    split = (
        f"{task['queries']} {task['query_split']} queries against {task['database']} "
        f"{task['database_split']} images"
        if task["protocol"] == "split"
        else f"{task['queries']} images, each against all the others"
    )
    print(f"dataset  {task['root']}: {task['classes']} classes, {task['protocol']} ({split})")
    print(f"model    {args.model} (layer {args.layer}), metric {args.metric}")
    metrics = result.metrics
    if metrics.queries_without_relevant:
        print(f"note     {metrics.queries_without_relevant} queries have no relevant image")
    print()
    print(f"{'k':>5}  {'precision':>9}  {'recall':>7}  {'F1':>7}  {'mAP@k':>7}")
    for k in metrics.ks:
        print(
            f"{k:>5}  {metrics.precision_at_k[k]:>9.4f}  {metrics.recall_at_k[k]:>7.4f}  "
            f"{metrics.f1_at_k[k]:>7.4f}  {metrics.map_at_k[k]:>7.4f}"
        )
    print(f"\nmAP {metrics.mean_ap:.4f}")


def _print_copy_detection(
    args: argparse.Namespace, encoder: Encoder, database_size: int, result: CopyDetectionResult
) -> None:
    identity = encoder.identity
    how = [f"rerank {args.rerank}" if args.rerank else "no re-ranking"]
    how.append("copy views" if args.copy_views else "no copy views")
    print(
        f"copy detection: {len(result.sources)} images attacked, searched among "
        f"{database_size} (model {identity.model}, layer {identity.layer}, metric "
        f"{args.metric}, {', '.join(how)}, seed {args.seed})"
    )
    print()
    k = result.k
    w = max([10, *(len(a.attack) for a in result.attacks)])
    header = (
        f"{'attack':<{w}}  {'queries':>7}  {'recall@1':>8}  {f'recall@{k}':>9}  {'micro-AP':>8}"
        f"  {'ms/query':>8}"
    )
    print(header)
    for attack in result.attacks:
        print(
            f"{attack.attack:<{w}}  {attack.queries:>7}  {attack.recall_at_1:>8.4f}  "
            f"{attack.recall_at_k:>9.4f}  {attack.micro_ap:>8.4f}  {attack.query_ms:>8.1f}"
        )
    recall_k = sum(a.recall_at_k for a in result.attacks) / max(1, len(result.attacks))
    print(
        f"{'mean':<{w}}  {'':>7}  {result.mean_recall_at_1:>8.4f}  {recall_k:>9.4f}  "
        f"{result.mean_micro_ap:>8.4f}  {result.mean_query_ms:>8.1f}"
    )
    min_k = min((a.recall_at_k for a in result.attacks), default=0.0)
    print(
        f"{'min':<{w}}  {'':>7}  {result.min_recall_at_1:>8.4f}  {min_k:>9.4f}  "
        f"{result.min_micro_ap:>8.4f}"
    )
    print(f"pooled micro-AP over all attacks: {result.pooled_micro_ap:.4f}")
