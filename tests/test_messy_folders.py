"""Indexing a real-world folder never stops on one bad entry: dangling symlinks, symlink loops,
FIFOs and devices named like images, files deleted while a run goes on, names that are not
UTF-8, formats Pillow cannot decode and oversized files are each reported with the reason,
in the run's report, the CLI summary and ``info``, and everything else is indexed.

Every step that could hang on the code this replaces (a FIFO read, a device read) runs under
a deadline, so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import photo

from lookalike.core.collection import Collection

DEADLINE = 300  # seconds for any one indexing run (the model may be exported first)
LIMIT = 50 * 1024**2  # the size limit the tests set: 50 MB
HEIC_REASON = (
    "cannot decode HEIC: install pillow-heif"
    if importlib.util.find_spec("pillow_heif") is None
    else ""  # with pillow-heif installed, garbage bytes are reported as corrupt instead
)


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError when the block runs longer than ``seconds`` (a blocking open of
    a FIFO in this thread is interrupted too)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds}s: it hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Messy:
    folder: Path
    good: dict[str, str]  # indexed path -> the photo it holds
    bad: dict[str, str]  # path -> what its reason says
    symlinks: set[str]  # bad and good entries that are symlinks (not followed on request)


def build_messy(root: Path) -> Messy:
    """Real photos mixed with every kind of bad entry, plus hidden files that stay unseen."""
    folder = root / "messy"
    (folder / "nested").mkdir(parents=True)
    (root / "outside").mkdir()
    (root / "gallery").mkdir()
    good: dict[str, str] = {}

    def save(path: Path, name: str, **options: object) -> None:
        photo(name).save(path, **options)
        good[str(path)] = name

    save(folder / "astronaut.jpg", "astronaut", quality=92)
    save(folder / "COFFEE.JPG", "coffee", format="JPEG", quality=92)  # suffix in capitals
    save(folder / "rocket.avif", "rocket")  # Pillow 13 decodes AVIF itself
    save(folder / "nested" / "chelsea.png", "chelsea")
    # A name that is not UTF-8: the bytes of "café" in Latin-1.
    latin1 = os.fsencode(folder) + b"/caf\xe9.jpg"
    photo("immunohistochemistry").save(latin1, format="JPEG", quality=92)
    good[os.fsdecode(latin1)] = "immunohistochemistry"
    # A symlink to a file outside the folder, and one to a folder outside it: followed.
    photo("retina").save(root / "outside" / "retina.jpg", quality=92)
    (folder / "retina-link.jpg").symlink_to(root / "outside" / "retina.jpg")
    good[str(folder / "retina-link.jpg")] = "retina"
    photo("hubble_deep_field").save(root / "gallery" / "hubble.jpg", quality=92)
    (folder / "album").symlink_to(root / "gallery", target_is_directory=True)
    good[str(folder / "album" / "hubble.jpg")] = "hubble_deep_field"
    # Hidden files and folders: neither indexed nor reported.
    photo("camera").save(folder / ".hidden.jpg")
    (folder / ".thumbs").mkdir()
    photo("camera").save(folder / ".thumbs" / "camera.jpg")

    (folder / "dangling.jpg").symlink_to(folder / "missing.jpg")
    (folder / "self.jpg").symlink_to("self.jpg")
    (folder / "ping.jpg").symlink_to("pong.jpg")
    (folder / "pong.jpg").symlink_to("ping.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "null.jpg").symlink_to("/dev/null")  # a character device behind an image name
    (folder / "garbage.heic").write_bytes(os.urandom(4096))
    (folder / "raw.NEF").write_bytes(os.urandom(4096))
    with open(folder / "huge.jpg", "wb") as handle:
        handle.truncate(LIMIT + 10 * 1024**2)  # sparse: 60 MB that take no disk
    (folder / "nested" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    bad = {
        folder / "dangling.jpg": "dangling symlink",
        folder / "self.jpg": "symlink loop",
        folder / "ping.jpg": "symlink loop",
        folder / "pong.jpg": "symlink loop",
        folder / "pipe.jpg": "not a regular file: a FIFO",
        folder / "null.jpg": "not a regular file: a character device",
        folder / "garbage.heic": HEIC_REASON,
        folder / "raw.NEF": "unsupported image format",
        folder / "huge.jpg": "larger than the 50 MB limit",
        folder / "nested" / "up": f"symlink loop back to {folder}",
    }
    links = ["dangling.jpg", "self.jpg", "ping.jpg", "pong.jpg", "null.jpg", "retina-link.jpg"]
    symlinks = {str(folder / name) for name in [*links, "album", "nested/up"]}
    return Messy(folder, good, {str(k): v for k, v in bad.items()}, symlinks)


@pytest.fixture
def messy(tmp_path: Path) -> Messy:
    return build_messy(tmp_path)


def assert_failures(failures: list[tuple[str, str]], expected: dict[str, str]) -> None:
    """Each expected path failed once, with a reason that says what ``expected`` says."""
    found = dict(failures)
    assert len(found) == len(failures), failures
    assert set(found) == set(expected), failures
    for path, words in expected.items():
        assert words in found[path], (path, found[path])


def test_a_messy_folder_indexes_every_good_photo_and_reports_every_bad_entry(
    messy: Messy, tmp_path: Path, encoder
) -> None:
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        with deadline(DEADLINE):
            report = collection.index(messy.folder, workers=0, max_file_bytes=LIMIT)
        assert_failures(report.failed, messy.bad)
        assert (report.added, report.updated, report.removed) == (len(messy.good), 0, 0)
        assert set(collection.catalog.paths()) == set(messy.good)  # no bad, no hidden entry
        assert_failures(collection.info().failures, messy.bad)
        for path, name in messy.good.items():
            assert collection.search(photo(name), k=1)[0].path == path, name

        # The next run finds everything unchanged (the non-UTF-8 name too) and still reports
        # what cannot be indexed, this time decoding in threads.
        with deadline(DEADLINE):
            again = collection.index(messy.folder, workers=2, max_file_bytes=LIMIT)
        assert (again.added, again.updated, again.removed) == (0, 0, 0)
        assert again.unchanged == len(messy.good)
        assert_failures(again.failed, messy.bad)
        assert_failures(collection.info().failures, messy.bad)

        # Fixed entries leave the failures: a dangling symlink whose target appears, a FIFO
        # that is deleted.
        photo("camera").save(messy.folder / "missing.jpg")
        (messy.folder / "pipe.jpg").unlink()
        fixed = {
            p: r for p, r in messy.bad.items() if Path(p).name not in ("dangling.jpg", "pipe.jpg")
        }
        with deadline(DEADLINE):
            third = collection.index(messy.folder, workers=0, max_file_bytes=LIMIT)
        assert (third.added, third.unchanged) == (2, len(messy.good))
        assert_failures(third.failed, fixed)
        assert_failures(collection.info().failures, fixed)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=DEADLINE,
    )


def reported(lines: list[str], prefix: str) -> list[tuple[str, str]]:
    """(path, reason) of the lines that start with ``prefix``."""
    found = []
    for line in lines:
        if line.startswith(prefix):
            path, reason = line.removeprefix(prefix).split(": ", 1)
            found.append((path, reason))
    return found


def test_the_cli_indexes_a_messy_folder_exits_0_and_names_every_bad_entry(
    messy: Messy, tmp_path: Path
) -> None:
    collection = str(tmp_path / "collection")
    command = ["-c", collection, "index", str(messy.folder), "--max-file-size", "50MB", "-q"]
    first = run_cli(*command)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{len(messy.good)} added" in first.stdout, first.stdout
    assert f"{len(messy.bad)} failed" in first.stdout, first.stdout
    assert_failures(reported(first.stdout.splitlines(), "  skipped "), messy.bad)

    info = run_cli("-c", collection, "info")
    assert info.returncode == 0, info.stderr
    assert f"images:     {len(messy.good)}" in info.stdout
    assert f"failed files: {len(messy.bad)}" in info.stdout
    lines = info.stdout.splitlines()
    failed_files = lines[lines.index(f"failed files: {len(messy.bad)}") + 1 :]
    assert_failures(reported(failed_files, "  "), messy.bad)

    # The photo with a non-UTF-8 name is found by searching for it.
    latin1 = next(p for p in messy.good if not p.isascii())
    found = run_cli("-c", collection, "search", latin1, "-k", "1", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["results"][0]["path"] == latin1

    second = run_cli(*command)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 added, 0 updated, 0 moved, 0 removed" in second.stdout, second.stdout
    assert f"{len(messy.good)} unchanged" in second.stdout, second.stdout
    assert_failures(reported(second.stdout.splitlines(), "  skipped "), messy.bad)


def test_symlinks_are_reported_not_followed_when_asked(
    messy: Messy, tmp_path: Path, encoder
) -> None:
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        with deadline(DEADLINE):
            report = collection.index(
                messy.folder, workers=0, max_file_bytes=LIMIT, follow_symlinks=False
            )
        not_followed = {
            path: "symlink to a folder not followed" if Path(path).suffix == "" else "symlink not"
            for path in messy.symlinks
        }
        others = {p: r for p, r in messy.bad.items() if p not in messy.symlinks}
        assert_failures(report.failed, not_followed | others)
        assert set(collection.catalog.paths()) == set(messy.good) - messy.symlinks - {
            str(messy.folder / "album" / "hubble.jpg")
        }


def test_a_file_deleted_between_listing_and_reading_is_reported(
    messy: Messy, tmp_path: Path, encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lookalike.core.collection as module

    victim = messy.folder / "astronaut.jpg"
    scan = module.scan_images

    def scan_then_delete(*args, **options):
        listed = scan(*args, **options)
        assert str(victim) in listed.files
        victim.unlink()
        return listed

    monkeypatch.setattr(module, "scan_images", scan_then_delete)
    expected = messy.bad | {str(victim): "no such file: deleted or moved"}
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        with deadline(DEADLINE):
            report = collection.index(messy.folder, workers=2, max_file_bytes=LIMIT)
        assert_failures(report.failed, expected)
        assert report.added == len(messy.good) - 1
        assert_failures(collection.info().failures, expected)

        monkeypatch.setattr(module, "scan_images", scan)
        with deadline(DEADLINE):
            collection.index(messy.folder, workers=0, max_file_bytes=LIMIT)
        assert_failures(collection.info().failures, messy.bad)  # gone: forgotten


def test_decode_file_reads_only_the_regular_file_it_opened(tmp_path: Path, encoder) -> None:
    from lookalike.core.ingest import decode_file, scan_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        photo(name).save(folder / f"{name}.jpg", quality=90)
    listed = scan_images(folder)
    assert sorted(Path(p).name for p in listed.files) == [
        "astronaut.jpg",
        "chelsea.jpg",
        "coffee.jpg",
        "rocket.jpg",
    ]
    assert listed.failed == []
    # After the listing: one file deleted, one swapped for a FIFO, one for a link to an
    # endless device, one left alone.
    (folder / "astronaut.jpg").unlink()
    (folder / "coffee.jpg").unlink()
    os.mkfifo(folder / "coffee.jpg")
    (folder / "rocket.jpg").unlink()
    (folder / "rocket.jpg").symlink_to("/dev/zero")
    with deadline(60):
        decoded = {Path(p).name: decode_file(p, encoder.preprocess) for p in listed.files}
    assert "no such file" in (decoded["astronaut.jpg"].error or "")
    assert decoded["coffee.jpg"].error == "not a regular file: a FIFO (named pipe)"
    assert decoded["rocket.jpg"].error == "not a regular file: a character device"
    kept = decoded["chelsea.jpg"]
    assert kept.error is None and kept.record is not None
    assert (kept.record.width, kept.record.height) == photo("chelsea").size


def test_max_file_size_takes_bytes_or_k_m_g_suffixes() -> None:
    from lookalike.cli.main import build_parser

    def parsed(*options: str) -> int | None:
        size: int | None = build_parser().parse_args(["index", "x", *options]).max_file_size
        return size

    assert parsed() == 256 * 1024**2
    assert parsed("--max-file-size", "50MB") == LIMIT
    assert parsed("--max-file-size", "50m") == LIMIT
    assert parsed("--max-file-size", "1048576") == 1024**2
    assert parsed("--max-file-size", "10K") == 10 * 1024
    assert parsed("--max-file-size", "1.5G") == 3 * 1024**3 // 2
    assert parsed("--max-file-size", "none") is None
    with pytest.raises(SystemExit):
        parsed("--max-file-size", "big")
    assert build_parser().parse_args(["index", "x"]).follow_symlinks is True
    assert (
        build_parser().parse_args(["index", "x", "--no-follow-symlinks"]).follow_symlinks is False
    )
