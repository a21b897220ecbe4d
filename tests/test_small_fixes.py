"""Small wrong answers, fixed: ``--where KEY=None`` is not "no KEY", a non-finite threshold is
one clear error, a mistyped collection name creates nothing, a bare ``-c NAME`` is always a
named collection, and an upload is deleted by whichever server removes it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PHOTO_NAMES, photo
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.catalog import SqliteCatalog
from lookalike.cli.common import collection_path, is_collection_name
from lookalike.core.collection import Collection
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

# Only the rocket's label is the text "None"; four photos have no label at all.
LABELS = "file,label\nastronaut.jpg,person\nrocket.jpg,None\n"


def lookalike(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``lookalike: error: ...`` line of a failed run."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lookalike: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def tree(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def cli_collection(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six photos indexed by the command line, with LABELS as metadata."""
    root = tmp_path_factory.mktemp("cli")
    labels = root / "labels.csv"
    labels.write_text(LABELS)
    collection = root / "collection"
    ok(lookalike("-c", str(collection), "index", str(photo_dir), "--metadata", str(labels), "-q"))
    return collection


# -- --where KEY=None ---------------------------------------------------------------------------


def test_cli_where_none_matches_only_the_text_none(cli_collection: Path, photo_dir: Path) -> None:
    query = str(photo_dir / "rocket.jpg")
    base = ("-c", str(cli_collection), "search", query, "-k", "6", "--json")
    found = json.loads(ok(lookalike(*base, "--where", "label=None")).stdout)["results"]
    assert [Path(r["path"]).name for r in found] == ["rocket.jpg"]
    assert found[0]["metadata"] == {"label": "None"}
    missing = json.loads(ok(lookalike(*base, "--where", "colour=None")).stdout)["results"]
    assert missing == []  # no image has a colour: none is returned


def test_rest_where_none_matches_only_the_text_none(
    photo_dir: Path, tmp_path: Path, encoder
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(LABELS)
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        collection.index(photo_dir, workers=0, metadata_csv=labels)
        with TestClient(create_app(SearchService(collection))) as client:
            query = (photo_dir / "astronaut.jpg").read_bytes()

            def names(where: str) -> list[str]:
                reply = client.post(
                    "/search",
                    files={"image": ("q.jpg", query, "image/jpeg")},
                    data={"k": "6", "where": where},
                )
                assert reply.status_code == 200, reply.text
                return [match["filename"] for match in reply.json()["results"]]

            assert names("label=None") == ["rocket.jpg"]
            assert names("colour=None") == []
            assert names("label=person") == ["astronaut.jpg"]


# -- non-finite thresholds ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_a_non_finite_threshold_is_one_clear_error(
    cli_collection: Path, photo_dir: Path, value: str
) -> None:
    query = str(photo_dir / "astronaut.jpg")
    result = lookalike("-c", str(cli_collection), "search", query, f"--threshold={value}")
    line = one_error_line(result)
    assert "threshold must be a finite number" in line
    assert result.returncode == 1 and result.stdout == ""


# -- a mistyped collection name -----------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A $LOOKALIKE_HOME with one collection, 'holiday'."""
    folder = tmp_path / "home"
    (folder / "holiday").mkdir(parents=True)
    SqliteCatalog(folder / "holiday" / "catalog.sqlite").close()
    (folder / "not-a-collection").mkdir()
    return folder


@pytest.mark.parametrize("command", [["info"], ["info", "--json"], ["search", "QUERY"]])
def test_a_mistyped_collection_name_is_an_error_and_creates_nothing(
    home: Path, tmp_path: Path, photo_dir: Path, command: list[str]
) -> None:
    args = [str(photo_dir / "astronaut.jpg") if a == "QUERY" else a for a in command]
    before = tree(home)
    result = lookalike("-c", "holidy", *args, cwd=tmp_path, env={"LOOKALIKE_HOME": str(home)})
    line = one_error_line(result)
    assert "no collection named 'holidy'" in line
    assert f"collections under {home}: holiday" in line
    assert "not-a-collection" not in line
    assert tree(home) == before  # no folder, no catalog
    assert not (tmp_path / "holidy").exists()


