"""Every format a photo library holds, decoded by its real library and indexed for real.

The files are written here from real photos (scikit-image) with the real encoders: HEIC with
pillow-heif, AVIF with Pillow (libavif), JPEG XL with pillow-jxl-plugin, animated GIF and
WebP, multi-page TIFF and MPO with Pillow, each with a *different* photo as its second frame,
so that a search proves the first frame (page, primary image) is the one indexed. Camera RAW:
no camera-made RAW file can be had on this machine, so DNGs are written here from real photo
pixels (a Bayer mosaic of the photo, in linear light) by a real DNG writer (pidng, when it is
installed) and by tifffile with the DNG tags (one with an embedded preview), and LibRaw
(rawpy) decodes them. Nothing is mocked: every decode below runs the real codec.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from lookalike.core.collection import Collection
from lookalike.core.ingest import ScanRules, decode_file
from lookalike.encoders.preprocess import PreprocessConfig
from lookalike.errors import DecompressionBombError, NotAnImageError
from lookalike.images import Photo, load_image, read_photo

# file name (suffixes in any case) -> (its first frame's photo, its second frame's or None)
FILES = {
    "CAMERA.HEIC": ("camera", None),
    "Chelsea.AVIF": ("chelsea", None),
    "coffee.JXL": ("coffee", None),
    "rocket.GIF": ("rocket", "moon"),
    "immuno.WebP": ("immunohistochemistry", "brick"),
    "retina.TIFF": ("retina", "coins"),
    "hubble.MPO": ("hubble_deep_field", "clock"),
    "astronaut.Jpeg": ("astronaut", None),
}
FORMATS = {
    "CAMERA.HEIC": "HEIF",
    "Chelsea.AVIF": "AVIF",
    "coffee.JXL": "JXL",
    "rocket.GIF": "GIF",
    "immuno.WebP": "WEBP",
    "retina.TIFF": "TIFF",
    "hubble.MPO": "MPO",
    "astronaut.Jpeg": "JPEG",
}
# decode_file resizes for a model: small here, only the decoding counts
PREPROCESS = PreprocessConfig(32, (0.5,) * 3, (0.5,) * 3)
ORIENTATION = 0x0112
MAKE = 0x010F
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>'
)


def save_heic(image: Image.Image, path: Path | io.BytesIO, **options: object) -> None:
    """Encode with pillow-heif (libheif + x265), without registering its Pillow opener:
    lookalike registers it when it meets a HEIC file (in this process scikit-image's imageio
    may have done so already; a fresh interpreter shows lookalike's own registration)."""
    import pillow_heif

    pillow_heif.from_pillow(image).save(path, quality=90, **options)


def save_jxl(image: Image.Image, path: Path | io.BytesIO, **options: object) -> None:
    import pillow_jxl  # noqa: F401  (registers the JPEG XL encoder with Pillow)

    image.save(path, "JXL", quality=90, **options)


def write_file(folder: Path, name: str) -> Path:
    """Write ``name`` with its format's real encoder; a second frame is a different photo."""
    first_name, second_name = FILES[name]
    first = photo(first_name)
    second = photo(second_name).resize(first.size) if second_name else None
    path = folder / name
    kind = FORMATS[name]
    if kind == "HEIF":
        save_heic(first, path)
    elif kind == "JXL":
        save_jxl(first, path)
    elif second is not None:
        options = {"quality": 90} if kind in ("WEBP", "MPO") else {}
        if kind == "TIFF":
            options = {"compression": "tiff_lzw"}
        first.save(path, kind, save_all=True, append_images=[second], **options)
    else:
        first.save(path, kind, quality=90)
    return path


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file per format, plus a truncated HEIC and an SVG."""
    folder = tmp_path_factory.mktemp("formats")
    for name in FILES:
        write_file(folder, name)
    heic = (folder / "CAMERA.HEIC").read_bytes()
    (folder / "broken.heic").write_bytes(heic[: len(heic) // 2])
    (folder / "drawing.SVG").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        '<rect width="10" height="10" fill="red"/></svg>'
    )
    return folder


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two RGB images of one size, in 0..255."""
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b.convert("RGB"), np.int16)).mean())


