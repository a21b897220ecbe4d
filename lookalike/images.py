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

import io
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, BinaryIO, TypeAlias

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
    "ImageSource",
    "image_size",
    "load_image",
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
            source, f"truncated, corrupt or unsupported image data ({type(exc).__name__}: {exc})"
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


def _decode_opened(
    img: Image.Image, *, source: str, max_pixels: int, draft_size: int | None
) -> Image.Image:
    """Check size, draft, load, transpose and convert an image PIL just opened."""
    _check_size(img.size, max_pixels, source)
    if draft_size is not None and _is_jpeg(img):
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return _convert(_transposed(img), source=source)


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
    (uint8, uint16, bool or float in [0, 1]; HxW, HxWx1, HxWx2, HxWx3 or HxWx4). The first
    frame of multi-frame files is used (for a PIL image: its current frame); EXIF orientation
    is applied; transparency is flattened onto white.

    ``max_pixels`` refuses images whose width*height exceeds it, checked from the header before
    anything is decoded. ``draft_size`` lets libjpeg decode JPEGs at a reduced scale that keeps
    both sides >= ``draft_size`` (no effect on other formats, PIL images or arrays).

    Raises :class:`NotAnImageError` for missing, empty, truncated, corrupt or non-image input
    and :class:`DecompressionBombError` above the pixel limit; the caller's image or array is
    never modified.
    """
    _check_max_pixels(max_pixels)
    if draft_size is not None and (
        isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size < 1
    ):
        raise ValueError(f"draft_size must be a positive int or None, got {draft_size!r}")

    if isinstance(source, Image.Image):
        name = "<PIL image>"
        with _decoding(name, max_pixels):
            _check_size(source.size, max_pixels, name)
            source.load()
            return _convert(_transposed(source), source=name)

    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels=max_pixels)

    if isinstance(source, (str, os.PathLike)):
        name = _path_name(source)
        _check_path(name)
        with _decoding(name, max_pixels), Image.open(name) as img:
            return _decode_opened(img, source=name, max_pixels=max_pixels, draft_size=draft_size)

    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        data = source.tobytes() if isinstance(source, memoryview) else bytes(source)
        if not data:
            raise NotAnImageError(name, "empty input (0 bytes)")
        with _decoding(name, max_pixels), Image.open(io.BytesIO(data)) as img:
            return _decode_opened(img, source=name, max_pixels=max_pixels, draft_size=draft_size)

    if hasattr(source, "read"):
        name = "<file object>"
        with _decoding(name, max_pixels):
            img = Image.open(source)  # not closed here: the caller owns the file object
            return _decode_opened(img, source=name, max_pixels=max_pixels, draft_size=draft_size)

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
