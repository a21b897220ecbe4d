"""SIFT keypoints with RootSIFT descriptors, small enough to store with every image.

An image is turned to grayscale and shrunk so that its longer side is at most
``SiftConfig.max_side`` pixels; the ``max_keypoints`` strongest SIFT keypoints are kept. Each
keypoint is stored as its position in that shrunk frame (float16) and a RootSIFT descriptor
(L1-normalised, square-rooted, so that Euclidean distance compares like the Hellinger kernel)
quantised to uint8: 132 bytes a keypoint, about 34 KB for 256 keypoints.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lookalike.images import ImageSource, in_mode, load_image
from lookalike.local.errors import CorruptLocalFeaturesError, LocalFeaturesError

if TYPE_CHECKING:
    from types import ModuleType

DESCRIPTOR_DIM = 128
FORMAT_VERSION = 1
_MAGIC = b"LKLF"
# magic, format version, descriptor dim, keypoint count, frame width, frame height, scale, crc32
_HEADER = struct.Struct("<4sBBHHHfI")
_EXIF_ORIENTATION = 0x0112
# SIFT positions are sub-pixel estimates; anything this far outside the frame is corruption.
_POSITION_SLACK = 2.0


def opencv() -> ModuleType:
    """The ``cv2`` module, or ``LocalFeaturesError`` saying how to install it."""
    try:
        import cv2
    except ImportError as error:  # the rest of lookalike works without OpenCV
        raise LocalFeaturesError(
            "local features need OpenCV: pip install opencv-python-headless"
        ) from error
    return cv2


@dataclass(frozen=True)
class SiftConfig:
    """How local features are extracted. ``kind`` names the configuration in the catalog, so
    features extracted differently are never compared with each other."""

    max_side: int = 512
    max_keypoints: int = 256
    # Half OpenCV's default (0.04): smooth product photos otherwise have too few keypoints
    # (on clothing-small the worst crop kept 4 inliers at 0.04, 47 at 0.02), and the cap on
    # keypoints still keeps the strongest where texture is rich.
    contrast_threshold: float = 0.02

    def __post_init__(self) -> None:
        if not 16 <= self.max_side <= 65_535:
            raise LocalFeaturesError(f"max_side must be in 16..65535, got {self.max_side}")
        if not 1 <= self.max_keypoints <= 65_535:
            raise LocalFeaturesError(f"max_keypoints must be in 1..65535, got {self.max_keypoints}")
        if not self.contrast_threshold > 0:
            raise LocalFeaturesError("contrast_threshold must be positive")

    @property
    def kind(self) -> str:
        return f"rootsift-{self.max_side}-{self.max_keypoints}-c{self.contrast_threshold:g}"


DATABASE_CONFIG = SiftConfig()
# A query is not stored, so it can afford more keypoints: more chances to hit the few that
# each database image kept, at no storage cost.
QUERY_CONFIG = SiftConfig(max_keypoints=1024)


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """Keypoints of one image: ``points`` float16 [n, 2] (x, y in the shrunk frame of
    ``width`` x ``height``), ``descriptors`` uint8 [n, 128] (RootSIFT * 255), and ``scale``,
    original pixels per shrunk pixel."""

    points: np.ndarray
    descriptors: np.ndarray
    width: int
    height: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        points = np.ascontiguousarray(self.points, dtype=np.float16).reshape(-1, 2)
        descriptors = np.ascontiguousarray(self.descriptors, dtype=np.uint8)
        if descriptors.ndim != 2 or descriptors.shape[1] != DESCRIPTOR_DIM:
            raise LocalFeaturesError(
                f"descriptors must be [n, {DESCRIPTOR_DIM}], got {descriptors.shape}"
            )
        if len(points) != len(descriptors):
            raise LocalFeaturesError(f"{len(points)} points but {len(descriptors)} descriptors")
        if len(points) > 65_535:
            raise LocalFeaturesError(f"at most 65535 keypoints, got {len(points)}")
        if not (1 <= self.width <= 65_535 and 1 <= self.height <= 65_535):
            raise LocalFeaturesError(f"bad frame size {self.width}x{self.height}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise LocalFeaturesError(f"scale must be positive, got {self.scale}")
        # Frozen dataclass: normalised arrays are set through object.__setattr__.
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "descriptors", descriptors)
        object.__setattr__(self, "scale", float(np.float32(self.scale)))

    def __len__(self) -> int:
        return len(self.points)

    @property
    def nbytes(self) -> int:
        """Size of ``to_bytes()``."""
        return _HEADER.size + self.points.nbytes + self.descriptors.nbytes

    def to_bytes(self) -> bytes:
        """A compact, versioned, checksummed encoding (read back with ``from_bytes``)."""
        payload = self.points.astype("<f2").tobytes() + self.descriptors.tobytes()
        header = _HEADER.pack(
            _MAGIC,
            FORMAT_VERSION,
            DESCRIPTOR_DIM,
            len(self.points),
            self.width,
            self.height,
            self.scale,
            zlib.crc32(payload),
        )
        return header + payload

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, *, check: bool = True
    ) -> LocalFeatures:
        """Decode ``to_bytes()`` output; anything else raises ``CorruptLocalFeaturesError``.
        ``check=False`` skips the checksum and the keypoint bounds and shares ``data``'s
        memory (read-only): for scans of every stored image, where the few that are used
        are decoded again with checks."""
        if not check:
            return cls._unchecked(data)
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise CorruptLocalFeaturesError(
                f"local features truncated: {len(data)} bytes, the header alone is {_HEADER.size}"
            )
        magic, version, dim, count, width, height, scale, crc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise CorruptLocalFeaturesError("not lookalike local features (bad magic)")
        if version != FORMAT_VERSION:
            raise CorruptLocalFeaturesError(
                f"local features format version {version}; this lookalike reads {FORMAT_VERSION}"
            )
        if dim != DESCRIPTOR_DIM:
            raise CorruptLocalFeaturesError(f"descriptor dimension {dim}, expected 128")
        expected = _HEADER.size + count * (4 + DESCRIPTOR_DIM)
        if len(data) != expected:
            raise CorruptLocalFeaturesError(
                f"local features of {count} keypoints need {expected} bytes, got {len(data)}"
            )
        payload = data[_HEADER.size :]
        if zlib.crc32(payload) != crc:
            raise CorruptLocalFeaturesError("local features checksum mismatch")
        if width < 1 or height < 1 or not (np.isfinite(scale) and scale > 0):
            raise CorruptLocalFeaturesError(f"bad frame {width}x{height} or scale {scale}")
        points = np.frombuffer(payload, dtype="<f2", count=2 * count).reshape(count, 2)
        descriptors = np.frombuffer(payload, dtype=np.uint8, offset=4 * count).reshape(
            count, DESCRIPTOR_DIM
        )
        inside = (
            np.isfinite(points).all()
            and (points >= -_POSITION_SLACK).all()
            and (points[:, 0] <= width + _POSITION_SLACK).all()
            and (points[:, 1] <= height + _POSITION_SLACK).all()
        )
        if not inside:
            raise CorruptLocalFeaturesError("local features have keypoints outside their frame")
        return cls(points.astype(np.float16), descriptors.copy(), width, height, scale)

    @classmethod
    def _unchecked(cls, data: bytes | bytearray | memoryview) -> LocalFeatures:
        view = memoryview(data)
        if len(view) < _HEADER.size:
            raise CorruptLocalFeaturesError("local features truncated")
        magic, version, dim, count, width, height, scale, _ = _HEADER.unpack_from(view)
        if magic != _MAGIC or version != FORMAT_VERSION or dim != DESCRIPTOR_DIM:
            raise CorruptLocalFeaturesError("not lookalike local features of this version")
        if len(view) != _HEADER.size + count * (4 + DESCRIPTOR_DIM):
            raise CorruptLocalFeaturesError("local features of the wrong length")
        if width < 1 or height < 1 or not (np.isfinite(scale) and scale > 0):
            raise CorruptLocalFeaturesError(f"bad frame {width}x{height} or scale {scale}")
        points = np.frombuffer(view, dtype="<f2", count=2 * count, offset=_HEADER.size)
        descriptors = np.frombuffer(
            view, dtype=np.uint8, count=count * DESCRIPTOR_DIM, offset=_HEADER.size + 4 * count
        )
        return cls(
            points.reshape(count, 2),
            descriptors.reshape(count, DESCRIPTOR_DIM),
            width,
            height,
            scale,
        )


def _as_image(image: ImageSource, config: SiftConfig) -> Image.Image:
    if isinstance(image, Image.Image) and image.mode in ("RGB", "L"):
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in (None, 1):
            return image  # already upright, as load_image returns it: no copy needed
    return load_image(image, draft_size=config.max_side)


def extract(image: ImageSource, config: SiftConfig = DATABASE_CONFIG) -> LocalFeatures:
    """SIFT keypoints and RootSIFT descriptors of any image input (see ``load_image``).

    Raises ``ImageError`` for unreadable input and ``LocalFeaturesError`` without OpenCV.
    """
    cv2 = opencv()
    pil = _as_image(image, config)
    width, height = pil.size
    factor = min(1.0, config.max_side / max(width, height))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    pixels = frame_grey(pil, *size)
    sift = cv2.SIFT_create(
        nfeatures=config.max_keypoints, contrastThreshold=config.contrast_threshold
    )
    keypoints, descriptors = sift.detectAndCompute(pixels, None)
    if descriptors is None or not keypoints:
        points = np.zeros((0, 2), dtype=np.float32)
        quantised = np.zeros((0, DESCRIPTOR_DIM), dtype=np.uint8)
    else:
        # OpenCV may keep a few more than nfeatures on ties; keep the strongest, stably.
        order = np.argsort([-k.response for k in keypoints], kind="stable")
        order = order[: config.max_keypoints]
        points = np.array([keypoints[i].pt for i in order], dtype=np.float32).reshape(-1, 2)
        quantised = root_sift(descriptors[order])
    return LocalFeatures(
        points=points,
        descriptors=quantised,
        width=pixels.shape[1],
        height=pixels.shape[0],
        scale=max(width, height) / max(pixels.shape),
    )


def frame_grey(image: Image.Image, width: int, height: int) -> np.ndarray:
    """An image as grey uint8 [height, width], resized as ``extract`` sees it: the frame its
    keypoints' coordinates refer to (the pixel test aligns these, see ``local.alignment``)."""
    grey = in_mode(image, "L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(grey)


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """uint8 [n, 128] RootSIFT * 255 of raw SIFT descriptors [n, 128] (any non-negative)."""
    values = np.asarray(descriptors, dtype=np.float32)
    total = values.sum(axis=1, keepdims=True)
    normalised = np.sqrt(values / np.maximum(total, 1e-12))
    # sqrt of an L1-normalised vector is L2-unit, so every component is <= 1: no clipping.
    codes: np.ndarray = np.rint(normalised * 255.0).astype(np.uint8)
    return codes


def load_features(data: Any) -> LocalFeatures:
    """``LocalFeatures.from_bytes`` that also accepts ``LocalFeatures`` (returned as is)."""
    return data if isinstance(data, LocalFeatures) else LocalFeatures.from_bytes(data)
