"""Vector index backends checked against exact brute force, plus their file format and specs.

Data are seeded Gaussian mixtures with anisotropic clusters (like real embeddings, unlike
uniform noise, where every ANN method looks bad and neighbours are meaningless), in odd sizes
(5,003 x 97) so that no code path relies on powers of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest

from lookalike.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    IndexSpecError,
    VectorIndexError,
)
from lookalike.knn import (
    choose_spec,
    create_index,
    hnsw_bytes,
    ivf_bytes,
    ivf_spec,
    load_index,
    parse_spec,
)
from lookalike.knn import hnsw as hnsw_module
from lookalike.knn._format import read_index_file
from lookalike.knn.base import Index, Metric
from lookalike.knn.binary import BinaryIndex
from lookalike.knn.exact import ExactIndex, score_matrix
from lookalike.knn.hnsw import HNSWIndex
from lookalike.knn.ivfpq import IVFPQIndex

# Two shared cores: OpenMP spinning on a busy second core made faiss 10-50x slower.
faiss.omp_set_num_threads(1)

N, DIM, N_QUERIES, K = 5_003, 97, 50, 101
FLOAT_METRICS = ("cosine", "dot", "euclidean")

# (spec, minimum recall@10 per metric). Measured on this data (cosine/dot/euclidean) with
# faiss-cpu 1.15 and annoy 1.17: annoy 1.000/0.980/0.992, lsh 0.988/0.974/0.988,
# hnsw 1.000/0.988/0.998, ivfpq 0.860/0.822/0.916, ivfpq+rerank 1.000/0.996/0.996, and
# lsh without probing 0.748/0.696/0.746. Parameters are deliberately weak so that the
# thresholds (measured minus 0.04-0.08) sit where a real regression shows.
RECALL_CASES = [
    ("exact", {"cosine": 1.0, "dot": 1.0, "euclidean": 1.0}),
    ("exact:engine=faiss", {"cosine": 1.0, "dot": 1.0, "euclidean": 1.0}),
    ("annoy:trees=10", {"cosine": 0.95, "dot": 0.93, "euclidean": 0.95}),
    ("lsh:bits=10,tables=8", {"cosine": 0.94, "dot": 0.92, "euclidean": 0.94}),
    ("hnsw:M=8,efConstruction=40,ef=32", {"cosine": 0.96, "dot": 0.94, "euclidean": 0.96}),
    ("ivfpq:nlist=32,m=97,nbits=4,nprobe=4", {"cosine": 0.80, "dot": 0.76, "euclidean": 0.86}),
    (
        "ivfpq:nlist=32,m=97,nbits=4,nprobe=4,rerank=50",
        {"cosine": 0.96, "dot": 0.95, "euclidean": 0.96},
    ),
    (
        "ivfpq:nlist=32,m=97,nbits=4,nprobe=4,rerank=50,sq=16,quantizer=hnsw",
        {"cosine": 0.96, "dot": 0.95, "euclidean": 0.96},
    ),
    # ivf measured 0.890/0.874/0.906, with 8-bit codes and the HNSW quantizer 0.882/0.864/0.902.
    ("ivf:nlist=64,nprobe=2", {"cosine": 0.84, "dot": 0.82, "euclidean": 0.86}),
    ("ivf:nlist=64,nprobe=2,sq=8,quantizer=hnsw", {"cosine": 0.83, "dot": 0.81, "euclidean": 0.85}),
]

# Small, fast configurations for the behaviour tests (every backend, both IVF-PQ phases).
SMALL_SPECS = [
    "exact",
    "exact:engine=faiss",
    "annoy:trees=5",
    "lsh:bits=6,tables=6",
    "hnsw:M=8,efConstruction=40,ef=64",
    "hnsw:M=8,efConstruction=40,ef=64,sq=16",
    "hnsw:M=8,efConstruction=40,ef=64,sq=8",  # 400 vectors: still in its float phase
    "ivfpq:nlist=4,m=97,nbits=4,nprobe=4,rerank=40",  # trains at 256 vectors
    "ivfpq:nlist=4,m=97,nbits=4,nprobe=2",  # trained, codes only, may return short rows
    "ivfpq:nlist=4,m=97,nbits=4,nprobe=4,rerank=40,sq=16,quantizer=hnsw",
    "ivfpq:nlist=64,m=97,nbits=8",  # stays in its flat phase (needs 4,096)
    "ivf:nlist=8,nprobe=8",  # trains at 128 vectors; visits every list: exact up to float16
    "ivf:nlist=16,nprobe=2,sq=8,quantizer=hnsw",
    "ivf:nlist=64,sq=0",  # stays in its flat phase (needs 1,024)
    "binary",
    "binary:engine=faiss",
    "binary:engine=hnsw,M=8,ef=64",
]
EXACT_SPECS = {"exact", "exact:engine=faiss", "ivfpq:nlist=64,m=97,nbits=8"}


def mixture(n: int, dim: int, seed: int, *, clusters: int = 24, rank: int = 24) -> np.ndarray:
    """Gaussian mixture: uneven cluster sizes, low-rank anisotropic spread, isotropic noise."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    labels = rng.choice(clusters, size=n, p=rng.dirichlet(np.full(clusters, 2.0)))
    bases = rng.standard_normal((clusters, rank, dim)) / np.sqrt(rank)
    spread = rng.standard_normal((n, rank)) * np.geomspace(1.0, 0.2, rank)
    noise = rng.standard_normal((n, dim)) * 3.0 / np.sqrt(dim)
    points = centers[labels] + np.einsum("nr,nrd->nd", spread, bases[labels]) + noise
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = mixture(N + N_QUERIES, DIM, seed=7)
    ids = np.random.default_rng(8).permutation(10 * N)[:N].astype(np.int64)  # sparse ids
    return ids, points[:N], points[N:]


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = mixture(420, DIM, seed=11, clusters=6)
    return np.arange(400, dtype=np.int64) * 3 + 1, points[:400], points[400:]


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f[:10]) & set(t[:10])) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / 10.0


