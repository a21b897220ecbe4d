"""Typed photo metadata from EXIF and XMP: when, with what camera and lens, and where.

:func:`photo_metadata` reads what decoding already has in memory (the file's EXIF block and
its XMP packet, as :func:`lookalike.images.read_photo` returns them): no second read of the
file. It returns only the fields the photo has, as JSON-ready values:

- ``taken``: ISO 8601, ``2024-05-01T10:20:30`` or with sub-seconds and the UTC offset when the
  file records one (``2024-05-01T10:20:30.120+02:00``). EXIF DateTimeOriginal, else
  DateTimeDigitized, else DateTime, each with its OffsetTime* (else OffsetTime) and
  SubSecTime*; XMP (exif:DateTimeOriginal, xmp:CreateDate, photoshop:DateCreated) when EXIF
  has no date, or for the offset of the same wall-clock time;
- ``make``, ``model``, ``camera`` (make and model as one name, without the make twice),
  ``lens``;
- ``lat``, ``lon``: degrees, south and west negative (the GPS IFD, else XMP's
  ``exif:GPSLatitude``); a void fix or an exact 0,0 is left out as junk;
- ``orientation``: the EXIF orientation, 1 to 8.

The pixel size is not repeated here: the catalog record holds it already (``width``,
``height``: the full upright size from the same read), and filters and sorting read it under
those names.

Malformed metadata never fails an image: a field that cannot be read is left out.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["EXIF_KEYS", "PhotoFields", "metadata_of", "photo_metadata"]

_T = TypeVar("_T")

# Every key photo_metadata can write: re-indexing a changed file replaces exactly these.
EXIF_KEYS = (
    "taken",
    "make",
    "model",
    "camera",
    "lens",
    "lat",
    "lon",
    "orientation",
)

# IFD pointers and tags (EXIF 2.32 / CIPA DC-008).
_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_ORIGINAL, _DIGITIZED = 0x9003, 0x9004
_OFFSET, _OFFSET_ORIGINAL, _OFFSET_DIGITIZED = 0x9010, 0x9011, 0x9012
_SUBSEC, _SUBSEC_ORIGINAL, _SUBSEC_DIGITIZED = 0x9290, 0x9291, 0x9292
_LENS_MODEL = 0xA434
_GPS_STATUS = 0x09
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 0x01, 0x02, 0x03, 0x04

# (date tag, its offset tag, its sub-second tag), most telling first.
_DATE_TAGS = (
    (_ORIGINAL, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL),
    (_DIGITIZED, _OFFSET_DIGITIZED, _SUBSEC_DIGITIZED),
    (_DATETIME, _OFFSET, _SUBSEC),
)

# EXIF dates are "YYYY:MM:DD HH:MM:SS"; some writers use dashes or a T, or drop the seconds.
_EXIF_DATE = re.compile(
    r"\s*(\d{4})[:\-](\d{2})[:\-](\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?"
    r"\s*(Z|[+\-]\d{2}:?\d{2})?\s*"
)
_OFFSET_TEXT = re.compile(r"\s*(Z|[+\-]\d{2}:?\d{2})\s*")
_XMP_GPS = re.compile(
    r"\s*(\d{1,3}),(\d{1,2}(?:\.\d+)?)(?:,(\d{1,2}(?:\.\d+)?))?\s*([NSEWnsew])\s*"
)
_XMP_DATE_PROPERTIES = ("exif:DateTimeOriginal", "xmp:CreateDate", "photoshop:DateCreated")
_XMP_LENS_PROPERTIES = ("aux:Lens", "exifEX:LensModel")
# The most of an XMP packet searched (a packet in a JPEG is at most 64 KB; sidecar-sized
# extended packets add nothing these fields need).
_XMP_LIMIT = 256 * 1024
# Maker names carry company suffixes that a camera's name does without.
_MAKE_SUFFIX = re.compile(
    r"[\s,]+(corporation|corp\.?|co\.?,?\s*ltd\.?|company|imaging|optical|"
    r"electric|camera|digital solutions)\b.*$",
    re.IGNORECASE,
)


class PhotoFields(Protocol):
    """What :func:`photo_metadata` reads of a decoded photo (``lookalike.images.Photo``)."""

    @property
    def exif(self) -> Image.Exif | None: ...

    @property
    def xmp(self) -> bytes | None: ...


def photo_metadata(photo: PhotoFields) -> dict[str, Any]:
    """The typed fields of a decoded photo's EXIF and XMP (see the module docstring), only
    those it has."""
    return metadata_of(photo.exif, photo.xmp)


def metadata_of(exif: Image.Exif | None, xmp: bytes | str | None) -> dict[str, Any]:
    """The typed fields of an EXIF block and an XMP packet, only those present and readable;
    XMP fills what EXIF lacks."""
    ifd0, exif_ifd, gps_ifd = _ifds(exif)
    properties = _XmpProperties(xmp)
    fields: dict[str, Any] = {}
    taken = _guarded(_exif_taken, ifd0, exif_ifd)
    if taken is None or taken.tzinfo is None:
        # XMP's date when EXIF has none; Lightroom and phones also write the moment EXIF
        # has to XMP with its offset.
        xmp_taken = _guarded(_xmp_taken, properties)
        if taken is None:
            taken = xmp_taken
        elif _same_moment_with_offset(taken, xmp_taken):
            assert xmp_taken is not None
            taken = taken.replace(tzinfo=xmp_taken.tzinfo)
    if taken is not None:
        fields["taken"] = _iso(taken)
    make = _text(ifd0.get(_MAKE)) or properties.text("tiff:Make")
    model = _text(ifd0.get(_MODEL)) or properties.text("tiff:Model")
    if make:
        fields["make"] = make
    if model:
        fields["model"] = model
    camera = _camera(make, model)
    if camera:
        fields["camera"] = camera
    lens = _text(exif_ifd.get(_LENS_MODEL)) or next(
        (value for name in _XMP_LENS_PROPERTIES if (value := properties.text(name))), None
    )
    if lens:
        fields["lens"] = lens
    position = _guarded(_gps_position, gps_ifd) or _guarded(_xmp_position, properties)
    if position is not None:
        fields["lat"], fields["lon"] = position
    orientation = _orientation(ifd0.get(_ORIENTATION))
    if orientation is None:
        orientation = _orientation(properties.text("tiff:Orientation"))
    if orientation is not None:
        fields["orientation"] = orientation
    return fields


# -- EXIF ---------------------------------------------------------------------------------------


def _ifds(
    exif: Image.Exif | None,
) -> tuple[Mapping[int, Any], Mapping[int, Any], Mapping[int, Any]]:
    """IFD0, the Exif IFD and the GPS IFD; an unreadable one is empty."""
    if exif is None:
        return {}, {}, {}
    ifd0: Mapping[int, Any] = _guarded(dict, exif) or {}
    exif_ifd: Mapping[int, Any] = _guarded(exif.get_ifd, _EXIF_IFD) or {}
    gps_ifd: Mapping[int, Any] = _guarded(exif.get_ifd, _GPS_IFD) or {}
    return ifd0, exif_ifd, gps_ifd


def _exif_taken(ifd0: Mapping[int, Any], exif_ifd: Mapping[int, Any]) -> datetime | None:
    def tag(number: int) -> Any:
        # Some writers put Exif-IFD tags in IFD0; the Exif IFD is where they belong.
        return exif_ifd.get(number, ifd0.get(number))

    fallback_offset = _offset(tag(_OFFSET))
    for date_tag, offset_tag, subsec_tag in _DATE_TAGS:
        moment = _parse_date(_text(tag(date_tag)))
        if moment is None:
            continue
        if moment.tzinfo is None:
            offset = _offset(tag(offset_tag)) or fallback_offset
            if offset is not None:
                moment = moment.replace(tzinfo=offset)
        digits = _text(tag(subsec_tag))
        if digits and digits.isdigit() and moment.microsecond == 0:
            moment = moment.replace(microsecond=int(digits[:6].ljust(6, "0")))
        return moment
    return None


def _same_moment_with_offset(taken: datetime, other: datetime | None) -> bool:
    """Whether ``other`` is ``taken`` (an offset-less time) to the second, with an offset."""
    if taken.tzinfo is not None or other is None or other.tzinfo is None:
        return False
    return other.replace(tzinfo=None, microsecond=0) == taken.replace(microsecond=0)


def _parse_date(text: str | None) -> datetime | None:
    """A date from EXIF or XMP text; None for blanks, zeros and impossible dates."""
    if not text:
        return None
    match = _EXIF_DATE.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
        )
    except ValueError:
        return None  # "0000:00:00 00:00:00" and other placeholders
    if moment.year < 1826:  # before the first photograph: a placeholder
        return None
    offset = _offset(zone)
    return moment if offset is None else moment.replace(tzinfo=offset)


def _offset(value: Any) -> timezone | None:
    """A UTC offset from "+02:00", "-0530" or "Z"; None when absent or out of range."""
    text = _text(value)
    match = _OFFSET_TEXT.fullmatch(text) if text else None
    if match is None:
        return None
    zone = match.group(1)
    if zone == "Z":
        return timezone.utc
    digits = zone[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + int(digits[2:])
    if minutes > 14 * 60 or int(digits[2:]) >= 60:
        return None
    return timezone(timedelta(minutes=-minutes if zone[0] == "-" else minutes))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")


def _gps_position(gps: Mapping[int, Any]) -> tuple[float, float] | None:
    if not gps or _text(gps.get(_GPS_STATUS)) == "V":  # V: the fix was void
        return None
    lat = _degrees(gps.get(_GPS_LAT), _text(gps.get(_GPS_LAT_REF)), "S")
    lon = _degrees(gps.get(_GPS_LON), _text(gps.get(_GPS_LON_REF)), "W")
    return _position(lat, lon)


def _degrees(value: Any, ref: str | None, negative: str) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals (or a single number)."""
    if value is None:
        return None
    parts = list(value) if isinstance(value, tuple | list) else [value]
    if not 1 <= len(parts) <= 3:
        return None
    numbers = [float(part) for part in parts]
    degrees = sum(n / 60.0**i for i, n in enumerate(numbers))
    if ref and ref.strip().upper().startswith(negative):
        degrees = -abs(degrees)
    return degrees


