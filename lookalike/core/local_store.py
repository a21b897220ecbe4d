"""A collection's local features: SIFT keypoints, or its encoder's patch tokens, chosen once.

The kind is chosen when local features are first asked for (patch tokens when the encoder
has them, SIFT otherwise) and remembered in the catalog. :class:`LocalFeatureKind` says what
ingest extracts for each image (picklable, so any executor can do it where the pixels are);
:class:`LocalFeatureStore` stores them and re-scores search candidates with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from lookalike.encoders.base import Encoder
from lookalike.local.features import DATABASE_CONFIG, QUERY_CONFIG, LocalFeatures, SiftConfig
from lookalike.local.matching import DEFAULT_RULE
from lookalike.local.patches import (
    PATCH_KIND_PREFIX,
    PATCH_RULE,
    PatchTokens,
    max_tokens_of,
    patch_kind,
    rerank_patches,
)
from lookalike.local.rerank import decode_stored, query_features, rerank_candidates

# The catalog setting that names the kind of local features a collection stores ("": none).
LOCAL_FEATURES_SETTING = "local_features"


class LocalFeatureCatalog(Protocol):
    """What the store needs of a catalog."""

    def get_setting(self, key: str, default: str | None = None) -> str | None: ...

    def set_setting(self, key: str, value: str) -> None: ...

    def local_features(self, ids: Iterable[int], kind: str) -> dict[int, bytes]: ...

    def ids_missing_local_features(self, kind: str) -> list[tuple[int, str]]: ...

    def store_local_features(
        self,
        items: Sequence[tuple[int, str, bytes]],
        *,
        content_hashes: Mapping[int, str] | None = None,
    ) -> int: ...


@dataclass(frozen=True)
class LocalFeatureKind:
    """What ingest extracts per image: SIFT with ``sift`` (from the decoded image, in the
    decoding worker), or the encoder's patch tokens (from the resized pixels, right after
    the batch is embedded). ``name`` is the kind the catalog stores."""

    name: str
    sift: SiftConfig | None = None

    @property
    def patch_tokens(self) -> bool:
        return self.name.startswith(PATCH_KIND_PREFIX)

    def from_pixels(self, encoder: Encoder, pixels: np.ndarray) -> list[bytes]:
        """Patch tokens of a batch of resized pixels, serialised (patch kinds only)."""
        tokens = encoder.patch_tokens_pixels(pixels)
        limit = max_tokens_of(self.name)
        return [PatchTokens.from_encoder_output(t, limit).to_bytes() for t in tokens]


def kind_for(encoder: Encoder) -> LocalFeatureKind:
    """The local features a collection with ``encoder`` stores: its patch tokens when it has
    them (ViT families), else SIFT."""
    if encoder.capabilities.patch_tokens:
        return LocalFeatureKind(patch_kind())
    return LocalFeatureKind(DATABASE_CONFIG.kind, DATABASE_CONFIG)


def kind_named(name: str) -> LocalFeatureKind:
    """The kind a catalog setting names."""
    if name.startswith(PATCH_KIND_PREFIX):
        return LocalFeatureKind(name)
    return LocalFeatureKind(name, DATABASE_CONFIG)


class LocalFeatureStore:
    """The local features of one collection: which kind, storing, and re-scoring."""

    def __init__(self, catalog: LocalFeatureCatalog) -> None:
        self.catalog = catalog

    def kind(self) -> LocalFeatureKind | None:
        """The kind this collection stores, or None when it stores none."""
        name = self.catalog.get_setting(LOCAL_FEATURES_SETTING) or ""
        return kind_named(name) if name else None

    def choose(self, enabled: bool | None, encoder: Encoder) -> LocalFeatureKind | None:
        """The kind to index with: ``None`` keeps the collection's choice, True or False
        changes and remembers it."""
        if enabled is not None:
            kind = kind_for(encoder).name if enabled else ""
            self.catalog.set_setting(LOCAL_FEATURES_SETTING, kind)
        chosen = self.kind()
        if chosen is not None and chosen.sift is not None:
            from lookalike.local.features import opencv

            opencv()  # without OpenCV, say so once instead of failing every file
        return chosen

    def missing(self) -> set[int]:
        """Ids of images that lack the collection's local features."""
        kind = self.kind()
        if kind is None:
            return set()
        return {i for i, _ in self.catalog.ids_missing_local_features(kind.name)}

    def save(
        self,
        kind: LocalFeatureKind,
        ids: Sequence[int],
        features: Sequence[bytes | None],
        content_hashes: dict[int, str],
    ) -> None:
        """Store the features of a batch just written (images without any are skipped)."""
        items = [(int(i), kind.name, data) for i, data in zip(ids, features, strict=True) if data]
        if items:
            self.catalog.store_local_features(items, content_hashes=content_hashes)

    def rescore(
        self,
        encoder: Encoder,
        query: Image.Image,
        candidates: Sequence[tuple[int, float]],
    ) -> np.ndarray:
        """New scores for (id, cosine) candidates: cosines raised by verified local matches
        with the query; candidates without stored features keep theirs."""
        kind = self.kind() or kind_for(encoder)
        ids = [image_id for image_id, _ in candidates]
        stored = self.catalog.local_features(ids, kind.name)
        if kind.patch_tokens:
            tokens = decode_stored(stored, ids, PatchTokens.from_bytes)
            query_tokens = PatchTokens.from_encoder_output(
                encoder.patch_tokens([query])[0], max_tokens_of(kind.name)
            )
            return rerank_patches(
                query_tokens,
                [(i, s, t) for (i, s), t in zip(candidates, tokens, strict=True)],
                PATCH_RULE,
            )
        features = decode_stored(stored, ids, LocalFeatures.from_bytes)
        views = query_features(query, QUERY_CONFIG)
        return rerank_candidates(
            views,
            [(i, s, f) for (i, s), f in zip(candidates, features, strict=True)],
            DEFAULT_RULE,
        )
