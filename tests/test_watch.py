"""Watched folders: a real watchdog observer on temporary folders of real photos, files copied,
overwritten, moved and deleted, and the collection following within a bound.

The watcher embeds with a toy encoder that counts what it embeds, so a move can be shown to
re-embed nothing. The command line (``lookalike watch``, ``lookalike serve --watch``) runs
as real subprocesses with the default model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import toy_encoder
from conftest import free_port, photo

from lookalike.catalog import SqliteCatalog
from lookalike.core.collection import CATALOG_FILE, Collection
from lookalike.core.ingest import ScanRules
from lookalike.core.watch import ChangeReport, FolderWatcher, PendingChanges, WatchOptions
from lookalike.errors import CatalogError, LookalikeError

# How long a change may take to reach the collection: generous, as the machine is shared;
# a watcher that misses a change never gets there.
BOUND = 30.0
DEBOUNCE = 0.3


class CountingEncoder(toy_encoder.ToyColourEncoder):
    """The toy encoder, counting the images it embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.embedded = 0

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        self.embedded += len(pixels)
        return super()._forward(pixels)


def save(name: str, path: Path, size: int = 256) -> Path:
    """A real photo (scikit-image's ``name``) as a JPEG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = photo(name)
    image.thumbnail((size, size))
    image.save(path, quality=90)
    return path


def wait_for(condition: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while not condition():
        assert time.monotonic() < deadline, f"not within {bound}s: {what}"
        time.sleep(0.05)


class Watched:
    """A folder of photos, a collection, and a watcher keeping it in step (started by the
    fixture); the test reads the collection through its own catalog connection."""

    def __init__(self, root: Path, options: WatchOptions | None = None) -> None:
        self.root = root
        self.folder = root / "photos"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.outside = root / "outside"
        self.outside.mkdir(exist_ok=True)
        self.path = root / "collection"
        self.encoder = CountingEncoder()
        self.options = options or WatchOptions(debounce=DEBOUNCE, max_delay=5.0)
        self.reports: list[ChangeReport] = []
        self.errors: list[LookalikeError] = []
        self.collection: Collection | None = None
        self.watcher: FolderWatcher | None = None
        self.catalog: SqliteCatalog | None = None

    def start(self, **options: object) -> FolderWatcher:
        self.collection = Collection(self.path, model=toy_encoder.NAME, encoder=self.encoder)
        self.watcher = FolderWatcher(
            self.collection,
            [self.folder],
            WatchOptions(**{**self.options.__dict__, **options}),
            on_report=self.reports.append,
            on_error=self.errors.append,
        ).start()
        assert self.watcher.caught_up.wait(BOUND), "the catch-up did not end"
        if self.catalog is None:
            self.catalog = SqliteCatalog(self.path / CATALOG_FILE)
        return self.watcher

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.collection is not None:
            self.collection.close()
            self.collection = None

    def paths(self) -> dict[str, int]:
        """Path (relative to the folder) -> id of every image in the collection."""
        assert self.catalog is not None
        prefix = str(self.folder.resolve()) + os.sep
        return {p.removeprefix(prefix): i for p, i in self.catalog.paths().items()}

    def follows(self, expected: set[str], what: str) -> dict[str, int]:
        """Wait until the collection holds exactly ``expected`` (relative paths)."""
        wait_for(lambda: set(self.paths()) == expected, f"{what}: {expected}")
        return self.paths()

    def search(self, name: str) -> list[tuple[str, float]]:
        """(relative path, score) of the best matches of a photo, by a second collection."""
        query = save(name, self.root / "queries" / f"{name}.jpg")  # the bytes save() writes
        with Collection(self.path, encoder=toy_encoder.ToyColourEncoder()) as reader:
            prefix = str(self.folder.resolve()) + os.sep
            return [
                (r.path.removeprefix(prefix), r.score) for r in reader.search(query, k=3).results
            ]


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    w = Watched(tmp_path)
    save("astronaut", w.folder / "astronaut.jpg")
    save("rocket", w.folder / "nested" / "rocket.jpg")
    w.start()
    w.follows({"astronaut.jpg", "nested/rocket.jpg"}, "the catch-up")
    yield w
    w.stop()
    if w.catalog is not None:
        w.catalog.close()


# -- the catalog's move -------------------------------------------------------------------------


def test_move_path_keeps_id_vectors_local_features_and_metadata(
    tmp_path: Path, catalog_db: Callable[[], str | None]
) -> None:
    folder = tmp_path / "photos"
    for name in ("astronaut", "rocket", "coffee"):
        save(name, folder / f"{name}.jpg")
    with Collection(tmp_path / "c", db=catalog_db(), model=toy_encoder.NAME) as collection:
        collection.index(folder, local_features=True)
        catalog = collection.catalog
        model = collection.model_id
        ids = {Path(p).name: i for p, i in catalog.paths().items()}
        astronaut = ids["astronaut.jpg"]
        catalog.update_metadata(astronaut, {"title": "Astronaut"})
        metadata = catalog.images([astronaut])[astronaut].metadata
        assert metadata["title"] == "Astronaut"
        vector = catalog.vector(astronaut, model)
        kind = collection.local_store.kind()
        assert kind is not None
        features = catalog.local_features([astronaut], kind.name)[astronaut]
        old, new = str(folder / "astronaut.jpg"), str(folder / "moved" / "astronaut.jpg")
        catalog.record_failure(new, "an earlier failure at the new path")
        generation = catalog.generation

        assert catalog.move_path(old, new) == astronaut
        record = catalog.images([astronaut])[astronaut]
        assert record.path == new and record.metadata == metadata
        np.testing.assert_array_equal(catalog.vector(astronaut, model), vector)
        assert catalog.local_features([astronaut], kind.name) == {astronaut: features}
        assert catalog.ids_for_paths([old, new]) == {new: astronaut}
        assert new not in dict(catalog.failures())
        # A rename changes no vector: the index files stay current.
        assert catalog.generation == generation
        assert catalog.move_path(old, new) is None  # nothing there any more
        # Where a file of some content was indexed (what a late half of a move looks up).
        found = catalog.file_states_by_hash([record.content_hash, "0" * 64])
        assert list(found) == [new] and found[new].id == astronaut

        # A swap in one batch: the paths trade places, the ids stay with their content.
        rocket, coffee = str(folder / "rocket.jpg"), str(folder / "coffee.jpg")
        swapped = catalog.move_paths({rocket: coffee, coffee: rocket})
        assert swapped == {coffee: ids["rocket.jpg"], rocket: ids["coffee.jpg"]}
        assert catalog.generation == generation

        # Moving onto another image's path replaces that image, and says so.
        assert catalog.move_paths({new: rocket}) == {rocket: astronaut}
        assert catalog.generation > generation
        assert sorted(catalog.paths().values()) == sorted([astronaut, ids["rocket.jpg"]])
        with pytest.raises(CatalogError, match="several files"):
            catalog.move_paths({rocket: str(folder / "x.jpg"), coffee: str(folder / "x.jpg")})
        # The collection answers from its index after the replacement, without the image.
        results = collection.search(photo("coffee"), k=5).results
        assert ids["coffee.jpg"] not in [r.id for r in results]


def test_move_files_replacing_an_image_updates_the_loaded_index(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name in ("astronaut", "rocket", "coffee"):
        save(name, folder / f"{name}.jpg")
    with Collection(tmp_path / "c", model=toy_encoder.NAME) as collection:
        collection.index(folder)
        ids = {Path(p).name: i for p, i in collection.catalog.paths().items()}
        assert len(collection.search(photo("coffee"), k=5).results) == 3
        rebuilds = collection.indexes.rebuilds
        moved = collection.move_files({str(folder / "astronaut.jpg"): str(folder / "coffee.jpg")})
        assert moved == {str(folder / "coffee.jpg"): ids["astronaut.jpg"]}
        found = [r.id for r in collection.search(photo("coffee"), k=5).results]
        assert sorted(found) == sorted([ids["astronaut.jpg"], ids["rocket.jpg"]])
        assert collection.indexes.rebuilds == rebuilds  # updated in place, not rebuilt


# -- what events add up to ----------------------------------------------------------------------


def test_pending_changes_sum_up_chains_and_folder_moves() -> None:
    pending = PendingChanges()
    pending.move("/w/a.jpg", "/w/b.jpg", False)
    pending.move("/w/b.jpg", "/w/c.jpg", False)
    assert pending.origin("/w/c.jpg") == "/w/a.jpg"  # a -> b -> c is one move
    pending.move("/w/c.jpg", "/w/album/c.jpg", False)
    pending.move("/w/album", "/w/trip", True)
    assert pending.origin("/w/trip/c.jpg") == "/w/a.jpg"
    assert pending.origin("/w/trip/other.jpg") == "/w/album/other.jpg"
    assert pending.origin("/w/elsewhere.jpg") == "/w/elsewhere.jpg"
    pending.move("/w/trip/c.jpg", "/w/a.jpg", False)
    assert "/w/a.jpg" not in pending.origins  # moved back where it was
    pending.move("/w/x.jpg", "/w/x.jpg.bak", False)  # renamed out of what a scan looks at
    assert "/w/x.jpg" in pending.files and "/w/x.jpg.bak" not in pending.origins
    pending.touch("/w/notes.txt", False)
    assert "/w/notes.txt" not in pending.files
    pending.touch("/w/sub/.lookalikeignore", False)
    assert "/w/sub" in pending.folders  # new patterns: the folder is looked at again

    later = PendingChanges()
    later.move("/w/trip", "/w/2024", True)
    later.merge(pending)
    assert later.origin("/w/2024/other.jpg") == "/w/album/other.jpg"


def test_watch_options_are_checked() -> None:
    with pytest.raises(LookalikeError, match="debounce"):
        WatchOptions(debounce=-1)
    with pytest.raises(LookalikeError, match="max_delay"):
        WatchOptions(debounce=2, max_delay=1)
    with pytest.raises(LookalikeError, match="not a folder"):
        FolderWatcher(Collection.__new__(Collection), ["/no/such/folder"])


# -- a real watcher on a real folder -----------------------------------------------------------


def test_copy_in_and_overwrite_are_embedded_and_searchable(watched: Watched) -> None:
    embedded = watched.encoder.embedded
    shutil.copy(watched.folder / "astronaut.jpg", watched.root / "chelsea.jpg")
    save("chelsea", watched.root / "chelsea.jpg")
    shutil.copy(watched.root / "chelsea.jpg", watched.folder / "cat.jpg")
    ids = watched.follows({"astronaut.jpg", "nested/rocket.jpg", "cat.jpg"}, "a copy in")
    assert watched.encoder.embedded == embedded + 1
    best, score = watched.search("chelsea")[0]
    assert best == "cat.jpg" and score == pytest.approx(1.0, abs=1e-4)

    # Overwritten with another photo: the same image, embedded again, found as the new one.
    assert watched.catalog is not None
    before = watched.catalog.images([ids["cat.jpg"]])[ids["cat.jpg"]].content_hash
    save("coffee", watched.folder / "cat.jpg")
    wait_for(
        lambda: (
            watched.catalog is not None
            and watched.catalog.images([ids["cat.jpg"]])[ids["cat.jpg"]].content_hash != before
        ),
        "the overwrite",
    )
    assert watched.paths() == ids  # same paths, same ids
    best, score = watched.search("coffee")[0]
    assert best == "cat.jpg" and score == pytest.approx(1.0, abs=1e-4)
    assert ("cat.jpg", pytest.approx(1.0, abs=1e-4)) not in watched.search("chelsea")
    assert not watched.errors


def test_a_move_keeps_the_image_and_embeds_nothing(watched: Watched) -> None:
    before = watched.paths()
    embedded = watched.encoder.embedded
    (watched.folder / "album").mkdir()
    os.rename(watched.folder / "astronaut.jpg", watched.folder / "album" / "space.jpg")
    after = watched.follows({"album/space.jpg", "nested/rocket.jpg"}, "the move")
    assert after["album/space.jpg"] == before["astronaut.jpg"]
    assert watched.encoder.embedded == embedded
    assert watched.reports[-1].moved == 1 and watched.reports[-1].added == 0

    # A chain a -> b -> c within one quiet period is one move.
    os.rename(watched.folder / "album" / "space.jpg", watched.folder / "b.jpg")
    os.rename(watched.folder / "b.jpg", watched.folder / "nested" / "c.jpg")
    after = watched.follows({"nested/c.jpg", "nested/rocket.jpg"}, "the chain of moves")
    assert after["nested/c.jpg"] == before["astronaut.jpg"]

    # A swap through a third name: each image follows its file.
    nested = watched.folder / "nested"
    os.rename(nested / "c.jpg", nested / "swap.tmp")
    os.rename(nested / "rocket.jpg", nested / "c.jpg")
    os.rename(nested / "swap.tmp", nested / "rocket.jpg")
    wait_for(lambda: watched.paths().get("nested/c.jpg") == before["nested/rocket.jpg"], "the swap")
    assert watched.paths() == {
        "nested/c.jpg": before["nested/rocket.jpg"],
        "nested/rocket.jpg": before["astronaut.jpg"],
    }
    assert watched.encoder.embedded == embedded
    best, _ = watched.search("rocket")[0]
    assert best == "nested/c.jpg"


def test_folder_renames_and_moves_in_and_out(watched: Watched) -> None:
    before = watched.paths()
    embedded = watched.encoder.embedded
    save("coffee", watched.folder / "nested" / "deeper" / "coffee.jpg")
    ids = watched.follows(
        {"astronaut.jpg", "nested/rocket.jpg", "nested/deeper/coffee.jpg"}, "a new sub-folder"
    )
    embedded += 1

    os.rename(watched.folder / "nested", watched.folder / "trip")
    after = watched.follows(
        {"astronaut.jpg", "trip/rocket.jpg", "trip/deeper/coffee.jpg"}, "the folder rename"
    )
    assert after["trip/rocket.jpg"] == before["nested/rocket.jpg"]
    assert after["trip/deeper/coffee.jpg"] == ids["nested/deeper/coffee.jpg"]
    assert watched.encoder.embedded == embedded

    # A folder moved out of the watched folder leaves; moved back in, it is indexed again.
    os.rename(watched.folder / "trip", watched.outside / "trip")
    watched.follows({"astronaut.jpg"}, "a folder moved out")
    os.rename(watched.outside / "trip", watched.folder / "back")
    watched.follows(
        {"astronaut.jpg", "back/rocket.jpg", "back/deeper/coffee.jpg"}, "a folder moved in"
    )
    assert watched.encoder.embedded == embedded + 2

    shutil.rmtree(watched.folder / "back")
    watched.follows({"astronaut.jpg"}, "a folder deleted")


def test_moved_out_and_deleted_files_leave(watched: Watched) -> None:
    os.rename(watched.folder / "astronaut.jpg", watched.outside / "astronaut.jpg")
    watched.follows({"nested/rocket.jpg"}, "a move out")
    (watched.folder / "nested" / "rocket.jpg").unlink()
    watched.follows(set(), "a delete")
    shutil.move(watched.outside / "astronaut.jpg", watched.folder / "astronaut.jpg")
    watched.follows({"astronaut.jpg"}, "a move in")
    assert [r.removed for r in watched.reports if r.removed] == [1, 1]


def test_bursts_come_to_one_result(watched: Watched) -> None:
    embedded = watched.encoder.embedded
    batches = watched.watcher.batches if watched.watcher else 0
    # Created and deleted within one quiet period: nothing is read.
    save("coffee", watched.folder / "brief.jpg")
    (watched.folder / "brief.jpg").unlink()
    # Written in pieces, then changed again: embedded once, as it is in the end.
    data = (save("chelsea", watched.root / "cat.jpg")).read_bytes()
    with open(watched.folder / "cat.jpg", "wb") as handle:
        for start in range(0, len(data), 4096):
            handle.write(data[start : start + 4096])
            handle.flush()
    save("coffee", watched.folder / "cat.jpg")
    watched.follows({"astronaut.jpg", "nested/rocket.jpg", "cat.jpg"}, "the burst")
    assert watched.watcher is not None
    wait_for(lambda: watched.watcher is not None and watched.watcher.batches > batches, "a batch")
    assert watched.encoder.embedded == embedded + 1
    best, score = watched.search("coffee")[0]
    assert best == "cat.jpg" and score == pytest.approx(1.0, abs=1e-4)


def test_a_file_still_being_written_waits_until_it_is_complete(tmp_path: Path) -> None:
    # Applied at the latest every 0.6 s while the folder stays busy, but a file changed in the
    # last 0.5 s is left for later.
    w = Watched(tmp_path, WatchOptions(debounce=0.5, max_delay=0.6))
    w.start()
    try:
        data = save("coffee", tmp_path / "coffee.jpg").read_bytes()
        target = w.folder / "coffee.jpg"
        with open(target, "wb") as handle:
            pieces = 12
            step = len(data) // pieces + 1
            for start in range(0, len(data), step):
                handle.write(data[start : start + step])
                handle.flush()
                time.sleep(0.2)  # 2.4 s of writing, longer than max_delay
        w.follows({"coffee.jpg"}, "the finished file")
        assert w.encoder.embedded == 1
        assert any(r.deferred for r in w.reports), "the watcher never saw the file unfinished"
        assert w.catalog is not None and w.catalog.failures() == []
    finally:
        w.stop()


def test_a_broken_file_is_reported_and_never_stops_the_watcher(watched: Watched) -> None:
    (watched.folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert watched.catalog is not None
    broken = str(watched.folder.resolve() / "broken.jpg")
    wait_for(
        lambda: watched.catalog is not None and broken in dict(watched.catalog.failures()),
        "the failure",
    )
    save("coffee", watched.folder / "coffee.jpg")
    watched.follows({"astronaut.jpg", "nested/rocket.jpg", "coffee.jpg"}, "the next file")
    save("chelsea", watched.folder / "broken.jpg")  # repaired: indexed, failure forgotten
    watched.follows(
        {"astronaut.jpg", "nested/rocket.jpg", "coffee.jpg", "broken.jpg"}, "the repair"
    )
    assert watched.catalog.failures() == []
    assert any(broken == path for r in watched.reports for path, _ in r.failed)


def test_hidden_and_excluded_files_are_left_out_as_index_does(watched: Watched) -> None:
    (watched.folder / ".lookalikeignore").write_text("drafts/\n")
    save("coffee", watched.folder / ".hidden.jpg")
    save("coffee", watched.folder / ".cache" / "coffee.jpg")
    save("coffee", watched.folder / "drafts" / "coffee.jpg")
    (watched.folder / "notes.txt").write_text("not an image")
    save("chelsea", watched.folder / "cat.jpg")
    watched.follows({"astronaut.jpg", "nested/rocket.jpg", "cat.jpg"}, "the visible photo")
    # Renamed to a hidden name: left out from then on, as a scan would.
    os.rename(watched.folder / "cat.jpg", watched.folder / ".cat.jpg")
    watched.follows({"astronaut.jpg", "nested/rocket.jpg"}, "the hidden rename")
    # The pattern taken back: the folder it left out is indexed.
    (watched.folder / ".lookalikeignore").write_text("# nothing left out\n")
    watched.follows(
        {"astronaut.jpg", "nested/rocket.jpg", "drafts/coffee.jpg"}, "the ignore file change"
    )


def test_a_restart_catches_up_and_stopping_applies_what_was_seen(watched: Watched) -> None:
    before = watched.paths()
    # Seen just before the stop: applied by the stop, without waiting for the quiet period.
    save("coffee", watched.folder / "coffee.jpg")
    watched.stop()
    assert set(watched.paths()) == {"astronaut.jpg", "nested/rocket.jpg", "coffee.jpg"}

    # While nothing watches: a new file, a deleted one, a changed one.
    save("chelsea", watched.folder / "chelsea.jpg")
    (watched.folder / "coffee.jpg").unlink()
    save("retina", watched.folder / "nested" / "rocket.jpg")
    # A rename while nothing watches: caught up as a move, not a removal plus an embedding.
    os.rename(watched.folder / "astronaut.jpg", watched.folder / "space.jpg")
    watched.start()
    after = watched.follows({"space.jpg", "nested/rocket.jpg", "chelsea.jpg"}, "catch-up")
    assert after["nested/rocket.jpg"] == before["nested/rocket.jpg"]
    assert after["space.jpg"] == before["astronaut.jpg"]
    catch_up = [r for r in watched.reports if r.folder is not None][-1]
    assert (catch_up.added, catch_up.updated, catch_up.moved, catch_up.removed) == (1, 1, 1, 1)
    best, _ = watched.search("retina")[0]
    assert best == "nested/rocket.jpg"
    # ... and watching goes on.
    (watched.folder / "chelsea.jpg").unlink()
    watched.follows({"space.jpg", "nested/rocket.jpg"}, "a delete after the restart")


def test_polling_follows_the_folder_too(tmp_path: Path) -> None:
    w = Watched(tmp_path, WatchOptions(debounce=DEBOUNCE, polling=True))
    save("astronaut", w.folder / "astronaut.jpg")
    w.start()
    try:
        w.follows({"astronaut.jpg"}, "the catch-up")
        before = w.paths()
        save("rocket", w.folder / "rocket.jpg")
        w.follows({"astronaut.jpg", "rocket.jpg"}, "a copy in")
        os.rename(w.folder / "astronaut.jpg", w.folder / "moon.jpg")
        after = w.follows({"moon.jpg", "rocket.jpg"}, "a move")
        assert after["moon.jpg"] == before["astronaut.jpg"]
        assert w.encoder.embedded == 2
    finally:
        w.stop()


def test_metadata_csv_reaches_files_that_arrive(tmp_path: Path) -> None:
    csv_path = tmp_path / "titles.csv"
    csv_path.write_text("file,title\nrocket.jpg,Rocket\n")
    w = Watched(tmp_path, WatchOptions(debounce=DEBOUNCE, metadata_csv=csv_path))
    w.start()
    try:
        save("rocket", w.folder / "rocket.jpg")
        ids = w.follows({"rocket.jpg"}, "a copy in")
        assert w.catalog is not None
        wait_for(
            lambda: (
                w.catalog is not None
                and w.catalog.images([ids["rocket.jpg"]])[ids["rocket.jpg"]].metadata
                == {"title": "Rocket"}
            ),
            "the metadata",
        )
    finally:
        w.stop()


def test_rules_apply_to_events(tmp_path: Path) -> None:
    w = Watched(tmp_path, WatchOptions(debounce=DEBOUNCE, rules=ScanRules(exclude=("*.png",))))
    w.start()
    try:
        photo("coffee").save(w.folder / "coffee.png")
        save("rocket", w.folder / "rocket.jpg")
        w.follows({"rocket.jpg"}, "the photo the rules let in")
        assert w.encoder.embedded == 1
    finally:
        w.stop()


# -- the command line --------------------------------------------------------------------------


def lookalike(*args: str, **options: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lookalike.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,  # type: ignore[call-overload]
    )


class Lines:
    """A process's stdout, read line by line in a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        stream = process.stdout
        self.thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "".join(self.lines)