def _position(lat: float | None, lon: float | None) -> tuple[float, float] | None:
    """A position in range, rounded to about a centimetre; exact 0,0 (a camera without a fix
    writes zeros) and anything non-finite or out of range is left out."""
    if lat is None or lon is None or not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180) or (lat == 0 and lon == 0):
        return None
    return round(lat, 7), round(lon, 7)


def _orientation(value: Any) -> int | None:
    try:
        number = int(str(value).strip()) if isinstance(value, str) else value
    except ValueError:
        return None
    if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 8:
        return number
    return None


def _text(value: Any) -> str | None:
    """An ASCII EXIF or XMP value as clean text (NUL padding and blanks removed)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    cleaned = value.replace("\x00", " ").strip()
    return cleaned or None


def _camera(make: str | None, model: str | None) -> str | None:
    """Make and model as one name: "Google Pixel 7", "Canon EOS R5" (not "Canon Canon EOS
    R5"), "NIKON D750" (not "NIKON CORPORATION NIKON D750")."""
    if not model:
        return make
    if not make:
        return model
    brand = _MAKE_SUFFIX.sub("", make).strip() or make
    if any(model.lower().startswith(word.lower()) for word in brand.split()):
        return model
    return f"{brand} {model}"


# -- XMP ----------------------------------------------------------------------------------------


class _XmpProperties:
    """Simple XMP properties by their conventional prefixed names, found as attributes
    (``exif:Make="..."``) or elements (``<exif:Make>...</exif:Make>``). Regular expressions
    instead of an XML parser: no entity expansion on untrusted files, and cheaper."""

    def __init__(self, packet: bytes | str | None) -> None:
        if isinstance(packet, bytes | bytearray):
            packet = bytes(packet[:_XMP_LIMIT]).decode("utf-8", "replace")
        self.packet = packet[:_XMP_LIMIT] if packet else ""

    def text(self, name: str) -> str | None:
        if not self.packet or name not in self.packet:
            return None
        escaped = re.escape(name)
        found = re.search(rf'[\s<]{escaped}\s*=\s*(["\'])(.*?)\1', self.packet, re.DOTALL)
        if found is None:
            found = re.search(
                rf"<{escaped}(?:\s[^>]*)?>(?:\s*<rdf:(?:Alt|Seq|Bag)>\s*<rdf:li[^>]*>)?"
                rf"([^<]*)<",
                self.packet,
            )
            value = found.group(1) if found else None
        else:
            value = found.group(2)
        return _text(html.unescape(value)) if value is not None else None


def _xmp_taken(properties: _XmpProperties) -> datetime | None:
    for name in _XMP_DATE_PROPERTIES:
        moment = _parse_date(properties.text(name))
        if moment is not None:
            return moment
    return None


def _xmp_position(properties: _XmpProperties) -> tuple[float, float] | None:
    lat = _xmp_degrees(properties.text("exif:GPSLatitude"))
    lon = _xmp_degrees(properties.text("exif:GPSLongitude"))
    return _position(lat, lon)


def _xmp_degrees(text: str | None) -> float | None:
    """XMP's GPS coordinate: "DDD,MM,SSk" or "DDD,MM.mmk" (k one of N, S, E, W)."""
    match = _XMP_GPS.fullmatch(text) if text else None
    if match is None:
        return None
    degrees, minutes, seconds, ref = match.groups()
    value = int(degrees) + float(minutes) / 60 + float(seconds or 0) / 3600
    return -value if ref.upper() in "SW" else value


def _guarded(function: Callable[..., _T], *args: Any) -> _T | None:
    """``function(*args)``, or None when the metadata it reads is malformed: whatever a
    broken EXIF block makes PIL raise, the image itself still indexes."""
    try:
        return function(*args)
    except Exception:
        return None
