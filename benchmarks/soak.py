"""Soak: a bounded run in which everything that can go wrong with a collection happens at once,
then every invariant is checked.

For ``--minutes`` (default 10), on a folder of real photos (clothing-small when present, else
scikit-image photos and edits of them):

- ``lookalike index`` runs again and again as its own process and is killed (SIGKILL) at a
  random moment most of the time; between runs, files are added to, changed in and removed
  from the folder;
- ``lookalike serve`` answers searches and adds (uploads) from client threads all along;
- once, midway, the collection switches model (``index --model efficientnet-lite1``), and
  that switch is killed too before it is resumed.

At the end a last ``index`` run completes and the invariants are checked:

- each file is in the catalog once, and every file on disk is in it (plus the uploads);
- no orphan vectors: every vector belongs to a catalogued image and to the active model;
- every catalogued image is found by its own file (an identical copy may tie with it);
- the server never answered 5xx, and still answers ``/health``.

    python benchmarks/soak.py [--minutes 10] [--images 300] [--workdir DIR]

It prints the counts (operations, kills, violations); violations must be 0.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageEnhance, ImageOps

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "clothing-small"
SWITCH_MODEL = "efficientnet-lite1"


@dataclass
class Counts:
    index_runs: int = 0
    kills: int = 0
    folder_changes: int = 0
    searches: int = 0
    adds: int = 0
    client_errors: int = 0
    server_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def source_images(count: int, seed: int) -> list[Image.Image]:
    """Real photos: clothing-small when present, else scikit-image photos and their edits."""
    rng = random.Random(seed)
    if DATASET.is_dir():
        paths = sorted(DATASET.rglob("*.jpg"))
        return [Image.open(p).convert("RGB") for p in rng.sample(paths, min(count, len(paths)))]
    from skimage import data

    names = (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "retina",
        "camera",
        "cat",
        "hubble_deep_field",
    )
    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]
    images = []
    while len(images) < count:
        image = rng.choice(photos)
        w, h = image.size
        box = (
            rng.randrange(w // 4),
            rng.randrange(h // 4),
            w - rng.randrange(w // 4),
            h - rng.randrange(h // 4),
        )
        edited = ImageEnhance.Brightness(image.crop(box)).enhance(rng.uniform(0.7, 1.3))
        images.append(ImageOps.mirror(edited) if rng.random() < 0.5 else edited)
    return images


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(collection: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lookalike.cli", "-c", str(collection), *args]


def change_folder(folder: Path, spare: list[Image.Image], rng: random.Random) -> None:
    """Add, change or remove a few files, as a user's folder changes between runs."""
    files = sorted(folder.glob("*.jpg"))
    action = rng.choice(("add", "add", "change", "remove"))
    if action == "add" and spare:
        (folder / f"new-{len(files):05d}-{rng.randrange(10**6)}.jpg").write_bytes(
            encode(spare.pop())
        )
    elif action == "change" and files:
        target = rng.choice(files)
        image = Image.open(target).convert("RGB")
        target.write_bytes(encode(ImageOps.flip(image)))
    elif action == "remove" and len(files) > 20:
        rng.choice(files).unlink()