def test_no_collection_at_all_says_so(tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    result = lookalike("info", cwd=tmp_path, env={"LOOKALIKE_HOME": str(home)})
    line = one_error_line(result)
    assert "no collection named 'default'" in line and "no collections under" in line
    assert not home.exists()


def test_a_missing_collection_folder_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    result = lookalike("-c", "./nowhere/c", "info", cwd=tmp_path)
    assert "no collection at nowhere/c" in one_error_line(result)
    assert not (tmp_path / "nowhere").exists()


def test_serve_refuses_a_mistyped_name_the_same_way(home: Path, tmp_path: Path) -> None:
    result = lookalike("-c", "holidy", "serve", cwd=tmp_path, env={"LOOKALIKE_HOME": str(home)})
    line = one_error_line(result)
    assert "no collection named 'holidy'" in line and "holiday" in line


# -- a bare -c NAME -----------------------------------------------------------------------------


def test_bare_names_are_collection_names() -> None:
    for name in ("photos", "my-collection", "v2.1"):
        assert is_collection_name(name), name
    for value in ("./photos", "../photos", ".hidden", "~/c", "/tmp/c", "a/b"):
        assert not is_collection_name(value), value
    home = Path(os.environ["LOOKALIKE_HOME"])
    assert collection_path("photos") == home / "photos"
    assert collection_path("./photos") == Path("photos")
    assert collection_path("~/c") == Path.home() / "c"


def test_a_bare_name_matching_a_folder_here_is_still_a_named_collection(
    photo_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(photo_dir, tmp_path / "photos")
    home = tmp_path / "home"
    before = tree(tmp_path / "photos")
    env = {"LOOKALIKE_HOME": str(home)}
    ok(lookalike("-c", "photos", "index", "photos", "-q", cwd=tmp_path, env=env))
    assert (home / "photos" / "catalog.sqlite").is_file()
    assert tree(tmp_path / "photos") == before  # nothing written into the user's photos
    info = json.loads(ok(lookalike("-c", "photos", "info", "--json", cwd=tmp_path, env=env)).stdout)
    assert info["images"] == len(PHOTO_NAMES)
    assert info["path"] == str(home / "photos")


# -- uploads removed through another server -----------------------------------------------------


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_removal_through_another_server_deletes_the_upload_file(
    postgres, photo_dir: Path, tmp_path: Path, encoder
) -> None:
    url = postgres.create_database()
    user = tmp_path / "user" / "uploads"  # a user's own folder that happens to be so named
    user.mkdir(parents=True)
    own = user / ("0123456789abcdef" * 2 + ".jpg")
    shutil.copy2(photo_dir / "astronaut.jpg", own)
    first = Collection(tmp_path / "server-a", db=url, encoder=encoder)
    second = Collection(tmp_path / "server-b", db=url, encoder=encoder)
    try:
        a, b = SearchService(first), SearchService(second)
        stored = a.add(jpeg(photo("rocket")), filename="rocket.jpg")
        upload = Path(a.record(stored).path)
        assert upload.parent == (tmp_path / "server-a" / "uploads").resolve()
        assert upload.is_file()
        b.remove(stored)  # B's own uploads folder is elsewhere
        assert not upload.exists()
        assert not any((tmp_path / "server-a" / "uploads").iterdir())

        stored = b.add(jpeg(photo("coffee")), filename="coffee.jpg")
        upload = Path(b.record(stored).path)
        assert upload.parent == (tmp_path / "server-b" / "uploads").resolve()
        a.remove(stored)
        assert not upload.exists()

        # A user's own file is never deleted, whatever its folder and name look like.
        first.index(user.parent, workers=0)
        (user_id,) = first.catalog.ids_for_paths([str(own.resolve())]).values()
        b.remove(user_id)
        a.remove(a.add(jpeg(photo("chelsea"))))  # and removing uploads leaves it alone too
        assert own.is_file()
        assert len(first) == 0
    finally:
        first.close()
        second.close()