def filled(index: Index, ids: np.ndarray, vectors: np.ndarray) -> Index:
    index.add(ids, vectors)
    return index


# --- recall against brute force -------------------------------------------------------------


@pytest.mark.parametrize("metric", FLOAT_METRICS)
@pytest.mark.parametrize(("spec", "thresholds"), RECALL_CASES, ids=[c[0] for c in RECALL_CASES])
def test_recall_against_exact(data, spec: str, thresholds: dict[str, float], metric: str) -> None:
    ids, vectors, queries = data
    truth = filled(ExactIndex(dim=DIM, metric=metric), ids, vectors).search(queries, K)
    index = filled(create_index(spec, dim=DIM, metric=metric), ids, vectors)
    hits = index.search(queries, K)
    assert hits.ids.shape == hits.scores.shape == (N_QUERIES, K)
    assert hits.ids.dtype == np.int64 and hits.scores.dtype == np.float32
    assert hits.metric is Metric(metric)
    recall = recall_at_10(hits.ids, truth.ids)
    assert recall >= thresholds[metric], f"{spec} {metric}: recall@10 {recall:.3f}"
    valid = hits.ids >= 0
    assert np.isin(hits.ids[valid], ids).all()
    # Best first, in the metric's direction.
    steps = np.diff(np.where(valid, hits.scores, np.nan), axis=1)
    steps = steps[~np.isnan(steps)]
    assert (steps <= 1e-5).all() if Metric(metric).higher_is_better else (steps >= -1e-5).all()
    if thresholds[metric] == 1.0:
        np.testing.assert_allclose(hits.scores, truth.scores, rtol=1e-4, atol=1e-4)


def test_lsh_probing_raises_recall(data) -> None:
    ids, vectors, queries = data
    truth = filled(ExactIndex(dim=DIM), ids, vectors).search(queries, 10).ids
    recalls = []
    for probe in (0, 1):
        index = filled(create_index(f"lsh:bits=10,tables=8,probe={probe}", dim=DIM), ids, vectors)
        recalls.append(recall_at_10(index.search(queries, 10).ids, truth))
    assert recalls[1] > recalls[0] + 0.1


