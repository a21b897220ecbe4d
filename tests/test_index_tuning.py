"""The self-tuning default index (``auto``, ``auto:recall=R``): it learns its search knob on
the collection's own vectors, reaches its recall target on data where the old fixed knob did
not, falls back to another structure when a graph cannot, stores what it measured (shown by
``info``, the CLI and REST ``/stats``), and tunes again once the collection has doubled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import toy_encoder
from test_rest import LiveServer

from lookalike.catalog import ImageRecord
from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.core.ingest import Batch, Decoded, IndexReport, IngestPipeline
from lookalike.errors import IndexSpecError
from lookalike.knn import EXACT_MAX_N, choose_spec, create_index, parse_auto, read_index_header
from lookalike.knn.base import Index, Metric
from lookalike.knn.hnsw import HNSWIndex
from lookalike.knn.tuning import TUNING_SAMPLE, Tuning, build_tuned
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

BUDGET = 2**30
N = 24_000  # above EXACT_MAX_N, so a graph is chosen, not exact search
DIM = toy_encoder.DIM  # 64


def isotropic(n: int, dim: int, seed: int) -> np.ndarray:
    """The hardest data for an approximate index: every point is nearly as far from its
    neighbours as from the rest, so a graph walk with a short list misses many of them."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Easy data: tight clusters, as a photo collection's near-duplicates are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    return centres[rng.integers(0, 200, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)


def held_out_recall(index: Index, queries: np.ndarray, truth: np.ndarray) -> float:
    """recall@10 of ``index`` on queries it never saw, against exact neighbours."""
    found = index.search(queries, 10).ids
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


class Hard:
    """An isotropic set, fresh queries with their exact neighbours, and tuned indexes of it."""

    def __init__(self, dim: int, n: int) -> None:
        self.vectors = isotropic(n, dim, seed=1)
        self.queries = isotropic(1000, dim, seed=2)
        exact = create_index("exact", dim=dim)
        exact.add(np.arange(n), self.vectors)
        self.truth = exact.search(self.queries, 10).ids
        self._tuned: dict[float, tuple[Index, Tuning]] = {}

    def tuned(self, target: float) -> tuple[Index, Tuning]:
        if target not in self._tuned:
            ids = np.arange(len(self.vectors))
            self._tuned[target] = build_tuned(
                ids, self.vectors, target=target, memory_budget_bytes=BUDGET
            )
        return self._tuned[target]

    def recall(self, index: Index) -> float:
        return held_out_recall(index, self.queries, self.truth)


@pytest.fixture(scope="module")
def hard() -> Hard:
    return Hard(DIM, N)


def test_tuning_reaches_the_target_where_the_fixed_knob_does_not(hard: Hard) -> None:
    fixed_spec = choose_spec(N, DIM, memory_budget_bytes=BUDGET)
    assert fixed_spec.startswith("hnsw:") and "ef=160" in fixed_spec
    fixed = create_index(fixed_spec, dim=DIM)
    fixed.add(np.arange(N), hard.vectors)
    assert hard.recall(fixed) < 0.93  # the old default, silently short of 0.95

    before = hard.vectors.copy()
    index, tuning = hard.tuned(0.95)
    assert np.array_equal(hard.vectors, before)  # the held-out rows moved back
    assert tuning.knob == "ef" and tuning.value is not None and tuning.value > 160
    assert tuning.reached and tuning.fallbacks == []
    assert tuning.recall - 2 * tuning.stderr >= 0.95
    assert tuning.sample == TUNING_SAMPLE and tuning.tuned_on == N
    assert tuning.spec == index.spec and f"ef={tuning.value}" in index.spec
    # On queries tuning never saw: the target, up to the sampling error of 1,000 queries.
    assert hard.recall(index) >= 0.94
    # The held-out sample was added back: every vector is there and finds itself.
    assert len(index) == N
    every = np.arange(0, N, 97)
    assert np.array_equal(index.search(hard.vectors[every], 1).ids[:, 0], every)


