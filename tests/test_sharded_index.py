"""Sharded indexes: IVF-PQ trained once, shards built in parallel and merged; fan-out search."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import CorruptIndexError, VectorIndexError
from lookalike.knn import Index, create_index, load_index
from lookalike.knn.sharded import (
    ShardedIndex,
    build_shards,
    merge_shards,
    split_by_id,
    train_ivfpq,
)

N, DIM, K = 6_000, 64, 10
IVF = {"nlist": 64, "m": 16, "nbits": 6, "nprobe": 16}  # small codebooks: quick to train
SAMPLE = 2048


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin against each other on a busy 2-core machine (k-means took
    10x longer); one thread keeps these tests quick and changes no result."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered vectors (so IVF lists are uneven, as with real embeddings) and queries."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, DIM)).astype(np.float32) * 3
    labels = rng.integers(0, len(centres), N + 50)
    points = centres[labels] + rng.standard_normal((N + 50, DIM)).astype(np.float32)
    return np.arange(N, dtype=np.int64) * 3 + 5, points[:N], points[N:]


@pytest.fixture(scope="module")
def trained(data):
    """IVF-PQ quantisers trained once on a sample, with and without exact re-ranking."""
    _, vectors, _ = data
    plain = train_ivfpq(vectors[:SAMPLE], **IVF)
    with_rerank = train_ivfpq(vectors[:SAMPLE], **IVF, rerank=30)
    return {0: plain, 30: with_rerank}


def contiguous(ids: np.ndarray, vectors: np.ndarray, parts: int):
    bounds = np.linspace(0, len(ids), parts + 1).astype(int)
    return [(ids[a:b], vectors[a:b]) for a, b in itertools.pairwise(bounds)]


def unsharded_copy(trained, tmp_path: Path, ids: np.ndarray, vectors: np.ndarray) -> Index:
    """The trained index, saved and loaded, filled the ordinary way in one process."""
    trained.save(tmp_path / "trained.idx")
    single = load_index(tmp_path / "trained.idx")
    for start in range(0, len(ids), 1000):
        single.add(ids[start : start + 1000], vectors[start : start + 1000])
    return single


def assert_identical(a, b) -> None:
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.scores, b.scores)


@pytest.mark.parametrize("rerank", [0, 30])
def test_shards_built_in_parallel_and_merged_equal_the_unsharded_index(
    data, trained, tmp_path, rerank
):
    ids, vectors, queries = data
    trained = trained[rerank]
    single = unsharded_copy(trained, tmp_path, ids, vectors)
    merged = merge_shards(build_shards(trained, contiguous(ids, vectors, 4), workers=4))
    assert len(merged) == len(single) == N
    assert merged.spec == single.spec
    hits = merged.search(queries, K)
    assert_identical(hits, single.search(queries, K))
    assert (hits.ids >= 0).all()
    merged.save(tmp_path / "merged.idx")  # the merged index is an ordinary IVF-PQ index
    assert_identical(load_index(tmp_path / "merged.idx").search(queries, K), hits)


def test_fan_out_over_ivfpq_shards_equals_the_unsharded_index(data, trained, tmp_path):
    ids, vectors, queries = data
    trained = trained[0]
    fan_out = ShardedIndex(build_shards(trained, split_by_id(ids, vectors, 3)))
    single = unsharded_copy(trained, tmp_path, ids, vectors)
    assert len(fan_out) == N
    hits = fan_out.search(queries, K)
    assert np.array_equal(hits.scores, single.search(queries, K).scores)
    assert np.array_equal(np.sort(hits.ids, axis=1), np.sort(single.search(queries, K).ids, axis=1))


def test_fan_out_over_exact_shards_equals_one_exact_index(data, tmp_path):
    ids, vectors, queries = data
    single = create_index("exact", dim=DIM, metric="cosine")
    single.add(ids, vectors)
    sharded = ShardedIndex([create_index("exact", dim=DIM, metric="cosine") for _ in range(4)])
    sharded.add(ids, vectors)
    assert isinstance(sharded, Index)
    assert [len(s) for s in sharded.shards] == [N // 4] * 4  # routed by id % 4

    def same(a, b) -> None:
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)

    same(sharded.search(queries, K), single.search(queries, K))
    gone = ids[::7]
    assert sharded.remove(gone) == single.remove(gone) == len(gone)
    keep = np.setdiff1d(ids[:300], gone)
    new = vectors[: len(keep)][::-1].copy()  # upsert: these ids get other vectors
    sharded.add(keep, new)
    single.add(keep, new)
    assert len(sharded) == len(single)
    same(sharded.search(queries, K), single.search(queries, K))

    sharded.save(tmp_path / "sharded.json")
    loaded = ShardedIndex.load(tmp_path / "sharded.json")
    assert len(load_index(tmp_path / "sharded.json.2")) == len(sharded.shards[2])
    same(loaded.search(queries, K), single.search(queries, K))


def test_bad_shards_are_refused(data, trained, tmp_path):
    ids, vectors, _ = data
    trained = trained[0]
    overlapping = [(ids[:100], vectors[:100]), (ids[50:150], vectors[50:150])]
    with pytest.raises(VectorIndexError, match="more than one shard"):
        build_shards(trained, overlapping)
    other = train_ivfpq(vectors[-SAMPLE:], **IVF)
    (first,) = build_shards(trained, [(ids[:100], vectors[:100])])
    (second,) = build_shards(other, [(ids[100:200], vectors[100:200])])
    with pytest.raises(VectorIndexError, match="same trained index"):
        merge_shards([first, second])
    with pytest.raises(VectorIndexError, match="trained, empty"):
        build_shards(create_index("ivfpq:nlist=64,m=16,nbits=6", dim=DIM), [(ids, vectors)])
    with pytest.raises(VectorIndexError, match="same dimension"):
        ShardedIndex([create_index("exact", dim=DIM), create_index("exact", dim=DIM + 1)])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptIndexError):
        ShardedIndex.load(tmp_path / "bad.json")
