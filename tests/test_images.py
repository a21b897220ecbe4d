"""lookalike.images: every input kind gives the same 8-bit RGB pixels; bad input fails typed."""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile

from lookalike.errors import DecompressionBombError, ImageError, NotAnImageError
from lookalike.images import image_size, load_image, to_rgb

# --------------------------------------------------------------------------- helpers

PIL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    """A non-square photo, 300 rows x 451 columns x RGB."""
    return skimage.data.chelsea()


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    """A 400 x 600 RGB photo (large enough for JPEG draft scales 2 and 4)."""
    return skimage.data.coffee()


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8
    assert arr.shape == (img.height, img.width, 3)
    return arr


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def save(array_or_image: np.ndarray | Image.Image, path: Path, fmt: str, **kw) -> Path:
    img = (
        array_or_image
        if isinstance(array_or_image, Image.Image)
        else Image.fromarray(array_or_image)
    )
    img.save(path, fmt, **kw)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but which carries no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def png_chunks(data: bytes) -> list[bytes]:
    """Split a PNG file into its raw chunks (length, type, data and CRC each)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos : pos + 12 + length])
        pos += 12 + length
    return chunks


# The array operation that each EXIF orientation asks for (what a viewer displays).
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def jpeg_with_orientation(array: np.ndarray, path: Path, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(array, path, "JPEG", quality=95, exif=exif)


# --------------------------------------------------------------------------- input kinds


def test_every_input_kind_gives_the_same_pixels(cat, tmp_path):
    path = save(cat, tmp_path / "cat.png", "PNG")
    data = path.read_bytes()
    with open(path, "rb") as fh:
        from_file_object = pixels(load_image(fh))
    with Image.open(path) as opened:
        from_pil = pixels(load_image(opened))
    results = {
        "str": pixels(load_image(str(path))),
        "pathlib": pixels(load_image(path)),
        "bytes": pixels(load_image(data)),
        "bytearray": pixels(load_image(bytearray(data))),
        "memoryview": pixels(load_image(memoryview(data))),
        "BytesIO": pixels(load_image(io.BytesIO(data))),
        "file object": from_file_object,
        "PIL image": from_pil,
        "numpy": pixels(load_image(cat)),
    }
    for kind, arr in results.items():
        assert arr.shape == (300, 451, 3), kind
        assert np.array_equal(arr, cat), kind


def test_returns_fully_loaded_plain_image_not_tied_to_the_file(cat, tmp_path):
    path = save(cat, tmp_path / "cat.jpg", "JPEG")
    img = load_image(path)
    path.unlink()  # the pixels must already be in memory
    assert type(img) is Image.Image
    assert img.mode == "RGB"
    assert mean_abs_diff(np.asarray(img), cat) < 3


def test_caller_pil_image_and_array_are_not_modified(cat):
    rgba = np.dstack([cat, np.full(cat.shape[:2], 128, np.uint8)])
    original = Image.fromarray(rgba)
    out = load_image(original)
    assert out is not original
    assert original.mode == "RGBA"
    assert np.array_equal(np.asarray(original), rgba)

    rgb = Image.fromarray(cat)
    out = load_image(rgb)
    assert out is not rgb
    out.putpixel((0, 0), (1, 2, 3))
    assert rgb.getpixel((0, 0)) == tuple(cat[0, 0])

    arr = cat.copy()
    out = load_image(arr)
    arr[:] = 0  # the result must not share memory with the caller's array
    assert np.array_equal(pixels(out), cat)

    out = to_rgb(rgb)
    assert out is not rgb
    assert np.array_equal(pixels(out), cat)


# --------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(cat, tmp_path, orientation):
    path = jpeg_with_orientation(cat, tmp_path / f"o{orientation}.jpg", orientation)
    expected = ORIENT[orientation](cat)
    img = load_image(path)
    arr = pixels(img)
    assert arr.shape == expected.shape
    if orientation in (5, 6, 7, 8):
        assert img.size == (300, 451)  # swapped: (width, height) of the 451x300 photo
    else:
        assert img.size == (451, 300)
    assert mean_abs_diff(arr, expected) < 3.0
    if orientation != 1:  # the unrotated pixels must NOT match (the check can fail)
        assert arr.shape != cat.shape or mean_abs_diff(arr, cat) > 20
    assert image_size(path) == img.size
    # Same result from bytes and from an already opened PIL image.
    assert np.array_equal(pixels(load_image(path.read_bytes())), arr)
    with Image.open(path) as opened:
        assert np.array_equal(pixels(load_image(opened)), arr)


@pytest.mark.parametrize("after_idat", [False, True])
def test_png_exif_orientation_before_and_after_pixel_data(cat, tmp_path, after_idat):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(cat).save(buf, "PNG", exif=exif)
    chunks = png_chunks(buf.getvalue())
    kinds = [c[4:8] for c in chunks]
    assert b"eXIf" in kinds
    if after_idat:  # legal, and some tools write it there: PIL only sees it after decoding
        exif_chunk = chunks.pop(kinds.index(b"eXIf"))
        chunks.insert(len(chunks) - 1, exif_chunk)  # just before IEND
        assert [c[4:8] for c in chunks][-2:] == [b"eXIf", b"IEND"]
    path = tmp_path / "rotated.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))

    img = load_image(path)
    assert np.array_equal(pixels(img), np.rot90(cat, -1))
    assert image_size(path) == img.size == (300, 451)


# --------------------------------------------------------------------------- modes


def test_rgba_transparent_region_becomes_white(cat, tmp_path):
    alpha = np.full(cat.shape[:2], 255, np.uint8)
    alpha[:, :100] = 0  # fully transparent strip
    alpha[:, 100:200] = 128  # half transparent strip
    path = save(np.dstack([cat, alpha]), tmp_path / "rgba.png", "PNG")
    with Image.open(path) as check:
        assert check.mode == "RGBA"
    arr = pixels(load_image(path))
    assert (arr[:, :100] == 255).all()
    assert np.array_equal(arr[:, 200:], cat[:, 200:])
    expected_half = (cat[:, 100:200].astype(np.int32) * 128 + 255 * 127) / 255
    assert np.abs(arr[:, 100:200] - expected_half).max() <= 1.0
    # Not black (what a plain convert("RGB") of a transparent pixel would often give).
    assert mean_abs_diff(arr[:, :100], cat[:, :100]) > 50


def test_la_png_flattened_onto_white(cat, tmp_path):
    gray = np.asarray(Image.fromarray(cat).convert("L"))
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:50] = 0
    path = save(Image.fromarray(np.dstack([gray, alpha]), "LA"), tmp_path / "la.png", "PNG")
    with Image.open(path) as check:
        assert check.mode == "LA"
    arr = pixels(load_image(path))
    assert (arr[:50] == 255).all()
    for channel in range(3):
        assert np.array_equal(arr[50:, :, channel], gray[50:])


def test_premultiplied_modes_flattened_onto_white():
    rgba = Image.new("RGBA", (3, 2), (200, 100, 50, 128))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    out = pixels(to_rgb(rgba.convert("RGBa")))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert np.abs(out[1, 1].astype(int) - [227, 177, 152]).max() <= 1
    la = Image.new("LA", (2, 2), (100, 128)).convert("La")
    assert la.mode == "La"
    out = pixels(to_rgb(la))
    assert np.abs(out.astype(int) - 177).max() <= 1  # 100*128/255 + 255*127/255


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_becomes_white(fmt, tmp_path):
    index = np.zeros((8, 10), np.uint8)
    index[:, 5:] = 1
    index[0, 0] = 2
    img = Image.frombytes("P", (10, 8), index.tobytes())
    img.putpalette([200, 30, 40, 0, 0, 0, 10, 200, 10] + [0, 0, 0] * 253)
    path = tmp_path / f"palette.{fmt.lower()}"
    img.save(path, fmt, transparency=1)
    with Image.open(path) as check:
        assert check.mode == "P"
        assert "transparency" in check.info
    arr = pixels(load_image(path))
    assert (arr[:, 5:] == 255).all()  # transparent black -> white
    assert tuple(arr[1, 1]) == (200, 30, 40)
    assert tuple(arr[0, 0]) == (10, 200, 10)


def test_palette_gif_photo(cat, tmp_path):
    path = save(Image.fromarray(cat).quantize(64), tmp_path / "cat.gif", "GIF")
    with Image.open(path) as check:
        assert check.mode == "P"
        expected = np.asarray(check.convert("RGB"))
    arr = pixels(load_image(path))
    assert np.array_equal(arr, expected)
    assert mean_abs_diff(arr, cat) < 10


def test_cmyk_jpeg_close_to_rgb_original(cat, tmp_path):
    path = save(Image.fromarray(cat).convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    assert mean_abs_diff(pixels(load_image(path)), cat) < 4


def test_sixteen_bit_grayscale_png_scaled_to_eight_bits(tmp_path):
    values = np.linspace(0, 65535, 64 * 32).astype(np.uint16).reshape(64, 32)
    values[0, 0], values[0, 1], values[0, 2] = 255, 256, 65535
    path = save(values, tmp_path / "gray16.png", "PNG")
    with Image.open(path) as check:
        assert check.mode == "I;16"
    arr = pixels(load_image(path))
    expected = (values // 256).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(arr[:, :, channel], expected)
    assert tuple(arr[0, :3, 0]) == (0, 1, 255)
    assert arr.max() == 255 and arr.min() == 0


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_modes(mode):
    img = Image.new(mode, (3, 1))
    for x, value in enumerate((0, 40000, 65535)):
        img.putpixel((x, 0), value)
    assert pixels(to_rgb(img))[0, :, 0].tolist() == [0, 156, 255]


def test_int32_mode_clipped_to_sixteen_bit_range():
    img = Image.new("I", (4, 1))
    for x, value in enumerate((-5, 512, 65535, 1_000_000)):
        img.putpixel((x, 0), value)
    assert pixels(to_rgb(img))[0, :, 1].tolist() == [0, 2, 255, 255]


def test_float_mode():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    assert pixels(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-3.0, 100.0, 300.0]], np.float32))
    assert pixels(to_rgb(wide))[0, :, 2].tolist() == [0, 100, 255]


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB"])
def test_colour_space_modes_back_to_rgb(cat, mode):
    converted = Image.fromarray(cat).convert(mode)
    assert converted.mode == mode
    assert mean_abs_diff(pixels(to_rgb(converted)), cat) < 3


def test_grayscale_and_one_bit(cat, tmp_path):
    gray = np.asarray(Image.fromarray(cat).convert("L"))
    arr = pixels(load_image(save(gray, tmp_path / "gray.png", "PNG")))
    assert all(np.array_equal(arr[:, :, c], gray) for c in range(3))

    bits = gray >= 128
    path = save(
        Image.fromarray(gray).convert("1", dither=Image.Dither.NONE), tmp_path / "b.png", "PNG"
    )
    with Image.open(path) as check:
        assert check.mode == "1"
    arr = pixels(load_image(path))
    assert set(np.unique(arr).tolist()) == {0, 255}
    assert np.array_equal(arr[:, :, 0] == 255, bits)


def test_multi_frame_files_use_the_first_frame(tmp_path):
    first = Image.new("RGB", (6, 4), (10, 200, 30))
    second = Image.new("RGB", (6, 4), (250, 0, 0))
    for fmt in ("GIF", "TIFF"):
        path = tmp_path / f"frames.{fmt.lower()}"
        first.save(path, fmt, save_all=True, append_images=[second])
        with Image.open(path) as check:
            assert check.n_frames == 2
        arr = pixels(load_image(path))
        assert np.abs(arr.astype(int) - [10, 200, 30]).max() <= 2, fmt


# --------------------------------------------------------------------------- numpy arrays


def test_numpy_dtypes_and_shapes(cat):
    gray = cat[:, :, 0]
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(pixels(load_image(gray)), as_rgb)
    assert np.array_equal(pixels(load_image(gray[:, :, None])), as_rgb)
    assert np.array_equal(pixels(load_image(cat[:, ::-1])), cat[:, ::-1])  # non-contiguous

    wide = cat.astype(np.uint16) * 257  # 0..65535
    assert np.array_equal(pixels(load_image(wide)), cat)
    assert np.array_equal(pixels(load_image(wide.astype(">u2"))), cat)

    unit = cat.astype(np.float32) / 255.0
    assert np.array_equal(pixels(load_image(unit)), cat)
    out_of_range = np.array([[-1.0, 0.5, 2.0, np.nan]])
    assert pixels(load_image(out_of_range))[0, :, 0].tolist() == [0, 128, 255, 0]

    mask = np.zeros((4, 5), bool)
    mask[1:3] = True
    arr = pixels(load_image(mask))
    assert (arr[1:3] == 255).all() and (arr[0] == 0).all()


def test_numpy_alpha_channels(cat):
    gray = cat[:, :, 1]
    alpha = np.full(gray.shape, 255, np.uint8)
    alpha[:10] = 0
    arr = pixels(load_image(np.dstack([gray, alpha])))
    assert (arr[:10] == 255).all()
    assert np.array_equal(arr[10:, :, 2], gray[10:])

    rgba = np.dstack([cat, alpha])
    arr = pixels(load_image(rgba))
    assert (arr[:10] == 255).all()
    assert np.array_equal(arr[10:], cat[10:])
    half = np.dstack([cat, np.full(gray.shape, 128, np.uint8)])
    expected = (cat.astype(np.int32) * 128 + 255 * 127) / 255
    assert np.abs(pixels(load_image(half)) - expected).max() <= 0.51


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((4, 4, 5), np.uint8), "channels"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((0,), np.uint8), "shape"),
        (np.arange(10, dtype=np.uint8), "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.zeros((4, 4), object), "dtype"),
        (np.zeros((4, 4), np.int64), "dtype"),
        (np.zeros((4, 4), np.complex64), "dtype"),
    ],
)
def test_bad_arrays(array, reason):
    with pytest.raises(NotAnImageError, match="numpy array") as info:
        load_image(array)
    assert reason in info.value.reason
    assert info.value.source == "<numpy array>"


# --------------------------------------------------------------------------- bad input


def _bad_file(kind: str, tmp_path: Path, cat: np.ndarray) -> Path:
    path = tmp_path / f"bad-{kind}.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(cat).save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    elif kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("this is not an image\n" * 20)
    elif kind == "directory":
        path = tmp_path / "a-folder.png"
        path.mkdir()
    elif kind == "missing":
        path = tmp_path / "nowhere.png"
    elif kind == "truncated-png":
        buf = io.BytesIO()
        Image.fromarray(cat).save(buf, "PNG")
        path = tmp_path / "cut.png"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "corrupt-jpeg":
        buf = io.BytesIO()
        Image.fromarray(cat).save(buf, "JPEG")
        data = bytearray(buf.getvalue())
        data[200:] = b"\x00" * (len(data) - 200)
        path.write_bytes(bytes(data))
    return path


BAD_KINDS = [
    "empty",
    "truncated",
    "random",
    "text",
    "directory",
    "missing",
    "truncated-png",
    "corrupt-jpeg",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_not_an_image_naming_the_file(kind, tmp_path, cat):
    path = _bad_file(kind, tmp_path, cat)
    with pytest.raises(NotAnImageError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert info.value.source == str(path)
    if kind == "missing":
        assert info.value.reason == "no such file"
    # Global PIL state is untouched.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == PIL_MAX_IMAGE_PIXELS


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "text", "corrupt-jpeg"])
def test_bad_data_as_bytes_and_file_objects(kind, tmp_path, cat):
    data = _bad_file(kind, tmp_path, cat).read_bytes()
    with pytest.raises(NotAnImageError, match="<bytes>"):
        load_image(data)
    with pytest.raises(NotAnImageError, match="<file object>"):
        load_image(io.BytesIO(data))


def test_truncated_jpeg_lazy_pil_image(tmp_path, cat):
    path = _bad_file("truncated", tmp_path, cat)
    with Image.open(path) as lazy, pytest.raises(NotAnImageError, match="<PIL image>"):
        load_image(lazy)


@pytest.mark.parametrize("kind", ["empty", "text", "directory", "missing"])
def test_image_size_raises_like_load_image(kind, tmp_path, cat):
    path = _bad_file(kind, tmp_path, cat)
    with pytest.raises(NotAnImageError, match=re.escape(str(path))):
        image_size(path)


def test_unsupported_input_type():
    with pytest.raises(TypeError, match="int"):
        load_image(42)  # type: ignore[arg-type]


def test_error_chaining(tmp_path, cat):
    path = _bad_file("truncated", tmp_path, cat)
    with pytest.raises(NotAnImageError) as info:
        load_image(path)
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value, ImageError)


# --------------------------------------------------------------------------- decompression bombs


def test_decompression_bomb_refused_from_the_header(tmp_path):
    real = save(np.zeros((2000, 2000), np.uint8), tmp_path / "big.png", "PNG")
    start = time.perf_counter()
    with pytest.raises(DecompressionBombError, match=re.escape("big.png")) as info:
        load_image(real, max_pixels=1_000_000)
    assert time.perf_counter() - start < 1.0
    assert "4000000" in info.value.reason
    with pytest.raises(DecompressionBombError):
        image_size(real, max_pixels=1_000_000)
    with pytest.raises(DecompressionBombError):
        load_image(real.read_bytes(), max_pixels=1_000_000)
    # Just inside the limit it loads.
    assert load_image(real, max_pixels=4_000_000).size == (2000, 2000)

    # The pixel data is cut off: only a header-based check can still call it a bomb.
    cut = tmp_path / "big-cut.png"
    cut.write_bytes(real.read_bytes()[:100])
    with pytest.raises(DecompressionBombError, match=re.escape("big-cut.png")):
        load_image(cut, max_pixels=1_000_000)
    with pytest.raises(NotAnImageError):
        load_image(cut, max_pixels=4_000_000)


def test_crafted_header_claiming_huge_dimensions(tmp_path):
    path = tmp_path / "liar.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    assert len(path.read_bytes()) < 100
    with pytest.raises(DecompressionBombError, match=re.escape("liar.png")):
        load_image(path)
    with pytest.raises(DecompressionBombError, match=re.escape("liar.png")):
        image_size(path)
    # Above Pillow's own hard limit even though max_pixels would allow it: PIL's error is
    # converted into ours.
    with pytest.raises(DecompressionBombError, match=re.escape("liar.png")):
        load_image(path, max_pixels=10**11)
    with pytest.raises(DecompressionBombError, match="<bytes>"):
        load_image(path.read_bytes(), max_pixels=10**11)


def test_header_over_the_default_limit_is_refused(tmp_path):
    # 10000 x 10000 = 1e8 pixels, above the default (Pillow's own limit): refused from the header.
    path = tmp_path / "claims-1e8.png"
    path.write_bytes(png_header_only(10_000, 10_000))
    with pytest.raises(DecompressionBombError, match=re.escape("claims-1e8.png")):
        load_image(path)


def test_a_lowered_pillow_limit_is_respected(monkeypatch, cat, coffee):
    # An application lowered Pillow's global limit (restored by monkeypatch after the test).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    buf = io.BytesIO()
    Image.fromarray(coffee).save(buf, "PNG")  # 240_000 > 2 * 100_000: Pillow's own error
    with pytest.raises(DecompressionBombError, match="<bytes>") as info:
        load_image(buf.getvalue())
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_max_pixels_applies_to_arrays_and_pil_images(cat):
    with pytest.raises(DecompressionBombError, match="numpy array"):
        load_image(cat, max_pixels=1000)
    with pytest.raises(DecompressionBombError, match="PIL image"):
        load_image(Image.fromarray(cat), max_pixels=1000)


# --------------------------------------------------------------------------- draft, size, tiny


def test_draft_size_on_jpeg(coffee, tmp_path):
    path = save(coffee, tmp_path / "coffee.jpg", "JPEG", quality=95)
    full = load_image(path)
    assert full.size == (600, 400)
    for draft_size, expected in [(100, (150, 100)), (150, (300, 200)), (300, (600, 400))]:
        img = load_image(path, draft_size=draft_size)
        assert min(img.size) >= draft_size
        assert img.size == expected
        if expected != full.size:
            reference = np.asarray(full.resize(img.size, Image.Resampling.BOX))
            assert mean_abs_diff(pixels(img), reference) < 6
    assert load_image(path, draft_size=10_000).size == (600, 400)  # never upscales/shrinks
    # MPO (multi-picture JPEG, as many cameras write) is a JPEG too.
    buf = io.BytesIO()
    Image.fromarray(coffee).save(buf, "MPO", save_all=True, append_images=[full])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    assert load_image(buf.getvalue(), draft_size=100).size == (150, 100)


def test_draft_size_with_exif_rotation(coffee, tmp_path):
    path = jpeg_with_orientation(coffee, tmp_path / "coffee6.jpg", 6)
    img = load_image(path, draft_size=100)
    assert img.size == (100, 150)
    reference = np.rot90(np.asarray(Image.fromarray(coffee).resize((150, 100))), -1)
    assert mean_abs_diff(pixels(img), reference) < 8


def test_draft_size_ignored_for_png(coffee, tmp_path):
    path = save(coffee, tmp_path / "coffee.png", "PNG")
    assert np.array_equal(pixels(load_image(path, draft_size=100)), coffee)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_options(bad, coffee):
    with pytest.raises(ValueError):
        load_image(coffee, draft_size=bad)
    with pytest.raises(ValueError):
        load_image(coffee, max_pixels=bad)


def test_image_size_matches_load_image(cat, tmp_path):
    paths = [
        save(cat, tmp_path / "a.png", "PNG"),
        save(cat, tmp_path / "a.jpg", "JPEG"),
        save(Image.fromarray(cat).quantize(16), tmp_path / "a.gif", "GIF"),
        save(cat, tmp_path / "a.webp", "WEBP"),
        save(cat, tmp_path / "a.tiff", "TIFF"),
        jpeg_with_orientation(cat, tmp_path / "r6.jpg", 6),
        jpeg_with_orientation(cat, tmp_path / "r8.jpg", 8),
        jpeg_with_orientation(cat, tmp_path / "r3.jpg", 3),
    ]
    exif = Image.Exif()
    exif[0x0112] = 8
    paths.append(save(cat, tmp_path / "r8.tiff", "TIFF", exif=exif))
    for path in paths:
        assert image_size(path) == load_image(path).size, path.name
    # TIFF: PIL itself reports the oriented size and transposes on load; no double rotation.
    assert mean_abs_diff(pixels(load_image(paths[-1])), np.rot90(cat, 1)) < 1
    assert [image_size(p) for p in paths[-4:]] == [(300, 451), (300, 451), (451, 300), (300, 451)]


def test_one_pixel_images(tmp_path):
    pixel = np.array([[[12, 200, 99]]], np.uint8)
    for fmt in ("PNG", "BMP", "GIF", "TIFF"):
        path = save(pixel, tmp_path / f"one.{fmt.lower()}", fmt)
        arr = pixels(load_image(path))
        assert arr.shape == (1, 1, 3)
        if fmt != "GIF":
            assert arr[0, 0].tolist() == [12, 200, 99]
        assert image_size(path) == (1, 1)
    jpeg = pixels(load_image(save(pixel, tmp_path / "one.jpg", "JPEG"), draft_size=224))
    assert jpeg.shape == (1, 1, 3)
    assert np.abs(jpeg[0, 0].astype(int) - [12, 200, 99]).max() < 12
    assert pixels(load_image(pixel)).tolist() == [[[12, 200, 99]]]
    assert pixels(load_image(np.array([[0.5]]))).tolist() == [[[128, 128, 128]]]
