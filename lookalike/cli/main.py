"""The ``lookalike`` command: a thin layer over the library. Only lookalike.cli prints."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from lookalike.cli.common import (
    COLLECTION_ENV,
    DB_ENV,
    CommandParser,
    ProgressBars,
    collection_path,
    database_url,
    open_collection,
    require_collection,
)
from lookalike.errors import LookalikeError

if TYPE_CHECKING:
    from pathlib import Path

    from lookalike.core.ingest import IngestExecutor, ScanRules
    from lookalike.core.watch import ChangeReport, FolderWatcher
    from lookalike.encoders.base import Encoder


def _cmd_index(args: argparse.Namespace) -> int:
    options = {"model": args.model, "layer": args.layer, "runtime": args.runtime}
    options |= {"pooling": args.pooling, "scales": args.scales, "whitening": args.whiten}
    options |= {"precision": args.precision}
    options |= {"text_model": args.text_model, "device": args.device}
    with open_collection(args, index_spec=args.index, **options) as collection:
        with ProgressBars(quiet=args.quiet) as bars:
            report = collection.index(
                args.folder,
                batch_size=args.batch_size,
                workers=args.workers,
                metadata_csv=args.metadata,
                progress=bars.stage(),
                local_features=args.local_features,
                executor=_ray_executor(args),
                follow_symlinks=args.follow_symlinks,
                max_file_bytes=args.max_file_size,
                rules=_scan_rules(args),
            )
        total = len(collection)
    print(
        f"indexed {_shown(args.folder)}: {report.added} added, {report.updated} updated, "
        f"{report.moved} moved, {report.removed} removed, {report.unchanged} unchanged, "
        f"{len(report.failed)} failed "
        f"in {report.seconds:.1f}s ({report.images_per_second:.1f} images/s); "
        f"{total} images in the collection"
    )
    for path, reason in report.failed:
        print(f"  skipped {_shown(path)}: {_shown(reason)}")
    if report.skipped:
        print(f"  left out on purpose (not failures): {_skipped_summary(report.skipped)}")
    if report.switch == "done":
        print(f"switched to {collection.model_name}: searches use it from now on")
    elif report.switch == "pending":
        print(
            "the model switch is not finished: images in other folders lack the new model's "
            "vectors; index those folders too (searches use the old model until then)"
        )
    return 0


def _scan_rules(args: argparse.Namespace) -> ScanRules:
    from lookalike.core.ingest import ScanRules

    cap: dict[str, float | None] = {}
    if args.max_megapixels is not None:  # inf: 'none', no cap
        cap["max_megapixels"] = None if args.max_megapixels == float("inf") else args.max_megapixels
    return ScanRules(
        exclude=tuple(args.exclude),
        include_hidden=args.include_hidden,
        raw_with_jpeg=args.raw_with_jpeg,
        **cap,
    )


def _megapixels(text: str) -> float:
    """``--max-megapixels``: a positive number, or ``none`` for no cap (infinity)."""
    if text.strip().lower() in ("none", "unlimited"):
        return float("inf")
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of megapixels")
    return value


def _skipped_summary(skipped: list[tuple[str, str]]) -> str:
    """``2 hidden, 5 system folders, 3 excluded, 1 RAW beside its JPEG``, from the reasons'
    first words."""
    kinds = {"hidden": 0, "system": 0, "excluded": 0, "RAW": 0}
    for _, reason in skipped:
        first = reason.removeprefix("inside a skipped folder (").split(" ", 1)[0]
        kinds[first if first in kinds else "excluded"] += 1
    words = {"hidden": "hidden", "system": "system folder", "excluded": "excluded"}
    words["RAW"] = "RAW beside its JPEG"
    shown = [
        f"{count} {words[kind]}{'s' if kind == 'system' and count > 1 else ''}"
        for kind, count in kinds.items()
        if count
    ]
    return ", ".join(shown)


def _shown(text: str) -> str:
    """``text`` printable on any terminal: the bytes of a file name that is not valid UTF-8
    (surrogate escapes) are shown as ``\\xe9`` instead of failing the print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _file_size(text: str) -> int | None:
    """``--max-file-size``: bytes, or a number with K, M or G (powers of 1024); ``none``
    for no limit."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    from lookalike.core.ingest import parse_size

    try:
        return parse_size(text)
    except LookalikeError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _ray_executor(args: argparse.Namespace) -> IngestExecutor | None:
    if args.ray is None:
        return None
    from lookalike.distributed.ray_executor import RayExecutor, RayOptions

    return RayExecutor(RayOptions(address=args.ray or None, workers=args.ray_workers))


def _weights(text: str | None) -> list[float] | None:
    """``--weights 2,1,0.5``: one number per query part."""
    if text is None:
        return None
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise LookalikeError(
            f"--weights takes comma-separated numbers (positives, negatives, text), got {text!r}"
        ) from None


def _cmd_search(args: argparse.Namespace) -> int:
    from lookalike.errors import RequestError

    output = "json" if args.json else args.format
    if args.json and args.format not in ("table", "json"):
        raise RequestError(f"--json is --format json; it cannot go with --format {args.format}")
    weights = _weights(args.weights)
    shown = " ".join([*args.images, *(f"--not {n}" for n in args.negatives)])
    if args.text is not None:
        shown = f"{shown} {args.text}".strip() if args.images or args.negatives else args.text
    reply = None
    if args.server and not args.index:  # a one-off index is searched in this process
        from lookalike.cli.remote import search_remotely

        # A running `lookalike serve` of this collection has the model and index loaded.
        path = collection_path(args.collection)
        reply = search_remotely(args, path, database_url(args), weights)
    if reply is None:
        reply = _search_locally(args, weights)
    results: list[dict[str, Any]] = reply["results"]
    if reply.get("partial"):
        # Partial results are still results: printed as usual, with a warning beside them.
        print(
            "warning: part of the sharded index did not answer; these are the best results "
            "of the shards that did",
            file=sys.stderr,
        )
    if output == "json":
        payload = {
            "query": shown,
            "metric": reply["metric"],
            "threshold": reply["threshold"],
            "no_close_match": reply["no_close_match"],
            "results": results,
        }
        print(json.dumps(payload, indent=2))
    elif output == "paths":
        for result in results:
            print(result["path"])
    elif output == "csv":
        _print_search_csv(results)
    elif reply["no_close_match"]:
        best_score = reply["best_score"]
        best = "" if best_score is None else f" (best score {best_score:.4f})"
        print(f"no close match for {shown} at threshold {args.threshold}{best}")
    else:
        for rank, result in enumerate(results, 1):
            meta = " ".join(f"{k}={v}" for k, v in result["metadata"].items())
            copy = _copy_columns(result)
            print(f"{rank:3d}  {result['score']:8.4f}  {copy}{result['path']}  {meta}".rstrip())
    return 0


def _copy_columns(result: dict[str, Any]) -> str:
    """A copy search's probability and transform, as table columns ("" otherwise)."""
    probability = result.get("copy_probability")
    if probability is None:
        return ""
    transform = result.get("transform")
    if transform is None:
        edit = "transform unknown"
    else:
        from lookalike.local.matching import EstimatedTransform

        edit = f"{EstimatedTransform(**transform).describe()}, {transform['inliers']} inliers"
    return f"p={probability:.3f}  ({edit})  "


