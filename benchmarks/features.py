"""Every global-feature variant on both benchmarks of clothing-small, with its cost.

Benchmarks:

- class level: the test split queries the train split (no labels used by any feature), mAP
  over the whole ranking, relevant meaning "same class";
- copy detection: ``--sources`` (100) seeded train images x all 10 attacks query the train
  split; mean and min recall@1 over the attacks, mean micro-AP (DISC21) over the attacks.

Variants: pooling (average / GeM), layer (head / stage7 / stage6), multi-scale extraction,
the model (Lite0 / Lite1 / Lite2), what the collection does with its vectors (nothing /
centring / PCA-whitening), query expansion, database-side augmentation, multi-crop queries.

One forward pass per image and model yields every pooling of every layer, plus the head at
scale 1/sqrt(2) for multi-scale (:class:`AllPoolings`, built from the encoder's own network
and pooling function); the product encoders are then timed one by one on the same images, and
their vectors are checked against the pass's. Embeddings are cached under $LOOKALIKE_CACHE
(default: a temporary folder), so a second run only evaluates (seconds).

    python benchmarks/features.py [--sources 100] [--models lite0,lite1,lite2] [--threads 2]

Prints a Markdown report (copy it to benchmarks/results/features.md); progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SMALL_SCALE = 0.7071
# Outputs of one AllPoolings pass, in order: (name, layer index in features(), scale, pooling).
OUTPUTS = (
    ("stage6-avg", 5, 1.0, "avg"),
    ("stage6-gem", 5, 1.0, "gem"),
    ("stage7-avg", 6, 1.0, "avg"),
    ("stage7-gem", 6, 1.0, "gem"),
    ("head-avg", 7, 1.0, "avg"),
    ("head-gem", 7, 1.0, "gem"),
    ("head-avg@0.71", 7, SMALL_SCALE, "avg"),
    ("head-gem@0.71", 7, SMALL_SCALE, "gem"),
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- extraction --------------------------------------------------------------------------------


def all_poolings_module(model: str):
    """A torch module: uint8 NHWC pixels -> every OUTPUTS vector, concatenated."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from lookalike.encoders.efficientnet_lite import (
        VARIANTS,
        lite_preprocess,
        load_pretrained,
        pool_map,
    )

    variant = VARIANTS[model]
    config = lite_preprocess(variant)

    class AllPoolings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = load_pretrained(variant)
            self.register_buffer("mean", (255.0 * torch.tensor(config.mean)).view(1, 3, 1, 1))
            self.register_buffer(
                "inv_std", (1.0 / (255.0 * torch.tensor(config.std))).view(1, 3, 1, 1)
            )
            self.small = round(config.resolution * SMALL_SCALE)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.permute(0, 3, 1, 2).float()
            x = ((x - self.mean) * self.inv_std).contiguous(memory_format=torch.channels_last)
            maps = {1.0: self.network.features(x)}
            small = F.interpolate(
                x, size=(self.small, self.small), mode="bilinear", align_corners=False
            )
            maps[SMALL_SCALE] = [None] * 7 + [self.network.features(small)[-1]]
            return torch.cat([pool_map(maps[s][i], p) for _, i, s, p in OUTPUTS], dim=1)

    module = AllPoolings().eval()
    dims = [module.network.stage_channels[i] if i < 7 else 1280 for _, i, _, _ in OUTPUTS]
    return module, config, dims


class Extractor:
    """Runs AllPoolings of one model on ONNX Runtime; splits its output by variant."""

    def __init__(self, model: str, threads: int) -> None:
        import numpy as np
        import torch

        from lookalike.encoders.runtime import OnnxRunner

        module, self.config, dims = all_poolings_module(model)
        example = np.zeros((1, self.config.resolution, self.config.resolution, 3), np.uint8)
        key = f"bench-allpoolings-{model}-v1-torch{torch.__version__}"
        self.run = OnnxRunner(module, example=example, cache_key=key, threads=threads)
        self.bounds = np.cumsum([0, *dims])

    def __call__(self, pixels) -> dict:
        out = self.run(pixels)
        return {
            name: out[:, self.bounds[i] : self.bounds[i + 1]]
            for i, (name, *_) in enumerate(OUTPUTS)
        }


