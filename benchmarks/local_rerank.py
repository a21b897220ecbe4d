"""Copy detection with and without SIFT re-ranking of the global top-k, on clothing-small.

The database is one split of the dataset (train: 3,068 images); a seeded sample of it
(``--sample``) is attacked by every attack, and each attacked copy searches the whole database
(the rest are distractors). Both runs use the same global features and candidates; the second
re-ranks each query's top ``-k`` candidates by RANSAC-verified RootSIFT matches
(:mod:`lookalike.local`). Database local features are extracted lazily, only for images that
appear among the candidates, stored as bytes and decoded per query as a catalog would return
them; their extraction time is reported apart from the per-query cost.

    python benchmarks/local_rerank.py [--sample 50] [--dataset DIR] [--split train]
        [--attacks crop,rotation,...] [-k 10] [--mirror] [--threads 1]

Prints a Markdown report (copy it to benchmarks/results/); progress goes to stderr. Database
vectors are cached under $LOOKALIKE_CACHE (default: a temporary folder) between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class DatabaseFeatures:
    """Serialised local features of database positions, extracted on first request."""

    def __init__(self, paths: Sequence[Path], config) -> None:
        self.paths = paths
        self.config = config
        self.stored: dict[int, bytes] = {}
        self.keypoints: dict[int, int] = {}
        self.seconds = 0.0

    def ensure(self, ids: Sequence[int]) -> None:
        from lookalike.local.features import extract

        for i in ids:
            if i not in self.stored:
                started = time.perf_counter()
                features = extract(self.paths[i], self.config)
                self.stored[i] = features.to_bytes()
                self.seconds += time.perf_counter() - started
                self.keypoints[i] = len(features)

    def __call__(self, ids: Sequence[int]):
        from lookalike.local.features import LocalFeatures

        return [LocalFeatures.from_bytes(self.stored[i]) for i in ids]


def _vectors(database: list[Path], args: argparse.Namespace, encoder):
    import numpy as np

    from lookalike.evaluation.copydetect import embed_database

    key = hashlib.sha256("\n".join(map(str, database)).encode()).hexdigest()[:16]
    cache = Path(os.environ["LOOKALIKE_CACHE"]) / f"copydetect-{args.model}-{args.layer}-{key}.npy"
    if cache.exists():
        return np.load(cache)
    vectors = embed_database(database, encoder=encoder, batch_size=32, progress=_progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


_last = [0.0]


def _progress(stage: str, done: int, total: int) -> None:
    now = time.perf_counter()
    if now - _last[0] > 10 or done == total:
        _last[0] = now
        print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--split", default="train", help="database split (default: train)")
    parser.add_argument("--sample", type=int, default=50, help="sources attacked per attack")
    parser.add_argument("--attacks", default=None, help="comma-separated (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=10, help="candidates kept and re-ranked")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--layer", default="head")
    parser.add_argument(
        "--mirror", action="store_true", help="also a run that matches the mirrored query too"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()

    # Before numpy, OpenCV and ONNX Runtime start their thread pools (hence the imports
    # here, not at the top): this machine is shared.
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, str(args.threads))
    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))

    import cv2
    import numpy as np

    from lookalike.encoders import create_encoder
    from lookalike.evaluation.copydetect import ATTACKS, parse_attacks, run_copy_detection
    from lookalike.evaluation.datasets import load_dataset
    from lookalike.local.features import DATABASE_CONFIG, QUERY_CONFIG
    from lookalike.local.matching import DEFAULT_RULE
    from lookalike.local.rerank import LocalReranker

    cv2.setNumThreads(args.threads)
    attacks = parse_attacks(args.attacks or ",".join(ATTACKS))
    dataset = load_dataset(args.dataset)
    database = [dataset.paths[i] for i in dataset.indices(args.split)]
    if not database:
        sys.exit(f"no images in split {args.split!r} of {args.dataset}")
    encoder = create_encoder(args.model, layer=args.layer, normalize=False, threads=args.threads)
    vectors = _vectors(database, args, encoder)

    common = {
        "encoder": encoder,
        "database_vectors": vectors,
        "attacks": attacks,
        "copies": args.sample,
        "seed": args.seed,
        "k": args.k,
        "progress": _progress,
    }
    plain = run_copy_detection(database, **common)

    runs = [("global", plain)]
    timings: dict[str, np.ndarray] = {}
    stored = DatabaseFeatures(database, DATABASE_CONFIG)
    for mirror in (False, True) if args.mirror else (False,):
        name = "+ SIFT, mirror" if mirror else "+ SIFT"
        reranker = LocalReranker(
            stored, query_config=QUERY_CONFIG, rule=DEFAULT_RULE, mirror=mirror
        )
        per_query: list[float] = []

        def hook(query, candidate_ids, scores, reranker=reranker, per_query=per_query):
            stored.ensure(candidate_ids.tolist())  # indexing work, timed apart
            started = time.perf_counter()
            new = reranker(query, candidate_ids, scores)
            per_query.append(time.perf_counter() - started)
            return new

        runs.append((name, run_copy_detection(database, rerank=hook, **common)))
        timings[name] = np.array(per_query) * 1000

    sizes = np.array([len(b) for b in stored.stored.values()])
    keypoints = np.array(list(stored.keypoints.values()))
    k = plain.k
    rule = DEFAULT_RULE
    print("# Copy detection: global features, then SIFT re-ranking of the top candidates\n")
    print(
        f"- database: `{args.dataset.name}` split `{args.split}`, {len(database)} images "
        f"(the sources plus {len(database) - len(plain.sources)} distractors)"
    )
    print(
        f"- queries: {len(plain.sources)} sampled images (seed {args.seed}) x {len(attacks)} "
        f"attacks = {len(plain.sources) * len(attacks)}"
    )
    print(f"- global: {args.model}, layer {args.layer}, cosine, exact search, top {k} per query")
    print(
        f"- SIFT re-ranking of those {k}: database features `{DATABASE_CONFIG.kind}`, query up "
        f"to {QUERY_CONFIG.max_keypoints} keypoints; mutual nearest neighbours + ratio test "
        f"{rule.ratio}, RANSAC similarity (estimateAffinePartial2D, {rule.threshold:g} px); "
        f"verified at >= {rule.min_inliers} inliers: score = cosine + (1 - cosine) * "
        f"{rule.weight:g} * min(inliers, {rule.cap}) / {rule.cap}, else the cosine. "
        '"mirror": the mirrored query is matched too (best of the two)'
    )
    print(
        f"- machine: {os.cpu_count()} CPU cores, shared (run with {args.threads} thread), "
        f"Python {platform.python_version()}, OpenCV {cv2.__version__}\n"
    )
    names = [n for n, _ in runs]
    for metric, label in (
        ("recall_at_1", "recall@1"),
        ("micro_ap", "micro-AP"),
        ("recall_at_p90", "recall@P90"),
    ):
        print(f"### {label}\n")
        print("| attack | queries | " + " | ".join(names) + " |")
        print("|---|---:|" + "---:|" * len(runs))
        for position, attack in enumerate(plain.attacks):
            values = " | ".join(f"{getattr(r.attacks[position], metric):.3f}" for _, r in runs)
            print(f"| {attack.attack} | {attack.queries} | {values} |")
        means = " | ".join(
            f"**{np.mean([getattr(a, metric) for a in r.attacks]):.3f}**" for _, r in runs
        )
        print(f"| **mean** | | {means} |\n")
    pooled = ", ".join(f"{r.pooled_micro_ap:.3f} {n}" for n, r in runs)
    print(f"micro-AP pooled over all attacks at once: {pooled}\n")
    for name, times in timings.items():
        print(
            f"- extra time per query, {name} (query SIFT, decoding {k} stored feature sets, "
            f"matching and RANSAC): mean {times.mean():.1f} ms, median "
            f"{np.median(times):.1f} ms, p95 {np.percentile(times, 95):.1f} ms"
        )
    print(
        f"- stored local features per database image: mean {sizes.mean() / 1024:.1f} KiB, "
        f"max {sizes.max() / 1024:.1f} KiB ({keypoints.mean():.0f} keypoints on average); "
        f"extraction {1000 * stored.seconds / len(sizes):.1f} ms per image (decode + SIFT; "
        f"the {len(sizes)} database images that were candidates)"
    )
    walls = ", ".join(f"{r.seconds:.0f} s {n}" for n, r in runs)
    print(f"- wall time per run (database vectors cached): {walls}")


if __name__ == "__main__":
    main()