@pytest.mark.parametrize("name", FILES)
def test_each_format_decodes_to_its_first_frame(formats: Path, name: str) -> None:
    first_name, second_name = FILES[name]
    first = photo(first_name)
    decoded = read_photo(formats / name)
    assert isinstance(decoded, Photo)
    assert decoded.format == FORMATS[name]
    assert decoded.image.mode == "RGB"
    assert decoded.size == decoded.image.size == first.size
    close = difference(decoded.image, first)
    assert close < 12, close  # lossy codecs (GIF's 256 colours the most)
    if second_name is not None:
        other = difference(decoded.image, photo(second_name).resize(first.size))
        assert other > 3 * close + 20, (close, other)
    # Bytes decode the same, and load_image (queries) takes the same path.
    data = (formats / name).read_bytes()
    assert difference(read_photo(data).image, decoded.image) == 0
    assert difference(load_image(formats / name), decoded.image) == 0


def test_a_collection_indexes_every_format_and_finds_each_by_its_photo(
    formats: Path, tmp_path: Path, encoder
) -> None:
    broken, svg = str(formats / "broken.heic"), str(formats / "drawing.SVG")
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        report = collection.index(formats, workers=2)
        assert (report.added, report.updated, report.removed) == (len(FILES), 0, 0)
        failed = dict(report.failed)
        assert set(failed) == {broken, svg}, report.failed
        assert "truncated, corrupt or unsupported image data" in failed[broken]
        assert "SVG is a vector format; lookalike does not rasterise it" in failed[svg]
        assert dict(collection.info().failures) == failed
        for name, (first, _) in FILES.items():
            best = collection.search(photo(first), k=1)[0]
            assert best.path == str(formats / name), (name, best)
        # The catalog holds each file's full upright size, not a draft's.
        records = collection.catalog.images(list(collection.catalog.paths().values()))
        sizes = {Path(r.path).name: (r.width, r.height) for r in records.values()}
        assert sizes == {name: photo(first).size for name, (first, _) in FILES.items()}