def _views(path: Path, config, crops: bool) -> list:
    from lookalike.core.multicrop import query_crops
    from lookalike.encoders.preprocess import resize_for_model
    from lookalike.images import load_image

    image = load_image(path)
    views = query_crops(image) if crops else [image]
    return [resize_for_model(v, config) for v in views]


def extract(
    extractor: Extractor, paths: Sequence[Path], *, crops: bool, label: str, threads: int
) -> tuple[dict, float]:
    """{variant: [n (x views), dim]} for the files, and images per second of the pass."""
    import numpy as np

    parts: dict[str, list] = {}
    started = time.perf_counter()
    last = started
    chunk = 32 if not crops else 8
    batches = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        decoded = pool.map(
            lambda b: [v for p in b for v in _views(p, extractor.config, crops)], batches
        )
        for done, pixels in enumerate(decoded, 1):
            for name, vectors in extractor(np.stack(pixels)).items():
                parts.setdefault(name, []).append(vectors)
            if time.perf_counter() - last > 15:
                last = time.perf_counter()
                _log(f"  {label}: {min(done * chunk, len(paths))}/{len(paths)}")
    seconds = time.perf_counter() - started
    views = 6 if crops else 1
    out = {
        name: np.concatenate(p).reshape(len(paths), views, -1).squeeze(1)
        if not crops
        else np.concatenate(p).reshape(len(paths), views, -1)
        for name, p in parts.items()
    }
    return out, len(paths) * views / seconds


def cached(cache: Path, key: str, compute: Callable[[], tuple[dict, float]]) -> dict:
    import numpy as np

    path = cache / f"{key}.npz"
    if path.exists():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    vectors, rate = compute()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **vectors, __rate__=np.array(rate))
    return {**vectors, "__rate__": np.array(rate)}


def attacked_copies(database: Sequence[Path], sources: int, seed: int, cache: Path):
    """The attacked copies as PNG files (made once), with their source positions and attacks."""
    from lookalike.evaluation.copydetect import ATTACKS, generate_copies, sample_sources

    picked = sample_sources(len(database), sources, seed)
    folder = cache / f"copies-{seed}-{len(picked)}"
    rows = []
    for source_id in picked.tolist():
        for attack in ATTACKS:
            rows.append((folder / attack / f"{source_id:05d}.png", source_id, attack))
    if not all(path.exists() for path, _, _ in rows):
        _log(f"writing {len(rows)} attacked copies to {folder}")
        for copy in generate_copies(database, attacks=list(ATTACKS), seed=seed, sources=picked):
            path = folder / copy.attack / f"{copy.source_id:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            copy.image.save(path, compress_level=1)
    return rows


def _digest(paths: Sequence[Path]) -> str:
    return hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:12]


@dataclass
class Features:
    """Every pass's vectors of one model: database, test queries, copy queries (+ crops)."""

    database: dict
    test: dict
    copies: dict
    test_crops: dict | None
    copy_crops: dict | None


def model_features(model, sets, cache, threads, crops: bool) -> Features:
    extractor: list[Extractor] = []

    def run(paths, crop, label):
        def compute():
            if not extractor:
                extractor.append(Extractor(model, threads))
            _log(f"{model}: embedding {label} ({len(paths)} images{', 6 views' if crop else ''})")
            return extract(extractor[0], paths, crops=crop, label=label, threads=threads)

        return cached(cache, f"{model}-{label}-{_digest(paths)}", compute)

    database, test, copies, crop_copies = sets
    return Features(
        run(database, False, "database"),
        run(test, False, "test"),
        run(copies, False, "copies"),
        run(test, True, "test-crops") if crops else None,
        run(crop_copies, True, "copy-crops") if crops else None,
    )


