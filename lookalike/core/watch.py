"""Folders kept in step with a collection as their files change (``lookalike watch``,
``lookalike serve --watch``).

:class:`FolderWatcher` first catches up with each folder by an ordinary incremental
:meth:`Collection.index <lookalike.core.collection.Collection.index>` run (what changed
while nothing watched), then follows file system events (watchdog: inotify on Linux, polling
where that is unavailable). Events are collected until the folders have been quiet for
``debounce`` seconds (at most ``max_delay`` after the first), then applied in one batch.

Events only say *where* to look: a batch reads what is on disk there now and what the
catalog holds there, so any burst of events comes to one result (a file created and then
changed is embedded once; created and then deleted, it costs nothing; moved a -> b -> c, it
is moved once). A file that left a path and one that appeared elsewhere with the same
content are one file moved: its catalog entry is renamed, keeping its id, vector, local
features and metadata (:meth:`Collection.move_files`), and nothing is embedded again. The
move an event reports is trusted when size and modification time match what was indexed
(as ``index`` trusts them); otherwise, and for files that left one watched folder for
another, the content hash decides. Everything else goes through the one ingest pipeline
(:meth:`Collection.index_files`), one transaction per batch, so a watcher killed at any
point leaves a consistent catalog, and the next start's catch-up does what is left.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.catalog import FileState
from lookalike.core.collection import Collection
from lookalike.core.ingest import (
    DEFAULT_MAX_FILE_BYTES,
    IGNORE_FILE,
    JPEG_SUFFIXES,
    IndexReport,
    ScanRules,
    _file_problem,  # the scan's own wording for what cannot be read, as ``index`` reports it
    _stat_failure,
    content_hash,
    has_image_suffix,
    scan_images,
)
from lookalike.core.metadata import match_metadata, read_metadata_csv
from lookalike.errors import LookalikeError
from lookalike.images import RAW_SUFFIXES

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver

__all__ = ["ChangeReport", "FolderWatcher", "PendingChanges", "WatchOptions"]

_log = logging.getLogger(__name__)

# Event kinds that can change what a path holds ("opened" and "closed_no_write" cannot).
_CHANGES = frozenset({"created", "deleted", "modified", "moved", "closed"})
# After a batch fails on the catalog (busy, unreachable, disk full), it is tried again after
# this many seconds, doubling up to the maximum.
_RETRY_FIRST, _RETRY_MAX = 1.0, 60.0
# How long a stopping watcher waits for events already reported to reach it (watchdog holds
# the first half of a rename 0.5 s for its second half).
_DRAIN_SECONDS = 0.6


@dataclass(frozen=True)
class WatchOptions:
    """How a :class:`FolderWatcher` works.

    ``debounce``: seconds of quiet before changes are applied (a file is also only read
    once it has not changed for that long). ``max_delay``: changes are applied at the latest
    this long after the first of them, however busy the folders stay. The others are
    :meth:`Collection.index`'s, ``rules`` (:class:`~lookalike.core.ingest.ScanRules`, with
    each folder's ``.lookalikeignore``) included. ``catch_up=False`` skips the first
    ``index`` run of each folder; ``polling=True`` polls the folders instead of asking the
    system for events.
    """

    debounce: float = 1.0
    max_delay: float = 10.0
    batch_size: int = 32
    workers: int | None = None
    follow_symlinks: bool = True
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    metadata_csv: str | Path | None = None
    local_features: bool | None = None
    rules: ScanRules = field(default_factory=ScanRules)
    catch_up: bool = True
    polling: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.debounce <= 3600:
            raise LookalikeError(f"debounce must be 0 to 3600 seconds, got {self.debounce}")
        if self.max_delay < self.debounce:
            raise LookalikeError(
                f"max_delay ({self.max_delay}) must be at least the debounce ({self.debounce})"
            )
        if self.batch_size < 1:
            raise LookalikeError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class ChangeReport:
    """What one batch of changes did, or the catch-up of one ``folder`` (then set)."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Files still being written: tried again once they have been left alone.
    deferred: int = 0
    seconds: float = 0.0
    folder: str | None = None

    @property
    def changes(self) -> int:
        """How many images were added, updated, moved or removed."""
        return self.added + self.updated + self.moved + self.removed

    @classmethod
    def of_index(cls, report: IndexReport, folder: str | None = None) -> ChangeReport:
        """The change report of an ``index`` run."""
        return cls(
            added=report.added,
            updated=report.updated,
            moved=report.moved,
            removed=report.removed,
            unchanged=report.unchanged,
            failed=list(report.failed),
            seconds=report.seconds,
            folder=folder,
        )