def _search_locally(args: argparse.Namespace, weights: list[float] | None) -> dict[str, Any]:
    """The search in this process, as the plain data a server's local route answers
    (:mod:`lookalike.server.local`), so that both print alike."""
    from lookalike.core.search import Query, SearchOptions

    query = Query.of(args.images, negatives=args.negatives, text=args.text, weights=weights)
    options = SearchOptions(
        k=args.k,
        metric=args.metric,
        threshold=args.threshold,
        where=args.where,
        query_expansion=args.qe,
        rerank=args.rerank,
        multi_crop=args.multi_crop,
        copy_views=not args.no_copy_views,
        copies=args.copies,
        near=args.near,
        within=args.within,
        sort=args.sort,
    )
    with open_collection(args, create=False, runtime=args.runtime) as collection:
        if args.index:
            collection.use_index(args.index)
        if args.text_model:
            collection.use_text_model(args.text_model)
        response = collection.searcher.search_query(query, options)
    return {
        "metric": response.metric.value,
        "threshold": response.threshold,
        "no_close_match": response.no_close_match,
        "best_score": response.best_score,
        "partial": response.partial,
        "results": [asdict(r) for r in response.results],
    }


def _print_search_csv(results: Sequence[dict[str, Any]]) -> None:
    """rank, score, id, path, then one column per metadata key (in order of appearance)."""
    import csv

    keys: list[str] = []
    for result in results:
        keys += [key for key in result["metadata"] if key not in keys]
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["rank", "score", "id", "path", *keys])
    for rank, result in enumerate(results, 1):
        values = [result["metadata"].get(key, "") for key in keys]
        cells = [v if isinstance(v, str) else json.dumps(v) for v in values]
        writer.writerow([rank, f"{result['score']:.6f}", result["id"], result["path"], *cells])


