"""What reading EXIF and XMP costs per image at ingest, next to the decode it rides on.

``photo_metadata`` reads the EXIF block and XMP packet that ``read_photo`` already holds (no
second read of the file); this times it on photos freshly decoded, so that the lazy parsing
of the Exif and GPS IFDs is counted, against ``read_photo`` itself (JPEG draft decode for a
224-pixel model, as ingest does). Photos are scikit-image's, resized to a phone-like
4032 x 3024, saved as JPEG with a full EXIF block (camera, lens, dates with offset, GPS) and an
XMP packet; and the same without any metadata. CPU time on one thread.

    python benchmarks/exif_cost.py [--n 60]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from PIL import Image
from skimage import data

from lookalike.exif import photo_metadata
from lookalike.images import read_photo

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
SIZE = (4032, 3024)
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    b'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:aux="http://ns.adobe.com/exif/1.0/aux/" '
    b'xmp:CreateDate="2024-05-01T10:20:30+02:00" aux:Lens="Pixel 7 back camera"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def exif_block() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Google", "Pixel 7", 6
    exif[0x0132] = "2024:05:01 10:20:30"
    ifd = exif.get_ifd(0x8769)
    ifd.update({0x9003: "2024:05:01 10:20:30", 0x9004: "2024:05:01 10:20:30", 0x9011: "+02:00"})
    ifd.update({0x9291: "120", 0xA434: "Pixel 7 back camera 6.81mm f/1.85"})
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (48.0, 51.0, 30.24), 3: "E", 4: (2.0, 17.0, 40.2)})
    return exif


def files(with_metadata: bool) -> list[bytes]:
    made = []
    for name in NAMES:
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize(SIZE)
        buffer = io.BytesIO()
        extra = {"exif": exif_block().tobytes(), "xmp": XMP} if with_metadata else {}
        image.save(buffer, "JPEG", quality=90, **extra)
        made.append(buffer.getvalue())
    return made


def measure(blobs: list[bytes], n: int) -> tuple[list[float], list[float], dict[str, object]]:
    decode, metadata = [], []
    fields: dict[str, object] = {}
    for i in range(n):
        blob = blobs[i % len(blobs)]
        started = time.process_time_ns()
        photo = read_photo(blob, draft_size=224)
        decoded = time.process_time_ns()
        fields = photo_metadata(photo)
        done = time.process_time_ns()
        decode.append((decoded - started) / 1e3)
        metadata.append((done - decoded) / 1e3)
    return decode, metadata, fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60)
    args = parser.parse_args()
    print(f"{args.n} JPEGs of {SIZE[0]} x {SIZE[1]}, one thread, CPU microseconds per image")
    print("| photos | read_photo (draft 224) | photo_metadata | metadata / decode |")
    print("|---|---:|---:|---:|")
    read = {}
    for label, with_metadata in (("EXIF + GPS + XMP", True), ("no metadata", False)):
        blobs = files(with_metadata)
        measure(blobs, len(blobs))  # warm-up: imports, caches
        decode, metadata, fields = measure(blobs, args.n)
        d, m = statistics.median(decode), statistics.median(metadata)
        print(f"| {label} | {d:,.0f} | {m:,.0f} | {m / d:.1%} |")
        read[label] = sorted(fields)
    for label, names in read.items():
        print(f"\nfields read ({label}): {', '.join(names) or 'none'}")


if __name__ == "__main__":
    main()
