"""Any image input -> 8-bit RGB pixels.

``load_image`` accepts a path, raw bytes, a binary file object, a PIL image or a numpy array
and returns a fully loaded 8-bit RGB :class:`PIL.Image.Image`, with EXIF orientation applied
and transparency flattened onto white. Everything that goes wrong with the *input* surfaces
as a typed :class:`~lookalike.errors.ImageError` whose message names the file (its path) or
the input kind (``<bytes>``, ``<file object>``, ``<PIL image>``, ``<numpy array>``).

No global PIL state is changed: truncated files are never accepted, and
``Image.MAX_IMAGE_PIXELS`` is left alone; the pixel limit is ``max_pixels`` instead.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, TypeAlias

import numpy as np
from PIL import (
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
)

from lookalike.errors import DecompressionBombError, ImageError, NotAnImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "RAW_PREVIEW_MIN_SIDE",
    "RAW_SUFFIXES",
    "VECTOR_SUFFIXES",
    "ImageSource",
    "Photo",
    "decoder_available",
    "image_size",
    "load_image",
    "read_photo",
    "to_rgb",
]

ImageSource: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray
)

# Pillow's own default limit: at the default, Pillow never warns about an image we accept.
DEFAULT_MAX_PIXELS = 89_478_485

_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_WHITE = (255, 255, 255, 255)

# What PIL and its plugins raise on bad data. UnidentifiedImageError is an OSError; plugins
# also raise SyntaxError, struct.error, EOFError, ValueError, IndexError, ... on malformed input.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    ZeroDivisionError,
    OverflowError,
    struct.error,
)
# Named, not starred inline in the except clause, so that type checkers can follow it.
_DECODE_ERRORS_OR_WARNING: tuple[type[BaseException], ...] = (*_DECODE_ERRORS, Warning)

_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


@contextmanager
def _decoding(source: str, max_pixels: int) -> Iterator[None]:
    """Turn PIL's errors into typed errors naming ``source``.

    This deliberately does not use ``warnings.catch_warnings``: it swaps process-wide state,
    which is unsafe when several threads decode at once (the indexer does). Pixel limits are
    enforced from the header by ``_check_size`` instead. PIL's own ``DecompressionBombError``
    (above twice ``Image.MAX_IMAGE_PIXELS``) and its warning, when the application turns
    warnings into errors, both become our ``DecompressionBombError``.
    """
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(
            source, f"more pixels than allowed (max_pixels={max_pixels}): {exc}"
        ) from exc
    except FileNotFoundError as exc:
        raise NotAnImageError(source, "no such file") from exc
    except IsADirectoryError as exc:
        raise NotAnImageError(source, "is a directory") from exc
    except PermissionError as exc:
        raise NotAnImageError(source, "permission denied") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(source, "not a recognized image format") from exc
    except _DECODE_ERRORS_OR_WARNING as exc:
        # A Warning arrives here only when the application made warnings errors.
        raise NotAnImageError(
            source,
            f"truncated, corrupt or unsupported image data ({type(exc).__name__}: "
            f"{str(exc).strip()})",
        ) from exc


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _check_size(size: tuple[int, int], max_pixels: int, source: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise NotAnImageError(source, f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise DecompressionBombError(
            source,
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )


def _path_name(source: str | os.PathLike[str]) -> str:
    return os.fsdecode(os.fspath(source))


def _check_path(path: str) -> None:
    """Cheap, clear errors for what is obviously not an image file."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise NotAnImageError(path, "no such file") from exc
    except OSError as exc:
        raise NotAnImageError(path, f"cannot access file ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise NotAnImageError(path, "is a directory")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise NotAnImageError(path, "empty file (0 bytes)")


def _exif_orientation(img: ImageFile.ImageFile) -> int:
    """The EXIF (or XMP) orientation of an opened image, 1 when absent or unreadable.

    Header-only: for PNG, PIL's ``getexif`` would decode the whole image to reach an ``eXIf``
    chunk stored after the pixel data, so such a chunk is located by walking chunk headers.
    """
    try:
        if img.format == "PNG" and "exif" not in img.info:
            data = _png_exif_chunk(img.fp) if img.fp is not None else None
            if data is not None:
                exif = Image.Exif()
                exif.load(data)
            else:
                exif = Image.Image.getexif(img)  # base class: no decoding
        else:
            exif = img.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return 1
    return orientation if isinstance(orientation, int) else 1


def _png_exif_chunk(fp: IO[bytes]) -> bytes | None:
    """Payload of the first ``eXIf`` chunk of a PNG file, found by seeking past chunk data."""
    fp.seek(8)
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return None
        length, chunk_type = struct.unpack(">I4s", head)
        if chunk_type == b"eXIf":
            data = fp.read(length)
            return data if len(data) == length else None
        if chunk_type == b"IEND":
            return None
        fp.seek(length + 4, io.SEEK_CUR)  # data + CRC


def _is_jpeg(img: Image.Image) -> bool:
    # MPO (the multi-picture JPEG many cameras write) subclasses JpegImageFile.
    return isinstance(img, JpegImagePlugin.JpegImageFile)


def _transposed(img: Image.Image) -> Image.Image:
    """A new image with EXIF orientation applied (a copy when there is none or it is broken)."""
    try:
        return ImageOps.exif_transpose(img)
    except _DECODE_ERRORS:
        # Unreadable EXIF does not make the pixels unreadable; ``image_size`` agrees (-> 1).
        return img.copy()


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Return an 8-bit RGB PIL image, fully loaded.

    ``source`` is a path, encoded bytes, a binary file object, a PIL image or a numpy array
    (uint8, uint16, bool or float in [0, 1]; HxW, HxWx1, HxWx2, HxWx3 or HxWx4). Files and
    bytes are decoded by :func:`read_photo` (HEIC, AVIF, JPEG XL and camera RAW included). The
    first frame of multi-frame files is used (for a PIL image: its current frame); EXIF
    orientation is applied; transparency is flattened onto white.

    ``max_pixels`` refuses images whose width*height exceeds it, checked from the header before
    anything is decoded. ``draft_size`` lets JPEG, HEIF and RAW decode at a reduced scale that
    keeps both sides >= ``draft_size`` (no effect on other formats, PIL images or arrays).

    Raises :class:`NotAnImageError` for missing, empty, truncated, corrupt or non-image input
    and :class:`DecompressionBombError` above the pixel limit; the caller's image or array is
    never modified.
    """
    _check_max_pixels(max_pixels)
    _check_draft_size(draft_size)

    if isinstance(source, Image.Image):
        name = "<PIL image>"
        with _decoding(name, max_pixels):
            _check_size(source.size, max_pixels, name)
            source.load()
            return _convert(_transposed(source), source=name)

    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels=max_pixels)

    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        return read_photo(source, max_pixels=max_pixels, draft_size=draft_size).image

    if hasattr(source, "read"):
        name = "<file object>"
        with _decoding(name, max_pixels):
            data = source.read()  # not closed here: the caller owns the file object
        if not isinstance(data, bytes):
            raise TypeError(f"the file object gave {type(data).__name__}, not bytes")
        if not data:
            raise NotAnImageError(name, "empty input (0 bytes)")
        return read_photo(data, name=name, max_pixels=max_pixels, draft_size=draft_size).image

    raise TypeError(
        "load_image() takes a path, bytes, a binary file object, a PIL image or a numpy array, "
        f"not {type(source).__name__}"
    )


def to_rgb(image: Image.Image, *, source: str = "<image>") -> Image.Image:
    """Convert an already opened PIL image (any mode) to a new 8-bit RGB image.

    Alpha (RGBA, LA, PA, RGBa, La, palette or colour-key transparency) is flattened onto white;
    16-bit and 32-bit integer modes are divided by 256 (clipped to 0..65535 first); float "F" is
    taken as [0, 1] when its maximum is <= 1, else clipped to 0..255; CMYK, YCbCr, LAB, HSV,
    palette, grayscale and 1-bit use PIL's conversions. EXIF orientation is *not* applied here
    (``load_image`` does that). ``source`` names the image in error messages.
    """
    with _decoding(source, DEFAULT_MAX_PIXELS):
        image.load()
        return _convert(image, source=source, copy=True)


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in the Pillow ``mode`` (``"L"``, ``"RGB"``, ...): itself when it is in it
    already, since ``convert`` would copy it (the copy views and thumbnails of one query
    each take the same grey image)."""
    return image if image.mode == mode else image.convert(mode)


def _convert(image: Image.Image, *, source: str, copy: bool = False) -> Image.Image:
    """``to_rgb`` without the error mapping; ``copy=False`` when ``image`` is ours to return."""
    mode = image.mode
    if mode == "RGB":
        return image.copy() if copy else image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBa", "La"):
        # Premultiplied: over white, each channel is value + (255 - alpha); no unpremultiply.
        values = np.asarray(image).astype(np.int16)
        color, alpha = values[..., :-1], values[..., -1:]
        flat = np.clip(color + (255 - alpha), 0, 255).astype(np.uint8)
        if flat.shape[-1] == 1:
            flat = flat[..., 0]
        return Image.fromarray(flat).convert("RGB")
    if mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        try:
            rgba = image.convert("RGBA")
        except ValueError as exc:
            raise NotAnImageError(source, f"cannot convert mode {mode!r} to RGB ({exc})") from exc
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise NotAnImageError(source, f"cannot convert mode {mode!r} to RGB ({exc})") from exc


def _from_array(array: np.ndarray, *, max_pixels: int) -> Image.Image:
    name = "<numpy array>"
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3:
        raise NotAnImageError(
            name, f"expected an HxW or HxWxC array, got shape {array.shape} ({array.ndim}-D)"
        )
    height, width, channels = array.shape
    if channels not in (1, 2, 3, 4):
        raise NotAnImageError(
            name, f"expected 1, 2, 3 or 4 channels (last axis), got shape {array.shape}"
        )
    if height == 0 or width == 0:
        raise NotAnImageError(name, f"empty array (shape {array.shape})")
    _check_size((width, height), max_pixels, name)

    dtype = array.dtype
    if dtype == np.uint8:
        pixels = np.array(array, dtype=np.uint8, order="C")  # a copy: never share the caller's
    elif dtype == np.bool_:
        pixels = array.astype(np.uint8) * np.uint8(255)
    elif dtype.kind == "u" and dtype.itemsize == 2:
        pixels = (array.astype(np.uint16) >> 8).astype(np.uint8)
    elif dtype.kind == "f":
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        pixels = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise NotAnImageError(
            name,
            f"unsupported dtype {dtype}; use uint8 (0..255), uint16 (0..65535), bool "
            "or float in [0, 1]",
        )
    pixels = np.ascontiguousarray(pixels)
    if channels == 1:
        return Image.fromarray(pixels[:, :, 0]).convert("RGB")
    if channels == 3:
        return Image.fromarray(pixels).convert("RGB")
    # Gray+alpha / RGBA: flatten onto white.
    alpha = pixels[:, :, -1:].astype(np.uint32)
    color = pixels[:, :, :-1].astype(np.uint32)
    flat = (color * alpha + 255 * (255 - alpha) + 127) // 255
    flat = flat.astype(np.uint8)
    if channels == 2:
        return Image.fromarray(np.ascontiguousarray(flat[:, :, 0])).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(flat)).convert("RGB")


