"""Perceptual hashes (64-bit DCT pHash) of images, and a cache of them beside a collection.

The hash is the classic pHash, bit for bit what ``imagehash.phash`` computes for the same
decoded image: grey levels resized to 32 x 32 (Lanczos), a 2-D DCT-II, the 8 x 8 lowest
frequencies, one bit per coefficient set when it is above their median.

Each image also gets the hash of its mirror image, computed from the same coefficients: a
horizontal flip multiplies the DCT coefficient of horizontal frequency ``u`` by ``(-1)^u``, so
no second decode is needed, and comparing one image's hash to the other's mirrored hash finds
flipped copies, which plain pHash misses.

Hashes are cached by content hash in ``perceptual.sqlite`` in the collection folder, so files
are decoded once, and a moved or renamed file keeps its hash.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import CatalogError, ImageError
from lookalike.images import ImageSource, load_image

HASH_SIZE = 8
_RESIZE = HASH_SIZE * 4
# A JPEG is decoded at the smallest libjpeg scale that keeps this many pixels a side: far
# faster than a full decode, and the 32 x 32 grey thumbnail barely changes.
_DRAFT = 128
CACHE_FILE = "perceptual.sqlite"


def _dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II as a matrix (scipy.fftpack's default scaling)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * x + 1) / (2 * n))


_DCT = _dct_matrix(_RESIZE)[:HASH_SIZE]
# Sign of each low-frequency coefficient under a horizontal mirror: (-1)^u by column.
_MIRROR = np.where(np.arange(HASH_SIZE) % 2 == 0, 1.0, -1.0)[None, :]


@dataclass(frozen=True)
class PerceptualHash:
    """An image's packed 64-bit pHash (8 bytes) and the pHash of its mirror image."""

    code: bytes
    mirrored: bytes


def phash(image: ImageSource) -> PerceptualHash:
    """The pHash of any image input (see ``load_image``), and of its mirror image."""
    from PIL import Image

    picture = load_image(image, draft_size=_DRAFT)
    grey = picture.convert("L").resize((_RESIZE, _RESIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T  # the 8 x 8 lowest frequencies of the 2-D DCT
    return PerceptualHash(_bits(low), _bits(low * _MIRROR))


def _bits(coefficients: np.ndarray) -> bytes:
    return np.packbits(coefficients > np.median(coefficients)).tobytes()


def hamming(a: bytes, b: bytes) -> int:
    """Bits that differ between two packed codes of the same length."""
    return int.from_bytes(bytes(x ^ y for x, y in zip(a, b, strict=True)), "big").bit_count()


class PerceptualHashCache:
    """pHashes by content hash, in a small SQLite file of their own."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS phash (content_hash TEXT PRIMARY KEY, "
                "code BLOB NOT NULL, mirrored BLOB NOT NULL)"
            )
        except (sqlite3.DatabaseError, OSError) as error:
            raise CatalogError(
                f"{self.path}: not a usable perceptual-hash cache ({error})"
            ) from error

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def get(self, content_hashes: Iterable[str]) -> dict[str, PerceptualHash]:
        """Content hash -> cached pHash, for those that are cached."""
        found: dict[str, PerceptualHash] = {}
        keys = list(content_hashes)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT content_hash, code, mirrored FROM phash WHERE content_hash IN ({marks})",
                chunk,
            )
            found.update((h, PerceptualHash(bytes(c), bytes(m))) for h, c, m in rows)
        return found

    def put(self, hashes: dict[str, PerceptualHash]) -> None:
        """Store pHashes by content hash, in one transaction."""
        with closing(self._db.cursor()) as cursor:
            cursor.executemany(
                "INSERT OR REPLACE INTO phash (content_hash, code, mirrored) VALUES (?, ?, ?)",
                [(h, p.code, p.mirrored) for h, p in hashes.items()],
            )
        self._db.commit()


@dataclass(frozen=True)
class HashedFile:
    """A file's pHash, or why it could not be computed."""

    path: str
    content_hash: str
    value: PerceptualHash | None = None
    error: str | None = None


def _hash_file(path: str, content_hash: str) -> HashedFile:
    try:
        return HashedFile(path, content_hash, value=phash(path))
    except ImageError as error:
        return HashedFile(path, content_hash, error=error.reason)
    except OSError as error:
        return HashedFile(path, content_hash, error=error.strerror or str(error))


def hash_files(
    files: Sequence[tuple[str, str]],
    cache: PerceptualHashCache | None = None,
    *,
    workers: int | None = None,
) -> Iterator[HashedFile]:
    """pHashes of (path, content hash) pairs: from ``cache`` when there, else decoded in
    ``workers`` threads (decoding and resizing release the GIL) and added to the cache."""
    cached = cache.get(h for _, h in files) if cache is not None else {}
    todo = [(p, h) for p, h in files if h not in cached]
    for path, content_hash in files:
        if content_hash in cached:
            yield HashedFile(path, content_hash, value=cached[content_hash])
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    fresh: dict[str, PerceptualHash] = {}
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="lookalike-phash") as pool:
        for start in range(0, len(todo), 256):
            chunk = todo[start : start + 256]
            for hashed in pool.map(lambda item: _hash_file(*item), chunk):
                if hashed.value is not None:
                    fresh[hashed.content_hash] = hashed.value
                yield hashed
            if cache is not None and fresh:
                cache.put(fresh)
                fresh = {}