def _cmd_info(args: argparse.Namespace) -> int:
    with open_collection(args, create=False) as collection:
        info = collection.info()
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    print(f"collection: {info.path}")
    print(f"images:     {info.images}")
    print(f"model:      {info.model} (layer {info.layer}, dim {info.dim})")
    held = " (an HNSW index inside PostgreSQL)" if info.index_spec.startswith("pgvector") else ""
    print(f"index:      {info.index_spec}{held}")
    print(f"recall@10:  {_recall_line(info.index_recall, info.index_tuning)}")
    print(f"schema:     v{info.schema_version}")
    for model in info.models:
        print(f"  vectors of {model['key']}: {model['vectors']}")
    if info.failures:
        print(f"failed files: {len(info.failures)}")
        for path, reason in info.failures:
            print(f"  {path}: {reason}")
    return 0


def _recall_line(recall: float | None, tuning: dict[str, Any] | None) -> str:
    """What ``info`` says about the index's measured recall and its tuned knob."""
    if recall is None:
        return "not measured (a named spec, or the index is built at the next search)"
    if tuning is None or tuning.get("knob") is None:
        return f"{recall:.3f} (exact search)"
    line = (
        f"{recall:.3f} ± {tuning['stderr']:.3f} on {tuning['sample']} held-out vectors"
        f" (target {tuning['target']:g}) with {tuning['knob']}={tuning['value']}: {tuning['spec']}"
    )
    for fallback in tuning.get("fallbacks") or []:
        line += f"; tried first: {fallback['spec']}, {fallback['recall']:.3f}"
    if not tuning.get("reached", True):
        line += " -- below the target: no structure that reaches it fits the memory budget"
    return line


def _cmd_remove(args: argparse.Namespace) -> int:
    targets: list[int | str] = [int(t) if t.isdigit() else t for t in args.targets]
    with open_collection(args, create=False) as collection:
        removed = collection.remove(targets)
    print(f"removed {removed} image(s)")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from lookalike.core.check import CheckReport, Finding
    from lookalike.core.collection import CATALOG_FILE, CATALOG_LINK
    from lookalike.errors import CatalogCorruptError

    report: CheckReport
    try:
        with (
            open_collection(args, create=False) as collection,
            ProgressBars(quiet=args.quiet) as bars,
        ):
            report = collection.check(args.repair, progress=bars.stage("re-embedding"))
    except CatalogCorruptError as error:
        # Too damaged to open or to read: say so without the advice to run check again.
        path = collection_path(args.collection)
        link = path / CATALOG_LINK
        location = database_url(args) or (
            link.read_text(encoding="utf-8").strip() if link.is_file() else str(path / CATALOG_FILE)
        )
        cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
        raise LookalikeError(
            f"{location}: the catalog file is damaged{cause} and `lookalike check` cannot repair "
            "it: restore it from a backup, or move it aside and index your folders again"
        ) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.healthy else 1

    def show(title: str, findings: list[Finding], limit: int = 20) -> None:
        if not findings:
            return
        print(f"{title} ({len(findings)}):")
        for finding in findings[:limit]:
            print(f"  {finding.kind:8s} {finding.subject}: {finding.detail}")
            if finding.repaired is not None:
                print(f"           repaired: {finding.repaired}")
            elif finding.problem and finding.advice:
                print(f"           fix: {finding.advice}")
        if len(findings) > limit:
            print(f"  ... and {len(findings) - limit} more (--json lists every one)")

    print(f"checked {report.collection} (catalog {report.catalog}, {report.images} images)")
    show("problems", report.problems)
    show("notes", report.notes)
    if report.repair:
        print(
            f"re-embedded {report.re_embedded}, removed {report.removed}, deleted "
            f"{len(report.deleted)} derived file(s), rebuilt {len(report.rebuilt)} index file(s)"
        )
    if not report.problems:
        print("no problems found")
    elif report.healthy:
        print(f"all {len(report.problems)} problem(s) repaired")
    elif report.repair:
        print(f"{len(report.unrepaired)} problem(s) not repaired: see fix: above")
    else:
        print(
            f"{len(report.problems)} problem(s) found: `lookalike check --repair` repairs "
            "what it can"
        )
    return 0 if report.healthy else 1