def start_watching(
    folder: Path, collection: Path, debounce: str
) -> tuple[subprocess.Popen[str], Lines]:
    """``lookalike watch`` of ``folder`` (holding one photo) into ``collection``, once it has
    caught up."""
    save("astronaut", folder / "astronaut.jpg")
    process = lookalike("-c", str(collection), "watch", str(folder), "--debounce", debounce)
    out = Lines(process)
    try:
        wait_for(lambda: "caught up" in out.text() or process.poll() is not None, "catch-up", 120)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
    except BaseException:
        end(process, out)
        raise
    return process, out


def end(process: subprocess.Popen[str], out: Lines) -> None:
    """Kill ``process`` if it still runs, and close its output."""
    if process.poll() is None:
        process.kill()
        process.wait()
    out.thread.join(10)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def test_lookalike_watch_follows_the_folder_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    folder, collection = tmp_path / "photos", tmp_path / "c"
    process, out = start_watching(folder, collection, "0.3")
    catalog: SqliteCatalog | None = None
    try:
        catalog = SqliteCatalog(collection / CATALOG_FILE)
        astronaut = catalog.paths()[str(folder.resolve() / "astronaut.jpg")]

        save("rocket", folder / "rocket.jpg")
        wait_for(lambda: catalog is not None and catalog.count() == 2, "a copy in", 60)
        (folder / "album").mkdir()
        os.rename(folder / "astronaut.jpg", folder / "album" / "astronaut.jpg")
        moved = str(folder.resolve() / "album" / "astronaut.jpg")
        wait_for(lambda: catalog is not None and moved in catalog.paths(), "a move", 60)
        assert catalog.paths()[moved] == astronaut
        (folder / "rocket.jpg").unlink()
        wait_for(lambda: catalog is not None and catalog.count() == 1, "a delete", 60)

        # Seen, not yet applied: Ctrl-C applies it before the command exits.
        save("coffee", folder / "coffee.jpg")
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""
        out.thread.join(10)
        assert str(folder.resolve() / "coffee.jpg") in catalog.paths()
        assert "1 moved" in out.text() and "stopped watching" in out.text()

        # And it answers searches like any collection.
        search = lookalike("-c", str(collection), "search", str(folder / "coffee.jpg"), "--json")
        reply, errors = search.communicate(timeout=120)
        assert search.returncode == 0, errors
        assert json.loads(reply)["results"][0]["path"].endswith("coffee.jpg")
    finally:
        end(process, out)
        if catalog is not None:
            catalog.close()


