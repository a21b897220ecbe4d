"""Dedup at scale: time and peak memory of ``find_duplicates(method="embedding")`` on
collections of N stored embeddings, N up to 100,000.

The vectors are synthetic but shaped by real ones: convex mixtures of 2-3 real
EfficientNet-Lite0 embeddings of clothing-small plus noise (as in ``benchmarks/ann.py``), and
5% of them are planted near-duplicates: a copy of another vector turned by an angle whose
cosine is drawn uniformly from [0.93, 0.99], the range of real transformed copies. They are
stored in a real collection (SQLite catalog, fake paths) and its default index is built once,
as ``lookalike index`` leaves it; each measured run is a fresh process that opens the
collection, loads the index and vectors, finds candidates by k-NN and groups them.

    python benchmarks/dedup.py [--sizes 25000,50000,100000] [--embeddings real.npy]

Without ``--embeddings``, the real vectors are read from the collection that
``benchmarks/dedup_accuracy.py`` caches (or clothing-small is indexed). Prints a Markdown
report; progress goes to stderr. Collections are cached under $LOOKALIKE_CACHE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
PLANTED_FRACTION = 0.05
GOAL_SECONDS = 60.0
# Noise of the mixtures (times the real per-dimension std): at 0.6 the median cosine of a
# vector to its nearest neighbour is 0.73 and almost none reach 0.9, close to the real
# vectors (0.75; 2.5% at 0.9 or more), so groups are mostly the planted ones. At 0.3 a third
# of the vectors had a neighbour above 0.9: mixtures of the same parents.
NOISE = 0.6


def real_vectors(cache: Path, dataset: Path):
    """Real Lite0 vectors of clothing-small (indexed once, then read from the cache)."""
    import numpy as np

    from lookalike.core.collection import Collection

    target = cache / "clothing-lite0.npy"
    if target.exists():
        return np.load(target)
    with Collection(cache / "clothing-collection") as collection:
        collection.index(dataset)
        _, vectors = collection.catalog.vectors(collection.model_id)
    np.save(target, vectors)
    return vectors


def synthetic(n: int, real, seed: int):
    """n vectors: mixtures of real ones, the last 5% planted near-copies of earlier ones.
    Returns (vectors, planted (copy row, source row) pairs)."""
    import numpy as np
    from ann import perturbed_embeddings

    rng = np.random.default_rng(seed)
    planted = int(n * PLANTED_FRACTION)
    base = perturbed_embeddings(n - planted, real, NOISE, rng)
    sources = rng.choice(len(base), size=planted, replace=False)
    originals = base[sources]
    norms = np.linalg.norm(originals, axis=1, keepdims=True)
    unit = originals / norms
    noise = rng.standard_normal(originals.shape).astype(np.float32) * real.std(axis=0)
    noise -= (noise * unit).sum(axis=1, keepdims=True) * unit  # orthogonal to the source
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cosine = rng.uniform(0.93, 0.99, size=(planted, 1)).astype(np.float32)
    copies = (cosine * unit + np.sqrt(1 - cosine**2) * noise) * norms
    vectors = np.concatenate([base, copies.astype(np.float32)])
    pairs = np.stack([np.arange(n - planted, n), sources], axis=1)
    return vectors, pairs


def prepare(folder: Path, n: int, real, seed: int) -> dict:
    """A collection of n synthetic vectors under ``folder`` with its index built."""
    import numpy as np

    from lookalike.catalog import ImageRecord
    from lookalike.core.collection import Collection

    info = folder / "planted.json"
    if info.exists():
        return json.loads(info.read_text())
    vectors, pairs = synthetic(n, real, seed)
    started = time.perf_counter()
    with Collection(folder) as collection:
        model_id = collection.model_id
        ids: list[int] = []
        for start in range(0, n, 5000):
            rows = range(start, min(n, start + 5000))
            records = [
                ImageRecord(
                    path=f"/synthetic/{row // 1000:03d}/{row:07d}.jpg",
                    content_hash=f"{row:064x}",
                    size=100_000,
                    mtime=1.6e9 + row,
                    width=640,
                    height=480,
                )
                for row in rows
            ]
            ids += collection.catalog.store(records, vectors[start : start + 5000], model_id)
        stored = time.perf_counter() - started
        started = time.perf_counter()
        index = collection.vector_index("cosine")
        built = time.perf_counter() - started
        spec = index.index.spec
    id_of = np.asarray(ids, dtype=np.int64)
    result = {
        "n": n,
        "planted": [[int(id_of[a]), int(id_of[b])] for a, b in pairs],
        "store_seconds": stored,
        "build_seconds": built,
        "spec": spec,
    }
    info.write_text(json.dumps(result))
    return result


def measure(folder: Path) -> None:
    """Run in a fresh process: one dedup of the collection, its time and memory as JSON."""
    from ann import memory_mib

    from lookalike.core.collection import Collection
    from lookalike.dedup import find_duplicates

    with Collection(folder) as collection:
        _ = collection.model_id  # loads the encoder: not part of deduplicating
        before = memory_mib("VmRSS")
        started = time.perf_counter()
        report = find_duplicates(collection, method="embedding")
        seconds = time.perf_counter() - started
    found = {
        (min(a.id, b.id), max(a.id, b.id))
        for g in report.groups
        for a in g.members
        for b in g.members
        if a.id != b.id
    }
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_before_mib": before,
                "peak_mib": memory_mib("VmHWM"),
                "groups": len(report.groups),
                "duplicates": report.duplicates,
                "found": sorted(found),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25000,50000,100000")
    parser.add_argument("--embeddings", type=Path, help="real embeddings .npy")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        measure(args.measure)
        return

    import numpy as np

    cache = Path(os.environ.get("LOOKALIKE_CACHE") or Path(tempfile.gettempdir()) / "lookalike")
    real = np.load(args.embeddings) if args.embeddings else real_vectors(cache, args.dataset)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        folder = cache / f"dedup-scale-{n}-{args.seed}"
        print(f"preparing {n:,} vectors in {folder} ...", file=sys.stderr, flush=True)
        info = prepare(folder, n, real, args.seed)
        print(f"deduplicating {n:,} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(folder)],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        found = {tuple(p) for p in result["found"]}
        planted = {(min(a, b), max(a, b)) for a, b in info["planted"]}
        recall = len(planted & found) / len(planted)
        rows.append((n, info, result, recall))

    print("# Dedup at scale: embedding method on N stored vectors\n")
    print(
        f"- data: mixtures of {len(real):,} real EfficientNet-Lite0 vectors (1280-d) of "
        f"clothing-small plus noise ({NOISE} x the per-dimension std); "
        f"{PLANTED_FRACTION:.0%} planted near-copies at cosine 0.93-0.99 to their source; "
        "stored in a real collection (SQLite catalog)"
    )
    print(
        f"- each run: a fresh process opens the collection and runs "
        f"`find_duplicates(method='embedding')` (default threshold); the index was built "
        f"beforehand, as `lookalike index` leaves it; {os.cpu_count()} CPU cores, shared\n"
    )
    print(
        "| N | index | dedup s | goal | peak RSS MiB | RSS before MiB | dedup MiB | "
        "MiB per 1k | groups | duplicates | planted pairs found | index build s |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, info, result, recall in rows:
        used = result["peak_mib"] - result["rss_before_mib"]
        goal = ("PASS" if result["seconds"] < GOAL_SECONDS else "FAIL") if n >= 100_000 else ""
        print(
            f"| {n:,} | `{info['spec']}` | {result['seconds']:.1f} | {goal} | "
            f"{result['peak_mib']:,.0f} | {result['rss_before_mib']:,.0f} | {used:,.0f} | "
            f"{used / n * 1000:.2f} | {result['groups']:,} | {result['duplicates']:,} | "
            f"{recall:.3f} | {info['build_seconds']:.1f} |"
        )
    if len(rows) > 1:
        (n0, _, r0, _), (n1, _, r1, _) = rows[0], rows[-1]
        grow = (r1["peak_mib"] - r1["rss_before_mib"]) / max(
            1e-9, r0["peak_mib"] - r0["rss_before_mib"]
        )
        print(
            f"\nFrom {n0:,} to {n1:,} vectors ({n1 / n0:.1f}x): dedup memory {grow:.2f}x, "
            f"time {r1['seconds'] / r0['seconds']:.2f}x. An N x N float32 similarity matrix "
            f"would take {n1 * n1 * 4 / 2**30:,.0f} GiB at {n1:,}."
        )


if __name__ == "__main__":
    main()
