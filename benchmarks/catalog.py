"""Catalog backends side by side: SQLite, PostgreSQL with bytea vectors, PostgreSQL with pgvector.

Each stores N images with one D-dimensional float32 vector each (``catalog.store`` in batches,
as indexing does), then reads them the ways lookalike does: every vector at once (an index
rebuild), the vectors of 1,000 random ids (query expansion, labelled features), the records
of 10 ids and the generation (what every search asks). PostgreSQL is a local server started
here with its default durability (fsync, synchronous commit), reached over TCP on loopback;
SQLite runs in WAL mode with synchronous=NORMAL, as lookalike opens it. Sizes are the
catalog's tables with their indexes and TOAST (PostgreSQL) or the file (SQLite).

    python benchmarks/catalog.py [--n 20000] [--dim 1280] [--output benchmarks/results/catalog.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lookalike.catalog import Catalog, ImageRecord, SqliteCatalog
from lookalike.catalog.local_postgres import LocalPostgres
from lookalike.catalog.postgres import PostgresCatalog
from lookalike.encoders import EncoderIdentity, PreprocessConfig

TABLES = ("settings", "models", "images", "vectors", "failures", "local_features")


def identity(dim: int) -> EncoderIdentity:
    config = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return EncoderIdentity("bench", "head", dim, "ab" * 32, config)


def records(n: int) -> list[ImageRecord]:
    return [
        ImageRecord(
            path=f"/data/images/{i // 1000:04d}/{i:08d}.jpg",
            content_hash=f"{i:064x}",
            size=150_000 + i,
            mtime=1.7e9 + i,
            width=640,
            height=480,
            metadata={"label": f"class-{i % 10}"},
        )
        for i in range(n)
    ]


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(catalog: Catalog, vectors: np.ndarray, batch: int, size: Callable[[], int]) -> dict:
    n, dim = vectors.shape
    items = records(n)
    model = catalog.register_model(identity(dim))
    started = time.perf_counter()
    for start in range(0, n, batch):
        catalog.store(items[start : start + batch], vectors[start : start + batch], model)
    store = time.perf_counter() - started

    started = time.perf_counter()
    ids, stored = catalog.vectors(model)
    read_all = time.perf_counter() - started
    if stored.tobytes() != vectors.tobytes():
        raise AssertionError("vectors did not read back bit for bit")
    rng = np.random.default_rng(1)
    sample = rng.choice(ids, size=min(1000, n), replace=False).tolist()
    some = median_seconds(lambda: catalog.vectors_for(sample, model), 5)
    hits = [rng.choice(ids, size=10, replace=False).tolist() for _ in range(200)]
    records_10 = median_seconds(lambda: catalog.images(hits[len(hits) // 2]), 200)
    generation = median_seconds(lambda: catalog.generation, 200)
    doomed = rng.choice(ids, size=min(100, n), replace=False).tolist()
    started = time.perf_counter()
    catalog.remove(doomed)
    remove = time.perf_counter() - started
    return {
        "remove": remove,
        "store": n / store,
        "read_all": n / read_all,
        "read_all_mb": stored.nbytes / read_all / 1e6,
        "vectors_for": some,
        "records_10": records_10,
        "generation": generation,
        "bytes": size(),
    }


def postgres_size(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as db:
        total = 0
        for table in TABLES:
            total += db.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0]
        return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=500, help="images per store call")
    parser.add_argument("--output", type=Path, default=None, help="write a markdown table here")
    args = parser.parse_args()

    vectors = np.random.default_rng(0).normal(size=(args.n, args.dim)).astype(np.float32)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "catalog.sqlite"
        with SqliteCatalog(path) as catalog:
            results["SQLite"] = measure(catalog, vectors, args.batch, lambda: 0)
        results["SQLite"]["bytes"] = path.stat().st_size  # after close: WAL checkpointed
    with LocalPostgres(durable=True) as server:
        version = server.binaries.bin_dir
        for name, storage in (("PostgreSQL bytea", "bytea"), ("PostgreSQL pgvector", "pgvector")):
            if storage == "pgvector" and not server.has_pgvector:
                continue
            url = server.create_database()
            with PostgresCatalog(url, vector_storage=storage) as catalog:
                results[name] = measure(
                    catalog, vectors, args.batch, lambda url=url: postgres_size(url)
                )
        import psycopg

        with psycopg.connect(server.url()) as db:
            version = db.execute("SHOW server_version").fetchone()[0]

    base = results["SQLite"]
    raw = args.dim * 4
    lines = [
        f"<!-- python benchmarks/catalog.py --n {args.n} --dim {args.dim} --batch {args.batch} -->",
        f"# Catalog backends: {args.n:,} images x {args.dim}-d float32 vectors",
        "",
        f"- store: `catalog.store` in batches of {args.batch} (one transaction each); vectors are "
        "random normal float32 (incompressible, like real features)",
        "- read all: `catalog.vectors(model)`, what an index rebuild reads; every vector "
        "checked bit for bit against what was stored",
        "- 1,000 by id: `vectors_for` of 1,000 random ids; 10 records: `images` of 10 ids and "
        "`generation`: what every search asks (median of 200); remove 100: `remove` of 100 "
        "random ids in one call (their vectors go by cascade)",
        f"- PostgreSQL {version} on loopback TCP, started by the benchmark with default "
        "durability (fsync, synchronous_commit on); SQLite in WAL mode, synchronous=NORMAL",
        f"- machine: {os.cpu_count()} CPU cores, shared; Python {platform.python_version()}",
        "",
        "| backend | store (images/s) | read all (vectors/s) | read all (MB/s) | 1,000 by id "
        "(ms) | 10 records (ms) | generation (ms) | remove 100 (ms) | size (MB) "
        "| bytes per image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['store']:,.0f} ({r['store'] / base['store']:.2f}x) "
            f"| {r['read_all']:,.0f} ({r['read_all'] / base['read_all']:.2f}x) "
            f"| {r['read_all_mb']:,.0f} | {r['vectors_for'] * 1e3:.1f} "
            f"| {r['records_10'] * 1e3:.2f} | {r['generation'] * 1e3:.3f} "
            f"| {r['remove'] * 1e3:,.0f} "
            f"| {r['bytes'] / 1e6:,.1f} | {r['bytes'] / args.n:,.0f} |"
        )
    lines += [
        "",
        f"Ratios in brackets are against SQLite. A raw vector is {raw:,} bytes; bytes per image "
        "include the image record, its path and metadata, and the indexes.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