_STOP_POLL_SECONDS = 0.2


class _StopRequest:
    """Notes a stop signal without raising: a KeyboardInterrupt raised inside
    ``threading.Event.wait`` can leave the event's lock held (CPython before 3.12), after
    which the watcher could never report that it ended. A second signal stops at once."""

    def __init__(self) -> None:
        self.made = False

    def handle(self, signum: int, frame: object) -> None:
        """The signal handler: the first signal asks, the second interrupts."""
        del frame
        if self.made:
            raise KeyboardInterrupt(f"signal {signum}")
        self.made = True


def _cmd_watch(args: argparse.Namespace) -> int:
    import signal

    from lookalike.core.watch import FolderWatcher, WatchOptions

    options = {"model": args.model, "layer": args.layer, "runtime": args.runtime}
    options |= {"pooling": args.pooling, "scales": args.scales, "whitening": args.whiten}
    options |= {"precision": args.precision}
    options |= {"text_model": args.text_model}
    watching = WatchOptions(
        debounce=args.debounce,
        max_delay=max(10.0, args.debounce),
        batch_size=args.batch_size,
        workers=args.workers,
        follow_symlinks=args.follow_symlinks,
        max_file_bytes=args.max_file_size,
        metadata_csv=args.metadata,
        local_features=args.local_features,
        rules=_scan_rules(args),
        polling=args.polling,
    )
    for folder in args.folders:  # before the collection is made
        if not os.path.isdir(os.path.expanduser(folder)):
            raise LookalikeError(f"{folder}: not a folder")
    with open_collection(args, index_spec=args.index, **options) as collection:
        watcher = FolderWatcher(
            collection, args.folders, watching, on_report=_print_changes, on_error=_print_problem
        )
        # Ctrl-C, or SIGTERM (a service manager stopping it), ends it with changes applied.
        request = _StopRequest()
        stop_signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, request.handle) for sig in stop_signals}
        try:
            watcher.start()
            print(f"watching {', '.join(map(_shown, watcher.folders))} (Ctrl-C stops)", flush=True)
            while not request.made and not watcher.wait(_STOP_POLL_SECONDS):
                pass
            if request.made:
                print("stopping: applying the changes seen so far", file=sys.stderr, flush=True)
        finally:
            watcher.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print("stopped watching", flush=True)
    return 0


def _print_changes(report: ChangeReport) -> None:
    """One line for a watcher's catch-up or batch of changes (from its thread)."""
    if report.folder is None and not (report.changes or report.failed):
        return  # only files still being written, left for later
    head = time.strftime("%H:%M:%S ")
    if report.folder is not None:
        head += f"caught up with {_shown(report.folder)}: "
    unchanged = f", {report.unchanged} unchanged" if report.folder is not None else ""
    print(
        f"{head}{report.added} added, {report.updated} updated, {report.moved} moved, "
        f"{report.removed} removed{unchanged}, {len(report.failed)} failed "
        f"({report.seconds:.1f}s)",
        flush=True,
    )
    for path, reason in report.failed:
        print(f"  skipped {_shown(path)}: {_shown(reason)}", flush=True)


def _print_problem(error: LookalikeError) -> None:
    """An error a watcher goes on after (it tries the batch again later)."""
    print(f"lookalike: {_shown(str(error))}", file=sys.stderr, flush=True)


def _serve_watcher(
    args: argparse.Namespace, path: Path, db: str | None, encoder: Encoder | None = None
) -> FolderWatcher | None:
    """``serve --watch``: a watcher with its own collection object of the served collection
    (the server's searches see what it writes), sharing the server's encoder when given."""
    if not args.watch:
        return None
    from lookalike.core.collection import Collection
    from lookalike.core.watch import FolderWatcher, WatchOptions

    collection = Collection(path, db=db)
    try:
        if encoder is not None and collection.switching_to is None:
            collection.use_encoder(encoder)  # one model in memory, not two
        watcher = FolderWatcher(
            collection,
            args.watch,
            WatchOptions(debounce=args.debounce, max_delay=max(10.0, args.debounce)),
            on_report=_print_changes,
            on_error=_print_problem,
        ).start()
    except BaseException:
        collection.close()
        raise
    print(f"watching {', '.join(map(_shown, watcher.folders))}", flush=True)
    return watcher


