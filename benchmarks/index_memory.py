"""Bytes per vector of the compact index types at scale: IVF-PQ (m=64) and 64-bit binary codes.

Complements ``ann.py`` (whose tables cover exact, Annoy and HNSW): fills each index with
``--n`` vectors and reports resident memory growth (VmRSS after adding minus before, with the
input already in memory and IVF-PQ already trained), the saved file size per vector, and how
fast vectors are added. Gaussian vectors: the size of these structures does not depend on the
data distribution.

    python benchmarks/index_memory.py [--n 200000] [--dim 1280]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.knn import create_index
from lookalike.knn.sharded import train_ivfpq


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def measure(name: str, index, fill, n: int) -> None:
    """Memory growth of ``fill(index)`` (adding every vector) and the saved size, per vector."""
    gc.collect()
    before = rss()
    started = time.perf_counter()
    fill(index)
    seconds = time.perf_counter() - started
    gc.collect()
    grown = rss() - before
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index"
        index.save(path)
        saved = path.stat().st_size
    row = f"| `{name}` | {n:,} | {grown / n:,.0f} | {saved / n:,.0f} | {n / seconds:,.0f} |"
    print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    ids = np.arange(args.n, dtype=np.int64)
    codes = rng.integers(0, 256, (args.n, 8), dtype=np.uint8)
    sample = vectors[:16_384]
    print("| index | vectors | resident bytes per vector | saved bytes per vector | adds/s |")
    print("|---|---:|---:|---:|---:|")

    trained = train_ivfpq(sample, nlist=256, m=64)  # training memory is not counted
    measure("ivfpq:nlist=256,m=64", trained, lambda i: i.add(ids, vectors), args.n)
    binary = create_index("binary:packed=true", dim=64, metric="hamming")
    measure("binary:packed=true (64-bit codes)", binary, lambda i: i.add(ids, codes), args.n)


if __name__ == "__main__":
    main()
