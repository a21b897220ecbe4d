"""EXIF and XMP become typed metadata: written into real photos here, read back through the
decoder ingest uses (``read_photo``), stored by indexing, replaced when a file changes.

The helpers that write photos with EXIF, GPS and XMP are shared with test_filters.py.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import pytest
import toy_encoder
from conftest import photo
from PIL import Image

from lookalike.core.collection import Collection
from lookalike.exif import EXIF_KEYS, photo_metadata
from lookalike.images import read_photo

EXIF_IFD, GPS_IFD = 0x8769, 0x8825


# -- writing photos with metadata -----------------------------------------------------------------


def dms(degrees: float) -> tuple[float, float, float]:
    """Degrees as EXIF's (degrees, minutes, seconds), unsigned."""
    value = abs(degrees)
    whole = int(value)
    minutes = (value - whole) * 60
    return float(whole), float(int(minutes)), round((minutes - int(minutes)) * 60, 4)


def exif_block(
    *,
    make: str | None = None,
    model: str | None = None,
    taken: str | None = None,
    offset: str | None = None,
    subsec: str | None = None,
    digitized: str | None = None,
    digitized_offset: str | None = None,
    modified: str | None = None,
    modified_offset: str | None = None,
    lens: str | None = None,
    position: tuple[float, float] | None = None,
    gps: dict[int, Any] | None = None,
    orientation: int | None = None,
) -> Image.Exif:
    """An EXIF block with these tags (dates as EXIF writes them: ``2024:05:01 10:20:30``);
    ``position`` (lat, lon) becomes GPS rationals with N/S/E/W refs, ``gps`` raw GPS tags."""
    exif = Image.Exif()
    for tag, value in ((0x010F, make), (0x0110, model), (0x0112, orientation)):
        if value is not None:
            exif[tag] = value
    if modified is not None:
        exif[0x0132] = modified
    sub = {
        0x9003: taken,
        0x9011: offset,
        0x9291: subsec,
        0x9004: digitized,
        0x9012: digitized_offset,
        0x9010: modified_offset,
        0xA434: lens,
    }
    if any(value is not None for value in sub.values()):
        ifd = exif.get_ifd(EXIF_IFD)
        ifd.update({tag: value for tag, value in sub.items() if value is not None})
    if position is not None or gps is not None:
        tags = exif.get_ifd(GPS_IFD)
        if position is not None:
            lat, lon = position
            tags.update(
                {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
            )
        tags.update(gps or {})
    return exif


def xmp_packet(
    attributes: dict[str, str] | None = None, elements: dict[str, str] | None = None
) -> bytes:
    """An XMP packet as Adobe's tools write it: properties as attributes of rdf:Description
    and as elements inside it."""
    attributes = attributes or {}
    elements = elements or {}
    attrs = "".join(f'\n    {name}="{value}"' for name, value in attributes.items())
    inner = "".join(f"\n   <{name}>{value}</{name}>" for name, value in elements.items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        '    xmlns:exif="http://ns.adobe.com/exif/1.0/"\n'
        '    xmlns:exifEX="http://cipa.jp/exif/1.0/"\n'
        '    xmlns:tiff="http://ns.adobe.com/tiff/1.0/"\n'
        '    xmlns:aux="http://ns.adobe.com/exif/1.0/aux/"\n'
        f'    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"{attrs}>{inner}\n'
        "  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode()


def photo_file(
    name: str,
    *,
    exif: Image.Exif | bytes | None = None,
    xmp: bytes | None = None,
    size: tuple[int, int] | None = (160, 120),
    format: str = "JPEG",
) -> bytes:
    """A real photo (scikit-image's ``name``) encoded with this EXIF and XMP."""
    image = photo(name)
    if size is not None:
        image = image.resize(size)
    options: dict[str, Any] = {}
    if exif is not None:
        options["exif"] = exif.tobytes() if isinstance(exif, Image.Exif) else exif
    if xmp is not None:
        options["xmp"] = xmp
    if format == "HEIF":
        pillow_heif = pytest.importorskip("pillow_heif")
        pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def fields_of(data: bytes, name: str = "<bytes>") -> dict[str, Any]:
    """What ingest stores of a photo file: its typed fields."""
    return photo_metadata(read_photo(data, name=name, draft_size=32))


# -- reading every field ------------------------------------------------------------------------


FULL = {
    "make": "Google",
    "model": "Pixel 7",
    "taken": "2024:05:01 10:20:30",
    "offset": "+02:00",
    "subsec": "12",
    "lens": "Pixel 7 back camera 6.81mm f/1.85",
    "position": (-33.8568, 151.2153),
    "orientation": 6,
}


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP", "HEIF"])
def test_every_field_is_read_from_exif(format: str) -> None:
    data = photo_file("astronaut", exif=exif_block(**FULL), size=(160, 120), format=format)
    fields = fields_of(data, f"photo.{format.lower()}")
    lat, lon = fields.pop("lat"), fields.pop("lon")
    assert lat == pytest.approx(-33.8568, abs=1e-5) and lon == pytest.approx(151.2153, abs=1e-5)
    assert fields == {
        "taken": "2024-05-01T10:20:30.120+02:00",
        "make": "Google",
        "model": "Pixel 7",
        "camera": "Google Pixel 7",
        "lens": "Pixel 7 back camera 6.81mm f/1.85",
        "orientation": 6,
    }
    assert set(fields) | {"lat", "lon"} == set(EXIF_KEYS)


def test_a_photo_without_metadata_has_no_fields() -> None:
    assert fields_of(photo_file("coffee", size=(90, 60))) == {}


@pytest.mark.parametrize(
    ("tags", "taken"),
    [
        # DateTimeOriginal with its own offset, which wins over OffsetTime.
        ({"taken": "2021:01:02 03:04:05", "offset": "-05:00", "modified_offset": "+01:00"},
         "2021-01-02T03:04:05-05:00"),
        # DateTimeOriginal without its offset: OffsetTime stands in.
        ({"taken": "2021:01:02 03:04:05", "modified_offset": "+05:30"},
         "2021-01-02T03:04:05+05:30"),
        # No offset anywhere: the wall-clock time alone.
        ({"taken": "2021:01:02 03:04:05"}, "2021-01-02T03:04:05"),
        # No DateTimeOriginal: DateTimeDigitized, then DateTime.
        ({"digitized": "2020:12:24 18:00:00", "digitized_offset": "+01:00",
          "modified": "2022:01:01 00:00:00"}, "2020-12-24T18:00:00+01:00"),
        ({"modified": "2019:07:14 12:00:00", "modified_offset": "+02:00"},
         "2019-07-14T12:00:00+02:00"),
        # A placeholder original date falls back to the next that is a date.
        ({"taken": "0000:00:00 00:00:00", "modified": "2018:03:03 03:03:03"},
         "2018-03-03T03:03:03"),
        ({"taken": "    :  :     :  :  ", "digitized": "2017:02:02 02:02:02"},
         "2017-02-02T02:02:02"),
        # Sub-seconds, and an offset out of range is no offset.
        ({"taken": "2016:06:06 06:06:06", "subsec": "5", "offset": "+25:00"},
         "2016-06-06T06:06:06.500"),
    ],
)  # fmt: skip
def test_the_date_taken_and_its_offset(tags: dict[str, str], taken: str) -> None:
    assert fields_of(photo_file("chelsea", exif=exif_block(**tags)))["taken"] == taken


def test_xmp_fills_what_exif_lacks() -> None:
    packet = xmp_packet(
        attributes={
            "xmp:CreateDate": "2023-08-09T10:11:12.5+09:00",
            "tiff:Make": "Apple",
            "tiff:Model": "iPhone 13",
            "exif:GPSLatitude": "35,39.5N",
            "exif:GPSLongitude": "139,41.9E",
            "tiff:Orientation": "3",
        },
        elements={"aux:Lens": "iPhone 13 back dual camera &amp; more"},
    )
    fields = fields_of(photo_file("rocket", xmp=packet, size=(100, 80)))
    assert fields.pop("lat") == pytest.approx(35 + 39.5 / 60, abs=1e-6)
    assert fields.pop("lon") == pytest.approx(139 + 41.9 / 60, abs=1e-6)
    assert fields == {
        "taken": "2023-08-09T10:11:12.500+09:00",
        "make": "Apple",
        "model": "iPhone 13",
        "camera": "Apple iPhone 13",
        "lens": "iPhone 13 back dual camera & more",
        "orientation": 3,
    }


def test_xmp_dates_in_order_and_gps_with_seconds_south_and_west() -> None:
    packet = xmp_packet(
        elements={
            "photoshop:DateCreated": "2001-02-03",
            "exif:DateTimeOriginal": "2002-03-04T05:06:07",
            "exif:GPSLatitude": "22,54,30S",
            "exif:GPSLongitude": "43,12.5W",
            "exifEX:LensModel": "EF 50mm f/1.8",
        }
    )
    fields = fields_of(photo_file("retina", xmp=packet))
    assert fields["taken"] == "2002-03-04T05:06:07"
    assert fields["lat"] == pytest.approx(-(22 + 54 / 60 + 30 / 3600), abs=1e-6)
    assert fields["lon"] == pytest.approx(-(43 + 12.5 / 60), abs=1e-6)
    assert fields["lens"] == "EF 50mm f/1.8"


def test_exif_wins_over_xmp_and_xmp_gives_the_offset_of_the_same_moment() -> None:
    exif = exif_block(make="FUJIFILM", model="X-T5", taken="2024:02:29 08:00:00")
    packet = xmp_packet(
        attributes={"exif:DateTimeOriginal": "2024-02-29T08:00:00+01:00", "tiff:Make": "Other"}
    )
    fields = fields_of(photo_file("coffee", exif=exif, xmp=packet))
    assert fields["taken"] == "2024-02-29T08:00:00+01:00"
    assert (fields["make"], fields["camera"]) == ("FUJIFILM", "FUJIFILM X-T5")
    # Another moment in XMP is not this photo's offset.
    packet = xmp_packet(attributes={"exif:DateTimeOriginal": "2024-02-29T09:00:00+01:00"})
    other = fields_of(photo_file("coffee", exif=exif, xmp=packet))
    assert other["taken"] == "2024-02-29T08:00:00"


@pytest.mark.parametrize(
    ("make", "model", "camera"),
    [
        ("Canon", "Canon EOS R5", "Canon EOS R5"),
        ("NIKON CORPORATION", "NIKON D750", "NIKON D750"),
        ("OLYMPUS IMAGING CORP.", "E-M10", "OLYMPUS E-M10"),
        ("EASTMAN KODAK COMPANY", "KODAK EASYSHARE C743", "KODAK EASYSHARE C743"),
        ("samsung", "SM-G991B", "samsung SM-G991B"),
        ("Google\x00\x00", "Pixel 8 Pro  ", "Google Pixel 8 Pro"),
        (None, "iPhone 15", "iPhone 15"),
        ("SONY", None, "SONY"),
    ],
)
def test_the_camera_is_make_and_model_without_the_make_twice(
    make: str | None, model: str | None, camera: str
) -> None:
    fields = fields_of(photo_file("astronaut", exif=exif_block(make=make, model=model)))
    assert fields["camera"] == camera


# -- junk and damage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gps",
    [
        {1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)},  # no fix: zeros
        {1: "N", 2: (48.0, 51.0, 0.0), 3: "E", 4: (2.0, 21.0, 0.0), 9: "V"},  # a void fix
        {1: "N", 2: (95.0, 0.0, 0.0), 3: "E", 4: (2.0, 21.0, 0.0)},  # latitude out of range
        {1: "N", 2: (48.0, 51.0, 0.0)},  # no longitude
    ],
)
def test_gps_junk_is_left_out(gps: dict[int, Any]) -> None:
    fields = fields_of(photo_file("astronaut", exif=exif_block(make="Google", gps=gps)))
    assert "lat" not in fields and "lon" not in fields and fields["make"] == "Google"


