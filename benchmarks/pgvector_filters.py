"""Filtered search inside PostgreSQL (the ``pgvector`` index) against exact search filtered in
Python, through lookalike's one search path (``Searcher``), on one catalog.

It stores N clustered vectors with metadata in a PostgreSQL catalog (a throwaway server started
here, pgvector 0.8+), then for each filter, from none to 0.1% of the rows passing, reports the
recall@10 of the pgvector search against exact search with the same filter, the pgvector
search's p50/p99 latency, and exact search's (every vector scanned in this process, the
filter checked on the candidates, widening until k pass). Each search is one query vector.

    python benchmarks/pgvector_filters.py [--n 50000] [--dim 128] [--queries 100] \
        [--spec pgvector]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.catalog import ImageRecord
from lookalike.catalog.local_postgres import LocalPostgres
from lookalike.catalog.postgres import PostgresCatalog
from lookalike.core.derived import DerivedFileStore, VectorIndexes
from lookalike.core.local_store import LocalFeatureStore
from lookalike.core.search import Searcher, SearchOptions
from lookalike.encoders import EncoderIdentity, PreprocessConfig
from lookalike.knn.base import Metric

FILTERS: list[tuple[str, list[str]]] = [
    ("none", []),
    ("half (iso>=400)", ["iso>=400"]),
    ("2% (label=c3)", ["label=c3"]),
    ("1% (rare=yes)", ["rare=yes"]),
    ("0.1% (tiny=yes)", ["tiny=yes"]),
    ("2 conditions, 1%", ["iso>=1600", "label<c3"]),
]


def metadata(i: int, rng: random.Random) -> dict[str, Any]:
    return {
        "label": f"c{i % 50}",
        "iso": rng.choice([100, 200, 400, 1600]),
        "rare": "yes" if i % 100 == 7 else "no",
        "tiny": "yes" if i % 1000 == 7 else "no",
    }


def searcher(catalog: PostgresCatalog, folder: Path, spec: str, model: int, dim: int) -> Searcher:
    """lookalike's search path over ``catalog`` with index ``spec`` (no encoder: vectors in)."""
    key = catalog.models()[0]["key"]
    indexes = VectorIndexes(DerivedFileStore(catalog, folder), catalog.vectors, spec=spec)
    return Searcher(
        encoder=None,  # type: ignore[arg-type]  # search_views needs none
        catalog=catalog,
        model_id=model,
        index_for=lambda metric: indexes.get(model, key, dim, Metric.parse(metric)),
        local_store=LocalFeatureStore(catalog),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--spec", default="pgvector", help="the pgvector spec to measure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((200, args.dim)).astype(np.float32)
    labels = rng.integers(0, len(centres), args.n)
    vectors = centres[labels] + 0.6 * rng.standard_normal((args.n, args.dim))
    vectors = (vectors + 1.5).astype(np.float32)  # a shared offset, as embeddings have
    picked = rng.choice(args.n, args.queries, replace=False)
    queries = vectors[picked] + 0.4 * rng.standard_normal((args.queries, args.dim))
    meta_rng = random.Random(args.seed)
    records = [
        ImageRecord(f"/bench/{i:07d}.jpg", f"h{i}", 1, 1.0, 640, 480, metadata(i, meta_rng))
        for i in range(args.n)
    ]
    config = PreprocessConfig(resolution=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    identity = EncoderIdentity("bench", "head", args.dim, "ab" * 32, config)
    with LocalPostgres() as server, tempfile.TemporaryDirectory() as folder:
        catalog = PostgresCatalog(server.create_database(), vector_storage="pgvector")
        model = catalog.register_model(identity)
        started = time.perf_counter()
        for start in range(0, args.n, 1000):
            catalog.store(records[start : start + 1000], vectors[start : start + 1000], model)
        stored = time.perf_counter() - started
        pg = searcher(catalog, Path(folder), args.spec, model, args.dim)
        exact = searcher(catalog, Path(folder), "exact", model, args.dim)
        started = time.perf_counter()
        pg.index_for(Metric.COSINE)
        built = time.perf_counter() - started
        exact.index_for(Metric.COSINE)
        print(
            f"{args.n:,} x {args.dim} clustered vectors, {args.queries} queries, cosine, "
            f"`{args.spec}`; stored in {stored:.1f} s, HNSW index built in {built:.1f} s\n"
        )
        print("| filter | recall@10 | pgvector p50 ms | p99 ms | exact + Python p50 ms |")
        print("|---|---:|---:|---:|---:|")
        for name, where in FILTERS:
            options = SearchOptions(k=10, where=where)
            recalls, latency, reference = [], [], []
            for query in queries:
                started = time.perf_counter()
                found = pg.search_views(query[None, :], options)
                latency.append(time.perf_counter() - started)
                started = time.perf_counter()
                truth = exact.search_views(query[None, :], options)
                reference.append(time.perf_counter() - started)
                wanted = {r.id for r in truth}
                recalls.append(len({r.id for r in found} & wanted) / max(1, len(wanted)))
                assert len(found) == len(truth), (name, len(found), len(truth))
            ms = np.array(latency) * 1000
            print(
                f"| {name} | {np.mean(recalls):.3f} | {np.median(ms):.1f} | "
                f"{np.percentile(ms, 99):.1f} | {np.median(reference) * 1000:.1f} |"
            )
        catalog.close()


if __name__ == "__main__":
    main()
