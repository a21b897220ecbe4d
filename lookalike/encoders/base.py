"""The Encoder protocol, the registry of encoders by name, and the shared embedding loop."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
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

    @property
    def key(self) -> str:
        """A short stable string naming this identity, used by the catalog.

        Pooling and scales appear only when they differ from plain single-scale average
        pooling, so keys of vectors stored before those options existed stay the same.
        """
        key = f"{self.model}/{self.layer}/{self.dim}/{self.weights_sha256[:12]}"
        if self.pooling != "avg":
            key += f"/{self.pooling}"
        if tuple(self.scales) != (1.0,):
            key += "/ms" + "+".join(f"{s:g}" for s in self.scales)
        return key


@runtime_checkable
class Encoder(Protocol):
    """Turns images into float32 vectors of a fixed dimension."""

    identity: EncoderIdentity
    normalize: bool

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


class EncoderBase:
    """Shared behaviour: decoding, batching and optional L2 normalisation."""

    identity: EncoderIdentity
    normalize: bool

    @property
    def dim(self) -> int:
        return self.identity.dim

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


EncoderFactory = Callable[..., Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}
# Families whose names carry a model reference after a prefix ("hf:facebook/dinov2-small"):
# prefix -> "module:function", imported only when such a name is asked for.
_PREFIXES: dict[str, str] = {"hf:": "lookalike.encoders.hf:create_hf_encoder"}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator that makes a factory available to ``create_encoder(name)``."""

    def decorate(factory: EncoderFactory) -> EncoderFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def _ensure_builtin_encoders() -> None:
    # Imported lazily so that importing lookalike never pulls in torch.
    from lookalike.encoders import efficientnet_lite  # noqa: F401


def list_encoders() -> list[str]:
    """Names accepted by ``create_encoder`` (plus any ``hf:<hub id or folder>``)."""
    _ensure_builtin_encoders()
    return sorted(_REGISTRY)


def create_encoder(name: str, **options: Any) -> Encoder:
    """Build a registered encoder, e.g. ``create_encoder("efficientnet-lite0", layer="head")``.

    ``<base>+<name>`` names a fine-tuned encoder saved by ``lookalike finetune`` (found in the
    ``search_dirs`` option's folders, then in ``$LOOKALIKE_HOME/encoders``).
    """
    if "+" in name:
        from lookalike.finetune.encoder import create_finetuned_encoder

        return create_finetuned_encoder(name, **options)
    for prefix, target in _PREFIXES.items():
        if name.startswith(prefix):
            module_name, _, function = target.partition(":")
            return getattr(importlib.import_module(module_name), function)(name, **options)
    _ensure_builtin_encoders()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise EncoderError(
            f"unknown encoder {name!r}; available: {', '.join(sorted(_REGISTRY))}, "
            "or hf:<hub id or folder>"
        ) from None
    return factory(**options)