def _stop_on_sigterm(watcher: FolderWatcher | None) -> None:
    """With a watcher, SIGTERM ends the server as Ctrl-C does (uvicorn raises the signal
    again once it has shut down), so the watcher applies what it saw before the exit."""
    if watcher is not None:
        import signal

        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _stop_watching(watcher: FolderWatcher | None) -> None:
    if watcher is not None:
        try:
            watcher.stop()
        finally:
            watcher.collection.close()
        print("stopped watching", flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lookalike.cli.remote import announce

    path = collection_path(args.collection)
    db = database_url(args)
    if not args.watch:  # with --watch, its catch-up makes the collection
        require_collection(path, db, args.collection)
    token = args.token or os.environ.get("LOOKALIKE_TOKEN")
    if args.workers > 1:
        if args.grpc_port is not None:
            raise LookalikeError("--grpc-port needs --workers 1 (gRPC runs in the same process)")
        # Each worker process opens the collection itself, configured through the environment.
        os.environ["LOOKALIKE_COLLECTION"] = str(path.resolve())
        if db is not None:
            os.environ[DB_ENV] = db
        # Workers share the cores: without this each would start one inference thread per core.
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        os.environ.setdefault("LOOKALIKE_THREADS", str(threads))
        if token:
            os.environ["LOOKALIKE_TOKEN"] = token
        if args.duplicates_to:
            os.environ["LOOKALIKE_DUPLICATES_TO"] = os.path.abspath(args.duplicates_to)
        print(f"serving {path} on http://{args.host}:{args.port} with {args.workers} workers")
        # The watcher runs here, in the process that supervises the workers.
        watcher = _serve_watcher(args, path, db)
        _stop_on_sigterm(watcher)
        # Announced in the collection folder while it runs: `lookalike search` asks it.
        try:
            with announce(path, host=args.host, port=args.port, db=db) as key:
                if key:
                    os.environ["LOOKALIKE_LOCAL_KEY"] = key
                uvicorn.run(
                    "lookalike.server.rest:create_app_from_env",
                    factory=True,
                    host=args.host,
                    port=args.port,
                    workers=args.workers,
                    log_level="warning",
                )
        finally:
            _stop_watching(watcher)
        return 0
    from lookalike.core.collection import Collection
    from lookalike.server.rest import create_app
    from lookalike.server.service import SearchService

    service = SearchService(Collection(path, db=db), token=token, duplicates_to=args.duplicates_to)
    grpc_server = None
    if args.grpc_port is not None:
        service.warm_up()
        from lookalike.server.grpc_server import create_grpc_server

        grpc_server, port = create_grpc_server(service, host=args.host, port=args.grpc_port)
        print(f"gRPC on {args.host}:{port}")
    watcher = _serve_watcher(args, path, db, service.collection.encoder if args.watch else None)
    _stop_on_sigterm(watcher)
    print(f"serving {path} on http://{args.host}:{args.port}")
    try:
        with announce(path, host=args.host, port=args.port, db=db) as key:
            app = create_app(service, local_key=key)
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        _stop_watching(watcher)
        if grpc_server is not None:
            grpc_server.stop(grace=2)
    return 0


# The options of ``index`` that ``watch`` takes too (by destination).
_WATCH_SHARES_WITH_INDEX = frozenset(
    {"model", "layer", "text_model", "batch_size", "workers", "metadata", "index", "runtime",
     "pooling", "scales", "precision", "whiten", "local_features", "max_file_size",
     "follow_symlinks", "exclude", "include_hidden", "raw_with_jpeg", "max_megapixels"}
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="lookalike", description="Find images that look alike.")
    parser.add_argument(
        "--collection",
        "-c",
        help=f"collection folder or name (default: ${COLLECTION_ENV}, else 'default' "
        "under $LOOKALIKE_HOME or ~/.local/share/lookalike)",
    )
    parser.add_argument(
        "--db",
        help=f"catalog location: postgresql://USER@HOST/DATABASE for a catalog that several "
        f"servers share, or a SQLite file (default: ${DB_ENV}, else the one the collection "
        "folder names, else its own catalog.sqlite)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    index = commands.add_parser("index", help="index (or re-index) a folder of images")
    index.add_argument("folder")
    index.add_argument("--model", help="encoder name (default: efficientnet-lite0)")
    index.add_argument("--layer", help="layer to pool: head (default) or stage4..stage7")
    index.add_argument(
        "--text-model",
        metavar="NAME",
        help="embed --text queries with this sentence-transformers model trained into the "
        "image model's space, e.g. hf:sentence-transformers/clip-ViT-B-32-multilingual-v1 with "
        "--model hf:openai/clip-vit-base-patch32 for queries in 50+ languages (remembered; "
        "'none' forgets it)",
    )
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--workers", type=int, default=None, help="decoding processes")
    index.add_argument("--metadata", help="CSV keyed by file name whose columns become metadata")
    index.add_argument(
        "--index",
        help="vector index spec, e.g. exact, hnsw:M=32,ef=128, ivfpq:nlist=4096,m=64 "
        "(default: auto, i.e. auto:recall=0.95: chosen by collection size and memory, its "
        "search knob tuned on the collection's own vectors to reach that recall@10); "
        "pgvector[:options] or shared: an HNSW index inside the PostgreSQL catalog that every "
        "server shares (docs/scaling.md)",
    )
    index.add_argument(
        "--runtime",
        choices=("auto", "onnx", "openvino", "torch"),
        default="auto",
        help="where the encoder runs (default auto: on a CPU the faster of OpenVINO and ONNX "
        "Runtime, measured once); never changes the vectors",
    )
    index.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="embed on a CUDA GPU (PyTorch, or ONNX Runtime's CUDA provider), decoding in "
        "worker processes; auto (default) takes a GPU when one can be used, cuda insists",
    )
    index.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="arithmetic of the vectors (remembered; default auto for a new collection: bf16 "
        "where the CPU runs it natively through OpenVINO, else fp32; fp32 for one indexed "
        "before precision was an option); another one re-embeds every image",
    )
    index.add_argument(
        "--pooling",
        choices=("avg", "gem"),
        help="EfficientNet pooling (remembered; default gem for a new collection, avg for "
        "one indexed before pooling was an option)",
    )
    index.add_argument(
        "--scales", help="EfficientNet multi-scale extraction, e.g. 1,0.707 (remembered)"
    )
    index.add_argument(
        "--whiten",
        type=int,
        metavar="DIMS",
        help="PCA-whiten cosine search to DIMS dimensions, learned on the collection "
        "(remembered; 0 turns it off)",
    )
    index.add_argument(
        "--local-features",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also store SIFT features (~33 KB an image) for search --rerank; remembered "
        "(default: as the collection was last indexed)",
    )
    index.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="decode and embed on a Ray cluster: no ADDRESS finds a running one or starts a "
        "local one, 'auto' needs a running one, or HOST:PORT / ray://HOST:PORT (needs "
        "lookalike[ray]; files must be readable at the same paths on every node)",
    )
    index.add_argument(
        "--ray-workers", type=int, default=None, help="Ray encoder workers (default: one per CPU)"
    )
    index.add_argument(
        "--max-file-size",
        type=_file_size,
        default="256M",
        metavar="SIZE",
        help="skip (and report) files larger than SIZE: bytes, or with K, M or G (powers of "
        "1024), e.g. 50MB; 'none' for no limit (default: 256M)",
    )
    index.add_argument(
        "--follow-symlinks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="index the files and folders symlinks point to (default); with "
        "--no-follow-symlinks they are skipped and reported",
    )
    index.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files and folders matching GLOB (repeatable; any case): a name at any "
        "depth ('*.tmp.jpg', 'drafts'), or with '/' a path below FOLDER ('2019/raw', "
        "'**/exports/*'); a trailing '/' matches folders only. FOLDER/.lookalikeignore adds "
        "one GLOB per line",
    )
    index.add_argument(
        "--include-hidden",
        action="store_true",
        help="index hidden files and folders (names starting with '.') too; system folders "
        "(.git, @eaDir, .thumbnails, $RECYCLE.BIN...) stay skipped",
    )
    index.add_argument(
        "--raw-with-jpeg",
        action="store_true",
        help="index a camera RAW file even when a JPEG of the same name is beside it "
        "(default: only the JPEG)",
    )
    index.add_argument(
        "--max-megapixels",
        type=_megapixels,
        default=None,
        metavar="N",
        help="report and skip images above N megapixels; 'none' for no cap (default: 89.5, "
        "Pillow's own limit)",
    )
    index.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    index.set_defaults(run=_cmd_index)

    watch = commands.add_parser(
        "watch",
        help="keep the collection in step with folders as files change (Ctrl-C stops)",
        description="Index each FOLDER as `index` does (what changed while nothing watched), "
        "then follow it: files added, changed, moved, renamed or deleted reach the collection "
        "within about --debounce seconds of quiet. A moved file keeps its image (id, metadata) "
        "and is not embedded again. Ctrl-C applies the changes seen so far and stops.",
    )
    watch.add_argument("folders", nargs="+", metavar="FOLDER")
    for action in index._actions:  # the options index takes, where they apply
        if action.dest in _WATCH_SHARES_WITH_INDEX:
            watch._add_action(action)
    watch.add_argument(
        "--debounce",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="apply changes once the folders have been quiet this long (default: 1)",
    )
    watch.add_argument(
        "--polling",
        action="store_true",
        help="look for changes by polling (network shares whose changes the system does not "
        "report) instead of the system's file events",
    )
    watch.set_defaults(run=_cmd_watch)

    search = commands.add_parser(
        "search",
        help="find the images most like IMAGE(s), or matching --text (CLIP models)",
        description="Search by one or more images, minus --not images, plus --text: the "
        "query is the weighted sum of the parts' normalised vectors (negatives subtracted), "
        'renormalised. E.g. lookalike search a.jpg b.jpg --not c.jpg --text "red" '
        "--weights 2,1,1,0.5",
    )
    search.add_argument("images", nargs="*", metavar="IMAGE", help="positive query images")
    search.add_argument(
        "--not",
        dest="negatives",
        action="append",
        default=[],
        metavar="IMAGE",
        help="a negative image: move away from it (repeatable)",
    )
    search.add_argument(
        "--text", help="a text query, alone or with images (needs a CLIP or SigLIP model)"
    )
    search.add_argument(
        "--text-model",
        metavar="NAME",
        help="embed --text with this text model for this search (default: the one index "
        "--text-model remembered, else the image model)",
    )
    search.add_argument(
        "--weights",
        metavar="W,W,...",
        help="one positive weight per part, in the order: positives, negatives, text "
        "(default all 1; a negative's weight is subtracted)",
    )
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--metric", choices=("cosine", "euclidean", "dot"), default="cosine")
    search.add_argument("--threshold", type=float, help="no results weaker than this")
    search.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="EXPR",
        help="keep images whose metadata meets KEY OP VALUE, OP one of = != >= <= > < ~= "
        "(~= case-insensitive substring); dates compare as dates, numbers as numbers: "
        "--where taken>=2024-01-01 --where camera~=pixel (repeatable, all must hold)",
    )
    search.add_argument(
        "--near",
        metavar="LAT,LON,KM",
        help="keep photos taken within KM kilometres of LAT,LON (their GPS position)",
    )
    search.add_argument(
        "--within",
        metavar="S,W,N,E",
        help="keep photos taken inside this box of latitudes and longitudes",
    )
    search.add_argument(
        "--sort",
        metavar="KEY",
        help="order the k results by a metadata key (taken, or -taken for newest first); "
        "images without it come last. Default: by score",
    )
    search.add_argument(
        "--qe", type=int, default=0, metavar="N", help="query expansion with the N nearest (cosine)"
    )
    search.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="verify the N best by local features (SIFT, or patch tokens with a ViT model) and "
        "move copies up (needs an index made with --local-features)",
    )
    search.add_argument(
        "--multi-crop",
        action="store_true",
        help="also search with the query's centre and corner crops; best score per image",
    )
    search.add_argument(
        "--copies",
        action="store_true",
        help="only verified copies of the image (SIFT + RANSAC), most probable first, each "
        "with the calibrated probability that it is a copy and how the query was made from "
        "it (rotation, scale, mirror); needs an index made with --local-features",
    )
    search.add_argument(
        "--no-copy-views",
        action="store_true",
        help="search with the image as it is only: no pixel check of the best candidates' "
        "thumbnails and no upright or trimmed views (what finds edited copies)",
    )
    search.add_argument(
        "--format",
        choices=("table", "json", "csv", "paths"),
        default="table",
        help="table: for people; json: one object; csv: rank,score,id,path then metadata "
        "columns, with a header; paths: one path a line, for xargs",
    )
    search.add_argument("--json", action="store_true", help="the same as --format json")
    search.add_argument(
        "--index",
        help="search with this index spec for this search only (default: the collection's), "
        "e.g. pgvector to search inside the PostgreSQL catalog; searches in this process",
    )
    search.add_argument("--runtime", choices=("auto", "onnx", "openvino", "torch"), default="auto")
    search.add_argument(
        "--server",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask a running `lookalike serve` of this collection on this machine, which has "
        "the model loaded (default; the same results, searched locally when there is none); "
        "--no-server always searches in this process",
    )
    search.set_defaults(run=_cmd_search)

    info = commands.add_parser("info", help="describe the collection")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_cmd_info)

    serve = commands.add_parser("serve", help="serve the REST API and web page (and gRPC)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="HTTP worker processes")
    serve.add_argument("--grpc-port", type=int, help="also serve gRPC on this port")
    serve.add_argument("--token", help="bearer token required for writes ($LOOKALIKE_TOKEN)")
    serve.add_argument(
        "--duplicates-to",
        metavar="DIR",
        help="let the web page move duplicates (with the token and a confirmation) into DIR, "
        "a folder outside the indexed ones; never deletes, never overwrites",
    )
    serve.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="FOLDER",
        help="keep the collection in step with FOLDER while serving, as `lookalike watch` "
        "does (repeatable; searches see the changes)",
    )
    serve.add_argument(
        "--debounce",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with --watch: apply changes once the folders have been quiet this long",
    )
    serve.set_defaults(run=_cmd_serve)

    # Feature subcommands add their arguments when used: their modules stay unimported.
    evaluate = commands.add_parser("eval", help="measure retrieval quality on a dataset")
    evaluate.defer("lookalike.cli.evaluation", "add_eval_arguments", "run_eval")

    hashing = commands.add_parser("hash", help="learned binary codes: train, search, list")
    hashing.defer("lookalike.cli.hashing", "add_hash_arguments", "run_hash")

    finetune = commands.add_parser("finetune", help="train an encoder on labelled images")
    finetune.defer("lookalike.cli.finetune", "add_finetune_arguments", "run_finetune")

    dedup = commands.add_parser("dedup", help="find groups of duplicate images")
    dedup.defer("lookalike.cli.dedup", "add_dedup_arguments", "run_dedup")

    check = commands.add_parser(
        "check",
        help="verify the collection: catalog file, vector checksums, index files, changed files "
        "(exit 1 when problems remain)",
    )
    check.add_argument(
        "--repair",
        action="store_true",
        help="re-embed damaged vectors and changed files, remove images whose file is gone, "
        "delete and rebuild corrupt or stale index files",
    )
    check.add_argument("--json", action="store_true")
    check.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    check.set_defaults(run=_cmd_check)

    remove = commands.add_parser("remove", help="remove images by id or path")
    remove.add_argument("targets", nargs="+")
    remove.set_defaults(run=_cmd_remove)
    return parser


# Flags whose values may start with "-" (southern latitudes, western longitudes, -taken),
# which argparse would take for options; such a value is attached ("--near=-33.9,151.2,5").
_SIGNED_VALUES = {
    "--near": re.compile(r"-\.?\d.*"),
    "--within": re.compile(r"-\.?\d.*"),
    "--sort": re.compile(r"-[^-\s]\S+"),  # a single letter (-k) stays an option
}


def _attach_signed_values(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--near -33.9,151.2,5`` and ``--sort -taken`` as ``--flag=value``."""
    joined: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        pattern = _SIGNED_VALUES.get(token)
        if pattern is None:
            joined.append(token)
            continue
        value = next(tokens, None)
        if value is not None and pattern.fullmatch(value):
            joined.append(f"{token}={value}")
        else:
            joined += [token] if value is None else [token, value]
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lookalike`` command."""
    args = build_parser().parse_args(_attach_signed_values(sys.argv[1:] if argv is None else argv))
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except LookalikeError as error:
        print(f"lookalike: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lookalike: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