def lookalike(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_the_cli_indexes_every_format_and_finds_each_by_its_photo(
    formats: Path, tmp_path: Path
) -> None:
    collection = str(tmp_path / "collection")
    out = lookalike("-c", collection, "index", str(formats), "-q").stdout
    assert f"{len(FILES)} added" in out and "2 failed" in out, out
    assert "drawing.SVG: SVG is a vector format" in out, out
    assert "broken.heic: truncated, corrupt" in out, out
    for name, (first, _) in FILES.items():
        query = tmp_path / f"{first}.png"
        photo(first).save(query)
        found = json.loads(
            lookalike("-c", collection, "search", str(query), "-k", "1", "--json").stdout
        )
        assert found["results"][0]["path"] == str(formats / name), name
    # A HEIC file as the query is decoded the same way.
    found = json.loads(
        lookalike("-c", collection, "search", str(formats / "CAMERA.HEIC"), "--json").stdout
    )
    assert found["results"][0]["path"] == str(formats / "CAMERA.HEIC")
    assert found["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kind", ["HEIC", "AVIF", "JXL", "JPEG", "WEBP", "PNG"])
def test_orientation_exif_and_xmp_come_from_the_file(kind: str) -> None:
    image = photo("coffee")  # 600x400, rotated by orientation 6 to 400x600
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[MAKE] = "lookalike"
    buffer = io.BytesIO()
    if kind == "HEIC":
        save_heic(image, buffer, exif=exif.tobytes(), xmp=XMP)
    elif kind == "JXL":
        save_jxl(image, buffer, exif=exif.tobytes())
    else:
        quality = {} if kind == "PNG" else {"quality": 92}
        image.save(buffer, kind, exif=exif.tobytes(), xmp=XMP, **quality)
    decoded = read_photo(buffer.getvalue(), name=f"IMG_0001.{kind}")
    upright = image.transpose(Image.Transpose.ROTATE_270)
    assert decoded.size == decoded.image.size == upright.size == (400, 600)
    assert difference(decoded.image, upright) < 4
    # The file's EXIF, orientation included, even where the decoder rotated the pixels itself.
    assert decoded.exif is not None
    assert (decoded.exif[ORIENTATION], decoded.exif[MAKE]) == (6, "lookalike")
    if kind in ("HEIC", "AVIF", "JPEG", "WEBP"):
        assert decoded.xmp is not None and b"x:xmpmeta" in decoded.xmp
    plain = io.BytesIO()
    image.save(plain, "PNG")
    bare = read_photo(plain.getvalue())
    assert (bare.exif, bare.xmp, bare.format) == (None, None, "PNG")


def test_avif_and_heic_with_the_generic_major_brand_each_reach_their_decoder() -> None:
    """Both containers may name "mif1" as the major brand (encoders differ), and both
    plugins accept that brand; the compatible brands decide, whichever plugin registered
    first (pillow-heif has no AV1 decoder)."""
    image = photo("chelsea")
    avif, heic = io.BytesIO(), io.BytesIO()
    image.save(avif, "AVIF", quality=90)
    save_heic(image, heic)
    for data, kind in ((avif.getvalue(), "AVIF"), (heic.getvalue(), "HEIF")):
        generic = data[:8] + b"mif1" + data[12:]  # the major brand; "avif"/"heic" stay listed
        assert read_photo(generic).format == kind
        assert difference(read_photo(generic).image, image) < 4


def test_a_draft_decodes_heic_and_jpeg_smaller_and_keeps_the_full_size(formats: Path) -> None:
    for name in ("astronaut.Jpeg", "CAMERA.HEIC"):
        full = read_photo(formats / name)
        small = read_photo(formats / name, draft_size=100)
        assert small.size == full.size == (512, 512)
        assert min(small.image.size) >= 100
        if name.endswith("Jpeg"):
            assert small.image.size == (128, 128)  # libjpeg's 1/4 scale


def test_corrupt_heic_and_svg_are_reported_with_the_reason(formats: Path) -> None:
    with pytest.raises(NotAnImageError, match=r"broken\.heic: truncated, corrupt"):
        read_photo(formats / "broken.heic")
    with pytest.raises(NotAnImageError, match="SVG is a vector format"):
        read_photo(formats / "drawing.SVG")
    # SVG is told by its content too, whatever its name.
    with pytest.raises(NotAnImageError, match="SVG is a vector format"):
        read_photo((formats / "drawing.SVG").read_bytes())
    decoded = decode_file(str(formats / "broken.heic"), PREPROCESS)
    assert decoded.error is not None and decoded.error.startswith("truncated, corrupt")


def test_the_megapixel_cap_reports_the_size_and_the_cap(formats: Path) -> None:
    decoded = decode_file(str(formats / "retina.TIFF"), PREPROCESS, max_pixels=10**6)
    assert decoded.error == (
        "too large: 1411x1411 is 2.0 megapixels, over the 1-megapixel cap (max_megapixels)"
    )
    with pytest.raises(DecompressionBombError, match="1990921 pixels exceeds max_pixels=1000000"):
        read_photo(formats / "retina.TIFF", max_pixels=10**6)


def run_python(code: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_plugins_load_only_when_a_file_needs_them_and_register_once(formats: Path) -> None:
    code = """
import sys
import lookalike.cli.main, lookalike.core.collection, lookalike.images
loaded = {"pillow_heif", "pillow_jxl", "rawpy"} & set(sys.modules)
assert not loaded, f"imported at import time: {loaded}"
import pillow_heif
calls = []
register = pillow_heif.register_heif_opener
pillow_heif.register_heif_opener = lambda *a, **k: (calls.append(1), register(*a, **k))
from lookalike.images import read_photo
assert [read_photo(sys.argv[1]).format for _ in range(3)] == ["HEIF"] * 3
assert read_photo(sys.argv[2]).format == "JXL"
print(len(calls), "pillow_jxl" in sys.modules)
"""
    out = run_python(code, str(formats / "CAMERA.HEIC"), str(formats / "coffee.JXL"))
    assert out == "1 True"


def test_a_missing_decoder_says_what_to_install(formats: Path) -> None:
    # A Python where pillow-heif cannot be imported (None in sys.modules blocks the import).
    code = """
import sys
sys.modules["pillow_heif"] = None
from lookalike.core.ingest import decode_file
from lookalike.encoders.preprocess import PreprocessConfig
print(decode_file(sys.argv[1], PreprocessConfig(32, (0.5,) * 3, (0.5,) * 3)).error)
"""
    out = run_python(code, str(formats / "CAMERA.HEIC"))
    assert out == "cannot decode HEIC: install pillow-heif"


# -- camera RAW ---------------------------------------------------------------------------

XYZ_TO_SRGB = [3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570]
WHITE = 4095  # 12-bit sensor


def bayer(image: Image.Image) -> np.ndarray:
    """The RGGB mosaic a sensor would record of ``image``, in linear light, 12 bits."""
    linear = (np.asarray(image, np.float64) / 255.0) ** 2.2
    mosaic = np.empty(linear.shape[:2])
    mosaic[0::2, 0::2] = linear[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = linear[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = linear[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = linear[1::2, 1::2, 2]
    return np.round(mosaic * WHITE).astype(np.uint16)


def pidng_dng(image: Image.Image) -> bytes:
    """A DNG written by pidng (a DNG writer) from ``image``'s mosaic, without a preview."""
    pidng = pytest.importorskip("pidng.core", reason="pidng is not installed")
    from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion
    from pidng.defs import PhotometricInterpretation as Photometric
    from pidng.dng import DNGTags, Tag

    width, height = image.size
    tags = DNGTags()
    for tag, value in [
        (Tag.ImageWidth, width),
        (Tag.ImageLength, height),
        (Tag.TileWidth, width),
        (Tag.TileLength, height),
        (Tag.Orientation, 1),
        (Tag.PhotometricInterpretation, Photometric.Color_Filter_Array),
        (Tag.SamplesPerPixel, 1),
        (Tag.BitsPerSample, 12),
        (Tag.CFARepeatPatternDim, [2, 2]),
        (Tag.CFAPattern, CFAPattern.RGGB),
        (Tag.BlackLevel, 0),
        (Tag.WhiteLevel, WHITE),
        (Tag.ColorMatrix1, [[round(v * 10000), 10000] for v in XYZ_TO_SRGB]),
        (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65),
        (Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]]),
        (Tag.Make, "lookalike"),
        (Tag.Model, "pidng test"),
        (Tag.DNGVersion, DNGVersion.V1_4),
    ]:
        tags.set(tag, value)
    writer = pidng.RAW2DNG()
    writer.options(tags, path="", compress=False)
    return bytes(writer.convert(bayer(image)))


def tifffile_dng(image: Image.Image, preview: Image.Image | None, orientation: int = 1) -> bytes:
    """A DNG written with tifffile: IFD0 the preview (a bitmap, as DNG allows) with the DNG
    and camera tags, its SubIFD the sensor mosaic of ``image``."""
    import tifffile

    ccm = [x for v in XYZ_TO_SRGB for x in (round(v * 10000), 10000)]
    first_page = np.asarray(preview if preview is not None else image.resize((64, 64)))
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(
            first_page,
            photometric="rgb",
            subfiletype=1,
            subifds=1,
            metadata=None,
            extratags=[
                (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
                (50707, "B", 4, (1, 1, 0, 0), True),  # DNGBackwardVersion
                (271, "s", 0, "lookalike", True),  # Make
                (272, "s", 0, "tifffile test", True),  # Model
                (274, "H", 1, orientation, True),
                (50708, "s", 0, "lookalike tifffile test", True),  # UniqueCameraModel
                (50721, "2i", 9, ccm, True),  # ColorMatrix1
                (50728, "2I", 3, (1, 1, 1, 1, 1, 1), True),  # AsShotNeutral
                (50778, "H", 1, 21, True),  # CalibrationIlluminant1: D65
            ],
        )
        tif.write(
            bayer(image),
            photometric=32803,  # CFA
            subfiletype=0,
            metadata=None,
            extratags=[
                (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
                (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
                (50714, "H", 1, 0, True),  # BlackLevel
                (50717, "H", 1, WHITE, True),  # WhiteLevel
            ],
        )
    return buffer.getvalue()


def test_a_dng_from_a_real_dng_writer_is_demosaiced() -> None:
    image = photo("astronaut")
    data = pidng_dng(image)
    decoded = read_photo(data, name="IMG_0001.DNG")
    assert (decoded.format, decoded.size, decoded.image.size) == ("RAW", (512, 512), (512, 512))
    assert difference(decoded.image, image) < 15  # demosaiced, colour-converted, gamma-encoded
    assert difference(decoded.image, photo("chelsea").resize((512, 512))) > 50
    assert decoded.exif is not None and decoded.exif[MAKE] == "lookalike"
    # Named or not, DNG bytes go to LibRaw (PIL alone would read only the mosaic's TIFF page).
    assert difference(read_photo(data).image, decoded.image) == 0
    # A draft at most half the size: LibRaw's half-size mode, which skips interpolation.
    assert read_photo(data, name="x.dng", draft_size=200).image.size == (256, 256)


def test_a_large_enough_raw_preview_is_used_else_the_sensor_data() -> None:
    image = photo("coffee").resize((1200, 800))  # the sensor: 1200x800, held upright by tag 6
    upright = image.transpose(Image.Transpose.ROTATE_270)
    big = tifffile_dng(image, image.resize((768, 512)), orientation=6)
    small = tifffile_dng(image, image.resize((240, 160)), orientation=6)

    from_preview = read_photo(big, name="DSC_0001.dng")
    assert from_preview.size == (800, 1200)  # the sensor's size, upright
    assert from_preview.image.size == (512, 768)  # the preview's, upright
    assert difference(from_preview.image, upright.resize((512, 768))) < 3  # a bitmap: exact

    demosaiced = read_photo(small, name="DSC_0002.DNG")
    assert demosaiced.size == demosaiced.image.size == (800, 1200)
    assert difference(demosaiced.image, upright) < 15
    assert demosaiced.exif is not None and demosaiced.exif[ORIENTATION] == 6

    # The threshold is an option; a draft larger than the preview also means demosaicing.
    assert read_photo(small, name="a.dng", raw_preview_min_side=100).image.size == (160, 240)
    assert read_photo(big, name="a.dng", draft_size=600).image.size == (800, 1200)
    with pytest.raises(DecompressionBombError, match=r"a\.dng"):
        read_photo(big, name="a.dng", max_pixels=900_000)


def test_raw_files_are_indexed_and_skipped_beside_a_same_stem_jpeg(tmp_path: Path, encoder) -> None:
    folder = tmp_path / "card"
    folder.mkdir()
    (folder / "IMG_0001.DNG").write_bytes(
        tifffile_dng(photo("rocket"), photo("rocket").resize((640, 427)))
    )
    photo("rocket").save(folder / "img_0001.jpg", quality=92)  # the pair, any case
    (folder / "IMG_0002.dng").write_bytes(tifffile_dng(photo("retina").resize((600, 600)), None))
    (folder / "IMG_0003.NEF").write_bytes(os.urandom(2048))  # not RAW at all: reported
    with Collection(tmp_path / "collection", encoder=encoder) as collection:
        report = collection.index(folder, workers=0)
        assert report.added == 2
        assert report.skipped == [
            (
                str(folder / "IMG_0001.DNG"),
                "RAW file with a JPEG beside it (img_0001.jpg); raw_with_jpeg indexes both",
            )
        ]
        (bad, reason), *others = report.failed
        assert not others and bad == str(folder / "IMG_0003.NEF")
        assert reason.startswith("unsupported image format: LibRaw cannot decode this camera RAW")
        best = collection.search(photo("retina"), k=1)[0]
        assert best.path == str(folder / "IMG_0002.dng")

        both = collection.index(folder, workers=0, rules=ScanRules(raw_with_jpeg=True))
        assert (both.added, both.skipped) == (1, [])
        paths = [r.path for r in collection.search(photo("rocket"), k=2)]
        assert set(paths) == {str(folder / "IMG_0001.DNG"), str(folder / "img_0001.jpg")}
