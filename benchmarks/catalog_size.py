"""Catalog bytes per image: SQLite and PostgreSQL (bytea, and pgvector when the server has it).

Stores ``--n`` images with realistic rows (a 60-odd character path, a SHA-256, size, mtime,
width, height, a small JSON metadata object) and one 1280-d float32 vector each, through the
catalogs' own ``store``, in batches of 256, then measures the files on disk (SQLite, after
closing, which checkpoints the WAL) or ``pg_total_relation_size`` of every table (PostgreSQL:
heap, TOAST and indexes, after VACUUM). The server is a throwaway local PostgreSQL.

    python benchmarks/catalog_size.py [--n 20000] [--dim 1280]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.catalog import ImageRecord, SqliteCatalog
from lookalike.encoders.base import EncoderIdentity
from lookalike.encoders.preprocess import PreprocessConfig

BATCH = 256


def records(n: int) -> list[ImageRecord]:
    return [
        ImageRecord(
            path=f"/data/images/shard-{i // 10_000:05d}/{hashlib.md5(b'%d' % i).hexdigest()}.jpg",
            content_hash=hashlib.sha256(str(i).encode()).hexdigest(),
            size=150_000 + i,
            mtime=1.7e9 + i,
            width=800,
            height=600,
            metadata={"label": "shirt", "split": "train"},
        )
        for i in range(n)
    ]


def fill(catalog, n: int, dim: int) -> float:
    """Store n images with vectors; returns seconds."""
    identity = EncoderIdentity(
        "bench", "head", dim, "0" * 64, PreprocessConfig(224, (0.5,) * 3, (0.5,) * 3)
    )
    model_id = catalog.register_model(identity)
    rows = records(n)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        batch = rows[start : start + BATCH]
        catalog.store(batch, rng.random((len(batch), dim), dtype=np.float32), model_id)
    return time.perf_counter() - started


def sqlite_size(n: int, dim: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "catalog.sqlite"
        catalog = SqliteCatalog(path)
        seconds = fill(catalog, n, dim)
        catalog.close()
        return sum(f.stat().st_size for f in Path(folder).iterdir()), seconds


def postgres_sizes(n: int, dim: int) -> list[tuple[str, int, float]]:
    import psycopg

    from lookalike.catalog.local_postgres import LocalPostgres
    from lookalike.catalog.postgres import PostgresCatalog

    results = []
    with LocalPostgres() as server:
        storages = ["bytea"] + (["pgvector"] if server.has_pgvector else [])
        for storage in storages:
            url = server.create_database()
            catalog = PostgresCatalog(url, vector_storage=storage)
            seconds = fill(catalog, n, dim)
            catalog.close()
            with psycopg.connect(url, autocommit=True) as db:
                db.execute("VACUUM ANALYZE")
                (size,) = db.execute(
                    "SELECT sum(pg_total_relation_size(oid)) FROM pg_class "
                    "WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
                ).fetchone()
            results.append((f"PostgreSQL ({storage})", int(size), seconds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()
    rows = [("SQLite", *sqlite_size(args.n, args.dim)), *postgres_sizes(args.n, args.dim)]
    raw = 4 * args.dim
    print(f"{args.n:,} images, {args.dim}-d float32 vectors ({raw:,} bytes raw)\n")
    print("| catalog | bytes | bytes per image | overhead over the raw vector | store images/s |")
    print("|---|---:|---:|---:|---:|")
    for name, size, seconds in rows:
        per = size / args.n
        print(f"| {name} | {size:,} | {per:,.0f} | {per - raw:,.0f} | {args.n / seconds:,.0f} |")


if __name__ == "__main__":
    main()