# -- evaluation --------------------------------------------------------------------------------

QE_N = 20  # the README's --qe 20
DBA_N = 10


def unit(x):
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Space:
    """A learned transform of raw vectors (the collection's, fitted on the database)."""

    name: str
    center: object = None
    whitening: object = None

    @classmethod
    def fit(cls, database, kind: str) -> Space:
        from lookalike.core.transform import learn_whitening

        if kind == "raw":
            return cls(kind)
        center = unit(database).mean(axis=0)
        if kind == "centred":
            return cls(kind, center)
        dims = int(kind.removeprefix("pcaw-"))
        return cls(kind, center, learn_whitening(unit(database) - center, dims))

    def __call__(self, vectors):
        vectors = unit(vectors)
        if self.center is None:
            return vectors
        centred = vectors - self.center
        if self.whitening is not None:
            centred = centred @ self.whitening
        return unit(centred)


def expand(queries, database, n: int):
    """alpha-QE as Collection._expand does it: the query plus its n nearest, weighted."""
    import numpy as np

    scores = queries @ database.T
    top = np.argpartition(-scores, n, axis=1)[:, :n]
    weights = np.clip(np.take_along_axis(scores, top, axis=1), 0.0, None)
    expanded = queries + np.einsum("qn,qnd->qd", weights, database[top])
    return unit(expanded)


def augment(database, n: int):
    """alpha-DBA: each database vector plus its n nearest others, weighted like QE."""
    import numpy as np

    scores = database @ database.T
    np.fill_diagonal(scores, -np.inf)
    top = np.argpartition(-scores, n, axis=1)[:, :n]
    weights = np.clip(np.take_along_axis(scores, top, axis=1), 0.0, None)
    return unit(database + np.einsum("qn,qnd->qd", weights, database[top]))


@dataclass
class Variant:
    label: str
    model: str
    feature: str
    space: str = "centred"
    qe: bool = False
    dba: bool = False
    multicrop: bool = False


def prepare(variant: Variant, db_raw):
    """The collection side: the transform learned on the database, and its vectors."""
    space = Space.fit(db_raw, variant.space)
    database = space(db_raw)
    return space, augment(database, DBA_N) if variant.dba else database


def scores_for(variant: Variant, db_raw, queries_raw, timing: list | None = None):
    """[queries, database] ranking scores and reported scores (QE ranks by the expanded
    query but reports the plain similarity, as the collection does), views merged by max.
    ``timing`` receives the seconds of the query side (transform, search, QE, merging)."""
    space, database = prepare(variant, db_raw)
    started = time.perf_counter()
    views = queries_raw if queries_raw.ndim == 3 else queries_raw[:, None, :]
    flat = space(views.reshape(-1, views.shape[-1]))
    plain = (flat @ database.T).reshape(len(views), views.shape[1], -1).max(axis=1)
    ranked = plain
    if variant.qe:
        expanded = expand(flat, database, QE_N) @ database.T
        ranked = expanded.reshape(len(views), views.shape[1], -1).max(axis=1)
    if timing is not None:
        timing.append(time.perf_counter() - started)
    return ranked, plain


def class_map(variant, feats, train_labels, test_labels, timing: list | None = None) -> float:
    from lookalike.evaluation.metrics import mean_average_precision

    queries = (
        feats.test_crops[variant.feature] if variant.multicrop else feats.test[variant.feature]
    )
    ranking, _ = scores_for(variant, feats.database[variant.feature], queries, timing)
    return mean_average_precision(ranking, test_labels, train_labels)


