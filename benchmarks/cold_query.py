"""Cold ``lookalike search IMAGE``: from process start to printed results, on 4,000 images.

Each run is a new process (``lookalike -c COLLECTION search IMAGE -k 10``), timed from spawn
to exit, with its CPU time (user + system, from the kernel's accounting of children). Rows:

* ``python -c pass``: the interpreter's own start on this machine (site-packages' .pth files
  included), the floor under every row;
* a search answered by a running ``lookalike serve`` of the collection (the default whenever
  one is up);
* a local search (``--no-server``) with the default runtime, and with ``--runtime onnx`` (the
  prepared ONNX Runtime graph);
* a local search with no prepared model (an empty model cache holding only the exported ONNX
  file: the first search after the model code or the weights changed).

The collection is built once (``--collection`` reuses one): the first 4,000 images of
clothing-small (every split) then grocery-store, indexed with the default model. Bytecode is
compiled once into a temporary ``PYTHONPYCACHEPREFIX`` (an installed package has its .pyc
files; a checkout run with ``PYTHONDONTWRITEBYTECODE`` would compile every module on every
run), and each path runs once untimed first (it prepares its model).

    python benchmarks/cold_query.py [--runs 9] [--images 4000] [--collection DIR]

The machine may be shared: the load average is printed with every row, and CPU time is less
sensitive to it than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SOURCES = (DATASETS / "clothing-small", DATASETS / "grocery-store")


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} cores"


def lookalike_command() -> list[str]:
    """The console script beside this interpreter (what ``pip install`` puts on PATH), else
    the module; never a version manager's shim, which adds its own start-up."""
    script = Path(sys.executable).parent / "lookalike"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lookalike.cli"]


@dataclass
class Row:
    label: str
    walls: list[float]
    cpus: list[float]
    load: str

    def line(self) -> str:
        wall = statistics.median(self.walls)
        cpu = statistics.median(self.cpus)
        return (
            f"| {self.label} | {wall:.3f} | {min(self.walls):.3f} | {max(self.walls):.3f} | "
            f"{cpu:.3f} | {self.load} |"
        )


def timed(command: Sequence[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds from spawn to exit, CPU seconds of the child, and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def measure(
    label: str, command: Sequence[str], env: dict[str, str], runs: int, *, warm: bool = True
) -> tuple[Row, str]:
    if warm:
        timed(command, env)  # compiles bytecode, prepares the model: not what is measured
    load = load_average()
    walls, cpus, output = [], [], ""
    for _ in range(runs):
        wall, cpu, output = timed(command, env)
        walls.append(wall)
        cpus.append(cpu)
    return Row(label, walls, cpus, load), output


def build_collection(
    folder: Path, images: int, env: dict[str, str], options: Sequence[str] = ()
) -> Path:
    """A folder of ``images`` links to dataset photos, indexed into ``folder / "c"`` (with
    the ``lookalike index`` ``options``)."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    found = [p for root in SOURCES for p in sorted(root.rglob("*.jpg"))][:images]
    if len(found) < images:
        raise SystemExit(f"only {len(found)} images under {', '.join(map(str, SOURCES))}")
    for number, path in enumerate(found):
        (photos / f"{number:05d}.jpg").symlink_to(path)
    collection = folder / "c"
    started = time.perf_counter()
    subprocess.run(
        [*lookalike_command(), "-c", str(collection), "index", str(photos), "-q", *options],
        env=env,
        check=True,
    )
    print(f"indexed {images} images in {time.perf_counter() - started:.0f}s ({load_average()})")
    return collection


def collection_precision(collection: Path) -> str:
    """The precision of the collection's vectors, as its catalog records it."""
    import sqlite3

    with sqlite3.connect(collection / "catalog.sqlite") as db:
        row = db.execute("SELECT value FROM settings WHERE key = 'precision'").fetchone()
    return str(row[0]) if row and row[0] else "fp32"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serving(collection: Path, env: dict[str, str]) -> Iterator[None]:
    """``lookalike serve`` of the collection, once it answers and has announced itself."""
    port = free_port()
    server = subprocess.Popen(
        [*lookalike_command(), "-c", str(collection), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    if (collection / "server.json").is_file():
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.3)
        yield
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--collection", type=Path, help="an indexed collection to reuse")
    parser.add_argument("--query", type=Path, help="the query image (default: a test photo)")
    parser.add_argument(
        "--precision", help="index with this precision (default: the default, auto)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the collection built")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lookalike-cold-"))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        index_options = ["--precision", args.precision] if args.precision else []
        collection = args.collection or build_collection(
            work / "data", args.images, env, index_options
        )
        precision = collection_precision(collection)
        query = args.query or next((DATASETS / "clothing-small" / "test").rglob("*.jpg"))
        search = [*lookalike_command(), "-c", str(collection), "search", str(query), "-k", "10"]
        rows = [measure("`python -c pass` (interpreter start)", [sys.executable, "-c", "pass"],
                        env, args.runs)[0]]  # fmt: skip
        with serving(collection, env):
            served, served_output = measure("search, server running (default)", search, env,
                                            args.runs)  # fmt: skip
            rows.append(served)
        local, local_output = measure("search --no-server", [*search, "--no-server"], env,
                                      args.runs)  # fmt: skip
        rows.append(local)
        if precision == "fp32":  # ONNX Runtime computes fp32 only
            onnx = [*search, "--no-server", "--runtime", "onnx"]
            rows.append(measure("search --no-server --runtime onnx", onnx, env, args.runs)[0])
        # No prepared model: each run gets a cache holding only the exported ONNX files.
        cache = Path(env.get("LOOKALIKE_CACHE") or Path.home() / ".cache" / "lookalike")
        cold_walls, cold_cpus = [], []
        load = load_average()
        for run in range(max(3, args.runs // 3)):
            fresh = work / f"cache{run}"
            shutil.copytree(cache / "onnx", fresh / "onnx")
            # What survives a model-code change: the runtime measured faster, and OpenVINO's
            # compiled-model cache (keyed by the model file, which is unchanged).
            for kept in ("openvino/fp32-runtime.json", "openvino/compiled"):
                if (cache / kept).is_dir():
                    shutil.copytree(cache / kept, fresh / kept)
                elif (cache / kept).is_file():
                    (fresh / kept).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(cache / kept, fresh / kept)
            wall, cpu, _ = timed([*search, "--no-server"], {**env, "LOOKALIKE_CACHE": str(fresh)})
            cold_walls.append(wall)
            cold_cpus.append(cpu)
        rows.append(Row("search --no-server, no prepared model", cold_walls, cold_cpus, load))
        if served_output != local_output:
            raise SystemExit("the server's results differ from the local search's")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    with_collection = f"{collection}" if args.collection else f"{args.images} images"
    with_collection += f", {precision} vectors"
    print(f"\ncold `lookalike search` ({with_collection}, {args.runs} runs each), seconds")
    print("| path | median wall | min | max | median CPU | load |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())
    print(json.dumps({r.label: {"walls": r.walls, "cpus": r.cpus} for r in rows}))


if __name__ == "__main__":
    main()
