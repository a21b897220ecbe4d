"""Feature options: GeM pooling and multi-scale extraction in the exported encoder, encoder
identities that keep feature configurations apart, PCA-whitening stored with the collection,
and multi-crop queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, unit
from PIL import Image
from test_refinement import DIM, IDENTITY, toy_catalog

from lookalike.core.collection import Collection
from lookalike.core.derived import VectorIndexes
from lookalike.core.multicrop import merge_views, query_crops
from lookalike.core.transform import CENTER_MIN_VECTORS
from lookalike.encoders import create_encoder
from lookalike.encoders.efficientnet_lite import VARIANTS, load_pretrained
from lookalike.encoders.preprocess import resize_for_model
from lookalike.errors import EncoderError, LookalikeError
from lookalike.knn.base import Metric

NAMES = ("coffee", "rocket", "astronaut")


def pixels(resolution: int) -> np.ndarray:
    from lookalike.encoders.preprocess import PreprocessConfig

    config = PreprocessConfig(resolution, (0, 0, 0), (1, 1, 1))
    return np.stack([resize_for_model(photo(n), config) for n in NAMES])


def reference_maps(x: np.ndarray) -> torch.Tensor:
    """The head feature maps of Lite0, computed eagerly in PyTorch from uint8 NHWC pixels."""
    network = load_pretrained(VARIANTS["efficientnet-lite0"])
    batch = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    with torch.inference_mode():
        return network.features(batch)[-1]


def test_gem_and_two_scales_run_in_the_exported_model(encoder) -> None:
    x = pixels(224)
    maps = reference_maps(x)
    gem = create_encoder("efficientnet-lite0", pooling="gem", normalize=False)
    assert gem.runtime in ("onnx", "openvino")  # the exported graph, on the faster runtime
    expected = maps.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3).numpy()
    np.testing.assert_allclose(gem.embed_pixels(x), expected, rtol=2e-3, atol=2e-3)
    # GeM is not average pooling under another name.
    assert (unit(gem.embed_pixels(x)) * unit(encoder.embed_pixels(x))).sum(1).max() < 0.99

    two = create_encoder("efficientnet-lite0", scales="1,0.5", normalize=False)
    assert two.preprocess.resolution == 224
    half = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(112, 112), mode="bilinear"
    )
    small = reference_maps(half.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    expected = (unit(maps.mean(dim=(2, 3)).numpy()) + unit(small.mean(dim=(2, 3)).numpy())) / 2
    cosine = (unit(two.embed_pixels(x)) * unit(expected)).sum(1)
    assert cosine.min() > 0.999
    up = create_encoder("efficientnet-lite0", scales=[1.5, 1.0], normalize=False)
    assert up.preprocess.resolution == 336  # extracted at the largest scale, resized inside


def test_identity_keys_keep_feature_configurations_apart(encoder) -> None:
    plain = encoder.identity.key
    assert plain.count("/") == 3 and "gem" not in plain  # keys of stored vectors unchanged
    gem = create_encoder("efficientnet-lite0", pooling="gem").identity
    two = create_encoder("efficientnet-lite0", scales="0.7071,1").identity
    assert gem.key == plain + "/gem"
    assert two.key == plain + "/ms1+0.7071" and two.scales == (1.0, 0.7071)
    assert len({plain, gem.key, two.key}) == 3


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"pooling": "max"}, "unknown pooling"),
        ({"scales": "1,3"}, "between 0.25 and 2"),
        ({"scales": "one"}, "must be numbers"),
        ({"layer": "logits", "pooling": "gem"}, "no pooling or scales"),
    ],
)
def test_bad_feature_options_are_clear_errors(options: dict, words: str) -> None:
    with pytest.raises(EncoderError, match=words):
        create_encoder("efficientnet-lite0", **options)


def test_a_collection_remembers_its_pooling_and_never_mixes_vectors(
    photo_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "collection"
    with Collection(folder, pooling="gem") as collection:
        report = collection.index(photo_dir, workers=0)
        assert report.added == 6
        gem_key = collection.encoder.identity.key
        assert collection.encoder.identity.pooling == "gem"
    with Collection(folder) as reopened:  # no option: the remembered pooling
        assert reopened.encoder.identity.key == gem_key
        assert reopened.index(photo_dir, workers=0).unchanged == 6
        best = reopened.search(next(photo_dir.rglob("coffee.jpg")), k=1)[0]
        assert best.path.endswith("coffee.jpg") and best.score > 0.99
    with Collection(folder, pooling="avg") as switched:
        # A switch: GeM keeps answering until average pooling covers every image.
        assert switched.encoder.identity.key == gem_key
        report = switched.index(photo_dir, workers=0)
        assert report.updated == 6 and report.switch == "done"  # embedded again, not reused
        assert switched.encoder.identity.pooling == "avg"
        models = {m["key"]: m["vectors"] for m in switched.catalog.models()}
        # The switch drops the old vectors: none of the GeM ones is left to mix in.
        assert models[gem_key] == 0 and models[switched.encoder.identity.key] == 6


def test_pca_whitening_is_learned_stored_and_relearned(tmp_path: Path) -> None:
    n = CENTER_MIN_VECTORS + 44
    catalog, model, vectors = toy_catalog(tmp_path, n)
    indexes = VectorIndexes.for_catalog(catalog, tmp_path, whitening=8)
    index = indexes.get(model, IDENTITY.key, DIM, Metric.COSINE)
    assert index.index.dim == 8 and index.whitening.shape == (DIM, 8)
    centred = unit(vectors) - index.center
    projected = centred @ index.whitening
    # Whitened: the collection's covariance in the kept directions is the identity.
    np.testing.assert_allclose(projected.T @ projected / n, np.eye(8), atol=1e-3)
    hits = index.search(vectors[3], 1)
    assert hits.ids[0][0] == 4 and hits.scores[0][0] == pytest.approx(1.0, abs=1e-5)
    rebuilds = indexes.rebuilds
    again = VectorIndexes.for_catalog(catalog, tmp_path, whitening=8)
    reloaded = again.get(model, IDENTITY.key, DIM, Metric.COSINE)
    assert again.rebuilds == 0 and indexes.rebuilds == rebuilds  # read from its file
    np.testing.assert_allclose(reloaded.whitening, index.whitening)
    # Another setting, or none, is a different transform: learned afresh.
    plain = VectorIndexes.for_catalog(catalog, tmp_path).get(
        model, IDENTITY.key, DIM, Metric.COSINE
    )
    assert plain.whitening is None and plain.index.dim == DIM


def test_whitening_waits_for_enough_vectors_and_follows_the_collection(tmp_path: Path) -> None:
    from lookalike.catalog import ImageRecord

    catalog, model, _ = toy_catalog(tmp_path, CENTER_MIN_VECTORS)
    indexes = VectorIndexes.for_catalog(catalog, tmp_path, whitening=200)
    small = indexes.get(model, IDENTITY.key, DIM, Metric.COSINE)
    assert small.whitening.shape == (DIM, DIM)  # never more dimensions than the vectors have
    assert small.learned_on == CENTER_MIN_VECTORS
    rng = np.random.default_rng(1)
    more = (3.0 + rng.normal(size=(CENTER_MIN_VECTORS, DIM))).astype(np.float32)
    records = [ImageRecord(f"/y/{i}.jpg", f"y{i}", 1, 1.0, 1, 1) for i in range(len(more))]
    catalog.store(records, more, model)
    grown = indexes.get(model, IDENTITY.key, DIM, Metric.COSINE)
    assert grown.learned_on == 2 * CENTER_MIN_VECTORS  # twice as many: learned again
    with pytest.raises(LookalikeError, match="dimensions"):
        Collection(tmp_path / "bad", whitening=-3)


def test_query_crops_and_merging() -> None:
    image = photo("astronaut")
    views = query_crops(image)
    assert len(views) == 6 and views[0] is image
    assert {v.size for v in views[1:]} == {(384, 384)}
    ids, scores = merge_views(
        np.array([[3, 1, -1], [1, 2, 3]]), np.array([[0.9, 0.5, 0.0], [0.8, 0.7, 0.2]]), 3
    )
    assert ids.tolist() == [3, 1, 2] and scores.tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_multi_crop_search_finds_a_photo_inside_a_larger_scene(
    photo_dir: Path, tmp_path: Path, encoder
) -> None:
    with Collection(tmp_path / "collection") as collection:
        collection.use_encoder(encoder)
        collection.index(photo_dir, workers=0)
        scene = Image.new("RGB", (800, 800), (40, 90, 40))
        scene.paste(photo("coffee").resize((560, 420)), (0, 0))  # the top-left corner's crop
        plain = collection.search(scene, k=6)
        cropped = collection.search(scene, k=6, multi_crop=True)
        score = {r.path.rsplit("/", 1)[1]: r.score for r in plain}
        assert cropped[0].path.endswith("coffee.jpg")
        assert cropped[0].score > score["coffee.jpg"] + 0.05
        assert len({r.id for r in cropped}) == 6
        assert [r.score for r in cropped] == sorted((r.score for r in cropped), reverse=True)
        limited = collection.search(scene, k=2, multi_crop=True, threshold=cropped[1].score)
        assert [r.id for r in limited] == [r.id for r in cropped[:2]]


def test_cli_pooling_whitening_and_multi_crop(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lookalike.cli.main import main

    home = str(tmp_path / "collection")
    args = ["--collection", home, "index", str(photo_dir), "-q", "--workers", "0"]
    assert main([*args, "--pooling", "gem", "--whiten", "4"]) == 0
    with Collection(home) as collection:
        assert collection.encoder.identity.pooling == "gem"
        assert collection.indexes.whitening == 4  # remembered (used once 256 images are in)
    coffee = str(next(photo_dir.rglob("coffee.jpg")))
    capsys.readouterr()
    assert main(["--collection", home, "search", coffee, "-k", "2", "--multi-crop"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.split()[2].endswith("coffee.jpg") and float(first.split()[1]) > 0.99


def test_new_collections_pool_by_gem_and_older_ones_keep_average_pooling(tmp_path: Path) -> None:
    with Collection(tmp_path / "new") as new:
        assert new.encoder.identity.pooling == "gem"
        new.model_id  # noqa: B018 - registering the model remembers the pooling
    with Collection(tmp_path / "new") as reopened:
        assert reopened.pooling == "gem"
    older = Collection(tmp_path / "older")
    older.catalog.set_setting("model", "efficientnet-lite0")  # indexed before pooling existed
    older.close()
    with Collection(tmp_path / "older") as kept:
        assert kept.encoder.identity.pooling == "avg"
        assert kept.encoder.identity.key.count("/") == 3
