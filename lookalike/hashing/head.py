"""A trained hash head: raw encoder vectors in, packed binary codes out.

Every method (HashNet, DCH, ITQ, LSH) ends as the same object: a fixed preprocessing of the
raw vectors (L2-normalise, subtract the training mean, scale to unit average variance), a small
stack of layers (linear, with ReLU between layers), and the sign of the last layer's output as
the code bits. Encoding needs numpy only, so serving never loads torch, and the same function
preprocesses training and query vectors.

A head remembers the identity key of the encoder whose vectors it was trained on and refuses
vectors declared to come from any other (:class:`~lookalike.errors.HashModelMismatchError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import HashingError, HashModelMismatchError

FORMAT = "lookalike-hash-head"
FORMAT_VERSION = 1
METHODS: tuple[str, ...] = ("hashnet", "dch", "itq", "lsh")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return unit


@dataclass(frozen=True)
class Preprocessing:
    """``(l2_normalize(v) - mean) * scale``: the one transform of training and query vectors."""

    mean: np.ndarray  # float32 [dim]
    scale: float

    @classmethod
    def fit(cls, raw: np.ndarray) -> Preprocessing:
        """Centre on the mean of the normalised training vectors; scale so that an average
        coordinate has unit variance (keeps the first layer's inputs well conditioned)."""
        unit = l2_normalize(np.asarray(raw, dtype=np.float32))
        mean = unit.mean(axis=0)
        spread = float(np.sqrt(np.mean((unit - mean) ** 2)))
        return cls(mean.astype(np.float32), 1.0 / max(spread, 1e-12))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        unit = l2_normalize(np.asarray(raw, dtype=np.float32))
        scaled: np.ndarray = ((unit - self.mean) * np.float32(self.scale)).astype(np.float32)
        return scaled


@dataclass(frozen=True)
class HashHead:
    """Preprocessing plus layers; the sign of the last layer's output gives ``bits`` bits."""

    method: str
    bits: int
    model_key: str
    preprocessing: Preprocessing
    weights: tuple[np.ndarray, ...]  # float32 [in, out] per layer
    biases: tuple[np.ndarray, ...]  # float32 [out] per layer
    info: dict[str, Any] = field(default_factory=dict)  # training options and measurements

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HashingError(f"unknown hashing method {self.method!r}; expected one of {METHODS}")
        if not self.weights or len(self.weights) != len(self.biases):
            raise HashingError("a hash head needs one bias per weight matrix")
        if self.weights[-1].shape[1] != self.bits:
            raise HashingError(
                f"last layer gives {self.weights[-1].shape[1]} bits, not {self.bits}"
            )

    @property
    def dim(self) -> int:
        """Dimension of the raw vectors the head takes."""
        return int(self.weights[0].shape[0])

    @property
    def code_bytes(self) -> int:
        return -(-self.bits // 8)

    def check_model(self, model_key: str) -> None:
        """Raise ``HashModelMismatchError`` unless ``model_key`` is the training encoder's key."""
        if model_key != self.model_key:
            raise HashModelMismatchError(
                f"this {self.method} head was trained on vectors of {self.model_key}, not of "
                f"{model_key}; train a head for that model"
            )

    def project(self, raw: np.ndarray, *, model_key: str) -> np.ndarray:
        """float32 [n, bits]: the real-valued outputs whose signs are the code bits."""
        self.check_model(model_key)
        vectors = np.asarray(raw, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise HashingError(
                f"the head takes vectors of dimension {self.dim}, got shape {np.shape(raw)}"
            )
        out = self.preprocessing(vectors)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            out = out @ weight + bias
            if layer < len(self.weights) - 1:
                out = np.maximum(out, 0.0)
        return out

    def encode(self, raw: np.ndarray, *, model_key: str) -> np.ndarray:
        """uint8 [n, ceil(bits / 8)]: packed codes (bit = output > 0, first bit highest)."""
        return np.packbits(self.project(raw, model_key=model_key) > 0, axis=1)

    @property
    def fingerprint(self) -> str:
        """A digest of everything that decides the codes: changes when the head is retrained."""
        digest = hashlib.sha256(f"{self.method}/{self.bits}/{self.model_key}".encode())
        for array in (self.preprocessing.mean, *self.weights, *self.biases):
            digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        digest.update(np.float64(self.preprocessing.scale).tobytes())
        return digest.hexdigest()[:16]

    # -- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the head to one ``.npz`` file (no pickles), atomically."""
        path = Path(path)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "bits": self.bits,
            "model_key": self.model_key,
            "scale": self.preprocessing.scale,
            "layers": len(self.weights),
            "info": self.info,
        }
        arrays: dict[str, np.ndarray] = {
            "header": np.array(json.dumps(header)),
            "mean": self.preprocessing.mean,
        }
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"weight{i}"] = weight
            arrays[f"bias{i}"] = bias
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as handle:
                # numpy's stub also matches **kwds against its allow_pickle: bool parameter.
                np.savez(handle, **arrays)  # type: ignore[arg-type]
            os.replace(partial, path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise HashingError(f"cannot write the hash head {path}: {error}") from error
        return path

    @classmethod
    def load(cls, path: str | Path) -> HashHead:
        """Read a file written by :meth:`save`; anything else raises ``HashingError``."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as file:
                header = json.loads(str(file["header"]))
                if header.get("format") != FORMAT:
                    raise HashingError(f"{path}: not a lookalike hash head")
                if header.get("version") != FORMAT_VERSION:
                    raise HashingError(
                        f"{path}: hash head format v{header.get('version')}, this lookalike "
                        f"reads v{FORMAT_VERSION}"
                    )
                layers = int(header["layers"])
                weights = tuple(file[f"weight{i}"].astype(np.float32) for i in range(layers))
                biases = tuple(file[f"bias{i}"].astype(np.float32) for i in range(layers))
                mean = file["mean"].astype(np.float32)
            return cls(
                method=header["method"],
                bits=int(header["bits"]),
                model_key=header["model_key"],
                preprocessing=Preprocessing(mean, float(header["scale"])),
                weights=weights,
                biases=biases,
                info=dict(header.get("info") or {}),
            )
        except HashingError:
            raise
        except FileNotFoundError:
            raise HashingError(f"no hash head at {path}") from None
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
            raise HashingError(f"{path}: unreadable hash head ({error})") from error


def linear_head(
    method: str,
    bits: int,
    model_key: str,
    preprocessing: Preprocessing,
    projection: np.ndarray,
    info: dict[str, Any] | None = None,
) -> HashHead:
    """A one-layer head without bias: the codes are the signs of ``x @ projection``."""
    projection = np.ascontiguousarray(projection, dtype=np.float32)
    return HashHead(
        method=method,
        bits=bits,
        model_key=model_key,
        preprocessing=preprocessing,
        weights=(projection,),
        biases=(np.zeros(bits, dtype=np.float32),),
        info=dict(info or {}),
    )
