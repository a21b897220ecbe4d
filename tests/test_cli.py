"""The command line, end to end in subprocesses, including a run killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO_NAMES, free_port, photo


def lookalike(*args: str, env: dict[str, str] | None = None, check: bool = True):
    result = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_index_search_info_remove(photo_dir: Path, tmp_path: Path) -> None:
    collection = str(tmp_path / "c")
    csv_path = tmp_path / "titles.csv"
    csv_path.write_text("file,title\nastronaut.jpg,Astronaut\nrocket.jpg,Rocket\n")
    out = lookalike("-c", collection, "index", str(photo_dir), "--metadata", str(csv_path), "-q")
    assert f"{len(PHOTO_NAMES)} added" in out.stdout

    query = photo_dir / "astronaut.jpg"
    found = json.loads(
        lookalike("-c", collection, "search", str(query), "-k", "3", "--json").stdout
    )
    assert found["results"][0]["path"] == str(query.resolve())
    assert found["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert found["results"][0]["metadata"] == {"title": "Astronaut"}
    assert len(found["results"]) == 3

    text = lookalike("-c", collection, "search", str(query), "--threshold", "0.99").stdout
    assert "astronaut.jpg" in text and "rocket.jpg" not in text

    info = json.loads(lookalike("-c", collection, "info", "--json").stdout)
    assert info["images"] == len(PHOTO_NAMES)
    assert (info["model"], info["layer"], info["dim"]) == ("efficientnet-lite0", "head", 1280)

    assert "removed 1" in lookalike("-c", collection, "remove", str(query)).stdout
    after = json.loads(lookalike("-c", collection, "search", str(query), "--json").stdout)
    assert str(query.resolve()) not in [r["path"] for r in after["results"]]


def test_no_close_match_and_errors(photo_dir: Path, tmp_path: Path) -> None:
    env = {"LOOKALIKE_COLLECTION": str(tmp_path / "from-env")}
    empty = lookalike("search", str(photo_dir / "rocket.jpg"), env=env, check=False)
    assert empty.returncode == 1 and "no indexed images" in empty.stderr

    lookalike("index", str(photo_dir), "-q", env=env)
    assert (tmp_path / "from-env" / "catalog.sqlite").exists()
    checker = tmp_path / "checker.png"
    from PIL import Image
    from skimage import data

    Image.fromarray(data.checkerboard()).save(checker)
    none = lookalike("search", str(checker), "--threshold", "0.97", env=env)
    assert "no close match" in none.stdout

    missing = lookalike("search", str(tmp_path / "nope.jpg"), env=env, check=False)
    assert (
        missing.returncode == 1
        and "nope.jpg" in missing.stderr
        and "Traceback" not in missing.stderr
    )
    bad_where = lookalike("search", str(checker), "--where", "oops", env=env, check=False)
    assert bad_where.returncode == 1 and "KEY=VALUE" in bad_where.stderr


def test_default_collection_lives_under_lookalike_home(photo_dir: Path, tmp_path: Path) -> None:
    env = {"LOOKALIKE_HOME": str(tmp_path / "home")}
    lookalike("index", str(photo_dir), "-q", env=env)
    assert (tmp_path / "home" / "default" / "catalog.sqlite").exists()
    lookalike("-c", "holidays", "index", str(photo_dir), "-q", env=env)
    assert (tmp_path / "home" / "holidays" / "catalog.sqlite").exists()


def make_many_photos(folder: Path, count: int) -> None:
    """Distinct real-photo crops, so every file has its own content hash."""
    sources = [photo(name) for name in ("astronaut", "coffee", "rocket", "chelsea")]
    for i in range(count):
        image = sources[i % len(sources)]
        x, y = (i * 7) % 120, (i * 11) % 90
        image.crop((x, y, x + 260, y + 200)).save(folder / f"p{i:04d}.jpg", quality=85)


def counts(catalog: Path) -> tuple[int, int, int]:
    with sqlite3.connect(catalog) as db:
        images = db.execute("SELECT COUNT(*), COUNT(DISTINCT path) FROM images").fetchone()
        vectors = db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    return images[0], images[1], vectors


def test_a_killed_run_resumes_without_duplicates_or_loss(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    total = 240
    make_many_photos(folder, total)
    collection = tmp_path / "c"
    catalog = collection / "catalog.sqlite"
    command = [sys.executable, "-m", "lookalike.cli", "-c", str(collection), "index", str(folder)]
    process = subprocess.Popen(
        [*command, "--batch-size", "2", "--workers", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    stored = 0
    while time.monotonic() < deadline and process.poll() is None:
        if catalog.exists():
            try:
                stored = counts(catalog)[0]
            except sqlite3.OperationalError:
                stored = 0  # the schema is still being created
        if stored >= 10:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = counts(catalog)
    assert 10 <= before[0] < total, "the run should have been killed mid-way"
    assert before[0] == before[1] == before[2]

    resumed = subprocess.run([*command, "-q"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{total - before[0]} added" in resumed.stdout
    assert counts(catalog) == (total, total, total)


def start_serving(collection: str, *args: str) -> subprocess.Popen:
    """``lookalike serve`` in its own process group, once /health answers."""
    import httpx

    port = args[args.index("--port") + 1]
    server = subprocess.Popen(
        [sys.executable, "-m", "lookalike.cli", "-c", collection, "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, server.stderr.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)


def stop_serving(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    server.stderr.close()


def test_serve_answers_over_http_with_two_workers(photo_dir: Path, tmp_path: Path) -> None:
    import httpx

    collection = str(tmp_path / "c")
    lookalike("-c", collection, "index", str(photo_dir), "-q")
    port = free_port()
    server = start_serving(collection, "--port", str(port), "--workers", "2", "--token", "t0ken")
    try:
        url = f"http://127.0.0.1:{port}"
        query = (photo_dir / "rocket.jpg").read_bytes()
        for _ in range(4):  # several requests, so both workers answer some
            reply = httpx.post(
                f"{url}/search", files={"image": ("q.jpg", query, "image/jpeg")}, timeout=60
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["results"][0]["filename"] == "rocket.jpg"
        files = {"image": ("q.jpg", query, "image/jpeg")}
        assert httpx.post(f"{url}/images", files=files, timeout=60).status_code == 401
    finally:
        stop_serving(server)


def test_serve_with_grpc_answers_the_classic_contract(photo_dir: Path, tmp_path: Path) -> None:
    import grpc
    from PIL import Image

    from lookalike.server.protos import similar_image_pb2, similar_image_pb2_grpc

    collection = str(tmp_path / "c")
    lookalike("-c", collection, "index", str(photo_dir), "-q")
    http_port, grpc_port = free_port(), free_port()
    server = start_serving(collection, "--port", str(http_port), "--grpc-port", str(grpc_port))
    try:
        query = Image.open(photo_dir / "astronaut.jpg").convert("RGB").resize((96, 96))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = similar_image_pb2_grpc.SimilarImageStub(channel)
            request = similar_image_pb2.ImageFileIn(
                value=query.tobytes(), image_size=96.0, similarity="EuclideanDistance"
            )
            reply = stub.FindSimilar(request, timeout=60)
        best = Image.frombytes(mode="RGB", size=(96, 96), data=reply.imageOut1)
        difference = np.abs(np.asarray(best, np.float32) - np.asarray(query, np.float32))
        assert difference.mean() < 10
        assert len(reply.imageOut5) == 96 * 96 * 3
    finally:
        stop_serving(server)
