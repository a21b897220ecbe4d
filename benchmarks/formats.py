"""Indexing speed per photo format at phone resolution, and the cost of EXIF extraction.

Writes N files per format (HEIC with pillow-heif, AVIF with Pillow, JPEG, PNG) at phone
resolution (3024x4032, 12.2 MP, portrait), each with camera EXIF (make, model, lens, date with
offset, GPS, orientation), made from the clothing-small photos (or scikit-image's when that
dataset is absent) upscaled with light sensor-like grain, so that files compress less
unrealistically than a smooth upscale would. Then, per format:

- index: ``Collection.index`` of that format's folder with EfficientNet-Lite0 (the default
  model, default threads): wall images/s, and CPU ms per image over all threads;
- decode: lookalike's ``decode_file`` alone (read, hash, decode with the model's draft size,
  resize), one thread, CPU ms per image;
- EXIF: ``lookalike.exif.photo_metadata`` on the photos ``read_photo`` already decoded (no
  second read of the file), microseconds per image; and ``PIL.Image.getexif`` on a freshly
  opened file, the header-only reference.

The files are cached in ``--workdir`` (writing HEIC at 12 MP takes seconds a file).

    python benchmarks/formats.py [--per-format 250] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
T = TypeVar("T")
SIZE = (3024, 4032)  # a 12 MP phone photo, portrait
FORMATS = ("HEIC", "AVIF", "JPEG", "PNG")
SUFFIXES = {"HEIC": ".heic", "AVIF": ".avif", "JPEG": ".jpg", "PNG": ".png"}


def sources(count: int) -> list[Image.Image]:
    """``count`` different photos: clothing-small when present, else scikit-image's."""
    if (DATASET / "labels.csv").exists():
        paths = sorted(DATASET.glob("*/*/*.jpg"))
        step = max(1, len(paths) // count)
        return [Image.open(p).convert("RGB") for p in paths[::step][:count]]
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    # Different crops and mirrors, so that files differ as a real library's do.
    out = []
    for i in range(count):
        image = photos[i % len(photos)]
        w, h = image.size
        k = (i // len(photos)) % 8
        image = image.crop((k * w // 40, k * h // 40, w - k * w // 60, h - k * h // 60))
        out.append(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else image)
    return out


def exif_for(i: int) -> Image.Exif:
    """Camera EXIF as a phone writes it: date with offset, make, model, lens, GPS."""
    exif = Image.Exif()
    exif[0x010F] = "Apple"
    exif[0x0110] = "iPhone 13"
    exif[0x0112] = 1
    exif[0x0132] = f"2024:05:{1 + i % 28:02d} 10:20:30"
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = f"2024:05:{1 + i % 28:02d} 10:20:30"
    sub[0x9011] = "+02:00"
    sub[0xA434] = "iPhone 13 back dual wide camera 5.1mm f/1.6"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (48.0, 51.0, 29.0 + i % 30)
    gps[3], gps[4] = "E", (2.0, 17.0, 40.0)
    return exif


def phone_photo(source: Image.Image, rng: np.random.Generator, grain: float) -> Image.Image:
    """``source`` at 12 MP with light grain (a smooth upscale compresses unrealistically)."""
    big = source.resize(SIZE, Image.Resampling.BICUBIC)
    if grain <= 0:
        return big
    noise = rng.normal(0.0, grain, size=(SIZE[1], SIZE[0], 1)).astype(np.float32)
    pixels = np.asarray(big, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write(image: Image.Image, path: Path, kind: str, exif: Image.Exif) -> None:
    data = exif.tobytes()
    if kind == "HEIC":
        import pillow_heif

        # x265's fastest preset: its slower ones take minutes a file on two cores, and the
        # preset changes the encoding effort far more than the decoding cost measured here.
        heif = pillow_heif.from_pillow(image)
        heif.save(path, quality=60, exif=data, enc_params={"preset": "ultrafast"})
    elif kind == "AVIF":
        image.save(path, "AVIF", quality=60, speed=8, exif=data)
    elif kind == "JPEG":
        image.save(path, "JPEG", quality=90, exif=data)
    else:
        image.save(path, "PNG", compress_level=3, exif=data)


def make_files(workdir: Path, per_format: int, grain: float) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    photos: list[Image.Image] | None = None
    rng = np.random.default_rng(0)
    for kind in FORMATS:
        folder = workdir / kind.lower()
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"IMG_{i:04d}{SUFFIXES[kind]}" for i in range(per_format)]
        missing = [i for i, p in enumerate(paths) if not p.exists()]
        if missing:
            photos = photos or sources(per_format)
            started = time.perf_counter()
            for i in missing:
                image = phone_photo(photos[i % len(photos)], rng, grain)
                part = paths[i].with_suffix(paths[i].suffix + ".part")
                write(image, part, kind, exif_for(i))
                part.rename(paths[i])
            took = (time.perf_counter() - started) / len(missing)
            print(f"wrote {len(missing)} {kind} files ({took:.1f} s each)", flush=True)
        files[kind] = paths
    return files


def cpu_and_wall(run: Callable[[], T]) -> tuple[float, float, T]:
    """CPU seconds (all threads), wall seconds, and what ``run`` returned."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-format", type=int, default=250, help="files per format")
    parser.add_argument("--workdir", type=Path, default=None, help="where the files are cached")
    parser.add_argument("--grain", type=float, default=2.0, help="noise sigma, in 0..255")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    tmp = Path(tempfile.gettempdir())
    os.environ.setdefault("LOOKALIKE_CACHE", str(tmp / "lookalike-bench"))
    workdir = args.workdir or tmp / f"lookalike-bench-formats-{args.per_format}"
    files = make_files(workdir, args.per_format, args.grain)

    from lookalike.core.collection import Collection
    from lookalike.core.ingest import decode_file
    from lookalike.encoders import create_encoder
    from lookalike.images import read_photo

    try:
        from lookalike.exif import photo_metadata
    except ImportError:  # before lookalike.exif existed: PIL's own EXIF reading
        photo_metadata = None

    encoder = create_encoder("efficientnet-lite0", normalize=False)
    encoder.embed_pixels(np.zeros((1, 224, 224, 3), dtype=np.uint8))  # export + warm-up
    load_before = os.getloadavg()
    rows = []
    for kind, paths in files.items():
        for path in paths:
            path.read_bytes()  # warm the page cache: measure decoding, not the disk
        megabytes = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        with (
            tempfile.TemporaryDirectory() as home,
            Collection(Path(home) / "c", encoder=encoder) as c,
        ):
            index_cpu, index_wall, report = cpu_and_wall(
                lambda c=c, folder=paths[0].parent: c.index(folder)
            )
        assert report.embedded == len(paths) and not report.failed, report
        decode_cpu, _, _ = cpu_and_wall(
            lambda paths=paths: [decode_file(str(p), encoder.preprocess) for p in paths]
        )
        photos = [read_photo(p, draft_size=encoder.preprocess.resolution) for p in paths]
        if photo_metadata is not None:
            exif_cpu, _, _ = cpu_and_wall(lambda photos=photos: [photo_metadata(p) for p in photos])
            fields = len(photo_metadata(photos[0]))
        else:
            exif_cpu, fields = float("nan"), 0

        def header_exif(paths: list[Path] = paths) -> None:
            for path in paths:
                with Image.open(path) as image:
                    image.getexif().get_ifd(0x8769)

        header_cpu, _, _ = cpu_and_wall(header_exif)
        n = len(paths)
        rows.append(
            (kind, n, megabytes, n / index_wall, index_cpu / n * 1e3, decode_cpu / n * 1e3,
             exif_cpu / n * 1e6, fields, header_cpu / n * 1e6)
        )  # fmt: skip
        print(f"{kind}: {n / index_wall:.1f} img/s indexed", flush=True)
    load_after = os.getloadavg()

    lines = [
        f"{args.per_format} files per format at {SIZE[0]}x{SIZE[1]} "
        f"({SIZE[0] * SIZE[1] / 1e6:.1f} MP), EXIF in every file; "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after (a shared machine: wall "
        "figures move with it, CPU figures much less).",
        "",
        "| format | files | MB/file | index img/s (wall) | index CPU ms/img | decode CPU ms/img "
        "(1 thread) | photo_metadata µs/img (fields) | PIL getexif µs/img (open+parse) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, n, mb, rate, index_ms, decode_ms, exif_us, fields, header_us in rows:
        lines.append(
            f"| {kind} | {n} | {mb:.2f} | {rate:.1f} | {index_ms:.0f} | {decode_ms:.0f} | "
            f"{exif_us:.0f} ({fields}) | {header_us:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
