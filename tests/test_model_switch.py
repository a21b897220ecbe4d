"""Switching a collection's model is atomic: the old model answers until the new one covers
every image, a killed switch resumes, and a running server follows the switch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import photo, variants
from test_rest import LiveServer, jpeg

from lookalike.core.collection import Collection
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

NEW_MODEL = "efficientnet-lite1"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """24 real photos and edits of them, so a switch takes several batches."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "retina", "camera"):
        image = photo(name)
        image.save(folder / f"{name}.jpg", quality=90)
        for edit, edited in variants(image).items():
            if edit != "mirror":
                edited.save(folder / f"{name}-{edit}.jpg", quality=90)
    return folder


def _search_all(url: str, folder: Path) -> tuple[int, list[int]]:
    """(status, number of results) of a search for each photo in ``folder``, over HTTP."""
    counts = []
    status = 200
    with httpx.Client(base_url=url, timeout=120) as http:
        for path in sorted(folder.glob("*.jpg"))[:4]:
            reply = http.post("/search", files={"image": path.read_bytes()}, data={"k": 100})
            status = max(status, reply.status_code)
            counts.append(len(reply.json().get("results", [])) if reply.is_success else 0)
    return status, counts


def test_a_killed_switch_keeps_the_old_model_answering_and_resumes(
    photos: Path, tmp_path: Path, encoder
) -> None:
    home = tmp_path / "collection"
    with Collection(home, encoder=encoder) as collection:
        collection.index(photos, batch_size=4, workers=0)
        old_key = collection.encoder.identity.key
    total = len(list(photos.glob("*.jpg")))

    server_collection = Collection(home, encoder=encoder)
    with LiveServer(create_app(SearchService(server_collection))) as server:
        assert _search_all(server.url, photos) == (200, [total] * 4)

        # The switch is stopped after two batches, as a kill would stop it.
        batches = 0

        def stop_after_two_batches(done: int, _total: int) -> None:
            nonlocal batches
            batches += 1
            if batches > 2:
                raise KeyboardInterrupt

        switching = Collection(home, model=NEW_MODEL)
        with pytest.raises(KeyboardInterrupt):
            switching.index(photos, batch_size=4, workers=0, progress=stop_after_two_batches)
        switching.close()

        # Mid-switch: the old model still answers for every image, with no warning needed.
        assert _search_all(server.url, photos) == (200, [total] * 4)
        with Collection(home) as reopened:
            assert reopened.model_name == "efficientnet-lite0"
            assert reopened.switching_to is not None
            assert reopened.switching_to.name == NEW_MODEL
            old_id = reopened.model_id
            assert len(reopened.catalog.vectors(old_id)[0]) == total  # nothing was dropped

        # Resumed by a plain index run: no --model needed.
        with Collection(home) as resumed:
            report = resumed.index(photos, batch_size=4, workers=0)
            assert report.switch == "done"
            assert 0 < report.embedded < total  # only what the killed run had not done
            assert resumed.model_name == NEW_MODEL
            assert resumed.switching_to is None
            new_key = resumed.encoder.identity.key
            assert new_key != old_key
            models = {m["key"]: m["vectors"] for m in resumed.catalog.models()}
            assert models[new_key] == total and models.get(old_key, 0) == 0

        # The running server follows the switch without a restart.
        assert _search_all(server.url, photos) == (200, [total] * 4)
        stats = httpx.get(f"{server.url}/stats", timeout=60).json()
        assert stats["model"] == NEW_MODEL and stats["images"] == total
        query = (photos / "coffee.jpg").read_bytes()
        best = httpx.post(
            f"{server.url}/search", files={"image": query}, data={"k": 1}, timeout=60
        ).json()["results"][0]
        assert best["filename"] == "coffee.jpg"
        assert best["score"] == pytest.approx(1, abs=1e-3)
    server_collection.close()


def test_a_switch_killed_by_a_signal_resumes_from_the_command_line(
    photos: Path, tmp_path: Path
) -> None:
    home = tmp_path / "collection"
    cli = [sys.executable, "-m", "lookalike.cli", "-c", str(home)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cli, "index", str(photos), "-q"], check=True, env=env, timeout=300)
    total = len(list(photos.glob("*.jpg")))

    # Eager PyTorch, so that the switch is still running when it is killed (the default
    # runtime indexes these few images faster than the watcher polls); fp32, which the
    # resumed run then keeps (it is recorded with the switch).
    slow = ["--batch-size", "2", "--workers", "0", "--runtime", "torch", "--precision", "fp32"]
    switch = subprocess.Popen(
        [*cli, "index", str(photos), "--model", NEW_MODEL, *slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    with Collection(home) as watcher:
        while time.monotonic() < deadline and switch.poll() is None:
            new = [m for m in watcher.catalog.models() if m["name"] == NEW_MODEL]
            if new and new[0]["vectors"] >= 4:
                break
            time.sleep(0.2)
    assert switch.poll() is None, "the switch finished before it could be killed"
    switch.send_signal(signal.SIGKILL)
    switch.wait(timeout=30)

    with Collection(home) as collection:
        assert collection.model_name == "efficientnet-lite0"  # the old model still answers
        assert len(collection.search(photos / "rocket.jpg", k=100)) == total
    done = subprocess.run(
        [*cli, "index", str(photos)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "switched to efficientnet-lite1" in done.stdout
    with Collection(home) as collection:
        assert collection.model_name == NEW_MODEL
        hits = collection.search(photos / "rocket.jpg", k=total)
        assert len(hits) == total and hits[0].path.endswith("rocket.jpg")


def test_a_new_folder_during_a_switch_is_searchable_after_it(
    photos: Path, tmp_path: Path, encoder
) -> None:
    """Images of another folder, indexed with the old model only, are embedded by the switch
    too: the switch never completes while any image lacks the new model's vector."""
    home = tmp_path / "collection"
    more = tmp_path / "more"
    shutil.copytree(photos, more)
    with Collection(home, encoder=encoder) as collection:
        collection.index(photos, workers=0)
        collection.index(more, workers=0)
    with Collection(home, model=NEW_MODEL) as switching:
        report = switching.index(photos, workers=0)
        assert report.switch == "done"
        ids, vectors = switching.catalog.vectors(switching.model_id)
        assert len(ids) == 2 * len(list(photos.glob("*.jpg")))
        assert np.isfinite(vectors).all()


def test_stale_upload_bytes_are_not_needed_for_a_switch(tmp_path: Path, encoder) -> None:
    """A collection whose only images were uploaded to a server (outside any indexed folder)
    switches models from those files."""
    home = tmp_path / "collection"
    service = SearchService(Collection(home, encoder=encoder))
    for name in ("coffee", "chelsea"):
        service.add(jpeg(photo(name)), filename=f"{name}.jpg")
    service.collection.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    with Collection(home, model=NEW_MODEL) as switching:
        assert switching.index(empty, workers=0).switch == "done"
        assert len(switching.search(jpeg(photo("coffee")), k=2)) == 2
