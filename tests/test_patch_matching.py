"""Patch-token matching (the local method of ViT encoders) with a tiny random-weight ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import photo
from PIL import ImageOps
from test_hf_encoders import TINY, _save

from lookalike.encoders import create_encoder
from lookalike.errors import LookalikeError
from lookalike.local.errors import CorruptLocalFeaturesError
from lookalike.local.patches import (
    PATCH_RULE,
    PatchTokens,
    mutual_patch_matches,
    rerank_patches,
    verify_patches,
)

SIDE, PATCH = 64, 4  # a 16 x 16 grid, like a 224 px ViT-B/14 or /16


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("vit") / "vit-grid16"
    model = transformers.ViTModel(transformers.ViTConfig(image_size=SIDE, patch_size=PATCH, **TINY))
    _save(folder, model, ViTImageProcessorPil(size={"height": SIDE, "width": SIDE}))
    encoder = create_encoder(f"hf:{folder}", normalize=False)
    encoder.folder_name = f"hf:{folder}"
    return encoder


def tokens_of(encoder, image, max_tokens: int = 256) -> PatchTokens:
    return PatchTokens.from_encoder_output(encoder.patch_tokens([image])[0], max_tokens)


def test_an_image_matches_itself_and_its_edited_copies_better_than_another(vit) -> None:
    coffee = photo("coffee")
    width, height = coffee.size
    source = tokens_of(vit, coffee)
    copies = {
        "itself": coffee,
        "flipped": ImageOps.mirror(coffee),
        "cropped": coffee.crop((width // 8, height // 8, width, height)),
    }
    unrelated = [tokens_of(vit, photo(name)) for name in ("astronaut", "rocket", "chelsea")]
    worst_unrelated = max(verify_patches(source, other) for other in unrelated)
    inliers = {
        name: verify_patches(tokens_of(vit, image), source) for name, image in copies.items()
    }
    assert inliers["itself"] == len(source) == 256  # every patch is its own mutual match
    # Measured: 47 for the mirror, 91 for the crop, at most 14 for the others.
    assert worst_unrelated < PATCH_RULE.min_inliers <= min(inliers["flipped"], inliers["cropped"])


def test_rerank_moves_the_verified_copy_first(vit) -> None:
    coffee = photo("coffee")
    query = tokens_of(vit, ImageOps.mirror(coffee))
    candidates = [
        (1, 0.80, tokens_of(vit, photo("astronaut"))),
        (2, 0.70, tokens_of(vit, coffee)),
        (3, 0.65, None),  # no stored tokens: keeps its cosine
    ]
    scores = rerank_patches(query, candidates)
    assert scores.argmax() == 1 and scores[1] > 0.8
    assert scores[2] == 0.65


def test_tokens_are_bounded_compact_and_round_trip(vit) -> None:
    raw = vit.patch_tokens([photo("rocket")])[0]
    tokens = PatchTokens.from_encoder_output(raw, max_tokens=100)
    assert len(tokens) == 100 and tokens.grid == (16, 16)
    kept = tokens.cells[:, 0] * 16 + tokens.cells[:, 1]
    norms = np.linalg.norm(raw, axis=1)
    assert norms[kept].min() >= np.delete(norms, kept).max()  # the strongest tokens are kept
    data = tokens.to_bytes()
    assert len(data) < 100 * (2 + 2 * raw.shape[1]) + 32  # float16 tokens, uint8 cells
    again = PatchTokens.from_bytes(data)
    np.testing.assert_array_equal(again.cells, tokens.cells)
    np.testing.assert_allclose(again.tokens, tokens.tokens, atol=1e-3)
    assert len(mutual_patch_matches(again, tokens)) == 100
    with pytest.raises(CorruptLocalFeaturesError):
        PatchTokens.from_bytes(data[:-2])
    with pytest.raises(LookalikeError):
        PatchTokens.from_encoder_output(raw[:10])


def test_a_vit_collection_stores_patch_tokens_and_search_reranks_with_them(
    vit, photo_dir, tmp_path
) -> None:
    from lookalike.core.collection import Collection
    from lookalike.local.patches import patch_kind

    collection = Collection(tmp_path / "collection", model=vit.folder_name)
    collection.use_encoder(vit)
    collection.index(photo_dir, workers=0, local_features=True)
    stored = collection.catalog.local_features(range(1, 7), patch_kind())
    assert len(stored) == 6  # tokens for every photo, no SIFT
    assert not collection.catalog.local_features(range(1, 7), "rootsift-512-256-c0.02")
    assert all(len(data) < 256 * (2 + 2 * vit.token_dim) + 32 for data in stored.values())
    query = ImageOps.mirror(photo("coffee"))
    plain = collection.search(query, k=6)
    verified = collection.search(query, k=6, rerank=6)
    coffee = next(r for r in plain if r.path.endswith("coffee.jpg"))
    assert verified[0].path.endswith("coffee.jpg")
    before = {r.id: r.score for r in plain}
    # The share of each score's gap to 1 that verification closed (the rule's inlier term).
    closed = {r.id: (r.score - before[r.id]) / (1 - before[r.id]) for r in verified}
    assert closed[coffee.id] > 0.5
    assert closed[coffee.id] > max(v for i, v in closed.items() if i != coffee.id)
    collection.close()
