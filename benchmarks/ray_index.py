"""Indexing on Ray against the single-process path, on the same machine and data, in one run.

single process: ``Collection.index`` (decoding threads, ONNX Runtime with all cores, SQLite).
Ray: ``Collection.index(executor=RayExecutor(RayOptions(...)))`` on a local Ray cluster with
this machine's CPUs:
encoder actors decode and embed chunks of files by path, the driver stores each chunk. Ray's
time includes starting the workers and loading one model per worker (a cost a long run
amortises); starting the cluster itself is reported apart. Every configuration indexes into a
fresh collection; the files are read once beforehand so that every run sees a warm page cache.
The SQLite catalog size per image of the single-process run is reported too.

    python benchmarks/ray_index.py [--dataset DIR] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

try:
    import lookalike  # noqa: F401
except ImportError:  # run from a checkout without installing
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookalike.core.collection import Collection
from lookalike.core.ingest import scan_folder
from lookalike.distributed.ray_executor import RayExecutor, RayOptions
from lookalike.encoders import create_encoder

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
RESULTS = Path(__file__).resolve().parent / "results" / "ray_index.md"


def index_once(dataset: Path, batch_size: int, ray: RayOptions | None) -> tuple[int, float, int]:
    """Index the folder into a fresh collection: (images, seconds, catalog bytes)."""
    with tempfile.TemporaryDirectory() as folder:
        with Collection(folder) as collection:
            collection.encoder  # noqa: B018 - the driver's model loads before the clock starts
            started = time.perf_counter()
            executor = RayExecutor(ray) if ray is not None else None
            report = collection.index(dataset, batch_size=batch_size, executor=executor)
            seconds = time.perf_counter() - started
            if report.failed:
                raise SystemExit(f"failed files: {report.failed[:3]}")
        size = sum(f.stat().st_size for f in Path(folder).glob("catalog.sqlite*"))
        return report.added, seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))
    cpus = os.cpu_count() or 1
    paths = list(scan_folder(args.dataset))
    for path in paths:  # warm the page cache for every run alike
        path.read_bytes()
    create_encoder("efficientnet-lite0")  # export to ONNX once, outside the timings
    print(f"dataset: {args.dataset} ({len(paths)} images), {cpus} CPU cores", flush=True)

    rows = []
    count, seconds, catalog = index_once(args.dataset, args.batch_size, None)
    single = count / seconds
    rows.append(("single process (threads decode, ONNX Runtime on all cores)", count, seconds))
    print(f"single process: {count} images in {seconds:.1f}s = {single:.1f} images/s", flush=True)

    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=False, configure_logging=False)  # fmt: skip
    cluster_seconds = time.perf_counter() - started
    print(f"local Ray cluster started in {cluster_seconds:.1f}s", flush=True)
    configs = [RayOptions(workers=cpus, threads=1), RayOptions(workers=1, threads=cpus)]
    try:
        for options in configs:
            count, seconds, _ = index_once(args.dataset, args.batch_size, options)
            label = f"Ray: {options.workers} worker(s) x {options.threads} thread(s)"
            rows.append((label, count, seconds))
            print(f"{label}: {count} images in {seconds:.1f}s = {count / seconds:.1f} images/s",
                  flush=True)  # fmt: skip
    finally:
        ray.shutdown()

    lines = [
        f"{len(paths)} images of `{args.dataset.name}`, EfficientNet-Lite0 (ONNX Runtime), batch "
        f"size {args.batch_size}, {cpus} CPU cores; local Ray cluster started in "
        f"{cluster_seconds:.1f} s (not included below).",
        "",
        "| path | images | seconds | images/s | vs single process |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, count, seconds in rows:
        rate = count / seconds
        lines.append(f"| {label} | {count} | {seconds:.1f} | {rate:.1f} | {rate / single:.2f}x |")
    lines += [
        "",
        f"SQLite catalog of the single-process run: {catalog:,} bytes, "
        f"{catalog / len(paths):,.0f} bytes per image (1280-d float32 vectors, 5,120 bytes).",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    args.output.write_text(
        "# Indexing on Ray vs one process\n\n```\npython benchmarks/ray_index.py\n```\n\n"
        + table
        + "\n",
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