def test_lookalike_watch_stops_on_sigterm_with_the_changes_seen_applied(tmp_path: Path) -> None:
    """A service manager's SIGTERM ends ``watch`` as Ctrl-C does: what it saw is applied."""
    folder, collection = tmp_path / "photos", tmp_path / "c"
    process, out = start_watching(folder, collection, "5")
    try:
        save("coffee", folder / "coffee.jpg")  # seen, not due for 5 s
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""
        out.thread.join(10)
        assert "stopped watching" in out.text()
        with SqliteCatalog(collection / CATALOG_FILE) as catalog:
            assert str(folder.resolve() / "coffee.jpg") in catalog.paths()
    finally:
        end(process, out)


def test_watch_takes_the_options_of_index_and_serve_takes_watch() -> None:
    from lookalike.cli.main import build_parser

    args = build_parser().parse_args(
        ["watch", "a", "b", "--model", "efficientnet-lite1", "--exclude", "*.png",
         "--no-follow-symlinks", "--max-file-size", "1M", "--debounce", "0.5", "--polling"]
    )  # fmt: skip
    assert args.folders == ["a", "b"] and args.model == "efficientnet-lite1"
    assert args.exclude == ["*.png"] and args.follow_symlinks is False
    assert (args.max_file_size, args.debounce, args.polling) == (1024**2, 0.5, True)
    served = build_parser().parse_args(["serve", "--watch", "a", "--watch", "b"])
    assert served.watch == ["a", "b"] and served.debounce == 1.0
    assert build_parser().parse_args(["serve"]).watch == []