def test_a_higher_target_turns_the_knob_further(hard: Hard) -> None:
    (low, low_tuning), (high, high_tuning) = hard.tuned(0.9), hard.tuned(0.98)
    assert low_tuning.knob == high_tuning.knob == "ef"
    assert low_tuning.value is not None and high_tuning.value is not None
    assert low_tuning.value < hard.tuned(0.95)[1].value < high_tuning.value  # type: ignore[operator]
    assert low_tuning.recall >= 0.9 and high_tuning.recall >= 0.98
    assert hard.recall(low) < hard.recall(high)
    assert hard.recall(high) >= 0.97


@pytest.fixture(scope="module")
def wide() -> Hard:
    # At 256 isotropic dimensions the cheap graph levels off far below 0.95 (0.86 at ef=512).
    return Hard(256, EXACT_MAX_N)


def test_a_graph_that_cannot_reach_the_target_falls_back_to_a_better_one(wide: Hard) -> None:
    index, tuning = wide.tuned(0.95)
    assert tuning.chosen.startswith("hnsw:M=16,efConstruction=40")
    assert [f["spec"].split(",ef=")[0] for f in tuning.fallbacks] == ["hnsw:M=16,efConstruction=40"]
    assert tuning.fallbacks[0]["recall"] < 0.95
    assert isinstance(index, HNSWIndex) and (index.M, index.efConstruction) == (32, 200)
    assert tuning.reached and tuning.knob == "ef" and tuning.recall >= 0.95
    assert wide.recall(index) >= 0.94


def test_past_every_graph_an_inverted_file_or_exact_search_answers(wide: Hard) -> None:
    # 0.999 is beyond both graphs (0.99 at ef=512): the inverted file must visit every list,
    # so exact search, which scans the same vectors, answers instead.
    index, tuning = wide.tuned(0.999)
    tried = [f["spec"].partition(":")[0] for f in tuning.fallbacks]
    assert tried == ["hnsw", "hnsw", "ivf"]
    assert all(f["recall"] < 0.999 for f in tuning.fallbacks[:2])
    assert index.spec == "exact" and tuning.recall == 1.0 and tuning.knob is None
    assert wide.recall(index) == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("auto:recall=1.5", "at most 1"),
        ("auto:recall=0", "above 0"),
        ("auto:recall=-0.2", "above 0"),
        ("auto:recall=nan", "above 0"),
        ("auto:recall=high", "not a number"),
        ("auto:recall", "name=value"),
        ("auto:ef=64", "unknown option"),
        ("auto:recall=0.9,recall=0.8", "twice"),
    ],
)
def test_bad_targets_are_typed_errors(tmp_path: Path, spec: str, message: str, capsys) -> None:
    with pytest.raises(IndexSpecError, match=message):
        parse_auto(spec)
    with pytest.raises(IndexSpecError, match=message):
        Collection(tmp_path / "c", index_spec=spec)
    folder = tmp_path / "empty"
    folder.mkdir()
    assert main(["-c", str(tmp_path / "cli"), "index", str(folder), "--index", spec]) == 1
    assert message in capsys.readouterr().err
    with pytest.raises(IndexSpecError):
        build_tuned(np.arange(3), np.zeros((3, 4)), target=1.5, memory_budget_bytes=BUDGET)


def test_auto_spellings() -> None:
    assert parse_auto("auto") == parse_auto("AUTO:") == 0.95
    assert parse_auto(" auto : Recall = 0.98 ") == 0.98
    assert parse_auto("hnsw:ef=64") is None


# --- a collection --------------------------------------------------------------------------


def store(collection: Collection, vectors: np.ndarray, start: int) -> None:
    """Store vectors as images through the ingest pipeline (as ``index`` does once it has
    embedded files), so that loaded indexes are updated in place."""
    records = [
        ImageRecord(f"/photos/{i}.jpg", f"hash{i}", 1000, 1.0, 32, 32)
        for i in range(start, start + len(vectors))
    ]
    pipeline = IngestPipeline(
        collection.catalog,
        collection.indexes,
        collection.local_store,
        model_id=collection.model_id,
        model_key=collection.encoder.identity.key,
    )
    batch = Batch([Decoded(r.path, r) for r in records], vectors)
    pipeline.run([batch], {}, IndexReport(), local=None, total=len(records))


