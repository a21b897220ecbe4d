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
from typing import Any, BinaryIO, Unpack

import numpy as np
from PIL import Image

from lookalike.catalog import ImageRecord
from lookalike.core.collection import Collection
from lookalike.core.results import SearchResponse
from lookalike.core.search import Query, SearchArgs, Searcher, SearchOptions, search_options
from lookalike.errors import (
    AuthError,
    FileChangedError,
    NotFoundError,
    RequestError,
    StorageError,
)
from lookalike.images import ImageSource, load_image
from lookalike.knn.base import Metric

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


class SearchService:
    """A collection behind thread-safe search, add, remove and image access."""

    def __init__(
        self,
        collection: Collection,
        *,
        token: str | None = None,
        limits: ServiceLimits | None = None,
    ) -> None:
        self.collection = collection
        self.token = token or None
        self.limits = limits or ServiceLimits()
        self._lock = threading.RLock()
        self._thumbnails: OrderedDict[tuple[int, str], bytes] = OrderedDict()

    def warm_up(self) -> None:
        """Load the model and the cosine index now, so no request pays for it."""
        encoder = self.collection.encoder
        encoder.embed_pixels(np.zeros((1, *(encoder.preprocess.resolution,) * 2, 3), np.uint8))
        with self._lock:
            if len(self.collection):
                self.collection.vector_index(Metric.COSINE)

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

    def _options(self, args: SearchArgs) -> SearchOptions:
        """Search options within this server's limits (checked first, so a request hears
        the server's bounds)."""
        self.check_k(args.get("k", 10))
        rerank = args.get("rerank", 0)
        if not 0 <= rerank <= self.limits.max_k:
            raise RequestError(f"rerank must be between 0 and {self.limits.max_k}, got {rerank}")
        expansion = args.get("query_expansion", 0)
        if not 0 <= expansion <= MAX_QUERY_EXPANSION:
            raise RequestError(
                f"query_expansion must be between 0 and {MAX_QUERY_EXPANSION}, got {expansion}"
            )
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
        **args: Unpack[SearchArgs],
    ) -> SearchResponse:
        """The k images most like an uploaded image file (or decoded pixels), through the
        collection's one search path; ``rerank=n`` verifies the n best candidates by local
        features. An upload is embedded from its bytes exactly as the library embeds a file
        (JPEG draft decoding included), so both give the same scores."""
        options = self._options(args)
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
        if options.rerank:
            image = query if isinstance(query, Image.Image) else self.decode(query, name=name)
        with self._lock:
            return searcher.search_views(views, options, query_image=image)

    def search_many(
        self,
        images: Sequence[bytes],
        *,
        negatives: Sequence[bytes] = (),
        text: str | None = None,
        weights: Sequence[float] | None = None,
        names: Sequence[str] = (),
        **args: Unpack[SearchArgs],
    ) -> SearchResponse:
        """A combined query (several images, negatives, a text, weighted; see
        :class:`~lookalike.core.search.Query`) through the same path as :meth:`search`; one
        image alone is exactly :meth:`search`."""
        options = self._options(args)
        query = Query.of(list(images), negatives=list(negatives), text=text, weights=weights)
        if query.single_image:
            return self.search(images[0], name=names[0] if names else "image", **args)
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
        if query.text is not None and not query.positives and not query.negatives:
            views = searcher.text_vector(str(query.text.source))
        else:
            views = searcher.query_views(drafted, options)  # the slow part, outside the lock
        image = None
        if options.rerank and query.positives:
            image = self.decode(query.positives[0].source, name=labels[0])
        with self._lock:
            return searcher.search_views(views, options, query_image=image)

    def search_by_id(self, image_id: int, **args: Unpack[SearchArgs]) -> SearchResponse:
        """The k images most like an indexed image, from its stored vector (no decoding)."""
        options = self._options(args)
        searcher = self._searcher()
        with self._lock:
            self._record(image_id)
            return searcher.search_id(image_id, options)

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
            image = load_image(
                handle, max_pixels=max(self.limits.max_pixels, record.width * record.height)
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
            info = self.collection.info()
            index = self.collection.vector_index(Metric.COSINE) if info.images else None
        return {
            "images": info.images,
            "model": info.model,
            "layer": info.layer,
            "dim": info.dim,
            "index_spec": info.index_spec,
            "index_kind": index.index.spec if index is not None else None,
            "schema_version": info.schema_version,
        }

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


def _upload_key(folder: Path) -> str:
    """The catalog setting that records ``folder`` as a folder of uploads."""
    digest = hashlib.sha256(os.fsencode(str(folder))).hexdigest()[:32]
    return UPLOAD_FOLDER_SETTING + digest
