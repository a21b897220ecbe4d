"""Near-duplicate detection accuracy on real photos: every method of ``lookalike dedup`` and the
``imagehash`` pHash baseline, side by side in one run.

The collection is one split of a dataset (``--split``: train, validation, test, or all) plus
transformed copies of a seeded sample of its photos: each sampled original gets one copy per
transform: resize (45-75%), horizontal flip, tilt (2-6 degrees, black corners, same canvas),
rotation 10-45 degrees either way on a grown canvas with black corners and with corners filled
by a blurred copy (``rotation-black``, ``rotation-filled``), crop (80-92% of each side),
overlay (caption lines, solid boxes, a translucent watermark: the ``overlay`` attack of
``lookalike.evaluation.copydetect``), JPEG recompression at quality 25-50, and a brightness
change. An original and its copies form one true group; every other photo of the split is a
distractor. On grocery-store (smartphone photos of packaged products, often the same product
shot again on the same shelf) those distractors are the hard negatives for precision.

Precision and recall are pairwise: every unordered pair of images placed in the same group is a
predicted pair; a predicted pair is correct when both images come from the same original.
Precision = correct predicted pairs / predicted pairs; recall = correct predicted pairs / true
pairs (10 images per sampled original: 45 pairs). Pairs of distinct originals that several
methods agree on are listed, since a dataset can hold real duplicates of its own.

The default method's thresholds were tuned on grocery-store's train split; its validation
and test splits and clothing-small are held out:

    python benchmarks/dedup_accuracy.py --dataset DIR [--split all] [--sample 250] [--seed 0]
        [--methods exact,perceptual,embedding,verified] [--sweep] [--no-local-features]

The copies and the indexed collection (with stored local features, as ``lookalike index
--local-features`` leaves it, unless ``--no-local-features``) are cached under
$LOOKALIKE_CACHE (default: a temporary folder). Prints a Markdown report; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _resize(image, rng):
    factor = rng.uniform(0.45, 0.75)
    size = (max(16, round(image.width * factor)), max(16, round(image.height * factor)))
    return image.resize(size, _pil().Image.Resampling.LANCZOS)


def _flip(image, rng):
    return _pil().ImageOps.mirror(image)


def _tilt(image, rng):
    angle = rng.uniform(2.0, 6.0) * rng.choice([-1.0, 1.0])
    return image.rotate(angle, _pil().Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0))


def _rotation_black(image, rng):
    """10-45 degrees either way on a grown canvas with black corners."""
    angle = rng.uniform(10.0, 45.0) * rng.choice([-1.0, 1.0])
    return image.rotate(angle, _pil().Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))


def _rotation_filled(image, rng):
    """10-45 degrees either way, corners filled with a blurred stretched copy (as apps do)."""
    from lookalike.evaluation.copydetect import HARD_ATTACKS

    return HARD_ATTACKS["rotation-large"](image, rng)


def _overlay(image, rng):
    """Several lines of text, 1-3 solid boxes and a translucent watermark."""
    from lookalike.evaluation.copydetect import HARD_ATTACKS

    return HARD_ATTACKS["overlay"](image, rng)


def _crop(image, rng):
    keep_w, keep_h = rng.uniform(0.8, 0.92), rng.uniform(0.8, 0.92)
    width, height = round(image.width * keep_w), round(image.height * keep_h)
    left = int(rng.integers(0, image.width - width + 1))
    top = int(rng.integers(0, image.height - height + 1))
    return image.crop((left, top, left + width, top + height))


def _brightness(image, rng):
    factor = 1.0 + rng.uniform(0.15, 0.3) * rng.choice([-1.0, 1.0])
    return _pil().ImageEnhance.Brightness(image).enhance(factor)


# Pairs of clothing-small photos that are near-duplicates themselves: the same garment shot
# twice from almost the same place (inspected by eye; found as the strongest "wrong" pairs of
# every method). They and their copies count as true pairs.
DATASET_DUPLICATES = (
    ("6075b4a5-5b1a-4ce0-aea0-9dbfbca7c35c", "637a56e4-7fa6-4f75-8859-0f8902461554"),
    ("b59e4d4a-a283-4868-8a81-2f24d8b9c8d8", "e6a8b33f-279c-4072-8dba-229d94205e55"),
    ("02341619-2fa3-42d4-bb5e-689518228e67", "78b7da73-ca6c-4e99-b88d-a9f358e7f0f2"),
    ("5e944547-5d37-4b1a-a544-64a250377e4d", "79307c6e-cc11-422f-8b55-d01148cc94b3"),
    ("2e688422-7be9-415a-94e6-488065873b40", "6e199a44-ee88-4a58-ace4-b6d926d82e6d"),
)

# Name -> (transform, JPEG quality of the saved copy). "jpeg" is the recompression itself.
TRANSFORMS: dict[str, tuple[Callable, int | None]] = {
    "resize": (_resize, 90),
    "flip": (_flip, 90),
    "tilt": (_tilt, 90),
    "rotation-black": (_rotation_black, 90),
    "rotation-filled": (_rotation_filled, 90),
    "crop": (_crop, 90),
    "overlay": (_overlay, 90),
    "jpeg": (lambda image, rng: image, None),
    "brightness": (_brightness, 90),
}


def _pil():
    import PIL.Image
    import PIL.ImageEnhance
    import PIL.ImageOps

    return PIL


def make_copies(originals: Sequence[Path], sample: int, seed: int, out: Path) -> dict[str, str]:
    """Write transformed copies of a seeded sample of ``originals`` under ``out`` (skipping
    those already written); returns copy path -> original path."""
    import numpy as np

    from lookalike.images import load_image

    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(originals), size=min(sample, len(originals)), replace=False))
    source_of: dict[str, str] = {}
    for position in chosen:
        original = originals[position]
        image = None
        for name, (transform, quality) in TRANSFORMS.items():
            target = out / name / f"{original.stem}-{name}.jpg"
            source_of[str(target)] = str(original)
            if target.exists():
                continue
            if image is None:
                image = load_image(original)
            generator = np.random.default_rng([seed, zlib.crc32(name.encode()), int(position)])
            copy = transform(image, generator)
            if quality is None:
                quality = int(generator.integers(25, 51))
            target.parent.mkdir(parents=True, exist_ok=True)
            copy.save(target, "JPEG", quality=quality)
    return source_of


def _progress(stage: str) -> Callable[[int, int], None]:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 15 or done == total:
            last[0] = now
            print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)

    return report


def pairs_of(groups: Iterable[Sequence[str]]) -> set[tuple[str, str]]:
    """Every unordered pair of paths that share a group."""
    found = set()
    for group in groups:
        for a, b in itertools.combinations(sorted(group), 2):
            found.add((a, b))
    return found


def score(
    predicted: set[tuple[str, str]], truth: set[tuple[str, str]], origin: dict[str, str]
) -> dict[str, float]:
    """Pairwise precision and recall, and the wrong pairs split by kind."""
    correct = predicted & truth
    wrong = predicted - truth
    between_originals = sum(1 for a, b in wrong if "/copies/" not in a + b)
    return {
        "pairs": len(predicted),
        "correct": len(correct),
        "precision": len(correct) / len(predicted) if predicted else 1.0,
        "recall": len(correct) / len(truth) if truth else 1.0,
        "wrong": len(wrong),
        "wrong_between_originals": between_originals,
    }


def imagehash_pairs(paths: Sequence[str], distance: int) -> tuple[list[list[str]], float]:
    """The baseline: ``imagehash.phash`` of every file (full decode, as imagededup does), and
    every pair within ``distance`` bits reported as duplicates, as imagededup's
    ``find_duplicates`` does (each image with its own list, no transitive grouping). Pairs
    are found with the same binary-index search lookalike uses, not an N x N matrix."""
    import imagehash
    import numpy as np
    from PIL import Image

    from lookalike.dedup import hamming_pairs

    started = time.perf_counter()
    codes = np.zeros((len(paths), 8), dtype=np.uint8)
    for row, path in enumerate(paths):
        with Image.open(path) as image:
            codes[row] = np.packbits(imagehash.phash(image).hash.reshape(-1))
    pairs = hamming_pairs(codes, distance)
    seconds = time.perf_counter() - started
    return [[paths[a], paths[b]] for a, b, _ in pairs], seconds


def split_originals(dataset: Path, split: str) -> tuple[Path, list[Path]]:
    """(folder to index, its images) of one split (``all``: the whole dataset)."""
    from lookalike.core.ingest import scan_folder

    folder = dataset.resolve() if split == "all" else (dataset / split).resolve()
    if not folder.is_dir():
        sys.exit(f"no split {split!r} under {dataset}")
    return folder, list(scan_folder(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--split", default="all", help="train, validation, test or all")
    parser.add_argument("--sample", type=int, default=250, help="originals that get copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="exact,perceptual,embedding,verified")
    parser.add_argument("--baseline-distance", type=int, default=10, help="imagehash bits")
    parser.add_argument(
        "--sweep", action="store_true", help="also other perceptual and embedding thresholds"
    )
    parser.add_argument(
        "--no-local-features",
        action="store_true",
        help="index without stored SIFT features (verification then extracts them)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()

    # One BLAS thread: SIFT matching multiplies many small matrices, which threads only slow
    # down on a shared machine; decoding and SIFT extraction use ``--threads`` threads.
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    cache = Path(os.environ.get("LOOKALIKE_CACHE") or Path(tempfile.gettempdir()) / "lookalike")
    local = not args.no_local_features
    work = cache / (
        f"dedup-accuracy-{args.dataset.name}-{args.split}-{args.sample}-{args.seed}"
        + ("" if local else "-nolocal")
    )

    from lookalike.core.collection import Collection

    folder, originals = split_originals(args.dataset, args.split)
    if not originals:
        sys.exit(f"no images under {folder}")
    if len({p.stem for p in originals}) != len(originals):
        sys.exit("original file names are not unique: copies are named after them")
    source_of = make_copies(originals, args.sample, args.seed, work / "copies")
    origin = {str(p): str(p) for p in originals} | source_of
    by_stem = {p.stem: str(p) for p in originals}
    same = {by_stem[b]: by_stem[a] for a, b in DATASET_DUPLICATES if a in by_stem and b in by_stem}
    origin = {path: same.get(source, source) for path, source in origin.items()}
    with Collection(work / "collection", threads=args.threads) as collection:
        for root in (folder, (work / "copies").resolve()):
            report = collection.index(
                root,
                workers=args.threads,
                local_features=local,
                progress=_progress(f"indexing {root.name}"),
            )
            if report.failed:
                print(f"  {len(report.failed)} files failed in {root}", file=sys.stderr)
        if args.prepare_only:
            return
        run(args, collection, origin, platform.python_version())


def _label(path: str, origin: dict[str, str]) -> str:
    return Path(origin[path]).parent.name


def evaluate(groups, truth, origin) -> dict[str, object]:
    """Scores of one grouping, recall per transform, and the wrong pairs."""
    predicted = pairs_of(groups)
    result: dict[str, object] = score(predicted, truth, origin)
    per_transform = {}
    for name in TRANSFORMS:
        wanted = {(a, b) for a, b in truth if f"-{name}.jpg" in a or f"-{name}.jpg" in b}
        per_transform[name] = len(wanted & predicted) / len(wanted) if wanted else 1.0
    result["per_transform"] = per_transform
    wrong = sorted(predicted - truth)
    result["same_class_wrong"] = sum(1 for a, b in wrong if _label(a, origin) == _label(b, origin))
    result["wrong_examples"] = wrong[:5]
    return result


def run(args, collection, origin: dict[str, str], python: str) -> None:
    import numpy as np

    from lookalike.dedup import find_duplicates

    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(1)

    paths = sorted(collection.catalog.paths())
    missing = [p for p in paths if p not in origin]
    if missing:
        sys.exit(f"{len(missing)} images in the collection are neither originals nor copies")
    by_origin: dict[str, list[str]] = {}
    for path in paths:
        by_origin.setdefault(origin[path], []).append(path)
    truth = pairs_of(g for g in by_origin.values() if len(g) > 1)
    rows = []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings: list[tuple[str, dict]] = [(m, {}) for m in methods]
    if args.sweep:
        settings += [("perceptual", {"threshold": t}) for t in (6, 8, 12, 14)]
        settings += [("embedding", {"threshold": t}) for t in (0.85, 0.92, 0.94, 0.96)]
    for method, options in settings:
        print(f"running {method} {options} ...", file=sys.stderr, flush=True)
        report = find_duplicates(collection, method=method, workers=args.threads, **options)
        groups = [[m.path for m in g.members] for g in report.groups]
        setting = "-" if report.threshold is None else f"{report.threshold:g}"
        if report.min_inliers is not None:
            setting += f", {report.min_inliers} inliers"
        rows.append((f"`{method}`", setting, groups, report.seconds))
    print("running the imagehash baseline ...", file=sys.stderr, flush=True)
    baseline, seconds = imagehash_pairs(paths, args.baseline_distance)
    rows.append(("`imagehash.phash` (baseline)", f"{args.baseline_distance:g}", baseline, seconds))

    copies = sum(1 for p in paths if "/copies/" in p)
    print(f"# Near-duplicate detection on {args.dataset.name} ({args.split}) with copies\n")
    print(
        f"- collection: {len(paths) - copies} originals of `{args.dataset.name}` split "
        f"`{args.split}` and {copies} "
        f"copies: {args.sample} sampled originals (seed {args.seed}) x "
        f"{len(TRANSFORMS)} transforms ({', '.join(TRANSFORMS)}); "
        f"{len(truth)} true pairs"
    )
    print(
        "- pairwise: a predicted pair is two images in one group; precision = true predicted "
        "pairs / predicted pairs, recall = true predicted pairs / true pairs"
    )
    print(
        f"- embeddings: {collection.model_name} ({collection.layer}); machine: "
        f"{os.cpu_count()} CPU cores, shared; Python {python}, numpy {np.__version__}\n"
    )
    header = "| method | threshold | groups | predicted pairs | precision | recall | "
    header += "wrong pairs | same-class wrong | seconds |"
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for name, setting, groups, seconds in rows:
        result = evaluate(groups, truth, origin)
        results.append((name, setting, result))
        print(
            f"| {name} | {setting} | {len(groups)} | {result['pairs']} | "
            f"{result['precision']:.3f} | {result['recall']:.3f} | {result['wrong']} | "
            f"{result['same_class_wrong']} | {seconds:.1f} |"
        )
    print("\nRecall per transform (pairs with a copy made by that transform):\n")
    print("| method | threshold | " + " | ".join(TRANSFORMS) + " |")
    print("|---|---|" + "---:|" * len(TRANSFORMS))
    for name, setting, result in results:
        values = " | ".join(f"{result['per_transform'][t]:.3f}" for t in TRANSFORMS)
        print(f"| {name} | {setting} | {values} |")
    print("\nWrong pairs between two originals (a dataset may hold real duplicates):\n")
    for name, setting, result in results:
        examples = [
            f"{Path(a).parent.name}/{Path(a).name} ~ {Path(b).parent.name}/{Path(b).name}"
            for a, b in result["wrong_examples"]
            if "/copies/" not in a + b
        ]
        print(
            f"- {name} ({setting}): {result['wrong_between_originals']}"
            + (f", e.g. {'; '.join(examples[:2])}" if examples else "")
        )


if __name__ == "__main__":
    main()