def test_binary_float_codes_and_recall(data) -> None:
    ids, vectors, queries = data
    index = filled(create_index("binary", dim=DIM), ids, vectors)
    assert index.metric is Metric.HAMMING
    expected = np.packbits(vectors > 0, axis=1)
    _, reference = _hamming_reference(np.packbits(queries > 0, axis=1), expected, ids, 10)
    hits = index.search(queries, 10)
    np.testing.assert_array_equal(hits.scores, reference)
    assert hits.ids.shape == (N_QUERIES, 10)


# --- binary codes ---------------------------------------------------------------------------


def _hamming_reference(
    queries: np.ndarray, codes: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force on unpacked bits; ties broken by stored order, like the numpy engine."""
    bits_q = np.unpackbits(queries, axis=1).astype(np.int32)
    bits_c = np.unpackbits(codes, axis=1).astype(np.int32)
    distances = (bits_q[:, None, :] != bits_c[None, :, :]).sum(axis=2)
    order = np.array([np.lexsort((np.arange(len(codes)), row)) for row in distances])[:, :k]
    return ids[order], np.take_along_axis(distances, order, axis=1).astype(np.float32)


@pytest.mark.parametrize("bits", [77, 128])
def test_packed_hamming_matches_brute_force(bits: int) -> None:
    rng = np.random.default_rng(bits)
    n_bytes = -(-bits // 8)
    # Clustered codes: flipped copies of a few prototypes, so distances tie and vary.
    prototypes = rng.integers(0, 256, size=(12, n_bytes), dtype=np.uint8)
    flips = np.packbits(rng.random((1_500 + 40, n_bytes * 8)) < 0.15, axis=1)
    codes = prototypes[rng.integers(0, 12, size=len(flips))] ^ flips
    codes[:, -1] &= np.uint8((0xFF << (8 * n_bytes - bits)) & 0xFF)
    database, queries = codes[:1_500], codes[1_500:]
    ids = rng.permutation(100_000)[:1_500].astype(np.int64)
    want_ids, want_scores = _hamming_reference(queries, database, ids, 33)

    numpy_index = BinaryIndex(dim=bits, packed=True)
    numpy_index.add(ids, database)
    hits = numpy_index.search(queries, 33)
    np.testing.assert_array_equal(hits.ids, want_ids)
    np.testing.assert_array_equal(hits.scores, want_scores)

    faiss_index = filled(create_index("binary:packed=true,engine=faiss", dim=bits), ids, database)
    faiss_hits = faiss_index.search(queries, 33)
    np.testing.assert_array_equal(faiss_hits.scores, want_scores)
    # faiss orders ties its own way: compare ids where the distance is unambiguous.
    for row in range(len(queries)):
        strict = want_scores[row] < want_scores[row, -1]
        assert set(faiss_hits.ids[row][strict]) == set(want_ids[row][strict])


def test_packed_codes_ignore_unused_trailing_bits() -> None:
    index = BinaryIndex(dim=10, packed=True)
    index.add([1, 2], np.array([[0b11000000, 0b01000000], [0b11000000, 0b01111111]], np.uint8))
    hits = index.search(np.array([[0b11000000, 0b01000000]], np.uint8), 2)
    np.testing.assert_array_equal(hits.scores, [[0.0, 0.0]])
    with pytest.raises(VectorIndexError):
        index.add([3], np.ones((1, 2), dtype=np.float32))
    with pytest.raises(DimensionMismatchError):
        index.add([3], np.ones((1, 3), dtype=np.uint8))


# --- behaviour shared by every backend ------------------------------------------------------


@dataclass
class Case:
    """One small backend instance, filled with ``vectors`` under ``ids``."""

    spec: str
    index: Index
    ids: np.ndarray
    vectors: np.ndarray
    queries: np.ndarray


@pytest.fixture(params=SMALL_SPECS)
def small_index(request, small) -> Case:
    ids, vectors, queries = small
    index = filled(create_index(request.param, dim=DIM), ids, vectors)
    return Case(request.param, index, ids, vectors, queries)


def test_save_load_round_trip(small_index, tmp_path: Path) -> None:
    c = small_index
    index, ids, queries = c.index, c.ids, c.queries
    before = index.search(queries, 15)
    path = tmp_path / "index.lki"
    index.save(path)
    for loaded in (load_index(path), type(index).load(path)):
        assert type(loaded) is type(index)
        assert (len(loaded), loaded.dim, loaded.metric, loaded.spec) == (
            len(index),
            index.dim,
            index.metric,
            index.spec,
        )
        after = loaded.search(queries, 15)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6)
        # A loaded index keeps working: changes apply on top of what was loaded.
        loaded.remove(ids[:5])
        assert len(loaded) == len(index) - 5


def test_spec_round_trips(small_index) -> None:
    index = small_index.index
    again = create_index(index.spec, dim=DIM)
    assert again.spec == index.spec and type(again) is type(index)
    assert isinstance(index, Index)  # the runtime-checkable protocol


def test_removed_ids_never_returned_and_readd(small_index) -> None:
    c = small_index
    index, ids, vectors, queries = c.index, c.ids, c.vectors, c.queries
    gone = ids[::3]
    assert index.remove(np.concatenate([gone, [999_999]])) == len(gone)
    assert index.remove(gone) == 0
    assert len(index) == len(ids) - len(gone)
    hits = index.search(np.concatenate([queries, vectors[::3][:20]]), len(ids))
    assert not np.isin(hits.ids, gone).any()
    valid = hits.ids[hits.ids >= 0]
    assert np.isin(valid, ids).all()
    # Re-adding a removed id makes it findable again, as its own nearest neighbour.
    index.add(gone[:1], vectors[:1])
    assert len(index) == len(ids) - len(gone) + 1
    assert index.search(vectors[:1], 1).ids[0, 0] == gone[0]


def test_upsert_replaces_vector(small_index) -> None:
    c = small_index
    index, ids, vectors = c.index, c.ids, c.vectors
    target = ids[10]
    index.add([target], vectors[200:201])  # now stored twice? it must not be
    assert len(index) == len(ids)
    hits = index.search(vectors[200:201], 3)
    assert target in hits.ids[0, :2]  # ties with id ids[200] itself are allowed
    assert np.count_nonzero(hits.ids[0] == target) == 1
    old = index.search(vectors[10:11], len(ids)).ids[0]
    assert np.count_nonzero(old == target) <= 1


def test_empty_index(small_index, tmp_path: Path) -> None:
    c = small_index
    spec, index, ids, queries = c.spec, c.index, c.ids, c.queries
    empty = create_index(spec, dim=DIM)
    hits = empty.search(queries, 10)
    assert len(empty) == 0 and hits.ids.shape == hits.scores.shape == (len(queries), 0)
    empty.save(tmp_path / "empty.lki")
    assert len(load_index(tmp_path / "empty.lki")) == 0
    assert empty.remove(ids[:3]) == 0
    assert empty.search(queries[:0], 10).ids.shape == (0, 0)
    index.remove(ids)
    assert len(index) == 0
    assert index.search(queries, 10).ids.shape == (len(queries), 0)


def test_k_larger_than_n(small_index) -> None:
    c = small_index
    spec, index, ids, queries = c.spec, c.index, c.ids, c.queries
    hits = index.search(queries[:3], 10 * len(ids))
    assert hits.ids.shape == (3, len(ids))
    for row, scores in zip(hits.ids, hits.scores, strict=True):
        valid = row[row >= 0]
        assert len(np.unique(valid)) == len(valid)
        padding = scores[row < 0]
        assert np.all(np.isinf(padding))
        if spec in EXACT_SPECS or spec.startswith("binary:engine=faiss") or spec == "binary":
            assert sorted(valid) == sorted(ids)
    assert index.search(queries[:2], 0).ids.shape == (2, 0)
    with pytest.raises(VectorIndexError):
        index.search(queries, -1)


def test_bad_inputs(small_index) -> None:
    c = small_index
    index, ids, vectors, queries = c.index, c.ids, c.vectors, c.queries
    with pytest.raises(VectorIndexError, match="more than once"):
        index.add([5_000, 5_000], vectors[:2])
    with pytest.raises(VectorIndexError):
        index.add([5_000, 5_001, 5_002], vectors[:2])
    with pytest.raises(VectorIndexError):
        index.add([-4], vectors[:1])
    if isinstance(index, BinaryIndex) and index.packed:
        return
    with pytest.raises(DimensionMismatchError):
        index.add([5_000], vectors[:1, :-1])
    with pytest.raises(DimensionMismatchError):
        index.search(queries[:, :50], 5)
    with pytest.raises(VectorIndexError):
        index.add([5_000], np.full((1, DIM), np.nan, dtype=np.float32))
    assert len(index) == len(ids)


# --- backend specifics ----------------------------------------------------------------------


def test_ivfpq_flat_until_enough_vectors(small) -> None:
    ids, vectors, queries = small
    index = IVFPQIndex(dim=DIM, nlist=4, m=97, nbits=4)
    with pytest.raises(VectorIndexError, match="needs at least 256"):
        index.train()
    index.add(ids[:100], vectors[:100])
    assert not index.is_trained
    exact = filled(ExactIndex(dim=DIM), ids[:100], vectors[:100]).search(queries, 5)
    np.testing.assert_array_equal(index.search(queries, 5).ids, exact.ids)
    index.add(ids[100:], vectors[100:])
    assert index.is_trained and len(index) == len(ids)
    explicit = IVFPQIndex(dim=DIM, nlist=4, m=97, nbits=4)
    explicit.train(vectors)
    assert explicit.is_trained and len(explicit) == 0
    explicit.add(ids[:10], vectors[:10])
    assert len(explicit) == 10


def test_ivfpq_default_m_divides_dim() -> None:
    assert create_index("ivfpq", dim=97).spec == "ivfpq:m=97"
    assert create_index("ivfpq", dim=256).spec == "ivfpq:m=64"
    assert create_index("ivfpq", dim=96).spec == "ivfpq:m=24"


def test_hnsw_compacts_after_many_removals(small) -> None:
    ids, vectors, queries = small
    index = filled(HNSWIndex(dim=DIM, M=8, efConstruction=40, ef=64), ids, vectors)
    index.remove(ids[:50])
    assert index.deleted == 50  # below the compaction threshold: only marked
    index.remove(ids[50:300])
    assert index.deleted == 0 and len(index) == 100
    exact = filled(ExactIndex(dim=DIM), ids[300:], vectors[300:]).search(queries, 10)
    assert recall_at_10(index.search(queries, 10).ids, exact.ids) >= 0.9


def _stored_scores(metric: str, queries: np.ndarray, found: np.ndarray, ids, vectors):
    """Exact scores of the returned ids (rows of ``found``), for checking approximate ones."""
    position = {int(i): p for p, i in enumerate(ids)}
    rows = np.array([[position[int(i)] for i in row] for row in found])
    return np.stack(
        [
            score_matrix(q[None], vectors[r], Metric(metric))[0]
            for q, r in zip(queries, rows, strict=True)
        ]
    )


# Measured recall@10 (cosine/dot/euclidean), M=8, efConstruction=40, ef=32, added in two
# batches: sq=8 0.978/0.982/0.988, sq=16 0.998/1.000/0.948 (float storage: 0.998/1.000/0.948).
@pytest.mark.parametrize("metric", FLOAT_METRICS)
@pytest.mark.parametrize(("sq", "rtol"), [(8, 1e-2), (16, 1e-3)])
def test_hnsw_sq_recall_against_exact(data, monkeypatch, metric: str, sq: int, rtol: float):
    monkeypatch.setattr(hnsw_module, "_SQ8_TRAIN_MIN", 1_000)
    ids, vectors, queries = data
    truth = filled(ExactIndex(dim=DIM, metric=metric), ids, vectors).search(queries, K)
    index = HNSWIndex(dim=DIM, metric=metric, M=8, efConstruction=40, ef=32, sq=sq)
    index.add(ids[:600], vectors[:600])  # sq=8: below the training size, float storage
    assert index.quantised is (sq == 16)
    index.add(ids[600:], vectors[600:])  # sq=8: trains on all 5,003, then quantises
    assert index.quantised and len(index) == N
    assert index.spec == f"hnsw:M=8,efConstruction=40,ef=32,sq={sq}"
    hits = index.search(queries, K)
    recall = recall_at_10(hits.ids, truth.ids)
    assert recall >= 0.9, f"sq={sq} {metric}: recall@10 {recall:.3f}"
    # Scores come from the rounded vectors: close to the exact scores of the same ids.
    exact = _stored_scores(metric, queries, hits.ids[:, :10], ids, vectors)
    np.testing.assert_allclose(hits.scores[:, :10], exact, rtol=rtol, atol=rtol)


def test_hnsw_sq_storage_is_compact(small, monkeypatch) -> None:
    monkeypatch.setattr(hnsw_module, "_SQ8_TRAIN_MIN", 256)
    ids, vectors, _ = small
    sizes = {}
    for sq in (0, 16, 8):
        index = filled(HNSWIndex(dim=DIM, M=8, sq=sq), ids, vectors)
        storage = faiss.downcast_index(index._graph.storage)
        sizes[sq] = storage.code_size if sq else 4 * DIM
        # The graph is the only copy of the vectors: nothing else in the object is that big.
        assert all(
            not isinstance(v, np.ndarray) or v.nbytes <= 8 * len(ids) for v in vars(index).values()
        )
    assert sizes == {0: 4 * DIM, 16: 2 * DIM, 8: DIM}


def test_hnsw_sq8_save_load_remove_and_compact(small, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hnsw_module, "_SQ8_TRAIN_MIN", 256)
    ids, vectors, queries = small
    index = HNSWIndex(dim=DIM, M=8, efConstruction=40, ef=64, sq=8)
    index.add(ids[:100], vectors[:100])
    index.add(ids[:10], vectors[100:110])  # upsert while still float
    assert not index.quantised and len(index) == 100 and index.deleted == 10
    index.add(ids[100:], vectors[100:])  # crosses 256: trained, deleted nodes dropped
    assert index.quantised and len(index) == len(ids) and index.deleted == 0
    assert index.search(vectors[100:101], 1).ids[0, 0] in (ids[0], ids[100])  # same vector

    path = tmp_path / "sq8.lki"
    index.save(path)
    loaded = load_index(path)
    assert isinstance(loaded, HNSWIndex) and loaded.quantised and loaded.spec == index.spec
    before, after = index.search(queries, 15), loaded.search(queries, 15)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)

    # Compaction re-encodes decoded vectors: the survivors' codes must not change.
    decoded = {int(i): loaded._graph.reconstruct(n) for n, i in enumerate(loaded._labels)}
    gone = ids[:150]
    assert loaded.remove(gone) == 150
    assert loaded.deleted == 150 and len(loaded) == len(ids) - 150  # marked only
    assert not np.isin(loaded.search(vectors[:20], 50).ids, gone).any()
    loaded.compact()
    assert loaded.deleted == 0 and len(loaded._labels) == len(ids) - 150
    for node, label in enumerate(loaded._labels):
        np.testing.assert_array_equal(loaded._graph.reconstruct(node), decoded[int(label)])
    hits = loaded.search(np.concatenate([queries, vectors[:20]]), 50)
    assert not np.isin(hits.ids, gone).any()
    exact = filled(ExactIndex(dim=DIM), ids[150:], vectors[150:]).search(queries, 10)
    assert recall_at_10(loaded.search(queries, 10).ids, exact.ids) >= 0.9
    loaded.add(gone[:1], vectors[:1])
    assert loaded.search(vectors[:1], 1).ids[0, 0] == gone[0]


def test_hnsw_sq_spec_and_mismatched_file(small, tmp_path: Path) -> None:
    with pytest.raises(IndexSpecError, match=r"sq must be one of 0\|8\|16"):
        create_index("hnsw:sq=4", dim=DIM)
    ids, vectors, _ = small
    path = tmp_path / "fp16.lki"
    filled(create_index("hnsw:M=8,sq=16", dim=DIM), ids, vectors).save(path)
    file = read_index_file(path)
    with pytest.raises(CorruptIndexError, match="sq=8"):
        HNSWIndex(dim=DIM, M=8, sq=8)._restore(file.state, file)
    with pytest.raises(CorruptIndexError, match="expected kind"):
        HNSWIndex(dim=DIM, M=8, sq=16)._restore(*_flat_file(small, tmp_path))


def _flat_file(small, tmp_path: Path):
    ids, vectors, _ = small
    path = tmp_path / "flat.lki"
    filled(create_index("hnsw:M=8", dim=DIM), ids, vectors).save(path)
    file = read_index_file(path)
    return file.state, file


def test_dimension_and_metric_recorded(small, tmp_path: Path) -> None:
    ids, vectors, _ = small
    index = filled(create_index("hnsw:M=8", dim=DIM, metric="euclidean"), ids, vectors)
    index.save(tmp_path / "e.lki")
    loaded = load_index(tmp_path / "e.lki")
    assert loaded.metric is Metric.EUCLIDEAN and loaded.dim == DIM
    assert loaded.spec == "hnsw:M=8"


# --- specs ----------------------------------------------------------------------------------


def test_parse_spec() -> None:
    assert parse_spec("exact") == ("exact", {})
    assert parse_spec(" annoy : trees=50 , search_k=5000 ") == (
        "annoy",
        {"trees": 50, "search_k": 5000},
    )
    assert parse_spec("hnsw:m=32,EF=128,efconstruction=200") == (
        "hnsw",
        {"M": 32, "ef": 128, "efConstruction": 200},
    )
    assert parse_spec("binary:packed=yes,engine=FAISS")[1] == {"packed": True, "engine": "faiss"}
    assert parse_spec("ivfpq:nlist=4096,m=64,nprobe=16")[1]["nlist"] == 4096
    assert parse_spec("lsh:bits=16,tables=8")[1] == {"bits": 16, "tables": 8}


@pytest.mark.parametrize(
    ("spec", "dim", "metric", "message"),
    [
        ("faiss", 8, "cosine", "valid backends: exact, annoy"),
        ("", 8, "cosine", "non-empty"),
        ("annoy:leaves=3", 8, "cosine", "valid options: trees"),
        ("annoy:trees=many", 8, "cosine", "not an integer"),
        ("annoy:trees=0", 8, "cosine", "trees must be between"),
        ("annoy:trees", 8, "cosine", "name=value"),
        ("annoy:trees=3,trees=4", 8, "cosine", "twice"),
        ("hnsw:M=1", 8, "cosine", "M must be"),
        ("lsh:bits=65", 8, "cosine", "bits must be"),
        ("exact:engine=gpu", 8, "cosine", "numpy|faiss"),
        ("binary:packed=maybe", 8, "cosine", "boolean"),
        ("ivfpq:m=10", 97, "cosine", "valid m for this dimension: 1, 97"),
        ("binary", 8, "euclidean", "supports hamming"),
        ("exact", 8, "hamming", "does not support metric"),
        ("hnsw", 0, "cosine", "dim must be"),
    ],
)
def test_bad_specs(spec: str, dim: int, metric: str, message: str) -> None:
    with pytest.raises(IndexSpecError, match=message):
        create_index(spec, dim=dim, metric=metric)


SIZES = (20_000, 200_000, 400_000)


def test_choose_spec() -> None:
    budget = 8 * 2**30
    assert choose_spec(5_000, 256, memory_budget_bytes=budget) == "exact"
    assert choose_spec(20_000, 256, memory_budget_bytes=budget).startswith("hnsw:M=16")
    # Bigger graphs: a longer search list.
    params = [parse_spec(choose_spec(n, 256, memory_budget_bytes=budget))[1] for n in SIZES]
    assert [p["ef"] for p in params] == [160, 160, 240]
    assert [p["efConstruction"] for p in params] == [40, 40, 40]
    # 200k EfficientNet-Lite0 vectors: float16 storage, about half a GiB.
    lite0 = parse_spec(choose_spec(200_000, 1280, memory_budget_bytes=6 * 2**30))
    assert lite0[0] == "hnsw" and lite0[1]["sq"] == 16
    assert hnsw_bytes(200_000, 1280, 16, 16) < 0.7 * 2**30 < hnsw_bytes(200_000, 1280, 16, 0)
    # From 500k on: an inverted file with float16 vectors, 8-bit codes when those do not fit.
    million = choose_spec(1_000_000, 1280, memory_budget_bytes=6 * 2**30)
    assert million == ivf_spec(1_000_000) == "ivf:nlist=2048,nprobe=4,sq=16"
    fp16, sq8 = ivf_bytes(1_000_000, 1280, 2048, 16), ivf_bytes(1_000_000, 1280, 2048, 8)
    assert 2.5 * 2**30 < fp16 < 3 * 2**30 and sq8 < 0.55 * fp16
    tight = choose_spec(1_000_000, 1280, memory_budget_bytes=(fp16 + sq8) // 2)
    assert tight == "ivf:nlist=2048,nprobe=4,sq=8"
    # Too big for either: IVF-PQ codes.
    assert choose_spec(1_000_000, 1280, memory_budget_bytes=sq8 - 1).startswith("ivfpq:")
    assert "quantizer=hnsw" in choose_spec(50_000_000, 64, memory_budget_bytes=budget)
    big = choose_spec(100_000_000, 256, memory_budget_bytes=budget)
    name, options = parse_spec(big)
    assert name == "ivfpq" and 256 % options["m"] == 0 and options["nlist"] >= 16_384
    assert "rerank" not in options
    tight = parse_spec(choose_spec(100_000_000, 256, memory_budget_bytes=2 * 2**30))[1]
    assert tight["m"] < options["m"]
    # Below 500k, a graph with 8-bit codes when float16 storage does not fit.
    assert parse_spec(choose_spec(400_000, 97, memory_budget_bytes=140 * 2**20))[1]["sq"] == 8
    rerank = parse_spec(choose_spec(400_000, 32, memory_budget_bytes=85 * 2**20))[1]
    assert rerank["m"] == 8 and rerank["rerank"] == 100
    for n in (20_000, 10**6, 10**8):
        spec = choose_spec(n, 97, memory_budget_bytes=2**30)
        assert create_index(spec, dim=97).spec  # every choice is a valid spec for the dim


# --- files ----------------------------------------------------------------------------------


@pytest.fixture()
def saved(small, tmp_path: Path) -> Path:
    ids, vectors, _ = small
    path = tmp_path / "hnsw.lki"
    filled(create_index("hnsw:M=8", dim=DIM), ids, vectors).save(path)
    return path


@pytest.mark.parametrize("cut", [0, 5, 40, 300, -1])
def test_truncated_file(saved: Path, cut: int) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[:cut] if cut >= 0 else data[:-1])
    with pytest.raises(CorruptIndexError):
        load_index(saved)
    with pytest.raises(CorruptIndexError):
        HNSWIndex.load(saved)


@pytest.mark.parametrize("where", [10, 100, -50, -5_000])
def test_flipped_byte(saved: Path, where: int) -> None:
    data = bytearray(saved.read_bytes())
    data[where] ^= 0x20
    saved.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError):
        load_index(saved)


def test_trailing_garbage(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(CorruptIndexError, match="trailing"):
        load_index(saved)


def test_foreign_files(saved: Path, tmp_path: Path) -> None:
    npz = tmp_path / "x.npz"
    np.savez(npz, ids=np.arange(3))
    text = tmp_path / "x.txt"
    text.write_text("hello\n" * 100)
    for path in (npz, text):
        with pytest.raises(CorruptIndexError, match="not a lookalike index"):
            load_index(path)
    with pytest.raises(CorruptIndexError, match="not 'exact'"):
        ExactIndex.load(saved)
    with pytest.raises(VectorIndexError):
        load_index(tmp_path / "missing.lki")
