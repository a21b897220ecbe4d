"""Shared fixtures: real photos (from scikit-image) written to disk, and one encoder per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "clothing-small"

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Exported models and default collections go to temporary folders, not the user's home."""
    os.environ["LOOKALIKE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["LOOKALIKE_HOME"] = str(tmp_path_factory.mktemp("home"))
    os.environ.pop("LOOKALIKE_COLLECTION", None)
    os.environ.pop("LOOKALIKE_DB", None)


def photo(name: str) -> Image.Image:
    """A real photo shipped with scikit-image, as an RGB PIL image."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def variants(image: Image.Image) -> dict[str, Image.Image]:
    """Mild edits that should keep an image recognisably itself."""
    width, height = image.size
    return {
        "half": image.resize((width // 2, height // 2)),
        "crop": image.crop((width // 10, height // 10, width - width // 10, height - height // 10)),
        "bright": ImageEnhance.Brightness(image).enhance(1.25),
        "mirror": ImageOps.mirror(image),
    }


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of six real photos as JPEGs, one per sub-folder level to exercise recursion."""
    root = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTO_NAMES):
        folder = root / ("nested/deeper" if i % 3 == 2 else "nested" if i % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        photo(name).save(folder / f"{name}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def encoder():
    """The default encoder (Lite0, raw vectors), built once per test session."""
    from lookalike.encoders import create_encoder

    return create_encoder("efficientnet-lite0", normalize=False)


@pytest.fixture(scope="session")
def collection_encoder():
    """The encoder a new collection builds for itself (Lite0, GeM pooling, raw vectors), for
    tests where a collection shares a catalog with one that chose its own encoder."""
    from lookalike.encoders import create_encoder

    return create_encoder("efficientnet-lite0", normalize=False, pooling="gem")


def require_dataset() -> Path:
    """The clothing-small dataset, or a skip when this machine does not have it."""
    if not (DATASET / "labels.csv").exists():
        pytest.skip(f"dataset not found at {DATASET}")
    return DATASET


def unit(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation for assertions."""
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (pgvector when its build has it), started
    here; tests that need it skip, saying why, where no server can run."""
    from lookalike.catalog.local_postgres import LocalPostgres
    from lookalike.errors import CatalogError

    try:
        pytest.importorskip("psycopg", reason="psycopg is not installed")
        server = LocalPostgres().start()
    except CatalogError as error:
        pytest.skip(f"no PostgreSQL server can run here: {error}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_db(request: pytest.FixtureRequest):
    """Makes fresh catalog locations for ``Collection(path, db=...)``, once per backend:
    None (the collection's own SQLite file) or the URL of a new PostgreSQL database."""
    if request.param == "sqlite":
        return lambda: None
    return request.getfixturevalue("postgres").create_database


# Headless Chromium for the web page's tests (Debian's chromium; scripts/setup.sh installs it).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright, one per test module."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for a server a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(http: Any, server: subprocess.Popen[bytes]) -> None:
    """Wait (up to 2 minutes) until the ``lookalike serve`` process ``server`` answers
    ``/health`` through the httpx client ``http``; its stderr if it exits first."""
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            assert server.stderr is not None
            raise AssertionError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")