class PendingChanges:
    """File system events since the last batch, summed up: the files and folders they
    touched, and where each moved file or folder came from (``origins``: path now -> path
    before the batch, a chain a -> b -> c kept as c <- a). Not thread-safe: the watcher holds
    its lock."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.folders: set[str] = set()
        self.origins: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.files or self.folders)

    def touch(self, path: str, is_dir: bool) -> None:
        """Something at ``path`` was created, changed or deleted."""
        name = os.path.basename(path)
        if is_dir:
            self.folders.add(path)
        elif has_image_suffix(name):
            self.files.add(path)
        elif name == IGNORE_FILE:
            # New patterns: everything below that folder is looked at again.
            self.folders.add(os.path.dirname(path))

    def move(self, source: str, target: str, is_dir: bool) -> None:
        """``source`` was renamed to ``target`` (a folder with all it holds)."""
        origin = self.origin(source)
        if is_dir:
            self.folders.update((source, target))
            prefix = source + os.sep
            for key in [k for k in self.origins if k == source or k.startswith(prefix)]:
                self.origins[target + key[len(source) :]] = self.origins.pop(key)
        else:
            self.touch(source, False)
            self.touch(target, False)
            self.origins.pop(source, None)
            if not has_image_suffix(target):
                return  # renamed to a name no scan looks at: the source is gone
        if origin == target:
            self.origins.pop(target, None)  # moved back where it was
        else:
            self.origins[target] = origin

    def origin(self, path: str) -> str:
        """Where the file now at ``path`` was before these events, as far as they tell
        (``path`` itself when they tell nothing)."""
        if path in self.origins:
            return self.origins[path]
        folder = os.path.dirname(path)
        while folder and folder not in self.origins:
            parent = os.path.dirname(folder)
            if parent == folder:
                return path
            folder = parent
        if not folder:
            return path
        return self.origins[folder] + path[len(folder) :]

    def merge(self, older: PendingChanges) -> None:
        """Add the changes of an earlier batch that could not be applied (these came
        after it: a move they record starts where the earlier batch's left off)."""
        self.files |= older.files
        self.folders |= older.folders
        for path, origin in list(self.origins.items()):
            self.origins[path] = older.origin(origin)
        for path, origin in older.origins.items():
            self.origins.setdefault(path, origin)


class _Stopped(Exception):
    """Raised inside the worker (from a progress callback) when the watcher is stopping."""


class FolderWatcher:
    """Keeps ``collection`` in step with ``folders`` (each watched with all its sub-folders)
    until stopped; see the module documentation.

    The watcher uses ``collection`` from its own thread while it runs: search through
    another :class:`Collection` of the same folder (a server does), which sees every change
    the watcher writes. ``on_report`` hears every catch-up and every batch that changed
    something, failed, or left files being written for later; ``on_error`` every error that
    did not stop it (a batch that failed on the catalog is tried again later). Files that
    cannot be indexed never stop it: they are reported and listed in ``info``, as ``index``
    does.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        collection: Collection,
        folders: Iterable[str | Path],
        options: WatchOptions | None = None,
        *,
        on_report: Callable[[ChangeReport], None] | None = None,
        on_error: Callable[[LookalikeError], None] | None = None,
    ) -> None:
        self.collection = collection
        self.options = options or WatchOptions()
        self.folders = _roots(folders)
        self._on_report = on_report
        self._on_error = on_error
        self._lock = threading.Condition()
        self._pending = PendingChanges()
        self._first = self._last = 0.0  # monotonic times of the first and latest pending event
        self._not_before = 0.0  # no batch before this monotonic time (retry back-off)
        self._retry = _RETRY_FIRST
        self._stopping = False
        self._observers: list[BaseObserver] = []
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.caught_up = threading.Event()  # set once the catch-up of every folder is done
        self._ended = threading.Event()  # set when the worker thread ends
        self.batches = 0  # batches of events applied (observable for tests and tools)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FolderWatcher:
        """Start watching: events are collected from now on, while the worker thread first
        catches up with every folder, then applies them."""
        if self._thread is not None:
            raise LookalikeError("this watcher was already started")
        self._observers = self._start_observers()
        # A daemon thread: a program that exits without stop() must not hang; a write cut
        # short is rolled back by the catalog, and the next catch-up redoes it.
        self._thread = threading.Thread(target=self._run, name="lookalike-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching and apply the changes seen so far: a batch being applied is
        finished, a catch-up still running is cut short after its current batch of images,
        and files still being written are left to the next start's catch-up. Raises the
        error that stopped the watcher, if one did."""
        if self._thread is not None and not self._ended.is_set() and self.caught_up.is_set():
            self._drain()
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._ended.wait(timeout)
        self._raise_failure()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the watcher to end (it ends on :meth:`stop`,
        or on an error, which is raised here); returns whether it has ended."""
        # An event, not Thread.join: a join that Ctrl-C interrupts can leave the thread
        # marked as ended while it still runs (CPython before 3.12).
        if self._thread is not None and not self._ended.wait(timeout):
            return False
        self._raise_failure()
        return True

    def __enter__(self) -> FolderWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _drain(self) -> None:
        """Let the events the system has reported reach the watcher before it stops: they
        pass through watchdog's threads, where half of a rename waits half a second for its
        other half, and a polling observer sees a change only at its next poll."""
        grace = _DRAIN_SECONDS
        for observer in self._observers:
            if type(observer).__name__ == "PollingObserver":
                grace = max(grace, observer.timeout + 0.1)
        time.sleep(grace)
        deadline = time.monotonic() + _DRAIN_SECONDS
        while time.monotonic() < deadline and not all(
            o.event_queue.empty() for o in self._observers
        ):
            time.sleep(0.01)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _start_observers(self) -> list[BaseObserver]:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        record = self._record

        class Handler(FileSystemEventHandler):
            def dispatch(self, event: FileSystemEvent) -> None:
                record(event)

        def started(observer: BaseObserver) -> BaseObserver:
            for folder in self.folders:
                observer.schedule(Handler(), folder, recursive=True)
            observer.start()
            return observer

        if self.options.polling:
            return [started(PollingObserver(timeout=min(1.0, max(self.options.debounce, 0.1))))]
        try:
            return [started(Observer())]
        except OSError as error:
            # Out of inotify watches or instances (fs.inotify.max_user_watches): polling
            # sees the same changes, later and at some cost.
            _log.warning("cannot watch for events (%s); polling the folders instead", error)
            return [started(PollingObserver())]

    # -- events (observer threads) -----------------------------------------------------------

    def _record(self, event: FileSystemEvent) -> None:
        """Note one event; the worker applies the batch once the folders are quiet."""
        kind = event.event_type
        # Synthetic events repeat, file by file, a folder move or creation already noted.
        if event.is_synthetic or kind not in _CHANGES:
            return
        if event.is_directory and kind in ("modified", "closed"):
            return  # a folder's listing changed: its entries report their own events
        source = os.fsdecode(event.src_path)
        with self._lock:
            was_empty = not self._pending
            if kind == "moved":
                self._pending.move(source, os.fsdecode(event.dest_path), event.is_directory)
            else:
                self._pending.touch(source, event.is_directory)
            if not self._pending:
                return
            now = time.monotonic()
            if was_empty:
                self._first = now
            self._last = now
            self._lock.notify_all()

    # -- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.options.catch_up:
                self._catch_up()
            self.caught_up.set()
            while (taken := self._next_batch()) is not None:
                batch, final = taken
                self._apply_safely(batch, final=final)
        except _Stopped:
            pass
        except BaseException as error:  # kept for stop() / wait() to raise in the caller
            _log.exception("the folder watcher stopped")
            self._failure = error
        finally:
            self.caught_up.set()
            self._ended.set()

    def _catch_up(self) -> None:
        """Index every folder as ``index`` would: what changed while nothing watched."""
        options = self.options
        for folder in self.folders:
            self._check_stop()
            try:
                report = self.collection.index(
                    folder,
                    batch_size=options.batch_size,
                    workers=options.workers,
                    metadata_csv=options.metadata_csv,
                    progress=self._progress,
                    local_features=options.local_features,
                    follow_symlinks=options.follow_symlinks,
                    max_file_bytes=options.max_file_bytes,
                    rules=options.rules,
                )
            except LookalikeError as error:
                self._error(error)
                continue
            self._report(ChangeReport.of_index(report, folder))

    def _progress(self, done: int, total: int) -> None:
        del done, total
        self._check_stop()

    def _check_stop(self) -> None:
        if self._stopping:
            raise _Stopped

    def _next_batch(self) -> tuple[PendingChanges, bool] | None:
        """The next batch once it is due: (changes, whether the watcher is stopping), or
        None when it stopped with nothing left to apply."""
        options = self.options
        with self._lock:
            while True:
                if self._stopping:
                    batch, self._pending = self._pending, PendingChanges()
                    return (batch, True) if batch else None
                timeout = None
                if self._pending:
                    due = min(self._last + options.debounce, self._first + options.max_delay)
                    timeout = max(due, self._not_before) - time.monotonic()
                    if timeout <= 0:
                        batch, self._pending = self._pending, PendingChanges()
                        return batch, False
                self._lock.wait(timeout)

    def _put_back(self, batch: PendingChanges, *, after: float) -> None:
        """Apply ``batch`` again with the next one, not before ``after`` seconds from now."""
        with self._lock:
            batch_time = time.monotonic()
            if not self._pending:
                self._first = batch_time
            self._pending.merge(batch)
            self._last = batch_time
            self._not_before = max(self._not_before, batch_time + after)
            self._lock.notify_all()

    def _apply_safely(self, batch: PendingChanges, *, final: bool) -> None:
        try:
            report, later = self.apply(batch, final=final)
        except LookalikeError as error:
            # The catalog refused (busy, unreachable, full): nothing of the failed step was
            # written, so the whole batch is tried again, later and later.
            self._error(error)
            if not final:
                self._put_back(batch, after=self._retry)
                self._retry = min(self._retry * 2, _RETRY_MAX)
            return
        except Exception as error:
            # A fault of lookalike's own: it would fail again the same way, so the batch is
            # left to the next start's catch-up and the watcher goes on with what comes next.
            _log.exception("watching %s: applying changes failed", ", ".join(self.folders))
            self._error(LookalikeError(f"changes left for the next start ({error!r})"))
            return
        self._retry = _RETRY_FIRST
        self.batches += 1
        if later:
            self._put_back(later, after=0.0)
        if report.changes or report.failed or report.deferred:
            self._report(report)

    def _report(self, report: ChangeReport) -> None:
        if self._on_report is not None:
            try:
                self._on_report(report)
            except Exception:
                _log.exception("the watcher's report callback failed")

    def _error(self, error: LookalikeError) -> None:
        if self._on_error is None:
            _log.warning("watching %s: %s", ", ".join(self.folders), error)
            return
        try:
            self._on_error(error)
        except Exception:
            _log.exception("the watcher's error callback failed")

    # -- one batch -------------------------------------------------------------------------

    def apply(
        self, batch: PendingChanges, *, final: bool = False
    ) -> tuple[ChangeReport, PendingChanges | None]:
        """Bring the catalog in line with what is on disk where ``batch`` touched: moves,
        then removals, then embedding. Returns the report and the changes left for later
        (files still being written), if any; ``final`` (the watcher is stopping) gives those
        files the time they would have had and then takes them as they are. Called by the
        worker thread."""
        started = time.perf_counter()
        report = ChangeReport()
        collection, catalog = self.collection, self.collection.catalog
        files, folders = self._places(batch)
        # What the catalog holds where the events were (below a folder: everything) ...
        known = _states(collection, [*files, *folders])
        for folder in folders:
            known.update(catalog.file_states(folder + os.sep))
        # ... and what is on disk there now.
        present: dict[str, os.stat_result] = {}
        failed: list[tuple[str, str]] = []
        for path in [*files, *folders]:
            self._look_at(path, present, failed)
        vanished = {p: s for p, s in known.items() if p not in present}
        targets = {
            p: info for p, info in present.items() if p not in known or _changed(known[p], info)
        }
        report.unchanged = len(present) - len(targets)
        settle = self.options.debounce
        moves, sources = self._match_moves(batch, targets, vanished, known)
        arriving = set(moves.values())

        later = PendingChanges() if not final else None
        settling = [p for p in targets if p not in arriving and _settling(targets[p], settle)]
        if final and settling:
            # Stopping: give files being written the time they would have had, then take
            # them as they are.
            newest = max(targets[p].st_ctime for p in settling)
            time.sleep(max(0.0, min(settle, newest + settle - time.time())))
            for path in settling:
                fresh: dict[str, os.stat_result] = {}
                self._look_at(path, fresh, failed)
                if path in fresh:
                    targets[path] = fresh[path]
                else:
                    del targets[path]
            settling = []
        for path in settling:
            # Still being written: read once it has been left alone. What it may have been
            # moved from stays until then.
            report.deferred += 1
            del targets[path]
            origin = batch.origin(path)
            held = origin in vanished and origin not in moves
            if held:
                del vanished[origin]
            if later is not None:
                later.touch(path, False)
                if held:
                    later.touch(origin, False)
                    later.origins[path] = origin

        if moves:
            moved = collection.move_files(moves)
            report.moved = len(moved)
            source_of = {new: old for old, new in moves.items()}
            for new, image_id in moved.items():
                info, source = targets[new], sources[source_of[new]]
                if (source.size, source.mtime) != (info.st_size, info.st_mtime):
                    catalog.touch(image_id, info.st_size, info.st_mtime)  # copied, same bytes
        gone = [s.id for p, s in vanished.items() if p not in moves]
        if gone:
            report.removed = collection.remove(gone)
        todo = sorted(p for p in targets if p not in arriving)
        if todo:
            options = self.options
            indexed = collection.index_files(
                todo,
                batch_size=options.batch_size,
                workers=options.workers,
                rules=options.rules,
            )
            report.added, report.updated = indexed.added, indexed.updated
            report.failed += indexed.failed
        for path, reason in failed:
            catalog.record_failure(path, reason)
        report.failed += failed
        self._clear_failures(files, folders, failed, todo)
        self._import_metadata([*todo, *arriving])
        report.seconds = time.perf_counter() - started
        return report, later if later else None

    def _places(self, batch: PendingChanges) -> tuple[list[str], list[str]]:
        """Where ``batch`` says to look: its files (with the RAW files beside a JPEG among
        them, which the JPEG's arrival or departure concerns) except those inside one of its
        folders, and its folders the rules do not leave out; all inside watched folders that
        are still there."""
        roots = [r for r in self.folders if os.path.isdir(r)]
        if len(roots) < len(self.folders):
            # An unmounted disk must not empty the collection: its images wait for it.
            missing = [r for r in self.folders if r not in roots]
            self._error(LookalikeError(f"watched folder gone: {', '.join(missing)}"))
        rules = self.options.rules
        folders = _outermost(
            f
            for f in batch.folders
            if (root := _root_in(f, roots)) is not None and rules.skip_reason(root, f, True) is None
        )
        files = {p for p in batch.files if _root_in(p, roots) and not _inside(p, folders)}
        files |= {p for p in _raw_siblings(files) if not _inside(p, folders)}
        return sorted(files), folders

    def _look_at(
        self, path: str, present: dict[str, os.stat_result], failed: list[tuple[str, str]]
    ) -> None:
        """Add what ``path`` holds now to ``present`` (an image file, or the image files
        below a folder) as a scan of its watched folder would see it; entries that cannot be
        indexed go to ``failed`` with the reason, as the scan words it."""
        root = _root_in(path, self.folders)
        if root is None:
            return
        rules, follow = self.options.rules, self.options.follow_symlinks
        image = has_image_suffix(os.path.basename(path))
        try:
            info = os.lstat(path)
            link = stat.S_ISLNK(info.st_mode)
            if link and follow:
                info = os.stat(path)
        except FileNotFoundError:
            return
        except OSError as error:
            if image and rules.skip_reason(root, path, False) is None:
                failed.append((path, _stat_failure(path, error, os.path.islink(path))))
            return
        is_dir = stat.S_ISDIR(info.st_mode)
        if rules.skip_reason(root, path, is_dir) is not None:
            return
        if is_dir:
            self._scan(root, path, present, failed)
        elif image and link and not follow:
            failed.append((path, "symlink not followed"))
        elif image:
            problem = _file_problem(info, self.options.max_file_bytes)
            if problem is None:
                present[path] = info
            else:
                failed.append((path, problem))

    def _scan(
        self,
        root: str,
        folder: str,
        present: dict[str, os.stat_result],
        failed: list[tuple[str, str]],
    ) -> None:
        """The image files below ``folder`` (inside the watched ``root``), by the scan
        ``index`` makes: the patterns are the root's, matched relative to the root."""
        rules = self.options.rules
        try:
            patterns = bool(rules.globs(root))
        except OSError:
            patterns = bool(rules.exclude)
        scan = scan_images(
            folder,
            follow_symlinks=self.options.follow_symlinks,
            max_file_bytes=self.options.max_file_bytes,
            rules=replace(rules, exclude=()),
        )
        for path, info in scan.files.items():
            if not patterns or rules.skip_reason(root, path, False) is None:
                present[path] = info
        failed += scan.failed

    def _match_moves(
        self,
        batch: PendingChanges,
        targets: dict[str, os.stat_result],
        vanished: dict[str, FileState],
        known: dict[str, FileState],
    ) -> tuple[dict[str, str], dict[str, FileState]]:
        """Old path -> new path of each catalogued file that now lives at one of
        ``targets``, with the catalog's state of each old path. A target's source has the
        same content and has left its path: one that vanished in this batch (or now holds
        something else), where an event's move is trusted when size and modification time
        match the record (as ``index`` trusts them) and the content hash decides otherwise;
        or, for a new file, any catalogued file of the same content hash whose path is gone,
        as when the events bring the other half of a move late (a rename into a new folder
        reaches inotify as a creation first) or never (from another watched folder)."""
        # A changed file's old content may have moved elsewhere (a swap through a third name).
        sources = {**vanished, **{p: known[p] for p in targets if p in known}}
        by_size: dict[int, list[str]] = {}
        for path, state in sources.items():
            by_size.setdefault(state.size, []).append(path)
        digests: dict[str, str | None] = {}
        moves: dict[str, str] = {}
        for target in sorted(targets):
            info = targets[target]
            candidates = [
                p for p in by_size.get(info.st_size, ()) if p != target and p not in moves
            ]
            if not candidates:
                continue
            hint = batch.origin(target)
            if hint in candidates and sources[hint].mtime == info.st_mtime:
                moves[hint] = target
                continue
            digest = digests[target] = content_hash(target)
            same = [p for p in candidates if sources[p].content_hash == digest]
            match = _best(target, hint, same)
            if match is not None:
                moves[match] = target
        arriving = set(moves.values())
        new = [t for t in sorted(targets) if t not in known and t not in arriving]
        for target in new:
            if target not in digests:
                digests[target] = content_hash(target)
        hashes = {d for t in new if (d := digests[t]) is not None}
        elsewhere = self.collection.catalog.file_states_by_hash(hashes) if hashes else {}
        for target in new:
            left = [
                p
                for p, state in elsewhere.items()
                if state.content_hash == digests[target]
                and p not in moves
                and p not in targets
                and not os.path.lexists(p)
            ]
            match = _best(target, batch.origin(target), left)
            if match is not None:
                moves[match] = target
                sources[match] = elsewhere[match]
        return moves, {old: sources[old] for old in moves}

    def _clear_failures(
        self,
        files: Sequence[str],
        folders: Sequence[str],
        failed: Sequence[tuple[str, str]],
        todo: Sequence[str],
    ) -> None:
        """Forget the failures of touched paths that are gone or fine now (those embedded
        just now were cleared or recorded again by the pipeline)."""
        catalog = self.collection.catalog
        still = {p for p, _ in failed} | set(todo)
        touched = set(files)
        stale = [
            path
            for path, _ in catalog.failures()
            if path not in still and (path in touched or _inside(path, folders))
        ]
        if stale:
            catalog.clear_failures(stale)

    def _import_metadata(self, paths: Iterable[str]) -> None:
        """Attach the metadata CSV's rows to images that just arrived (read afresh, so edits
        to the CSV count from then on)."""
        csv_path = self.options.metadata_csv
        paths = list(paths)
        if csv_path is None or not paths:
            return
        catalog = self.collection.catalog
        try:
            rows = read_metadata_csv(csv_path)
        except LookalikeError as error:  # the images are stored; only their CSV columns wait
            self._error(error)
            return
        for image_id, metadata in match_metadata(catalog.ids_for_paths(paths), rows).items():
            catalog.update_metadata(image_id, metadata)


# -- helpers -----------------------------------------------------------------------------------


def _roots(folders: Iterable[str | Path]) -> list[str]:
    """The watched folders, resolved, without any that another one holds."""
    resolved = []
    for folder in folders:
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise LookalikeError(f"{folder}: not a folder")
        resolved.append(str(path))
    if not resolved:
        raise LookalikeError("no folder to watch")
    return _outermost(resolved)


def _outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` without those inside another of them, sorted."""
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not _inside(path, kept):
            kept.append(path)
    return kept


def _inside(path: str, folders: Iterable[str]) -> bool:
    """Whether ``path`` is strictly below one of ``folders``."""
    return any(path.startswith(folder + os.sep) for folder in folders)


def _root_in(path: str, roots: Iterable[str]) -> str | None:
    """The folder of ``roots`` that ``path`` is (or is inside), if any."""
    return next((r for r in roots if path == r or path.startswith(r + os.sep)), None)


def _raw_siblings(paths: Iterable[str]) -> set[str]:
    """RAW files beside the JPEG files among ``paths``, with the same name in any case."""
    stems: dict[str, set[str]] = {}
    for path in paths:
        stem, suffix = os.path.splitext(os.path.basename(path))
        if suffix.lower() in JPEG_SUFFIXES:
            stems.setdefault(os.path.dirname(path), set()).add(stem.lower())
    found: set[str] = set()
    for folder, wanted in stems.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in RAW_SUFFIXES and stem.lower() in wanted:
                found.add(os.path.join(folder, name))
    return found


def _best(target: str, hint: str, candidates: list[str]) -> str | None:
    """Of several catalogued files with ``target``'s content, the one it most likely is: the
    one the events moved there, else one of the same name, else the first by path."""
    name = os.path.basename(target)
    ranked = sorted(candidates, key=lambda p: (p != hint, os.path.basename(p) != name, p))
    return ranked[0] if ranked else None


def _states(collection: Collection, paths: Sequence[str]) -> dict[str, FileState]:
    """What the catalog holds at exactly these paths."""
    ids = collection.catalog.ids_for_paths(paths)
    records = collection.catalog.images(list(ids.values()))
    return {r.path: FileState(i, r.size, r.mtime, r.content_hash) for i, r in records.items()}


def _changed(state: FileState, info: os.stat_result) -> bool:
    """Whether a file differs from what was indexed, by the test ``index`` uses."""
    return state.size != info.st_size or state.mtime != info.st_mtime


def _settling(info: os.stat_result, settle: float) -> bool:
    """Whether a file changed less than ``settle`` seconds ago, so may still be written
    (by its change time, which no program can set back, unlike the modification time)."""
    age = time.time() - info.st_ctime
    return 0 <= age < settle