def copy_detection(variant, feats, rows, k: int = 10):
    """(mean recall@1, min recall@1, mean micro-AP) over the attacks, and the queries used."""
    import numpy as np

    from lookalike.evaluation.copydetect import _attack_result

    queries = (
        feats.copy_crops[variant.feature] if variant.multicrop else feats.copies[variant.feature]
    )
    rows = rows[: len(queries)]
    ranking, plain = scores_for(variant, feats.database[variant.feature], queries)
    order = np.argsort(-ranking, axis=1, kind="stable")[:, :k]
    reported = np.take_along_axis(plain, order, axis=1)
    found: dict[str, dict[str, list]] = {}
    for row, (_, source, attack) in enumerate(rows):
        bucket = found.setdefault(attack, {"sources": [], "ids": [], "scores": []})
        bucket["sources"].append(np.array(source))
        bucket["ids"].append(order[row])
        bucket["scores"].append(reported[row])
    results = [_attack_result(name, bucket) for name, bucket in found.items()]
    recall = [r.recall_at_1 for r in results]
    return (
        float(np.mean(recall)),
        float(np.min(recall)),
        float(np.mean([r.micro_ap for r in results])),
        len(rows),
    )


PRODUCT = {
    # (model, feature) -> product encoder options whose vectors AllPoolings reproduces
    ("efficientnet-lite0", "head-avg"): {"layer": "head"},
    ("efficientnet-lite0", "head-gem"): {"layer": "head", "pooling": "gem"},
    ("efficientnet-lite0", "stage7-avg"): {"layer": "stage7"},
    ("efficientnet-lite0", "stage6-avg"): {"layer": "stage6"},
    ("efficientnet-lite0", "ms-avg"): {"layer": "head", "scales": "1,0.7071"},
    ("efficientnet-lite0", "ms-gem"): {"layer": "head", "pooling": "gem", "scales": "1,0.7071"},
    ("efficientnet-lite1", "head-avg"): {"layer": "head"},
    ("efficientnet-lite2", "head-avg"): {"layer": "head"},
}


def multiscale(feats, pooling: str):
    """Add the two-scale vectors: the mean of the unit vectors at scales 1 and 1/sqrt(2)."""
    for group in (feats.database, feats.test, feats.copies, feats.test_crops, feats.copy_crops):
        if group is not None and f"head-{pooling}" in group:
            group[f"ms-{pooling}"] = (
                unit(group[f"head-{pooling}"]) + unit(group[f"head-{pooling}@0.71"])
            ) / 2


def time_encoders(database, features, threads):
    """Product encoders on the same 64 database images: images/s, ms per single image, and
    the lowest cosine between their vectors and the benchmark pass's."""
    import numpy as np

    from lookalike.encoders import create_encoder
    from lookalike.encoders.preprocess import resize_for_model
    from lookalike.images import load_image

    sample = database[:64]
    costs = {}
    for (model, feature), options in PRODUCT.items():
        if model not in features:
            continue
        encoder = create_encoder(model, normalize=False, threads=threads, **options)
        pixels = np.stack([resize_for_model(load_image(p), encoder.preprocess) for p in sample])
        encoder.embed_pixels(pixels[:2])
        best = np.inf
        for _ in range(2):
            started = time.perf_counter()
            vectors = np.concatenate([encoder.embed_pixels(pixels[i : i + 32]) for i in (0, 32)])
            best = min(best, time.perf_counter() - started)
        single = np.inf
        for i in range(3):
            started = time.perf_counter()
            encoder.embed_pixels(pixels[i : i + 1])
            single = min(single, time.perf_counter() - started)
        reference = features[model].database[feature][:64]
        agreement = float((unit(vectors) * unit(reference)).sum(axis=1).min())
        costs[(model, feature)] = (len(sample) / best, 1000 * single, agreement, encoder.dim)
        _log(f"timed {model} {options}: {len(sample) / best:.1f} img/s, agreement {agreement:.5f}")
    return costs


