"""Combined queries (several positive images, negatives): vector sum against rank fusion.

For each dataset (labels.csv with path, split, label), the train split is the gallery and
queries are built from test images: 2 or 3 positives of the same class. Class-level mAP@all
and precision@10 against the train split, for

- single: each positive alone (averaged over the positives);
- vector sum: the L2-normalised query vectors summed and renormalised (what lookalike does);
- rank fusion: reciprocal-rank fusion (RRF, k=60) of the per-image rankings.

The negative test: a positive of class A and a negative of class B, where B is the class the
positive's own top-10 confuses most with A (falling back to a random other class); the
fraction of the top-10 in class B, and precision@10 for class A, without and with the
negative (vector: p - n renormalised; fusion: 1/(60+r_p) - 1/(60+r_n)).

Exact cosine search in numpy over embeddings cached under $LOOKALIKE_CACHE (default: a
temporary folder); the default encoder (efficientnet-lite0, GeM pooling).

    python benchmarks/combined_queries.py [--datasets DIR,DIR] [--queries 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_DATASETS = (SHARED / "clothing-small", SHARED / "grocery-store")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
RRF_K = 60


def _rows(dataset: Path) -> list[dict[str, str]]:
    with open(dataset / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _embed(paths: list[Path], encoder, name: str):
    import numpy as np

    key = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:16]
    cache = Path(os.environ["LOOKALIKE_CACHE"]) / f"combined-{name}-{key}.npy"
    if cache.exists():
        return np.load(cache)
    start = time.perf_counter()
    vectors = encoder.embed(paths, batch_size=32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    print(
        f"  embedded {len(paths)} images in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def _normalised(vector):
    import numpy as np

    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _ap(order, relevant) -> float:
    import numpy as np

    hits = relevant[order]
    if not hits.any():
        return 0.0
    cumulative = np.cumsum(hits)
    ranks = np.arange(1, len(hits) + 1)
    return float((cumulative[hits] / ranks[hits]).mean())


def _ranks(scores):
    """Rank (0-based) of every gallery item under ``scores`` (higher first)."""
    import numpy as np

    order = np.argsort(-scores, kind="stable")
    ranks = np.empty_like(order)
    ranks[order] = np.arange(len(order))
    return ranks


def run_dataset(dataset: Path, encoder, args) -> list[str]:
    import numpy as np

    rows = _rows(dataset)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    gallery_labels = np.array([r["label"] for r in train])
    rng = np.random.default_rng(args.seed)

    by_class: dict[str, list[int]] = {}
    for i, row in enumerate(test):
        by_class.setdefault(row["label"], []).append(i)
    eligible = sorted(c for c, members in by_class.items() if len(members) >= 3)
    queries = []
    for _ in range(args.queries):
        label = eligible[int(rng.integers(len(eligible)))]
        picked = rng.choice(by_class[label], size=3, replace=False).tolist()
        queries.append((label, picked))
    needed = sorted({i for _, picked in queries for i in picked})
    print(f"{dataset.name}: gallery {len(train)}, queries {len(queries)}", file=sys.stderr)
    gallery = _embed([dataset / r["path"] for r in train], encoder, f"{dataset.name}-train")
    test_vectors: dict[int, np.ndarray] = {}

    def vectors_of(indices: list[int]) -> None:
        missing = sorted(set(indices) - set(test_vectors))
        if missing:
            embedded = _embed(
                [dataset / test[i]["path"] for i in missing], encoder, f"{dataset.name}-test"
            )
            test_vectors.update(zip(missing, embedded, strict=True))

    vectors_of(needed)

    def evaluate(scores, label: str) -> tuple[float, float]:
        relevant = gallery_labels == label
        order = np.argsort(-scores, kind="stable")
        return _ap(order, relevant), float(relevant[order[:10]].mean())

    lines = [f"### {dataset.name} (gallery: train, {len(train)} images)", ""]
    lines += [
        "| query | positives | mAP@all | P@10 |",
        "|---|---|---|---|",
    ]
    for count in (2, 3):
        results: dict[str, list[tuple[float, float]]] = {"single": [], "sum": [], "rrf": []}
        for label, picked in queries:
            parts = [test_vectors[i] for i in picked[:count]]
            per_part = [gallery @ v for v in parts]
            singles = [evaluate(s, label) for s in per_part]
            results["single"].append(
                (float(np.mean([s[0] for s in singles])), float(np.mean([s[1] for s in singles])))
            )
            combined = _normalised(np.sum(parts, axis=0))
            results["sum"].append(evaluate(gallery @ combined, label))
            fused = sum(1.0 / (RRF_K + 1 + _ranks(s)) for s in per_part)
            results["rrf"].append(evaluate(fused, label))
        names = {
            "single": "single image (mean over the positives)",
            "sum": "vector sum",
            "rrf": "rank fusion (RRF)",
        }
        for key, name in names.items():
            values = np.array(results[key])
            lines.append(
                f"| {name} | {count} | {values[:, 0].mean():.4f} | {values[:, 1].mean():.4f} |"
            )

    # Negative test.
    neg_rows: dict[str, list[float]] = {
        k: []
        for k in (
            "b_without",
            "b_sum",
            "b_sum_half",
            "b_rrf",
            "a_without",
            "a_sum",
            "a_sum_half",
            "a_rrf",
        )
    }
    negatives = []
    for label, picked in queries:
        positive = test_vectors[picked[0]]
        top = np.argsort(-(gallery @ positive), kind="stable")[:10]
        confused = [c for c in gallery_labels[top].tolist() if c != label]
        if confused:
            other = max(set(confused), key=confused.count)
        else:
            others = [c for c in eligible if c != label]
            other = others[int(rng.integers(len(others)))]
        negatives.append((label, picked[0], other, int(rng.choice(by_class[other]))))
    vectors_of([n for *_, n in negatives])
    for label, p, other, n in negatives:
        positive, negative = test_vectors[p], test_vectors[n]
        s_p, s_n = gallery @ positive, gallery @ negative
        variants = {
            "without": s_p,
            "sum": gallery @ _normalised(positive - negative),
            "sum_half": gallery @ _normalised(positive - 0.5 * negative),
            "rrf": 1.0 / (RRF_K + 1 + _ranks(s_p)) - 1.0 / (RRF_K + 1 + _ranks(s_n)),
        }
        for name, scores in variants.items():
            top = np.argsort(-scores, kind="stable")[:10]
            neg_rows[f"b_{name}"].append(float((gallery_labels[top] == other).mean()))
            neg_rows[f"a_{name}"].append(float((gallery_labels[top] == label).mean()))
    lines += [
        "",
        f"Negative test ({len(negatives)} queries: a positive of class A, a negative of the "
        "class B its top-10 confuses most):",
        "",
        "| query | top-10 in class B | top-10 in class A |",
        "|---|---|---|",
    ]
    for key, name in (
        ("without", "positive only"),
        ("sum", "vector: p - n (weights 1, 1)"),
        ("sum_half", "vector: p - 0.5 n"),
        ("rrf", "rank fusion: 1/(60+r_p) - 1/(60+r_n)"),
    ):
        lines.append(
            f"| {name} | {np.mean(neg_rows['b_' + key]):.4f} | "
            f"{np.mean(neg_rows['a_' + key]):.4f} |"
        )
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(map(str, DEFAULT_DATASETS)))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, str(args.threads))
    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))

    from lookalike.encoders import create_encoder

    encoder = create_encoder("efficientnet-lite0", pooling="gem")
    lines = [
        "# Combined queries: vector sum vs rank fusion",
        "",
        f"`python benchmarks/combined_queries.py --queries {args.queries} --seed {args.seed}`; "
        "efficientnet-lite0 (GeM), exact cosine, class-level relevance.",
        "",
    ]
    start = time.perf_counter()
    for dataset in (Path(p) for p in args.datasets.split(",") if p):
        if not (dataset / "labels.csv").exists():
            print(f"skipping {dataset}: no labels.csv", file=sys.stderr)
            continue
        lines += run_dataset(dataset, encoder, args)
    lines.append(f"Wall time: {time.perf_counter() - start:.0f} s.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