def test_a_position_near_but_not_at_zero_is_kept() -> None:
    fields = fields_of(photo_file("astronaut", exif=exif_block(position=(0.0001, -0.0002))))
    assert fields["lat"] == pytest.approx(0.0001, abs=1e-6)
    assert fields["lon"] == pytest.approx(-0.0002, abs=1e-6)


def test_blank_and_impossible_values_are_left_out() -> None:
    exif = exif_block(make="   ", model="\x00\x00", taken="2023:02:30 10:00:00", orientation=9)
    assert fields_of(photo_file("chelsea", exif=exif)) == {}


def _tiff_header_pointing_past_its_end() -> bytes:
    # Little-endian TIFF whose IFD0 holds one entry: the Exif IFD pointer, far past the data.
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<HHHII", 1, EXIF_IFD, 4, 1, 10**6)


# PIL warns of corrupt EXIF while it opens such a file; the test suite makes warnings errors,
# an application does not (and the decoder turns them into errors only when it does).
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + bytes(range(256)) * 4,  # not a TIFF structure at all
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD0 far past the end
        b"Exif\x00\x00" + _tiff_header_pointing_past_its_end(),
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02",  # cut off inside IFD0
    ],
)
def test_malformed_exif_never_fails_the_image(exif: bytes, tmp_path: Path) -> None:
    data = photo_file("coffee", exif=exif, size=(120, 90))
    assert fields_of(data) == {}
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(data)
    with Collection(tmp_path / "collection", model=toy_encoder.NAME) as collection:
        report = collection.index(folder, workers=0)
        assert (report.added, report.failed) == (1, [])
        (record,) = collection.catalog.images(list(collection.catalog.paths().values())).values()
        assert (record.metadata, record.width, record.height) == ({}, 120, 90)


