"""Dedup at scale: time and peak memory of ``find_duplicates`` on collections of N stored
embeddings (and, for the ``verified`` method, stored SIFT features), N up to 100,000.

The vectors are synthetic but shaped by real ones: convex mixtures of 2-3 real
EfficientNet-Lite0 embeddings of clothing-small plus noise (as in ``benchmarks/ann.py``), and
5% of them are planted copies of another vector. Half of those are near copies, turned by an
angle whose cosine is drawn uniformly from [0.93, 0.99] (resized, recompressed, brightened or
mirrored copies score so); the other half are rotated copies at cosine 0.55-0.80 (a 10-45
degree rotation scores so on grocery-store), which only their local features can find.

With ``--method verified`` (the default method) every image also gets stored SIFT features
(256 keypoints, 34 KB, as ``lookalike index --local-features`` stores them): an ordinary
image's descriptors are mixtures of two real RootSIFT descriptors of clothing-small (plus
+-2 of noise) at random places; a planted copy keeps a random 75% of its source's
keypoints, moved by a similarity (near copies: scaled 0.6-1.0; rotated copies: also turned
10-45 degrees either way, a quarter of them mirrored), its descriptors disturbed as
resampling does (+-4 per component), with new random keypoints mixed in for the ones dropped.
This measures the cost of candidate generation and verification at scale; whether real
copies verify is measured on real photos by ``benchmarks/dedup_accuracy.py``.

Everything is stored in a real collection (SQLite catalog, fake paths) and its default index
is built once, as ``lookalike index`` leaves it; each measured run is a fresh process that
opens the collection, loads the index, vectors and features, finds candidates and groups them.

Each run reports its wall time and its CPU time (user + system, all threads of the process;
BLAS runs one thread): on a machine shared with other jobs the wall time grows with their
load, the CPU time hardly, so the 60 s goal is checked against the CPU time, which is what the
run takes on an idle core, and the load average is printed beside it.

    python benchmarks/dedup.py [--sizes 25000,50000,100000] [--embeddings real.npy]
        [--method verified] [--descriptors real-descriptors.npy]

Without ``--embeddings``/``--descriptors``, the real vectors and descriptors are read from a
collection of clothing-small indexed with local features (built on first use). Prints a
Markdown report; progress goes to stderr. Collections are cached under $LOOKALIKE_CACHE.
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
# Frame of every synthetic image's features (a 640 x 480 photo shrunk to 512 a side).
FRAME = (512, 384)
KEYPOINTS = 256
BATCH = 5000


def real_data(cache: Path, dataset: Path):
    """Real Lite0 vectors and RootSIFT descriptors of clothing-small (indexed once with
    local features, then read from the cache)."""
    import numpy as np

    from lookalike.core.collection import Collection
    from lookalike.local.features import LocalFeatures

    vectors_file = cache / "clothing-lite0.npy"
    descriptors_file = cache / "clothing-rootsift.npy"
    if vectors_file.exists() and descriptors_file.exists():
        return np.load(vectors_file), np.load(descriptors_file)
    with Collection(cache / "clothing-collection-local") as collection:
        collection.index(dataset, local_features=True)
        ids, vectors = collection.catalog.vectors(collection.model_id)
        kind = collection.local_store.kind()
        stored = collection.catalog.local_features(ids.tolist(), kind.name)
    descriptors = np.concatenate([LocalFeatures.from_bytes(d).descriptors for d in stored.values()])
    np.save(vectors_file, vectors)
    np.save(descriptors_file, descriptors)
    return vectors, descriptors


def synthetic(n: int, real, seed: int):
    """n vectors: mixtures of real ones, the last 5% planted copies of earlier ones (the
    first half near copies, the second half rotated ones). Returns (vectors, planted (copy
    row, source row) pairs)."""
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
    near = planted // 2
    cosine = np.concatenate(
        [rng.uniform(0.93, 0.99, size=near), rng.uniform(0.55, 0.80, size=planted - near)]
    ).astype(np.float32)[:, None]
    copies = (cosine * unit + np.sqrt(1 - cosine**2) * noise) * norms
    vectors = np.concatenate([base, copies.astype(np.float32)])
    pairs = np.stack([np.arange(n - planted, n), sources], axis=1)
    return vectors, pairs


class FeatureMaker:
    """Synthetic stored SIFT features (see the module docstring)."""

    def __init__(self, descriptors, seed: int) -> None:
        import numpy as np

        self.rng = np.random.default_rng([seed, 1])
        self.pool = descriptors
        # Noise drawn once and reused by rows: drawing 100k x 256 x 128 values is slow.
        self.small = self.rng.integers(-2, 3, size=(65_536, 128)).astype(np.int16)
        # Resampling moves a real copy's RootSIFT descriptors by ~0.1 of their norm (~25 of
        # 255 over 128 components, about +-4 each).
        self.large = self.rng.integers(-4, 5, size=(65_536, 128)).astype(np.int16)

    def _descriptors(self, count: int):
        """New descriptors: mixtures of two real ones, as the vectors are mixtures; reusing
        real descriptors as they are would give unrelated images shared words no real pair
        of photos has."""
        import numpy as np

        pool, rng = self.pool, self.rng
        first = pool[rng.integers(0, len(pool), size=count)].astype(np.float32)
        second = pool[rng.integers(0, len(pool), size=count)].astype(np.float32)
        weight = rng.uniform(0.3, 0.7, size=(count, 1)).astype(np.float32)
        mixed = weight * first + (1 - weight) * second
        mixed *= 255.0 / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-6)
        noisy = mixed + self.small[rng.integers(0, 65_536, count)]
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    def ordinary(self):
        from lookalike.local.features import LocalFeatures

        points = self.rng.uniform((0, 0), (FRAME[0] - 1, FRAME[1] - 1), size=(KEYPOINTS, 2))
        return LocalFeatures(points, self._descriptors(KEYPOINTS), *FRAME, scale=1.25)

    def copy(self, source, rotated: bool):
        import numpy as np

        from lookalike.local.features import LocalFeatures
        from lookalike.local.matching import mirror_descriptors

        rng = self.rng
        keep = rng.random(len(source)) < 0.75
        points = source.points[keep].astype(np.float64)
        descriptors = source.descriptors[keep]
        if rotated and rng.random() < 0.25:
            points[:, 0] = source.width - 1 - points[:, 0]
            descriptors = mirror_descriptors(descriptors)
        angle = np.radians(rng.uniform(10.0, 45.0) * rng.choice([-1.0, 1.0])) if rotated else 0.0
        scale = rng.uniform(0.6, 1.0)
        turn = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
        corners = np.array(
            [[0, 0], [source.width, 0], [0, source.height], [source.width, source.height]]
        )
        moved = corners @ turn.T * scale
        low = moved.min(axis=0)
        size = np.ceil(moved.max(axis=0) - low).astype(int)
        points = points @ turn.T * scale - low
        noisy = descriptors.astype(np.int16) + self.large[rng.integers(0, 65_536, len(descriptors))]
        descriptors = np.clip(noisy, 0, 255).astype(np.uint8)
        # New keypoints (corners, edges of the rotated canvas) take the dropped ones' places.
        extra = KEYPOINTS - len(points)
        extra_points = rng.uniform((0, 0), size - 1, size=(extra, 2))
        points = np.concatenate([points, extra_points])
        descriptors = np.concatenate([descriptors, self._descriptors(extra)])
        # Mixed in: the kept keypoints mostly stay among the strongest, as real ones do.
        order = np.argsort(
            np.concatenate([np.arange(len(points) - extra), rng.uniform(0, KEYPOINTS, extra)]),
            kind="stable",
        )
        return LocalFeatures(
            points[order], descriptors[order], int(size[0]), int(size[1]), 1.25 / scale
        )


def prepare(folder: Path, n: int, real, descriptors, seed: int, local: bool) -> dict:
    """A collection of n synthetic vectors (and features) under ``folder``, index built."""
    import numpy as np

    from lookalike.catalog import ImageRecord
    from lookalike.core.collection import Collection
    from lookalike.core.local_store import LOCAL_FEATURES_SETTING
    from lookalike.local.features import DATABASE_CONFIG

    info = folder / "planted.json"
    if info.exists():
        return json.loads(info.read_text())
    vectors, pairs = synthetic(n, real, seed)
    source_of = {int(copy): int(source) for copy, source in pairs}
    sources = set(source_of.values())
    planted = len(pairs)
    maker = FeatureMaker(descriptors, seed) if local else None
    features: dict[int, object] = {}
    started = time.perf_counter()
    with Collection(folder) as collection:
        model_id = collection.model_id
        if local:
            collection.catalog.set_setting(LOCAL_FEATURES_SETTING, DATABASE_CONFIG.kind)
        ids: list[int] = []
        for start in range(0, n, BATCH):
            rows = range(start, min(n, start + BATCH))
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
            stored = collection.catalog.store(records, vectors[start : start + BATCH], model_id)
            ids += stored
            if maker is not None:
                items = []
                for row, image_id in zip(rows, stored, strict=True):
                    if row in source_of:
                        rotated = row - (n - planted) >= planted // 2
                        made = maker.copy(features[source_of[row]], rotated)
                    else:
                        made = maker.ordinary()
                    if row in sources:
                        features[row] = made
                    items.append((image_id, DATABASE_CONFIG.kind, made.to_bytes()))
                collection.catalog.store_local_features(items)
            print(f"  stored {len(ids):,}/{n:,}", file=sys.stderr, flush=True)
        stored_seconds = time.perf_counter() - started
        started = time.perf_counter()
        index = collection.vector_index("cosine")
        built = time.perf_counter() - started
        spec = index.index.spec
    id_of = np.asarray(ids, dtype=np.int64)
    result = {
        "n": n,
        "local": local,
        "planted": [[int(id_of[a]), int(id_of[b])] for a, b in pairs],
        "store_seconds": stored_seconds,
        "build_seconds": built,
        "spec": spec,
    }
    info.write_text(json.dumps(result))
    return result


def measure(folder: Path, method: str) -> None:
    """Run in a fresh process: one dedup of the collection, its time and memory as JSON."""
    from ann import memory_mib

    from lookalike.core.collection import Collection
    from lookalike.dedup import find_duplicates

    with Collection(folder) as collection:
        _ = collection.model_id  # loads the encoder: not part of deduplicating
        before = memory_mib("VmRSS")
        cpu = time.process_time()
        started = time.perf_counter()
        report = find_duplicates(collection, method=method, workers=2)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
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
                "cpu_seconds": cpu,
                "load": os.getloadavg()[0],
                "rss_before_mib": before,
                "peak_mib": memory_mib("VmHWM"),
                "groups": len(report.groups),
                "duplicates": report.duplicates,
                "setting": report.threshold,
                "min_inliers": report.min_inliers,
                "found": sorted(found),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25000,50000,100000")
    parser.add_argument("--method", default=None, help="dedup method (default: the default)")
    parser.add_argument("--embeddings", type=Path, help="real embeddings .npy")
    parser.add_argument("--descriptors", type=Path, help="real RootSIFT descriptors .npy")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # One BLAS thread (before numpy loads), as benchmarks/dedup_accuracy.py: SIFT matching
    # multiplies many small matrices, which threads only slow down on a shared machine.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    from lookalike.dedup import DEFAULT_METHOD

    method = args.method or DEFAULT_METHOD.value
    if args.measure is not None:
        measure(args.measure, method)
        return

    import numpy as np

    cache = Path(os.environ.get("LOOKALIKE_CACHE") or Path(tempfile.gettempdir()) / "lookalike")
    local = method == "verified"
    if args.embeddings and (args.descriptors or not local):
        real, descriptors = np.load(args.embeddings), None
        if args.descriptors:
            descriptors = np.load(args.descriptors)
    else:
        real, descriptors = real_data(cache, args.dataset)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        folder = cache / (f"dedup-scale-{n}-{args.seed}" + ("-local" if local else ""))
        print(f"preparing {n:,} images in {folder} ...", file=sys.stderr, flush=True)
        info = prepare(folder, n, real, descriptors, args.seed, local)
        print(f"deduplicating {n:,} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(folder), "--method", method],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        found = {tuple(p) for p in result["found"]}
        planted = [(min(a, b), max(a, b)) for a, b in info["planted"]]
        half = len(planted) // 2
        recall = (
            len(set(planted[:half]) & found) / max(1, half),
            len(set(planted[half:]) & found) / max(1, len(planted) - half),
        )
        rows.append((n, info, result, recall))

    print(f"# Dedup at scale: `{method}` method on N stored images\n")
    print(
        f"- data: mixtures of {len(real):,} real EfficientNet-Lite0 vectors (1280-d) of "
        f"clothing-small plus noise ({NOISE} x the per-dimension std); "
        f"{PLANTED_FRACTION:.0%} planted copies: half near copies at cosine 0.93-0.99 to "
        "their source, half rotated copies at 0.55-0.80; stored in a real collection "
        "(SQLite catalog)"
        + (
            f"; every image with {KEYPOINTS} stored SIFT keypoints (synthetic: mixtures of "
            "real descriptors, copies moved from their source; see the script)"
            if local
            else ""
        )
    )
    print(
        f"- each run: a fresh process opens the collection and runs "
        f"`find_duplicates(method='{method}', workers=2)` (default thresholds); the index was "
        f"built beforehand, as `lookalike index` leaves it; {os.cpu_count()} CPU cores, shared\n"
    )
    print(
        "| N | index | dedup s | CPU s | load | goal (CPU s) | peak RSS MiB | RSS before MiB | "
        "dedup MiB | MiB per 1k | groups | duplicates | near copies found | "
        "rotated copies found |"
    )
    print("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, info, result, recall in rows:
        used = result["peak_mib"] - result["rss_before_mib"]
        cpu = result["cpu_seconds"]
        goal = ("PASS" if cpu < GOAL_SECONDS else "FAIL") if n >= 100_000 else ""
        print(
            f"| {n:,} | `{info['spec']}` | {result['seconds']:.1f} | {cpu:.1f} | "
            f"{result['load']:.1f} | {goal} | "
            f"{result['peak_mib']:,.0f} | {result['rss_before_mib']:,.0f} | {used:,.0f} | "
            f"{used / n * 1000:.2f} | {result['groups']:,} | {result['duplicates']:,} | "
            f"{recall[0]:.3f} | {recall[1]:.3f} |"
        )
    if len(rows) > 1:
        (n0, _, r0, _), (n1, _, r1, _) = rows[0], rows[-1]
        grow = (r1["peak_mib"] - r1["rss_before_mib"]) / max(
            1e-9, r0["peak_mib"] - r0["rss_before_mib"]
        )
        print(
            f"\nFrom {n0:,} to {n1:,} images ({n1 / n0:.1f}x): dedup memory {grow:.2f}x, "
            f"time {r1['seconds'] / r0['seconds']:.2f}x. An N x N float32 similarity matrix "
            f"would take {n1 * n1 * 4 / 2**30:,.0f} GiB at {n1:,}."
        )


if __name__ == "__main__":
    main()
