"""Schemathesis fuzzes the REST API from its own OpenAPI spec: no request may cause a 500."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_rest import TOKEN, LiveServer

from lookalike.core.collection import Collection
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService, ServiceLimits


@pytest.fixture(scope="module")
def api_url(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory, encoder) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz") / "photos"
    shutil.copytree(photo_dir, folder)
    collection = Collection(folder.parent / "collection")
    collection.use_encoder(encoder)
    collection.index(folder, workers=0)
    limits = ServiceLimits(max_upload_bytes=1_000_000, max_pixels=2_000_000, max_k=50)
    with LiveServer(create_app(SearchService(collection, token=TOKEN, limits=limits))) as server:
        yield server.url
    collection.close()


@pytest.mark.slow
def test_no_request_causes_a_server_error(api_url: str, tmp_path: Path) -> None:
    command = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    command = command or shutil.which("schemathesis")
    assert command, "schemathesis is a test dependency: pip install -e '.[test]'"
    result = subprocess.run(
        [
            command,
            "run",
            f"{api_url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
            "--header",
            f"Authorization: Bearer {TOKEN}",  # so the write endpoints are fuzzed too
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # schemathesis keeps a cache in its working folder
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Random bytes are rarely images, so most uploads get a 400: schemathesis warns about that,
    # which is the API refusing bad input as it should. What must never appear is a 5xx.
    assert " passed" in result.stdout and "Server error" not in result.stdout