def client(
    url: str, queries: list[bytes], stop: threading.Event, counts: Counts, seed: int
) -> None:
    """Searches mostly, an upload now and then; 5xx answers are violations."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            try:
                if rng.random() < 0.1:
                    data = queries[rng.randrange(len(queries))]
                    flipped = encode(ImageOps.flip(Image.open(io.BytesIO(data)).convert("RGB")))
                    reply = http.post("/images", files={"image": ("upload.jpg", flipped)})
                    kind = "adds"
                else:
                    reply = http.post(
                        "/search", files={"image": rng.choice(queries)}, data={"k": 5}
                    )
                    kind = "searches"
            except httpx.HTTPError as error:
                with counts.lock:
                    counts.server_errors.append(f"transport: {error}")
                continue
            with counts.lock:
                setattr(counts, kind, getattr(counts, kind) + 1)
                if reply.status_code >= 500:
                    counts.server_errors.append(f"{reply.status_code}: {reply.text[:200]}")
                elif reply.status_code >= 400:
                    counts.client_errors += 1  # e.g. 409 while the collection is still empty


def run_index(command: list[str], kill_after: float | None, counts: Counts) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts.index_runs += 1
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        counts.kills += 1


def wait_healthy(url: str, server: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def check_invariants(collection_dir: Path, folder: Path, url: str) -> list[str]:
    """Every violation of the invariants, as readable lines."""
    from lookalike.core.collection import Collection

    violations = []
    with Collection(collection_dir) as collection:
        paths = collection.catalog.paths()
        on_disk = {str(p.resolve()) for p in folder.glob("*.jpg")}
        uploads = {p for p in paths if "/uploads/" in p}
        missing = on_disk - set(paths)
        extra = set(paths) - on_disk - uploads
        violations += [f"not catalogued: {p}" for p in sorted(missing)]
        violations += [f"catalogued but gone: {p}" for p in sorted(extra)]
        model_id = collection.model_id
        ids, _ = collection.catalog.vectors(model_id)
        if len(ids) != len(paths):
            violations.append(f"{len(paths)} images but {len(ids)} vectors of the active model")
        records = collection.catalog.images(list(paths.values()))
        for path, image_id in sorted(paths.items()):
            hits = collection.search(path, k=5)
            same = {r.id for r in hits if r.score >= hits[0].score - 1e-4}
            twins = {
                r.id
                for r in hits
                if records.get(r.id)
                and records[r.id].content_hash == records[image_id].content_hash
            }
            if image_id not in same and image_id not in twins:
                violations.append(f"not found by its own file: {path}")
    database = sqlite3.connect(collection_dir / "catalog.sqlite")
    (orphans,) = database.execute(
        "SELECT count(*) FROM vectors WHERE image_id NOT IN (SELECT id FROM images)"
    ).fetchone()
    (inactive,) = database.execute(
        "SELECT count(*) FROM vectors WHERE model_id != ?", (model_id,)
    ).fetchone()
    database.close()
    if orphans:
        violations.append(f"{orphans} orphan vectors")
    if inactive:
        violations.append(f"{inactive} vectors of inactive models")
    if httpx.get(f"{url}/health", timeout=30).status_code != 200:
        violations.append("the server no longer answers /health")
    return violations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lookalike-soak-"))
    folder, collection = workdir / "photos", workdir / "collection"
    shutil.rmtree(workdir / "photos", ignore_errors=True)
    shutil.rmtree(collection, ignore_errors=True)
    folder.mkdir(parents=True)
    images = source_images(args.images + 200, args.seed)
    spare = images[args.images :]
    for i, image in enumerate(images[: args.images]):
        (folder / f"photo-{i:05d}.jpg").write_bytes(encode(image))
    queries = [encode(image) for image in images[:64]]
    env_home = workdir / "home"
    os.environ["LOOKALIKE_HOME"] = str(env_home)

    counts = Counts()
    started = time.monotonic()
    # A first, complete run so the server has something to serve from the start.
    run_index(cli(collection, "index", str(folder), "-q"), None, counts)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        cli(collection, "serve", "--port", str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()
    threads = []
    try:
        wait_healthy(url, server)
        threads = [
            threading.Thread(target=client, args=(url, queries, stop, counts, args.seed + i))
            for i in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        deadline = started + args.minutes * 60
        switch_at = started + args.minutes * 60 / 2
        switched = False
        while time.monotonic() < deadline:
            change_folder(folder, spare, rng)
            counts.folder_changes += 1
            if not switched and time.monotonic() > switch_at:
                # The switch is killed once, then resumed by plain index runs.
                command = cli(collection, "index", str(folder), "--model", SWITCH_MODEL, "-q")
                run_index(command, rng.uniform(5, 20), counts)
                switched = True
                continue
            kill_after = rng.uniform(0.5, 12) if rng.random() < 0.8 else None
            run_index(cli(collection, "index", str(folder), "-q"), kill_after, counts)
        # The end: a complete run, then the checks (with the clients stopped).
        stop.set()
        for thread in threads:
            thread.join()
        run_index(cli(collection, "index", str(folder), "-q"), None, counts)
        run_index(cli(collection, "index", str(folder), "-q"), None, counts)
        violations = check_invariants(collection, folder, url)
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    violations += counts.server_errors
    from lookalike.core.collection import Collection

    with Collection(collection) as final:
        model = final.model_name
        images_now = len(final)
    report = {
        "minutes": round((time.monotonic() - started) / 60, 1),
        "index_runs": counts.index_runs,
        "kills": counts.kills,
        "folder_changes": counts.folder_changes,
        "searches": counts.searches,
        "adds": counts.adds,
        "client_errors_4xx": counts.client_errors,
        "model_at_end": model,
        "images_at_end": images_now,
        "violations": len(violations),
    }
    print(json.dumps(report, indent=2))
    for line in violations[:50]:
        print("violation:", line)
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