def test_lookalike_watch_refuses_a_missing_folder(tmp_path: Path) -> None:
    process = lookalike("-c", str(tmp_path / "c"), "watch", str(tmp_path / "nowhere"))
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 1 and "not a folder" in errors
    assert not (tmp_path / "c").exists()  # no collection made for nothing


def test_serve_watch_answers_with_files_added_while_it_runs(tmp_path: Path) -> None:
    import httpx

    folder = tmp_path / "photos"
    save("astronaut", folder / "astronaut.jpg")
    collection = tmp_path / "c"
    port = free_port()
    log = tmp_path / "serve.log"
    command = ["-c", str(collection), "serve", "--port", str(port), "--watch", str(folder)]
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "lookalike.cli", *command, "--debounce", "0.3"],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url) or server.poll() is not None, "the server", 120)
        assert server.poll() is None, log.read_text()
        query = save("rocket", tmp_path / "query" / "rocket.jpg").read_bytes()

        def found() -> bool:
            reply = httpx.post(
                f"{url}/search", files={"image": ("q.jpg", query, "image/jpeg")}, timeout=60
            )
            results = reply.json().get("results", []) if reply.status_code == 200 else []
            return bool(results) and results[0]["filename"] == "rocket.jpg"

        assert not found()
        shutil.copy(tmp_path / "query" / "rocket.jpg", folder / "rocket.jpg")
        wait_for(found, "the new file in the server's answers", 60)
        os.rename(folder / "rocket.jpg", folder / "moon.jpg")
        wait_for(
            lambda: (
                httpx.post(
                    f"{url}/search", files={"image": ("q.jpg", query, "image/jpeg")}, timeout=60
                ).json()["results"][0]["filename"]
                == "moon.jpg"
            ),
            "the renamed file in the server's answers",
            60,
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    # SIGTERM stops the watcher (applying what it saw) before the server exits.
    assert server.returncode == 0, log.read_text()
    assert "stopped watching" in log.read_text()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