def tuning_of(collection: Collection, metric: Metric) -> dict[str, Any]:
    path = collection.indexes.path(collection.encoder.identity.key, metric)
    recorded: dict[str, Any] = read_index_header(path)["metadata"]["tuning"]
    return recorded


def test_a_collection_stores_and_shows_what_it_measured(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c"
    with Collection(path, model=toy_encoder.NAME, index_spec="auto:recall=0.9") as collection:
        store(collection, clustered(N, DIM, seed=3), 0)
        assert collection.info().index_recall is None  # not built yet: nothing measured
        index = collection.vector_index()
        assert index.tuning is not None and index.tuning.knob == "ef"
        assert index.tuning.target == 0.9 and index.tuning.recall >= 0.9
        recorded = tuning_of(collection, Metric.COSINE)
        assert recorded == index.tuning.to_json()
        info = collection.info()
        assert info.index_spec == "auto:recall=0.9"
        assert info.index_recall == index.tuning.recall
        assert info.index_tuning == recorded
        assert {"knob", "value", "target", "sample", "recall"} <= set(recorded)
    with Collection(path) as reopened:  # from the file: no rebuild, the same measure
        assert reopened.info().index_recall == recorded["recall"]
        assert reopened.vector_index().tuning == Tuning.from_json(recorded)
        assert reopened.indexes.rebuilds == 0
        with LiveServer(create_app(SearchService(reopened))) as server:
            stats = httpx.get(f"{server.url}/stats", timeout=30).json()
        assert stats["index_recall"] == recorded["recall"]
        assert stats["index_tuning"]["knob"] == "ef"
        assert stats["index_tuning"]["value"] == recorded["value"]
        assert stats["index_tuning"]["target"] == 0.9
        assert stats["index_kind"] == recorded["spec"]
    assert main(["-c", str(path), "info"]) == 0
    out = capsys.readouterr().out
    assert f"recall@10:  {recorded['recall']:.3f}" in out
    assert f"ef={recorded['value']}" in out and "target 0.9" in out


def test_a_small_collection_reports_exact_search(tmp_path: Path) -> None:
    with Collection(tmp_path / "c", model=toy_encoder.NAME) as collection:
        store(collection, clustered(300, DIM, seed=4), 0)
        assert collection.vector_index().index.spec == "exact"
        info = collection.info()
        assert info.index_spec == "auto" and info.index_recall == 1.0
        assert info.index_tuning is not None and info.index_tuning["knob"] is None
        assert info.index_tuning["target"] == 0.95  # auto means auto:recall=0.95


def test_the_index_is_tuned_again_once_the_collection_doubles(tmp_path: Path) -> None:
    # Euclidean: no centring to relearn, so only the tuning can ask for the rebuild.
    vectors = clustered(2 * N, DIM, seed=5)
    with Collection(tmp_path / "c", model=toy_encoder.NAME) as collection:
        store(collection, vectors[:N], 0)
        first = collection.vector_index(Metric.EUCLIDEAN).tuning
        assert first is not None and first.tuned_on == N
        assert collection.indexes.rebuilds == 1
        store(collection, vectors[N : N + 1000], N)  # grown by 4%: updated in place
        assert len(collection.vector_index(Metric.EUCLIDEAN)) == N + 1000
        assert collection.indexes.rebuilds == 1
        assert tuning_of(collection, Metric.EUCLIDEAN)["tuned_on"] == N
        store(collection, vectors[N + 1000 :], N + 1000)  # doubled: tuned again
        again = collection.vector_index(Metric.EUCLIDEAN).tuning
        assert collection.indexes.rebuilds == 2
        assert again is not None and again.tuned_on == 2 * N and again.recall >= 0.95
        assert tuning_of(collection, Metric.EUCLIDEAN)["tuned_on"] == 2 * N
