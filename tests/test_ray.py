"""Distributed extraction on a real local Ray cluster started by these tests."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import PHOTO_NAMES, photo, unit, variants

from lookalike.core.collection import Collection
from lookalike.distributed.ray_executor import ACTOR_PREFIX, RayExecutor, RayOptions
from lookalike.distributed.shards import fill_on_ray
from lookalike.errors import DistributedError
from lookalike.knn.sharded import build_shards, merge_shards, train_ivfpq

pytestmark = pytest.mark.slow  # a Ray cluster takes seconds to start

BATCH = 4


@pytest.fixture(scope="module")
def ray_cluster():
    """A two-CPU local Ray cluster for this module, shut down afterwards."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 real photos (6 originals and 4 edits of each) plus one file that is not an image."""
    root = tmp_path_factory.mktemp("variants")
    for name in PHOTO_NAMES:
        image = photo(name)
        image.save(root / f"{name}.jpg", quality=90)
        for edit, edited in variants(image).items():
            (root / edit).mkdir(exist_ok=True)
            edited.save(root / edit / f"{name}.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


IMAGES = 5 * len(PHOTO_NAMES)


@pytest.fixture(scope="module")
def single_process_vectors(variant_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with Collection(tmp_path_factory.mktemp("single")) as collection:
        report = collection.index(variant_dir, batch_size=BATCH)
        assert report.added == IMAGES
        return _vectors_by_path(collection)


def _vectors_by_path(collection: Collection) -> dict[str, np.ndarray]:
    ids, vectors = collection.catalog.vectors(collection.model_id)
    paths = {image_id: path for path, image_id in collection.catalog.paths().items()}
    return {paths[int(i)]: v for i, v in zip(ids, vectors, strict=True)}


def _row_counts(collection_dir: Path) -> tuple[int, int, int]:
    """Images, distinct image paths and vectors, counted in the catalog file itself."""
    with sqlite3.connect(collection_dir / "catalog.sqlite") as db:
        images, paths = db.execute("SELECT count(*), count(DISTINCT path) FROM images").fetchone()
        (vectors,) = db.execute("SELECT count(*) FROM vectors").fetchone()
    return images, paths, vectors


def _assert_same_vectors(collection: Collection, expected: dict[str, np.ndarray]) -> None:
    got = _vectors_by_path(collection)
    assert sorted(got) == sorted(expected)
    paths = sorted(expected)
    cosines = np.sum(
        unit(np.stack([got[p] for p in paths])) * unit(np.stack([expected[p] for p in paths])),
        axis=1,
    )
    assert cosines.min() > 0.9999


def test_ray_vectors_equal_the_single_process_path(
    ray_cluster, variant_dir, single_process_vectors, tmp_path
):
    with Collection(tmp_path) as collection:
        report = collection.index(variant_dir, batch_size=BATCH, executor=RayExecutor(RayOptions()))
        assert report.added == IMAGES
        assert [Path(p).name for p, _ in report.failed] == ["broken.jpg"]
        assert [Path(p).name for p, _ in collection.catalog.failures()] == ["broken.jpg"]
        _assert_same_vectors(collection, single_process_vectors)
        hits = collection.search(variant_dir / "crop" / "chelsea.jpg", k=2)
        assert {Path(h.path).parent.name for h in hits} == {"crop", variant_dir.name}
        assert {Path(h.path).name for h in hits} == {"chelsea.jpg"}
    assert ray.util.list_named_actors() == []  # the run's workers are gone


def test_a_killed_worker_loses_nothing_and_duplicates_nothing(
    ray_cluster, variant_dir, single_process_vectors, tmp_path
):
    killed = []

    def kill_a_worker(done: int, total: int) -> None:
        if done and not killed:
            name = next(n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX))
            ray.kill(ray.get_actor(name), no_restart=False)  # the process dies; Ray restarts it
            killed.append(name)

    with Collection(tmp_path) as collection:
        report = collection.index(
            variant_dir,
            batch_size=BATCH,
            progress=kill_a_worker,
            executor=RayExecutor(RayOptions(workers=2)),
        )
        assert killed
        assert report.added == IMAGES
        assert [Path(p).name for p, _ in report.failed] == ["broken.jpg"]
        _assert_same_vectors(collection, single_process_vectors)
    assert _row_counts(tmp_path) == (IMAGES, IMAGES, IMAGES)


def test_a_run_stopped_midway_is_finished_by_the_next_without_duplicates(
    ray_cluster, variant_dir, single_process_vectors, tmp_path
):
    def stop_after_two_batches(done: int, total: int) -> None:
        if done >= 2 * BATCH:
            raise KeyboardInterrupt

    with Collection(tmp_path) as collection, pytest.raises(KeyboardInterrupt):
        collection.index(
            variant_dir,
            batch_size=BATCH,
            progress=stop_after_two_batches,
            executor=RayExecutor(RayOptions()),
        )
    stored, _, _ = _row_counts(tmp_path)
    assert BATCH <= stored < IMAGES  # two batches done, one of them may hold broken.jpg
    with Collection(tmp_path) as collection:
        report = collection.index(variant_dir, batch_size=BATCH, executor=RayExecutor(RayOptions()))
        assert (report.added, report.unchanged) == (IMAGES - stored, stored)
        again = collection.index(variant_dir, batch_size=BATCH, executor=RayExecutor(RayOptions()))
        assert (again.added, again.updated, again.unchanged) == (0, 0, IMAGES)
        _assert_same_vectors(collection, single_process_vectors)
    assert _row_counts(tmp_path) == (IMAGES, IMAGES, IMAGES)


def test_cli_attaches_to_a_running_cluster(ray_cluster, variant_dir, tmp_path):
    collection_dir = tmp_path / "collection"
    command = [sys.executable, "-m", "lookalike.cli", "-c", str(collection_dir), "index"]
    command += [str(variant_dir), "--quiet", "--ray", ray_cluster, "--ray-workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{IMAGES} added" in done.stdout and "1 failed" in done.stdout
    assert _row_counts(collection_dir) == (IMAGES, IMAGES, IMAGES)


def test_ivfpq_shards_built_as_ray_tasks_merge_into_the_unsharded_index(ray_cluster):
    rng = np.random.default_rng(3)
    ids = np.arange(3000, dtype=np.int64)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((20, 32)).astype(np.float32)
    trained = train_ivfpq(vectors[:1024], nlist=32, m=8, nbits=6)
    (single,) = build_shards(trained, [(ids, vectors)])
    parts = [(ids[i : i + 1000], vectors[i : i + 1000]) for i in range(0, 3000, 1000)]
    merged = merge_shards(build_shards(trained, parts, fill=fill_on_ray))
    expected, got = single.search(queries, 10), merged.search(queries, 10)
    assert len(merged) == 3000
    assert np.array_equal(got.ids, expected.ids)
    assert np.array_equal(got.scores, expected.scores)


def test_bad_options_are_refused():
    with pytest.raises(DistributedError, match="workers"):
        RayOptions(workers=0)
    with pytest.raises(DistributedError, match="threads"):
        RayOptions(threads=0)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random-weight ViT checkpoint (32 px, 16 patches) saved to a folder, as hf:NAME."""
    import torch
    import transformers
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from lookalike.encoders.hf import _quiet_transformers

    folder = tmp_path_factory.mktemp("vit-tiny")
    torch.manual_seed(2)
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    with _quiet_transformers():
        transformers.ViTModel(config).save_pretrained(folder)
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def three_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three")
    for name in PHOTO_NAMES[:3]:
        photo(name).save(root / f"{name}.jpg", quality=90)
    return root


def _patch_tokens_of_every_image(collection: Collection) -> None:
    kind = collection.local_store.kind()
    assert kind is not None and kind.patch_tokens
    ids = sorted(collection.catalog.paths().values())
    stored = collection.catalog.local_features(ids, kind.name)
    assert sorted(stored) == ids and all(stored.values())


def test_vit_patch_tokens_are_extracted_on_ray_workers(
    ray_cluster, tiny_vit, three_photos, tmp_path
):
    with Collection(tmp_path, model=tiny_vit) as collection:
        report = collection.index(
            three_photos, local_features=True, executor=RayExecutor(RayOptions(workers=1))
        )
        assert (report.added, report.failed) == (3, [])
        _patch_tokens_of_every_image(collection)
        hits = collection.search(three_photos / "chelsea.jpg", k=3, rerank=3)
        assert hits[0].path == str((three_photos / "chelsea.jpg").resolve())
        assert len(hits) == 3
    assert ray.util.list_named_actors() == []


def test_cli_ray_index_with_vit_and_local_features(ray_cluster, tiny_vit, three_photos, tmp_path):
    command = [sys.executable, "-m", "lookalike.cli", "-c", str(tmp_path), "index"]
    command += [str(three_photos), "--model", tiny_vit, "--local-features", "--quiet"]
    command += ["--ray", ray_cluster, "--ray-workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 added" in done.stdout and "0 failed" in done.stdout
    with Collection(tmp_path) as collection:
        _patch_tokens_of_every_image(collection)
