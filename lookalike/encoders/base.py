"""The Encoder protocol, what an encoder can do (its capabilities), and the shared embedding
loop. Encoders are built by name through :mod:`lookalike.encoders.registry`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lookalike.encoders.preprocess import PreprocessConfig, resize_for_model
from lookalike.errors import EncoderError
from lookalike.images import ImageSource, load_image


@dataclass(frozen=True)
class EncoderIdentity:
    """Everything that decides which vectors an encoder produces; vectors of two encoders with
    different identities must never be compared."""

    model: str
    layer: str
    dim: int
    weights_sha256: str
    preprocess: PreprocessConfig
    pooling: str = "avg"
    scales: tuple[float, ...] = (1.0,)
    # The arithmetic the network ran in: "fp32", or "bf16" (OpenVINO's fast CPU path), whose
    # vectors differ slightly from fp32 ones and are never mixed with them.
    precision: str = "fp32"

    @property
    def key(self) -> str:
        """A short stable string naming this identity, used by the catalog.

        Pooling, scales and precision appear only when they differ from plain single-scale
        average pooling in fp32, so keys of vectors stored before those options existed stay
        the same.
        """
        key = f"{self.model}/{self.layer}/{self.dim}/{self.weights_sha256[:12]}"
        if self.pooling != "avg":
            key += f"/{self.pooling}"
        if tuple(self.scales) != (1.0,):
            key += "/ms" + "+".join(f"{s:g}" for s in self.scales)
        if self.precision != "fp32":
            key += f"/{self.precision}"
        return key

    def to_json(self) -> dict[str, Any]:
        """Every field as plain JSON, for the manifests of prepared models."""
        return {
            "model": self.model,
            "layer": self.layer,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.to_dict(),
            "pooling": self.pooling,
            "scales": list(self.scales),
            "precision": self.precision,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EncoderIdentity:
        """The identity :meth:`to_json` wrote (fp32 when it names no precision)."""
        preprocess = dict(data["preprocess"])
        for name in ("mean", "std"):
            preprocess[name] = tuple(preprocess[name])
        return cls(
            model=str(data["model"]),
            layer=str(data["layer"]),
            dim=int(data["dim"]),
            weights_sha256=str(data["weights_sha256"]),
            preprocess=PreprocessConfig(**preprocess),
            pooling=str(data["pooling"]),
            scales=tuple(float(s) for s in data["scales"]),
            precision=str(data.get("precision", "fp32")),
        )


@dataclass(frozen=True)
class EncoderCapabilities:
    """What an encoder can do beyond embedding images; callers ask this instead of probing
    for methods. ``text``: ``encode_text`` embeds text into the image space. ``patch_tokens``:
    ``patch_tokens`` / ``patch_tokens_pixels`` give per-patch tokens for local matching.
    ``poolings``: the pooling choices its factory takes as ``pooling=`` (empty: none)."""

    text: bool = False
    patch_tokens: bool = False
    poolings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON, for the manifests of prepared models."""
        return {
            "text": self.text,
            "patch_tokens": self.patch_tokens,
            "poolings": list(self.poolings),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EncoderCapabilities:
        """The capabilities :meth:`to_json` wrote."""
        return cls(
            text=bool(data["text"]),
            patch_tokens=bool(data["patch_tokens"]),
            poolings=tuple(data["poolings"]),
        )


NO_CAPABILITIES = EncoderCapabilities()


@runtime_checkable
class Encoder(Protocol):
    """Turns images into float32 vectors of a fixed dimension."""

    identity: EncoderIdentity
    normalize: bool

    @property
    def capabilities(self) -> EncoderCapabilities: ...

    @property
    def dim(self) -> int: ...

    @property
    def preprocess(self) -> PreprocessConfig: ...

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, res, res, 3] arrays (already resized) -> float32 [n, dim]."""
        ...

    def embed(self, images: Sequence[ImageSource], *, batch_size: int = 32) -> np.ndarray:
        """Any images -> float32 [n, dim], L2-normalised when ``normalize`` is set."""
        ...

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [n, dim] in the image space (``capabilities.text``), else
        ``EncoderError``."""
        ...

    def patch_tokens(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Any images -> float32 [n, patches, token_dim] (``capabilities.patch_tokens``)."""
        ...

    def patch_tokens_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Resized uint8 pixels -> float32 [n, patches, token_dim]."""
        ...


class EncoderBase:
    """Shared behaviour: decoding, batching and optional L2 normalisation."""

    identity: EncoderIdentity
    normalize: bool

    @property
    def capabilities(self) -> EncoderCapabilities:
        """Plain image embedding only, unless a subclass says more."""
        return NO_CAPABILITIES

    @property
    def dim(self) -> int:
        return self.identity.dim

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Encoders without a text tower cannot embed text."""
        raise EncoderError(
            f"the model {self.identity.model} cannot embed text; text search needs a CLIP or "
            "SigLIP model, e.g. --model hf:openai/clip-vit-base-patch32"
        )

    def patch_tokens(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Encoders without patch tokens say so."""
        raise EncoderError(f"the model {self.identity.model} has no patch tokens")

    def patch_tokens_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Encoders without patch tokens say so."""
        raise EncoderError(f"the model {self.identity.model} has no patch tokens")

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.identity.preprocess

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, res, res, 3] -> float32 [n, dim]."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        expected = (self.preprocess.resolution, self.preprocess.resolution, 3)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise EncoderError(
                f"expected uint8 pixels of shape [n, *{expected}], got {pixels.shape}"
            )
        if len(pixels) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = np.asarray(self._forward(pixels), dtype=np.float32)
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors

    def embed(self, images: Sequence[ImageSource], *, batch_size: int = 32) -> np.ndarray:
        """Decode, resize and embed images in batches of ``batch_size``."""
        if batch_size < 1:
            raise EncoderError(f"batch_size must be at least 1, got {batch_size}")
        parts = [np.empty((0, self.dim), dtype=np.float32)]
        draft = self.preprocess.resolution
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = [
                resize_for_model(load_image(s, draft_size=draft), self.preprocess) for s in chunk
            ]
            parts.append(self.embed_pixels(np.stack(pixels)))
        return np.concatenate(parts)