def report(args, dataset, database, test, copies, features, cache) -> None:
    import numpy as np

    train_labels = np.array([dataset.labels[i] for i in dataset.indices("train")], dtype=object)
    test_labels = np.array([dataset.labels[i] for i in dataset.indices("test")], dtype=object)
    for feats in features.values():
        multiscale(feats, "avg")
        multiscale(feats, "gem")
    lite0 = "efficientnet-lite0"
    variants = [
        Variant("Lite0 head, GAP, raw cosine (plain)", lite0, "head-avg", space="raw"),
        Variant("Lite0 head, GAP, centred (default)", lite0, "head-avg"),
        Variant("Lite0 head, GeM", lite0, "head-gem"),
        Variant("Lite0 head, GAP, 2 scales (1, 0.71)", lite0, "ms-avg"),
        Variant("Lite0 head, GeM, 2 scales (1, 0.71)", lite0, "ms-gem"),
        Variant("Lite0 stage7, GAP", lite0, "stage7-avg"),
        Variant("Lite0 stage7, GeM", lite0, "stage7-gem"),
        Variant("Lite0 stage6, GAP", lite0, "stage6-avg"),
        Variant("Lite0 stage6, GeM", lite0, "stage6-gem"),
        Variant("Lite0 head, GAP, PCA-whitening 128", lite0, "head-avg", space="pcaw-128"),
        Variant("Lite0 head, GAP, PCA-whitening 256", lite0, "head-avg", space="pcaw-256"),
        Variant("Lite0 head, GAP, PCA-whitening 512", lite0, "head-avg", space="pcaw-512"),
        Variant("Lite0 head, GeM, PCA-whitening 256", lite0, "head-gem", space="pcaw-256"),
        Variant(f"Lite0 head, GAP + alpha-QE {QE_N}", lite0, "head-avg", qe=True),
        Variant(f"Lite0 head, GAP + alpha-DBA {DBA_N}", lite0, "head-avg", dba=True),
        Variant("Lite0 head, GAP + DBA + QE", lite0, "head-avg", qe=True, dba=True),
        Variant(f"Lite0 head, GeM + alpha-QE {QE_N}", lite0, "head-gem", qe=True),
        Variant(
            "Lite0 head, GAP, multi-crop query (6 views, max)", lite0, "head-avg", multicrop=True
        ),
        Variant("Lite0 head, GeM, multi-crop query", lite0, "head-gem", multicrop=True),
    ]
    for model in features:
        if model != lite0:
            name = model.replace("efficientnet-lite", "Lite")
            variants.append(Variant(f"{name} head, GAP", model, "head-avg"))
            variants.append(Variant(f"{name} head, GeM", model, "head-gem"))
    costs = time_encoders(database, features, args.threads)

    crop_queries = len(features[lite0].copy_crops[next(iter(features[lite0].copy_crops))])
    baseline_subset = None
    lines = []
    for variant in variants:
        feats = features[variant.model]
        timing: list[float] = []
        mAP = class_map(variant, feats, train_labels, test_labels, timing)
        search_ms = 1000 * timing[0] / len(test_labels)
        mean_r1, min_r1, micro_ap, queries = copy_detection(variant, feats, copies)
        feature = variant.feature
        views = 6 if variant.multicrop else 1
        cost = costs.get((variant.model, feature)) or costs.get((variant.model, "head-avg"))
        if "stage" in feature and feature.endswith("gem"):
            cost = costs.get((variant.model, feature.replace("gem", "avg")))
        rate, single_ms, agreement, dim = cost
        dim = feats.database[feature].shape[1]
        if variant.space.startswith("pcaw-"):
            dim = int(variant.space.removeprefix("pcaw-"))
        query_ms = views * single_ms + search_ms
        subset = "" if queries == len(copies) else f" ({queries} q.)"
        lines.append(
            f"| {variant.label} | {mAP:.3f} | {mean_r1:.3f}{subset} | {min_r1:.3f} | "
            f"{micro_ap:.3f} | {rate:.0f} | {query_ms:.1f} | {dim * 4:,} |"
        )
        if variant.multicrop and baseline_subset is None:
            plain = Variant("", variant.model, feature)
            feats_subset = Features(
                feats.database,
                feats.test,
                {feature: feats.copies[feature][:crop_queries]},
                None,
                None,
            )
            baseline_subset = copy_detection(plain, feats_subset, copies)
        _log(lines[-1])

    print("# Global features: every variant on both benchmarks, with its cost\n")
    print(
        f"- class level: `{args.dataset.name}` test split ({len(test_labels)} queries) against "
        f"the train split ({len(train_labels)} images), no labels used; mAP over the whole ranking"
    )
    print(
        f"- copy detection: {args.sources} seeded train images (seed {args.seed}) x 10 attacks = "
        f"{len(copies)} queries against the train split, top 10 kept; recall@1 mean and min over "
        f"the attacks, micro-AP (DISC21) mean over the attacks. Multi-crop rows use the first "
        f"{crop_queries} of those queries ({crop_queries // 10} sources; the single-view GAP "
        f"baseline on the same subset: mean recall@1 {baseline_subset[0]:.3f}, min "
        f"{baseline_subset[1]:.3f}, micro-AP {baseline_subset[2]:.3f})"
    )
    print(
        '- "centred": cosine on unit vectors minus the collection\'s mean (the product default); '
        "every row is centred unless it says raw or PCA-whitening (learned on the train split's "
        f"vectors, no labels). alpha-QE: the query plus its {QE_N} nearest, weighted by cosine; "
        f"alpha-DBA: each database vector plus its {DBA_N} nearest, same weights. Multi-crop: the "
        "query, its centre and four corner crops (75%), each database image's best cosine"
    )
    print(
        f"- cost: extraction images/s of the product encoder (ONNX Runtime, {args.threads} "
        "threads, batches of 32, pixels already decoded; best of 2 on a shared machine); query "
        "ms = embedding one image (x views) + exact search, QE or DBA over the train split; "
        "bytes per image: the stored float32 vector (PCA-whitening: in the index)"
    )
    print(f"- machine: {os.cpu_count()} CPU cores, shared, Python {platform.python_version()}\n")
    print(
        "| variant | class mAP | copy recall@1 mean | copy recall@1 min | copy micro-AP | "
        "extract img/s | query ms | bytes/image |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for line in lines:
        print(line)
    agreement = min(c[2] for c in costs.values())
    print(
        f"\nProduct encoders vs the benchmark's single pass (64 images each): lowest cosine "
        f"{agreement:.5f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--sources", type=int, default=100, help="copy-detection sources")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="lite0,lite1,lite2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--crop-sources", type=int, default=30, help="copy-detection sources for multi-crop"
    )
    parser.add_argument("--extract-only", action="store_true")
    args = parser.parse_args()
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, str(args.threads))
    os.environ.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench"))
    cache = Path(os.environ["LOOKALIKE_CACHE"]) / "features"

    from lookalike.evaluation.copydetect import ATTACKS
    from lookalike.evaluation.datasets import load_dataset

    dataset = load_dataset(args.dataset)
    database = [Path(dataset.paths[i]) for i in dataset.indices("train")]
    test = [Path(dataset.paths[i]) for i in dataset.indices("test")]
    copies = attacked_copies(database, args.sources, args.seed, cache)
    crop_rows = copies[: args.crop_sources * len(ATTACKS)]
    paths = [row[0] for row in copies]
    sets = (database, test, paths, paths[: len(crop_rows)])
    models = [f"efficientnet-{m.strip()}" for m in args.models.split(",")]
    features = {}
    for model in models:  # the first model's multi-crop views last: they take longest
        features[model] = model_features(model, sets, cache, args.threads, crops=False)
    features[models[0]] = model_features(models[0], sets, cache, args.threads, crops=True)
    if args.extract_only:
        return
    report(args, dataset, database, test, copies, features, cache)


if __name__ == "__main__":
    main()
