"""What copy search costs per query: the default search with and without copy views, and
local-feature verification (``rerank``, ``copies``), on the same queries, interleaved.

Queries are image files the collection does not hold (``--query-split``, decoded from disk as
``lookalike search`` does) and attacked copies of database images (the copy-detection suite,
in memory). Every configuration runs on each query in turn, so a busy machine slows them
alike; the median and mean milliseconds per query are reported, with the ratio to the search
as it was before copy views (``copy_views=False``, no re-ranking).

    python benchmarks/copy_search_cost.py --collection DIR --dataset DIR --split test \\
        [--query-split validation] [--queries 60] [--photos DIR]

``--photos DIR`` also times the image files of a folder as queries (e.g. full-size phone
photos: decoding a 12-megapixel JPEG weighs more than the copy views' embeddings).

The collection must hold the database split with local features (e.g. made by ``lookalike
eval --copy-detection --collection DIR --local-features``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.core.collection import Collection
from lookalike.evaluation.copydetect import generate_copies
from lookalike.evaluation.datasets import load_dataset

CONFIGS: dict[str, dict[str, Any]] = {
    "before: no copy views": {"copy_views": False},
    "default: copy views": {},
    "rerank 10": {"rerank": 10},
    "rerank 20": {"rerank": 20},
    "copies": {"copies": True},
}


def timed(collection: Collection, query: Any, options: dict[str, Any]) -> float:
    """Milliseconds of one search."""
    started = time.perf_counter()
    collection.search(query, k=10, **options)
    return 1000.0 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", type=Path, required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--split", default="test", help="the database split (for attacks)")
    parser.add_argument("--query-split", default="validation")
    parser.add_argument("--queries", type=int, default=60, help="of each kind")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", help="comma-separated configurations to run (default: all)")
    parser.add_argument("--photos", type=Path, help="a folder of image files to time too")
    args = parser.parse_args()

    if args.only:
        for name in list(CONFIGS):
            if name not in args.only.split(","):
                del CONFIGS[name]
    dataset = load_dataset(args.dataset)
    files = [dataset.paths[i] for i in dataset.indices(args.query_split)]
    files = files[:: max(1, len(files) // args.queries)][: args.queries]
    database = [dataset.paths[i] for i in dataset.indices(args.split)]
    attacked = [
        c.image for c in generate_copies(database, attacks="all", copies=max(1, args.queries // 16))
    ][: args.queries]
    kinds: dict[str, list[Any]] = {"files": files, "attacked copies": attacked}
    if args.photos is not None:
        photos = sorted(str(f) for f in args.photos.iterdir() if f.is_file())
        kinds[f"files of {args.photos.name}"] = photos[: args.queries]
    with Collection(args.collection) as collection:
        for options in CONFIGS.values():  # loads the model, index and features once
            collection.search(files[0], **options)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for kind, queries in kinds.items():
                for query in queries:
                    for name, options in CONFIGS.items():
                        spent = timed(collection, query, options)
                        times.setdefault((kind, name), []).append(spent)
        count = len(collection)
    print(
        f"- collection: `{args.collection.name}`, {count} images; queries: {len(files)} files of "
        f"`{args.dataset.name}` split `{args.query_split}`, {len(attacked)} attacked copies; "
        f"{args.rounds} rounds, configurations interleaved"
    )
    print(
        f"- machine: {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}\n"
    )
    print("| queries | search | median ms | mean ms | x before (median) |")
    print("|---|---|---:|---:|---:|")
    for kind in kinds:
        base = float(np.median(times[(kind, "before: no copy views")]))
        for name in CONFIGS:
            values = times[(kind, name)]
            median = float(np.median(values))
            print(
                f"| {kind} | {name} | {median:.1f} | {np.mean(values):.1f} | {median / base:.2f} |"
            )


if __name__ == "__main__":
    main()
