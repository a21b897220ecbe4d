"""What every server front end (REST, gRPC) does with a collection, safely across threads.

The encoder runs outside the lock (ONNX Runtime sessions are thread-safe, and embedding is the
slow part), while catalog and index access is serialised: searches keep answering while images
are added or removed.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Unpack

import numpy as np
from PIL import Image

from lookalike.catalog import ImageRecord
from lookalike.core.collection import Collection
from lookalike.core.results import SearchResponse
from lookalike.core.search import (
    Query,
    QueryViews,
    SearchArgs,
    Searcher,
    SearchOptions,
    search_options,
)
from lookalike.errors import (
    AuthError,
    FileChangedError,
    NotFoundError,
    RequestError,
    StorageError,
)
from lookalike.images import ImageSource, load_image
from lookalike.knn.base import Metric

if TYPE_CHECKING:
    from lookalike.dedup import DedupReport, DuplicateGroup
    from lookalike.dedup.moving import Move

UPLOADS = "uploads"

# A catalog setting per folder that holds uploads (the key ends with a digest of the folder's
# path, the value is the path): any server sharing the catalog can tell an uploaded file from
# a user's own one, whichever server's folder it was stored in.
UPLOAD_FOLDER_SETTING = "upload_folder:"

# How uploads are named: the first 32 hex digits of their SHA-256, and the image's extension.
_UPLOAD_NAME = re.compile(r"[0-9a-f]{32}\.(?:jpg|png|gif|webp|img)")

# How far a file's modification time may be from the catalog's record (seconds) and still
# be the file that was indexed (file systems that round their timestamps).
MTIME_TOLERANCE = 0.01


# The most neighbours one query may be expanded with.
MAX_QUERY_EXPANSION = 100

# Listings and duplicate reports kept for the web page's paging (each for one catalog state).
_CACHED_ANSWERS = 16


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on what one request may ask, so no request can exhaust the server."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_k: int = 100
    thumbnail_size: int = 256
    thumbnail_cache: int = 2048
    # The largest image_size of the classic gRPC FindSimilar, whose reply holds five RGB
    # images of that size: 512 keeps it at 3.9 MB, within the 4 MiB a gRPC client accepts by
    # default (1024 would be 15.7 MB, 2600 101 MB).
    max_find_similar_size: int = 512
    # How deep paging may go: offset + k at most this (the web page's infinite scroll).
    max_depth: int = 1000
    # The most images one browse page may list.
    max_browse_limit: int = 200


class SearchService:
    """A collection behind thread-safe search, add, remove and image access."""

    def __init__(
        self,
        collection: Collection,
        *,
        token: str | None = None,
        limits: ServiceLimits | None = None,
        duplicates_to: str | Path | None = None,
    ) -> None:
        self.collection = collection
        self.token = token or None
        self.limits = limits or ServiceLimits()
        # Where POST /duplicates/move puts the duplicates it moves (None: moving is off).
        self.duplicates_to = Path(duplicates_to).expanduser().resolve() if duplicates_to else None
        self._lock = threading.RLock()
        self._thumbnails: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        # Answers derived from the whole catalog, each valid for one catalog state.
        self._records: tuple[tuple[int, str], list[ImageRecord]] | None = None
        self._listings: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        self._key_summary: tuple[tuple[int, str], list[dict[str, Any]]] | None = None
        self._dedup: OrderedDict[tuple[Any, ...], DedupReport] = OrderedDict()

    def warm_up(self) -> None:
        """Load the model, the cosine index, the visual words of the stored local features
        (which re-ranking may ask for) and the thumbnails' layouts (which a weak query looks
        among) now, so no request pays for them."""
        encoder = self.collection.encoder
        encoder.embed_pixels(np.zeros((1, *(encoder.preprocess.resolution,) * 2, 3), np.uint8))
        with self._lock:
            if len(self.collection):
                self.collection.vector_index(Metric.COSINE)
                self.collection.local_store.word_lookup()
                self.collection.local_store.layout_table()

    # -- requests ---------------------------------------------------------------------------

    def check_token(self, presented: str | None) -> None:
        """Raise AuthError unless writes are open or ``presented`` is the configured token."""
        if self.token is None:
            return
        if presented is None or not hmac.compare_digest(presented.encode(), self.token.encode()):
            raise AuthError("this server requires a bearer token for changes")

    def decode(
        self, source: ImageSource, *, name: str = "<upload>", draft_size: int | None = None
    ) -> Image.Image:
        """A request's image as RGB pixels, within the size and pixel limits (``draft_size``
        lets a JPEG decode at a reduced scale, as ``load_image`` says)."""
        from lookalike.errors import PayloadTooLargeError

        if isinstance(source, bytes | bytearray):
            if not source:
                raise RequestError(f"{name}: the image is empty")
            if len(source) > self.limits.max_upload_bytes:
                raise PayloadTooLargeError(
                    f"{name}: {len(source)} bytes exceeds the limit of "
                    f"{self.limits.max_upload_bytes} bytes"
                )
        return load_image(source, max_pixels=self.limits.max_pixels, draft_size=draft_size)

    def check_k(self, k: int) -> int:
        """k within 1..max_k."""
        if not 1 <= k <= self.limits.max_k:
            raise RequestError(f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def _options(self, args: SearchArgs, offset: int = 0) -> SearchOptions:
        """Search options within this server's limits (checked first, so a request hears
        the server's bounds); with an ``offset``, options for the results up to the end of
        that page (see :func:`_page`)."""
        k = self.check_k(args.get("k", 10))
        if not 0 <= offset <= self.limits.max_depth - k:
            raise RequestError(
                f"offset + k may be at most {self.limits.max_depth}; got offset {offset}, k {k}"
            )
        rerank = args.get("rerank", 0)
        if not 0 <= rerank <= self.limits.max_k:
            raise RequestError(f"rerank must be between 0 and {self.limits.max_k}, got {rerank}")
        expansion = args.get("query_expansion", 0)
        if not 0 <= expansion <= MAX_QUERY_EXPANSION:
            raise RequestError(
                f"query_expansion must be between 0 and {MAX_QUERY_EXPANSION}, got {expansion}"
            )
        if offset:
            options = search_options(**args)
            if options.sort_key is not None:
                # A sort orders the k best; pages of it would each re-sort a longer list.
                raise RequestError(
                    "a sorted search is one page (the k best, in that order): ask for a "
                    "larger k instead of an offset"
                )
            return replace(options, k=k + offset)
        return search_options(**args)

    def _searcher(self) -> Searcher:
        """The collection's search path, following a model switch another process finished
        (the first search after one loads the new model)."""
        with self._lock:
            self.collection.refresh()
            return self.collection.searcher

    def search(
        self,
        query: bytes | Image.Image,
        *,
        name: str = "<upload>",
        offset: int = 0,
        **args: Unpack[SearchArgs],
    ) -> SearchResponse:
        """The k images most like an uploaded image file (or decoded pixels), through the
        collection's one search path; ``rerank=n`` verifies the n best candidates by local
        features. An upload is embedded from its bytes exactly as the library embeds a file
        (JPEG draft decoding included), so both give the same scores. ``offset`` skips that
        many of the best (a later page)."""
        options = self._options(args, offset)
        searcher = self._searcher()
        source: bytes | Image.Image = query
        if not isinstance(query, Image.Image):
            # Within the limits, and an image: checked before anything else decodes it. The
            # draft decode is the one the encoder makes of a file, so it is reused (multi-crop
            # crops the full image, as the library does).
            small = self.decode(query, name=name, draft_size=searcher.encoder.preprocess.resolution)
            source = query if options.multi_crop else small
        views = searcher.image_views(source, options)  # the slow part, outside the lock
        image = None
        if options.verifies:
            image = query if isinstance(query, Image.Image) else self.decode(query, name=name)
        response = searcher.search_views(views, options, query_image=image, lock=self._lock)
        return _page(response, offset)

    def search_many(
        self,
        images: Sequence[bytes],
        *,
        negatives: Sequence[bytes] = (),
        text: str | None = None,
        weights: Sequence[float] | None = None,
        names: Sequence[str] = (),
        offset: int = 0,
        **args: Unpack[SearchArgs],
    ) -> SearchResponse:
        """A combined query (several images, negatives, a text, weighted; see
        :class:`~lookalike.core.search.Query`) through the same path as :meth:`search`; one
        image alone is exactly :meth:`search`."""
        query = Query.of(list(images), negatives=list(negatives), text=text, weights=weights)
        if query.single_image:
            name = names[0] if names else "image"
            return self.search(images[0], name=name, offset=offset, **args)
        options = self._options(args, offset)
        searcher = self._searcher()
        if text is not None and not searcher.encoder.capabilities.text:
            # A request's fault here, not the server's: say so as a 400.
            raise RequestError(
                f"the collection's model {searcher.encoder.identity.model} cannot embed text; "
                "a query with text needs a CLIP model"
            )
        searcher.check_query(query, options)
        labels = list(names) + [f"image {i + 1}" for i in range(len(names), len(images))]
        labels += [f"negative {i + 1}" for i in range(len(negatives))]
        # Each image is checked by the draft decode the encoder makes of a file, and that
        # decode is what gets embedded: one decode per part, as for a single image.
        resolution = searcher.encoder.preprocess.resolution
        named = iter(labels)
        drafted = Query(
            tuple(
                part
                if part.kind == "text"
                else replace(
                    part,
                    source=self.decode(part.source, name=next(named), draft_size=resolution),
                )
                for part in query.parts
            )
        )
        views: np.ndarray | QueryViews
        if query.text is not None and not query.positives and not query.negatives:
            views = searcher.text_vector(str(query.text.source))
        else:
            views = searcher.query_views(drafted, options)  # the slow part, outside the lock
        image = None
        if options.verifies and query.positives:
            image = self.decode(query.positives[0].source, name=labels[0])
        response = searcher.search_views(views, options, query_image=image, lock=self._lock)
        return _page(response, offset)

    def search_by_id(
        self, image_id: int, *, offset: int = 0, **args: Unpack[SearchArgs]
    ) -> SearchResponse:
        """The k images most like an indexed image, from its stored vector (no decoding)."""
        options = self._options(args, offset)
        searcher = self._searcher()
        with self._lock:
            self._record(image_id)
            return _page(searcher.search_id(image_id, options), offset)

    def add(
        self, data: bytes, *, filename: str = "", metadata: dict[str, Any] | None = None
    ) -> int:
        """Store an uploaded image inside the collection folder and index it; returns its id."""
        image = self.decode(data, name=filename or "<upload>")
        extension = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp"}.get(
            Image.open(io.BytesIO(data)).format or "", ".img"
        )
        del image
        folder = self.collection.path / UPLOADS
        folder.mkdir(parents=True, exist_ok=True)
        self._register_uploads(folder.resolve())
        # Named by content: the same upload twice is the same file, and no client-chosen name
        # ever becomes a path.
        target = folder / (hashlib.sha256(data).hexdigest()[:32] + extension)
        if not target.exists():
            temporary = target.with_suffix(target.suffix + f".{os.getpid()}.part")
            try:
                temporary.write_bytes(data)
                os.replace(temporary, target)
            except OSError as error:
                temporary.unlink(missing_ok=True)  # a full disk leaves nothing half-written
                raise StorageError.from_os_error(error, temporary) from error
        meta = dict(metadata or {})
        if filename:
            meta.setdefault("filename", os.path.basename(filename))
        with self._lock:
            return self.collection.add_file(target, metadata=meta)

    def remove(self, image_id: int) -> None:
        """Remove an image; an uploaded file is deleted too (also one another server sharing
        the catalog stored, where this one can reach it), a user's own file never is."""
        with self._lock:
            record = self._record(image_id)
            self.collection.remove([image_id])
            upload = self._is_upload(Path(record.path))
        if upload:
            Path(record.path).unlink(missing_ok=True)

    def _register_uploads(self, folder: Path) -> None:
        """Record in the catalog that ``folder`` holds uploads (once; no generation bump)."""
        key = _upload_key(folder)
        with self._lock:
            if self.collection.catalog.get_setting(key) != str(folder):
                self.collection.catalog.set_setting(key, str(folder))

    def _is_upload(self, path: Path) -> bool:
        """Whether ``path`` is a file some server stored as an upload: named by content, in
        this server's uploads folder or in one the catalog records as an uploads folder."""
        if not _UPLOAD_NAME.fullmatch(path.name):
            return False
        folder = path.parent
        if folder == (self.collection.path / UPLOADS).resolve():
            return True  # also uploads stored before folders were recorded
        return self.collection.catalog.get_setting(_upload_key(folder)) == str(folder)

    def record(self, image_id: int) -> ImageRecord:
        """The catalog record of an image id."""
        with self._lock:
            return self._record(image_id)

    def records(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """The catalog records of image ids (unknown ids are left out)."""
        with self._lock:
            return self.collection.catalog.images([i for i in ids if 0 < i < 2**63])

    def _record(self, image_id: int) -> ImageRecord:
        if not 0 < image_id < 2**63:
            raise NotFoundError(f"no image with id {image_id}")
        record = self.collection.catalog.images([image_id]).get(image_id)
        if record is None:
            raise NotFoundError(f"no image with id {image_id}")
        return record

    def open_file(self, image_id: int) -> tuple[ImageRecord, BinaryIO]:
        """An indexed image's file, opened for reading, if it is still the file the catalog
        records: a regular file of the recorded size and modification time whose real path
        (every link resolved) is a path the catalog holds, so inside the folders that were
        indexed. Raises NotFoundError when it is gone, FileChangedError when it changed.

        The checks run on the opened file itself, so what is read is what was checked."""
        record = self.record(image_id)
        return record, self._open_indexed(image_id, record)

    def _open_indexed(self, image_id: int, record: ImageRecord) -> BinaryIO:
        gone = NotFoundError(f"the file of image {image_id} is no longer on disk")
        try:
            real = os.path.realpath(record.path, strict=True)
        except FileNotFoundError:
            raise gone from None
        except OSError:  # a loop of links, a folder that cannot be searched
            raise FileChangedError(
                f"the file of image {image_id} can no longer be reached as it was indexed; "
                "index its folder again"
            ) from None
        if real != record.path and not self._catalogued(real):
            # Catalogued paths are real paths inside the indexed folders (or links there that
            # lead to another indexed file): a link to anywhere else is never followed.
            raise FileChangedError(
                f"the file of image {image_id} is now a link to a file outside the indexed "
                "folders; it is not served (index its folder again)"
            )
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:
            descriptor = os.open(real, flags | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise gone from None
        except OSError:  # swapped for a link meanwhile (O_NOFOLLOW), or unreadable
            raise FileChangedError(
                f"the file of image {image_id} changed since it was indexed; index again"
            ) from None
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                kind = "a folder" if stat.S_ISDIR(status.st_mode) else "not a regular file"
                raise FileChangedError(
                    f"the file of image {image_id} is {kind} now; it changed since it was "
                    "indexed; index again"
                )
            if (
                status.st_size != record.size
                or abs(status.st_mtime - record.mtime) > MTIME_TOLERANCE
            ):
                raise FileChangedError(
                    f"the file of image {image_id} changed since it was indexed; index again"
                )
            return os.fdopen(descriptor, "rb")
        except BaseException:
            os.close(descriptor)
            raise

    def _catalogued(self, path: str) -> bool:
        """Whether the catalog holds a file at ``path``."""
        with self._lock:
            return bool(self.collection.catalog.ids_for_paths([path]))

    def _load(self, image_id: int) -> tuple[ImageRecord, Image.Image]:
        """An indexed image's record and pixels, read from its checked file."""
        record, handle = self.open_file(image_id)
        with handle:
            image = load_image(
                handle, max_pixels=max(self.limits.max_pixels, record.width * record.height)
            )
        return record, image

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG of at most thumbnail_size pixels a side, cached in memory by content (the
        file is checked on every request, so a changed file is never answered from the
        cache)."""
        record, handle = self.open_file(image_id)
        key = (image_id, record.content_hash)
        with handle:
            with self._lock:
                cached = self._thumbnails.get(key)
                if cached is not None:
                    self._thumbnails.move_to_end(key)
                    return cached
            # A JPEG (HEIF, RAW) decodes at a reduced scale still above the thumbnail's size:
            # a browse page of big photos costs a fraction of full decodes.
            image = load_image(
                handle,
                max_pixels=max(self.limits.max_pixels, record.width * record.height),
                draft_size=self.limits.thumbnail_size,
            )
        size = self.limits.thumbnail_size
        image.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._thumbnails[key] = data
            while len(self._thumbnails) > self.limits.thumbnail_cache:
                self._thumbnails.popitem(last=False)
        return data

    def image_pixels(self, image_id: int, size: int) -> Image.Image:
        """An indexed image as RGB, squashed to ``size`` x ``size`` (the gRPC contract), read
        only from its checked file (see :meth:`open_file`)."""
        _, image = self._load(image_id)
        return image.resize((size, size), Image.Resampling.BILINEAR)

    def stats(self) -> dict[str, Any]:
        """Counts and what the collection runs on."""
        with self._lock:
            self.collection.refresh()
            # The index first, so that info reports the recall it measured when built.
            index = self.collection.vector_index(Metric.COSINE) if len(self.collection) else None
            info = self.collection.info()
        return {
            "images": info.images,
            "model": info.model,
            "layer": info.layer,
            "dim": info.dim,
            "index_spec": info.index_spec,
            "index_kind": index.index.spec if index is not None else None,
            "index_recall": info.index_recall,
            "index_tuning": info.index_tuning,
            "schema_version": info.schema_version,
        }

    def page_info(self) -> dict[str, Any]:
        """What the web page adapts to: whether the model embeds text, whether writes need
        the token, whether duplicates can be moved, and the metadata keys with their kinds
        (see :func:`lookalike.server.browsing.metadata_keys`)."""
        from lookalike.server.browsing import metadata_keys

        with self._lock:
            self.collection.refresh()
            # The searcher's encoder: a paired multilingual text model gives text too.
            text = self.collection.searcher.encoder.capabilities.text
            state = self.collection.catalog.state
            if self._key_summary is None or self._key_summary[0] != state:
                self._key_summary = (state, metadata_keys(self._all_records(state)))
            keys = self._key_summary[1]
        return {
            "text": text,
            "writes_need_token": self.token is not None,
            "can_move_duplicates": self.duplicates_to is not None,
            "metadata_keys": keys,
        }

    # -- browsing and duplicates (the web page's views) -----------------------------------

    def _all_records(self, state: tuple[int, str]) -> list[ImageRecord]:
        """Every catalog record, read once per catalog state (call under the lock)."""
        if self._records is None or self._records[0] != state:
            catalog = self.collection.catalog
            ids = sorted(catalog.paths().values())
            found = catalog.images(ids)
            self._records = (state, [found[i] for i in ids if i in found])
        return self._records[1]

    def browse(
        self,
        *,
        offset: int = 0,
        limit: int = 50,
        where: Sequence[str] = (),
        near: str | None = None,
        within: str | None = None,
        sort: str = "",
    ) -> tuple[list[ImageRecord], int]:
        """One page of the collection: the records from ``offset`` on (at most ``limit``)
        of the images that pass the filters, in the order ``sort`` names (see
        :func:`lookalike.server.browsing.ordered_ids`), and how many images pass. The
        ordered list is kept per catalog state, so paging does not list again."""
        from lookalike.server.browsing import ordered_ids

        if not 1 <= limit <= self.limits.max_browse_limit:
            raise RequestError(
                f"limit must be between 1 and {self.limits.max_browse_limit}, got {limit}"
            )
        if offset < 0:
            raise RequestError(f"offset must be 0 or more, got {offset}")
        with self._lock:
            state = self.collection.catalog.state
            key = (state, tuple(where), near, within, sort)
            ids = self._listings.get(key)
            if ids is None:
                every = self._all_records(state)
                ids = ordered_ids(every, where=where, near=near, within=within, sort=sort)
                self._listings[key] = ids
                while len(self._listings) > _CACHED_ANSWERS:
                    self._listings.popitem(last=False)
            self._listings.move_to_end(key)
            page = ids[offset : offset + limit]
            records = self.collection.catalog.images(page)
        return [records[i] for i in page if i in records], len(ids)

    def duplicates(
        self,
        *,
        method: str | None = None,
        threshold: float | None = None,
        min_inliers: int | None = None,
    ) -> DedupReport:
        """Groups of duplicates in the collection, each with its suggested keeper (see
        :func:`lookalike.dedup.find_duplicates`), found once per catalog state and way of
        finding them, so that paging through them does not search again."""
        from lookalike.dedup import DEFAULT_METHOD, find_duplicates
        from lookalike.errors import DedupError

        chosen = method or DEFAULT_METHOD.value
        with self._lock:
            self.collection.refresh()
            key = (self.collection.catalog.state, chosen, threshold, min_inliers)
            report = self._dedup.get(key)
            if report is None:
                try:
                    report = find_duplicates(
                        self.collection,
                        method=chosen,
                        threshold=threshold,
                        min_inliers=min_inliers,
                    )
                except DedupError as error:  # a bad method or threshold: the request's fault
                    raise RequestError(str(error)) from None
                self._dedup[key] = report
                while len(self._dedup) > _CACHED_ANSWERS:
                    self._dedup.popitem(last=False)
            self._dedup.move_to_end(key)
            return report

    def move_duplicates(
        self,
        choices: Sequence[tuple[int, Sequence[int]]],
        *,
        method: str | None = None,
        threshold: float | None = None,
        min_inliers: int | None = None,
    ) -> list[tuple[int, Move]]:
        """Move the chosen duplicates into :attr:`duplicates_to` (never deleting, never
        overwriting; see :mod:`lookalike.dedup.moving`); moved files leave the collection.

        ``choices`` are (keeper id, ids to move): every id must belong to one group of the
        duplicates found the same way, the keeper any member of it (another than the
        suggested one, if the user prefers), never among those moved. Returns (id, move)
        for each image asked to move."""
        from lookalike.dedup import DuplicateGroup
        from lookalike.dedup.moving import MOVED, apply_moves, plan_moves
        from lookalike.errors import DedupError

        if self.duplicates_to is None:
            raise RequestError(
                "this server moves no duplicates: start it with `lookalike serve "
                "--duplicates-to DIR` (a folder outside the indexed ones) to allow it"
            )
        if not choices:
            raise RequestError("choose at least one group's duplicates to move")
        with self._lock:
            report = self.duplicates(method=method, threshold=threshold, min_inliers=min_inliers)
            before = self.collection.catalog.state
            group_of = {m.id: g for g in report.groups for m in g.members}
            chosen: list[DuplicateGroup] = []
            asked: set[int] = set()
            for keeper_id, move_ids in choices:
                group = group_of.get(keeper_id)
                if group is None:
                    raise RequestError(f"image {keeper_id} is in no group of duplicates")
                members = {m.id: m for m in group.members}
                if not move_ids:
                    raise RequestError(f"nothing to move from the group of image {keeper_id}")
                for image_id in move_ids:
                    if image_id == keeper_id:
                        raise RequestError(f"image {image_id} is the keeper; it is never moved")
                    if image_id not in members:
                        raise RequestError(
                            f"image {image_id} is not in the group of image {keeper_id}"
                        )
                    if image_id in asked:
                        raise RequestError(f"image {image_id} is asked to move twice")
                    asked.add(image_id)
                chosen.append(DuplicateGroup(members[keeper_id], [members[i] for i in move_ids]))
            # Paths relative to the common folder of every group found, as the CLI keeps
            # them, so moves from several requests land in one consistent tree.
            every = [m.path for g in report.groups for m in g.members]
            root = os.path.commonpath(every) if every else None
            try:
                moves = plan_moves(chosen, self.duplicates_to, root=root)
            except DedupError as error:
                raise RequestError(str(error)) from None
            done = apply_moves(self.collection, moves)
            moved = {m.source for m in done if m.status == MOVED}
            self._after_moves(report, before, chosen, moved)
        ids = [d.id for g in chosen for d in g.duplicates]
        return list(zip(ids, done, strict=True))

    def _after_moves(
        self,
        report: DedupReport,
        before: tuple[int, str],
        chosen: Sequence[DuplicateGroup],
        moved: set[str],
    ) -> None:
        """Keep the groups of ``report`` less what was moved, for the new catalog state, when
        that move was the only change since (so the view does not search again after every
        move); else the next request finds the duplicates anew."""
        from lookalike.dedup import DuplicateGroup

        catalog = self.collection.catalog
        after = catalog.state
        if not moved or after == before:
            return
        if after[0] != before[0] + 1 or catalog.last_written_state != after:
            return
        keepers = {g.keeper.id for g in chosen}
        groups = []
        for group in report.groups:
            left = [m for m in group.members if m.path not in moved]
            if len(left) < 2:
                continue
            # The keeper the user chose, else the one suggested if it is still there.
            keeper = next((m for m in left if m.id in keepers), None)
            if keeper is None:
                keeper = group.keeper if group.keeper in left else left[0]
            groups.append(DuplicateGroup(keeper, [m for m in left if m.id != keeper.id]))
        for key in [k for k in self._dedup if k[0] == before]:
            kept = self._dedup.pop(key)
            if kept is report:
                self._dedup[(after, *key[1:])] = replace(report, groups=groups)

    # -- health and error answers ---------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Whether the catalog answers, by one cheap query: ``{"status": "ok", "catalog": "ok",
        "images": n}``, or ``{"status": "unavailable", "catalog": "unavailable"}`` when its
        database cannot be reached (``"catalog": "error"`` when it answers with an error)."""
        import logging

        from lookalike.errors import CatalogUnavailableError

        log = logging.getLogger(__name__)
        try:
            with self._lock:
                images = self.collection.catalog.count()
        except CatalogUnavailableError as error:
            log.warning("health: the catalog is unavailable: %s", error)
            return {"status": "unavailable", "catalog": "unavailable"}
        except Exception:
            log.exception("health: the catalog cannot be read")
            return {"status": "unavailable", "catalog": "error"}
        return {"status": "ok", "catalog": "ok", "images": images}

    def private_locations(self) -> list[str]:
        """Where this server keeps its data (the collection folder, the catalog): what an
        answer to a client must never name (see :func:`lookalike.server.status.scrub`)."""
        from lookalike.server.status import private_locations

        locations = private_locations(self.collection.path)
        catalog = getattr(self.collection.catalog, "location", None)
        if isinstance(catalog, str) and catalog:
            locations.append(catalog)
        return locations


def _page(response: SearchResponse, offset: int) -> SearchResponse:
    """The results of ``response`` after the first ``offset`` (its best score stays the best
    of all, so "no close match" keeps its meaning)."""
    if not offset:
        return response
    return replace(response, results=response.results[offset:])


def _upload_key(folder: Path) -> str:
    """The catalog setting that records ``folder`` as a folder of uploads."""
    digest = hashlib.sha256(os.fsencode(str(folder))).hexdigest()[:32]
    return UPLOAD_FOLDER_SETTING + digest