def test_a_damaged_gps_ifd_keeps_the_other_fields() -> None:
    # Rationals with zero denominators read as NaN: the position goes, the camera stays.
    from PIL.TiffImagePlugin import IFDRational

    nan = (IFDRational(1, 0), IFDRational(0, 0), IFDRational(0, 0))
    gps = {1: "N", 2: nan, 3: "E", 4: nan}
    fields = fields_of(photo_file("rocket", exif=exif_block(make="Canon", model="EOS R", gps=gps)))
    assert fields["camera"] == "Canon EOS R" and "lat" not in fields


# -- indexing -----------------------------------------------------------------------------------


def test_indexing_stores_the_fields_and_a_changed_file_replaces_them_keeping_csv_metadata(
    tmp_path: Path, catalog_db
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    first = exif_block(**FULL)
    (folder / "trip.jpg").write_bytes(photo_file("astronaut", exif=first, size=(160, 120)))
    (folder / "plain.jpg").write_bytes(photo_file("coffee", size=(64, 48)))
    labels = tmp_path / "labels.csv"
    labels.write_text("file,title,camera_owner\ntrip.jpg,Sydney,Ana\nplain.jpg,Mug,Bo\n")
    with Collection(tmp_path / "collection", db=catalog_db(), model=toy_encoder.NAME) as collection:
        collection.index(folder, workers=0, metadata_csv=labels)
        by_name = {Path(r.path).name: r for r in _records(collection)}
        trip = by_name["trip.jpg"].metadata
        assert trip["taken"] == "2024-05-01T10:20:30.120+02:00"
        assert trip["camera"] == "Google Pixel 7" and trip["title"] == "Sydney"
        assert trip["lat"] == pytest.approx(-33.8568, abs=1e-5)
        # Orientation 6 turns the 160 x 120 pixels upright: the photo is 120 wide.
        assert (by_name["trip.jpg"].width, by_name["trip.jpg"].height) == (120, 160)
        assert by_name["plain.jpg"].metadata == {"title": "Mug", "camera_owner": "Bo"}

        # The same file edited: another camera, no GPS, no lens, a new date.
        second = exif_block(make="Canon", model="Canon EOS R5", taken="2025:01:02 03:04:05")
        (folder / "trip.jpg").write_bytes(photo_file("astronaut", exif=second, size=(200, 100)))
        report = collection.index(folder, workers=0)  # no CSV this time
        assert (report.updated, report.unchanged) == (1, 1)
        edited = {Path(r.path).name: r for r in _records(collection)}["trip.jpg"]
        assert (edited.width, edited.height) == (200, 100)
        assert edited.metadata == {
            "taken": "2025-01-02T03:04:05",
            "make": "Canon",
            "model": "Canon EOS R5",
            "camera": "Canon EOS R5",
            "title": "Sydney",
            "camera_owner": "Ana",
        }


def _records(collection: Collection) -> list[Any]:
    return list(collection.catalog.images(list(collection.catalog.paths().values())).values())