def image_size(
    source: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of an image file from its header only, after EXIF orientation.

    Sides are swapped for the orientations that rotate by 90/270 degrees, so the result
    equals ``load_image(source).size`` (without ``draft_size``). Raises like ``load_image``
    for missing, empty, non-image and over-``max_pixels`` files; truncated pixel data is not
    detected, since nothing is decoded.
    """
    _check_max_pixels(max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"image_size() takes a path, not {type(source).__name__}")
    name = _path_name(source)
    _check_path(name)
    with _decoding(name, max_pixels), Image.open(name) as img:
        _check_size(img.size, max_pixels, name)
        width, height = img.size
        if isinstance(img, TiffImagePlugin.TiffImageFile):
            # PIL's TIFF plugin reports the size already oriented (and transposes on load).
            return width, height
        if _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
            return height, width
        return width, height


# -- photos: every format a photo library holds ---------------------------------------------

# Camera RAW suffixes, decoded with LibRaw (rawpy). ".raw" is left out: too many files that
# are no camera's share it.
RAW_SUFFIXES = frozenset(
    {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2",
     ".rwl", ".raf", ".pef", ".ptx", ".srw", ".erf", ".kdc", ".dcr", ".mrw", ".3fr", ".fff",
     ".iiq", ".mef", ".mos", ".x3f"}
)  # fmt: skip
# Vector formats: refused with a reason, since nothing here rasterises them.
VECTOR_SUFFIXES = frozenset({".svg", ".svgz"})
SVG_REASON = "SVG is a vector format; lookalike does not rasterise it (convert it to PNG)"
# A RAW file's embedded preview is used when its short side has at least this many pixels
# (and at least ``draft_size``); a smaller one means demosaicing the sensor data instead.
RAW_PREVIEW_MIN_SIDE = 512

_XMP_TAG = 0x02BC  # XMLPacket, where TIFF-based files (and RAW) keep their XMP
_DNG_VERSION_TAG = 0xC612
# LibRaw's ``flip`` as the transpose that makes a preview upright (the sensor data it rotates
# itself).
_RAW_FLIPS = {
    3: Image.Transpose.ROTATE_180,
    5: Image.Transpose.ROTATE_90,
    6: Image.Transpose.ROTATE_270,
}
# ISO-BMFF brands of HEIF still images (AVIF's "avif"/"avis" are Pillow's own).
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
# Some RAW formats are TIFF inside but start with their own magic; with the standard one the
# TIFF reader finds their EXIF.
_TIFF_LIKE_RAW = {
    b"IIRO": b"II*\x00",
    b"IIRS": b"II*\x00",
    b"IIU\x00": b"II*\x00",
    b"MMOR": b"MM\x00*",
}


@dataclass(frozen=True)
class Photo:
    """A decoded photo and what the file says about it.

    ``image`` is 8-bit RGB, upright (EXIF orientation applied), possibly decoded smaller
    (``draft_size``); ``exif`` is the file's EXIF as PIL reads it (None when it has none);
    ``xmp`` the raw XMP packet; ``format`` PIL's format name (``"JPEG"``, ``"MPO"``,
    ``"HEIF"``, ``"AVIF"``, ``"JXL"``, ``"PNG"``, ``"TIFF"``...) or ``"RAW"``; ``size`` the full
    upright pixel size, whatever size ``image`` was decoded at.
    """

    image: Image.Image
    exif: Image.Exif | None
    xmp: bytes | None
    format: str | None
    size: tuple[int, int]


def read_photo(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    raw_preview_min_side: int = RAW_PREVIEW_MIN_SIDE,
) -> Photo:
    """Decode a photo file (a path, or its bytes) of any format lookalike reads.

    JPEG, PNG, GIF, WebP, TIFF, BMP and the rest of Pillow's formats; AVIF (Pillow); HEIC/HEIF
    (pillow-heif) and JPEG XL (pillow-jxl-plugin), registered with Pillow the first time such
    a file is met; camera RAW (rawpy: the embedded preview when its short side reaches
    ``raw_preview_min_side`` and ``draft_size``, else the sensor data demosaiced with the
    camera's white balance). Multi-frame files give their first frame (GIF, WebP, TIFF's first
    page, MPO's primary image). The file is read once.

    ``name`` names the file in errors (a path's default is the path, bytes' ``<bytes>``) and
    its suffix picks RAW and SVG handling. ``max_pixels`` refuses larger images from the
    header, before decoding; ``draft_size`` lets JPEG, HEIF and RAW decode smaller as long
    as both sides stay >= it. Raises :class:`NotAnImageError` (with the reason: corrupt,
    unsupported, SVG, a missing plugin) and :class:`DecompressionBombError`.
    """
    _check_max_pixels(max_pixels)
    _check_draft_size(draft_size)
    if isinstance(source, (str, os.PathLike)):
        path = _path_name(source)
        label = path if name is None else name
        data = _read_file(path, label)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = "<bytes>" if name is None else name
        data = source.tobytes() if isinstance(source, memoryview) else bytes(source)
        if not data:
            raise NotAnImageError(label, "empty input (0 bytes)")
    else:
        raise TypeError(f"read_photo() takes a path or bytes, not {type(source).__name__}")
    return _photo_from_bytes(
        data,
        label,
        max_pixels=max_pixels,
        draft_size=draft_size,
        raw_preview_min_side=raw_preview_min_side,
    )


def _check_draft_size(draft_size: int | None) -> None:
    if draft_size is not None and (
        isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size < 1
    ):
        raise ValueError(f"draft_size must be a positive int or None, got {draft_size!r}")


def _read_file(path: str, label: str) -> bytes:
    try:
        _check_path(path)
    except NotAnImageError as error:
        raise NotAnImageError(label, error.reason) from error
    with _decoding(label, DEFAULT_MAX_PIXELS), open(path, "rb") as handle:
        data = handle.read()
    if not data:
        raise NotAnImageError(label, "empty file (0 bytes)")
    return data


def _suffix(label: str) -> str:
    return os.path.splitext(label)[1].lower() if not label.startswith("<") else ""


def _photo_from_bytes(
    data: bytes, label: str, *, max_pixels: int, draft_size: int | None, raw_preview_min_side: int
) -> Photo:
    suffix = _suffix(label)
    if suffix in VECTOR_SUFFIXES or _looks_like_svg(data):
        raise NotAnImageError(label, SVG_REASON)
    if suffix in RAW_SUFFIXES and not _is_plain_image(data):
        return _read_raw(data, label, max_pixels, draft_size, raw_preview_min_side)
    formats = _register_plugin_for(data, label)
    try:
        with _decoding(label, max_pixels), Image.open(io.BytesIO(data), formats=formats) as img:
            if not suffix and _is_dng(img):
                # DNG bytes without a name: PIL would read the TIFF's first page (a thumbnail).
                return _read_raw(data, label, max_pixels, draft_size, raw_preview_min_side)
            return _photo_from_opened(img, label, max_pixels=max_pixels, draft_size=draft_size)
    except NotAnImageError as error:
        if suffix or not error.reason.startswith("not a recognized image format"):
            raise
        # Bytes without a name that Pillow does not know may be camera RAW (CR3, RAF, ORF...).
        try:
            return _read_raw(data, label, max_pixels, draft_size, raw_preview_min_side)
        except NotAnImageError:
            raise error from None


def _photo_from_opened(
    img: ImageFile.ImageFile, label: str, *, max_pixels: int, draft_size: int | None
) -> Photo:
    """Check the size, draft, load and make upright an image PIL just opened."""
    _check_size(img.size, max_pixels, label)
    orientation = _exif_orientation(img)
    size = _upright_size(img, orientation)
    if draft_size is not None and (_is_jpeg(img) or img.format == "HEIF"):
        # JPEG: libjpeg's DCT scaling; HEIF: pillow-heif picks an embedded thumbnail that is
        # still at least draft_size on both sides, if the file has one.
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    image = _convert(_transposed(img), source=label)
    exif = _file_exif(img, orientation)
    return Photo(image, exif, _xmp(img.info.get("xmp")), img.format, size)


def _upright_size(img: ImageFile.ImageFile, orientation: int) -> tuple[int, int]:
    width, height = img.size
    if isinstance(img, TiffImagePlugin.TiffImageFile):
        return width, height  # PIL's TIFF plugin reports the size already oriented
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def _file_exif(img: Image.Image, orientation: int) -> Image.Exif | None:
    """The EXIF of a loaded image with the file's orientation, None when it has none.

    Decoders that turn the pixels upright themselves drop the orientation tag (PIL's TIFF
    plugin) or reset it to 1 (pillow-heif, keeping the old value in ``info``): the file's
    value is put back, the pixels being upright already.
    """
    try:
        exif = img.getexif()
    except _DECODE_ERRORS:
        return None
    original = img.info.get("original_orientation", orientation)
    if isinstance(original, int) and original != 1 and exif.get(_EXIF_ORIENTATION) != original:
        exif[_EXIF_ORIENTATION] = original
    return exif if len(exif) else None


def _xmp(value: object) -> bytes | None:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, (bytes, bytearray)) and value:
        return bytes(value)
    return None


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip()
    if head.startswith(b"\x1f\x8b"):
        return False  # gzip: .svgz is told by its suffix
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head)


def _is_plain_image(data: bytes) -> bool:
    """A JPEG or PNG under a RAW name (a camera's or a converter's mislabelled file)."""
    return data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"))


def _is_dng(img: Image.Image) -> bool:
    if not isinstance(img, TiffImagePlugin.TiffImageFile):
        return False
    return _DNG_VERSION_TAG in img.tag_v2


def _bmff_format(data: bytes) -> str | None:
    """``"AVIF"`` or ``"HEIF"`` for an ISO-BMFF still image, by the brands of its ``ftyp``
    box (the generic "mif1" major brand says neither: the compatible brands do), else None."""
    if data[4:8] != b"ftyp":
        return None
    size = min(int.from_bytes(data[:4], "big"), len(data), 4096)
    brands = {data[8:12], *(data[i : i + 4] for i in range(16, size - 3, 4))}
    if brands & {b"avif", b"avis"}:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


def _is_jxl(data: bytes) -> bool:
    return data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"))


def _register_plugin_for(data: bytes, label: str) -> list[str] | None:
    """Register the Pillow plugin that ``data``'s format needs, once, or raise saying what to
    install; returns the one Pillow format to open it as, when the brands tell (None: any).

    Pillow reads AVIF itself; HEIF and JPEG XL need their plugin. AVIF and HEIF share the
    container and the "mif1" brand, which both plugins accept, and whichever registered
    first would be tried first (pillow-heif has no AV1 decoder): the brands choose instead.
    """
    kind = _bmff_format(data)
    if kind == "HEIF" and not _heif_opener():
        raise NotAnImageError(label, "cannot decode HEIC: install pillow-heif")
    if kind is not None:
        return [kind]
    if _is_jxl(data) and not _jxl_opener():
        raise NotAnImageError(label, "cannot decode JPEG XL: install pillow-jxl-plugin")
    return None


@functools.cache
def _heif_opener() -> bool:
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def _jxl_opener() -> bool:
    try:
        import pillow_jxl  # noqa: F401  (registers its opener with Pillow on import)
    except ImportError:
        return False
    return True


def decoder_available(suffix: str) -> bool:
    """Whether the decoder for files with this suffix (any case) is installed: pillow-heif
    for HEIC/HEIF, pillow-jxl-plugin for JPEG XL, Pillow's AVIF support, rawpy for RAW
    (registering the Pillow plugin when it is). Other suffixes: True."""
    suffix = suffix.lower()
    if suffix in (".heic", ".heif", ".hif"):
        return _heif_opener()
    if suffix == ".jxl":
        return _jxl_opener()
    if suffix == ".avif":
        from PIL import features

        return bool(features.check("avif"))
    if suffix in RAW_SUFFIXES:
        return importlib.util.find_spec("rawpy") is not None
    return True


def _read_raw(
    data: bytes, label: str, max_pixels: int, draft_size: int | None, preview_min_side: int
) -> Photo:
    """A camera RAW file: its embedded preview when large enough, else its demosaiced data."""
    try:
        import rawpy
    except ImportError as exc:
        raise NotAnImageError(
            label, f"cannot decode camera RAW ({_suffix(label) or 'RAW'}): install rawpy"
        ) from exc
    raw_errors: tuple[type[BaseException], ...] = (
        rawpy.LibRawError,
        rawpy.NotSupportedError,
        *_DECODE_ERRORS,
    )
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sizes = raw.sizes
            width, height = sizes.width, sizes.height
            size = (height, width) if sizes.flip in (5, 6) else (width, height)
            _check_size(size, max_pixels, label)
            need = max(preview_min_side, draft_size or 0)
            image, preview_exif = _raw_preview(raw, label, sizes.flip, need, max_pixels)
            # TIFF-based RAW keeps EXIF in its own IFDs; others (CR3, RAF) in their preview.
            exif = _raw_exif(data) or preview_exif
            if image is None:
                # Half size skips interpolation (each 2x2 Bayer block is one pixel): 4x
                # faster, and enough when a smaller image is all that is wanted.
                half = draft_size is not None and min(size) // 2 >= draft_size
                pixels = raw.postprocess(use_camera_wb=True, half_size=half, output_bps=8)
                image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    except ImageError:
        raise
    except raw_errors as exc:
        raise NotAnImageError(label, _raw_failure(label, exc)) from exc
    xmp = exif.get(_XMP_TAG) if exif is not None else None
    return Photo(image, exif, _xmp(xmp), "RAW", size)


def _raw_failure(label: str, error: BaseException) -> str:
    import rawpy

    what = f"camera RAW ({_suffix(label) or 'RAW'})"
    detail = error.args[0] if error.args else error
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    if isinstance(error, rawpy.LibRawFileUnsupportedError):
        return f"unsupported image format: LibRaw cannot decode this {what} file ({detail})"
    return f"corrupt or unsupported {what}: LibRaw says {detail} ({type(error).__name__})"


def _raw_preview(
    raw: Any, label: str, flip: int, need: int, max_pixels: int
) -> tuple[Image.Image | None, Image.Exif | None]:
    """The embedded preview, upright, when its short side is at least ``need`` (else None),
    and the preview's EXIF when it is a JPEG that has some."""
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except rawpy.LibRawError:
        return None, None  # none, or a damaged one: the sensor data may still be fine
    image: Image.Image | None = None
    exif: Image.Exif | None = None
    oriented = False
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            with Image.open(io.BytesIO(thumb.data)) as img:
                exif = img.getexif() or None
                if min(img.size) >= need and img.size[0] * img.size[1] <= max_pixels:
                    img.draft("RGB", (need, need))  # full-size previews: decode no larger
                    img.load()
                    oriented = _exif_orientation(img) != 1
                    image = _convert(_transposed(img), source=label)
        except _DECODE_ERRORS:
            return None, None
    elif thumb.format == rawpy.ThumbFormat.BITMAP:
        array = np.ascontiguousarray(thumb.data)
        if array.ndim == 3 and min(array.shape[:2]) >= need:
            image = Image.fromarray(array).convert("RGB")
    if image is not None and not oriented and flip in _RAW_FLIPS:
        image = image.transpose(_RAW_FLIPS[flip])
    return image, exif


def _raw_exif(data: bytes) -> Image.Exif | None:
    """The EXIF of a TIFF-based RAW file (DNG, NEF, CR2, ARW, PEF, ORF, RW2...), else None."""
    header = _TIFF_LIKE_RAW.get(data[:4])
    if header is not None:
        data = header + data[4:]
    elif not data.startswith((b"II*\x00", b"MM\x00*")):
        return None
    exif = Image.Exif()
    try:
        exif.load(data)
        return exif if len(exif) else None
    except _DECODE_ERRORS:
        return None
