"""The photo library's parts together: a messy phone-photo folder (HEIC, AVIF and JPEG with the
EXIF the test writes, odd names, a symlink, hidden and system folders, broken files) indexed
on both catalogs, then searched by a HEIC upload with EXIF filters over REST and gRPC."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import toy_encoder
from test_exif import exif_block, photo_file
from test_grpc import Served
from test_rest import LiveServer

from lookalike.core.collection import Collection
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

PIXEL = {"make": "Google", "model": "Pixel 7"}
CANON = {"make": "Canon", "model": "Canon EOS R5"}


def messy_photo_folder(root: Path) -> Path:
    """A folder as phones and cameras leave it, with a photo outside it linked in."""
    pytest.importorskip("pillow_heif")
    folder = root / "photos"
    (folder / "2024 trip").mkdir(parents=True)
    (folder / ".thumbnails").mkdir()
    (folder / ".git").mkdir()
    (folder / "@eaDir").mkdir()
    outside = root / "elsewhere"
    outside.mkdir()

    def write(path: Path, source: str, fmt: str, camera: dict[str, str], taken: str) -> None:
        exif = exif_block(**camera, taken=taken, offset="+01:00")
        path.write_bytes(photo_file(source, exif=exif, format=fmt))

    write(folder / "2024 trip" / "IMG_0001.HEIC", "astronaut", "HEIF", PIXEL, "2024:03:10 09:00:00")
    write(folder / "older.AVIF", "coffee", "AVIF", CANON, "2023:08:01 18:30:00")
    write(folder / "café à l'été (1).jpg", "rocket", "JPEG", PIXEL, "2024:05:01 12:00:00")
    write(outside / "linked.jpg", "chelsea", "JPEG", CANON, "2022:12:24 20:00:00")
    os.symlink(outside / "linked.jpg", folder / "linked.jpg")
    write(folder / ".thumbnails" / "thumb.jpg", "retina", "JPEG", PIXEL, "2024:03:10 09:00:00")
    write(folder / "@eaDir" / "index.jpg", "retina", "JPEG", PIXEL, "2024:03:10 09:00:00")
    write(folder / ".git" / "logo.jpg", "retina", "JPEG", PIXEL, "2024:03:10 09:00:00")
    (folder / "broken.heic").write_bytes(photo_file("camera", format="HEIF")[:300])
    (folder / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    os.symlink(root / "gone.jpg", folder / "dangling.jpg")
    return folder


@pytest.fixture
def library(tmp_path: Path, catalog_db) -> Iterator[tuple[Collection, Path]]:
    folder = messy_photo_folder(tmp_path)
    with Collection(
        tmp_path / "collection", db=catalog_db(), model=toy_encoder.NAME, index_spec="exact"
    ) as collection:
        yield collection, folder


def test_a_messy_phone_folder_indexes_and_filters_the_same_through_every_interface(
    library: tuple[Collection, Path],
) -> None:
    collection, folder = library
    report = collection.index(folder, workers=0)

    indexed = {Path(p).name for p in collection.catalog.paths()}
    assert indexed == {"IMG_0001.HEIC", "older.AVIF", "café à l'été (1).jpg", "linked.jpg"}
    failed = {Path(path).name: reason for path, reason in report.failed}
    assert set(failed) == {"broken.heic", "drawing.svg", "dangling.jpg"}
    assert "vector format" in failed["drawing.svg"]
    assert "dangling symlink" in failed["dangling.jpg"]
    skipped = {Path(path).name for path, _ in report.skipped}
    assert {".thumbnails", ".git", "@eaDir"} <= skipped

    query = (folder / "2024 trip" / "IMG_0001.HEIC").read_bytes()  # a HEIC upload
    in_2024 = ["taken>=2024-01-01", "taken<2025-01-01", "camera~=pixel"]
    expected = ["IMG_0001.HEIC", "café à l'été (1).jpg"]

    library_names = [
        Path(r.path).name for r in collection.search(query, k=10, where=in_2024, sort="taken")
    ]
    assert library_names == expected

    service = SearchService(collection)
    with (
        LiveServer(create_app(service)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        reply = http.post(
            "/search",
            files={"image": ("IMG_0001.HEIC", query, "image/heic")},
            data={"k": "10", "where": in_2024, "sort": "taken"},
        )
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r["filename"] for r in results] == expected
        assert results[0]["metadata"]["taken"] == "2024-03-10T09:00:00+01:00"
        bad = http.post(
            "/search",
            files={"image": ("x.heic", query[:300], "image/heic")},
            data={"k": "3"},
        )
        assert bad.status_code == 400, bad.text

    served = Served(service)
    try:
        before_2024 = served.v1.Search(
            v1.SearchRequest(image=query, k=10, filters=["taken<2024-01-01"], sort="-taken"),
            timeout=60,
        )
        assert [Path(m.path).name for m in before_2024.matches] == ["older.AVIF", "linked.jpg"]
        assert before_2024.matches[0].metadata["camera"] == "Canon EOS R5"
    finally:
        served.close()
