"""The ``ray`` index backend on a real local Ray cluster started once for this module: IVF
shards held by Ray actors, searched as one index, surviving (or reporting) a lost actor."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import toy_encoder
from conftest import PHOTO_NAMES, free_port, photo
from test_grpc import Served
from test_rest import LiveServer

from lookalike.cli.main import main as lookalike_main
from lookalike.cli.remote import announce
from lookalike.core.collection import Collection
from lookalike.errors import DistributedError, IndexSpecError
from lookalike.knn import create_index, load_index
from lookalike.knn._format import read_index_file
from lookalike.knn.base import Tunable
from lookalike.knn.ivf import IVFIndex
from lookalike.knn.ray_shards import RayShardedIndex
from lookalike.server.protos import lookalike_v1_pb2 as v1
from lookalike.server.rest import create_app
from lookalike.server.service import SearchService

pytestmark = pytest.mark.slow  # a Ray cluster takes seconds to start

DIM = 32
N = 3000
SHARDS = 3
# 16 clusters (trained from 256 vectors on), 3 visited per query: approximate, so equal
# answers show the shards share one quantiser rather than both being exact.
SPEC = "ray:shards=3,nlist=16,nprobe=3,timeout=60"
SINGLE = "ivf:nlist=16,nprobe=3,sq=16"
CLUSTER_CPUS = 4


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster of 4 CPUs (more than this machine has: actors mostly wait) with a
    small object store, for the whole module."""
    ray.init(
        num_cpus=CLUSTER_CPUS,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


def clustered(n: int, seed: int) -> np.ndarray:
    """Vectors around 20 centres, as embeddings cluster."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(20, DIM))
    rows = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM))
    return rows.astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids (scattered, not 0..n), vectors and queries."""
    ids = np.random.default_rng(1).permutation(10 * N)[:N].astype(np.int64)
    return ids, clustered(N, 2), clustered(40, 3)


@pytest.fixture
def sharded() -> Iterator[RayShardedIndex]:
    index = create_index(SPEC, dim=DIM, metric="cosine")
    assert isinstance(index, RayShardedIndex)
    yield index
    index.close()  # frees the actors' CPUs for the next test


def assert_same(a, b) -> None:
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.scores, b.scores)


def kill(actor) -> None:
    """Kill a shard's actor and wait until it is dead (``ray.kill`` only asks: a call made
    right after it may still be answered)."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.count.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def expected_shards(ids: np.ndarray) -> list[np.ndarray]:
    return [np.sort(ids[ids % SHARDS == s]) for s in range(SHARDS)]


@pytest.mark.parametrize(
    ("metric", "sq"), [("cosine", 16), ("euclidean", 0), ("dot", 8)], ids=lambda v: str(v)
)
def test_same_ids_and_scores_as_one_ivf_index(metric: str, sq: int, data) -> None:
    """Fed the same vectors, the shards answer exactly as a plain ``ivf`` index: the one
    quantiser is trained on the same sample, and each shard's top-k merges into the top-k."""
    ids, vectors, queries = data
    index = create_index(f"ray:shards=3,nlist=16,nprobe=3,sq={sq}", dim=DIM, metric=metric)
    try:
        single = create_index(f"ivf:nlist=16,nprobe=3,sq={sq}", dim=DIM, metric=metric)
        index.add(ids, vectors)
        single.add(ids, vectors)
        assert len(index) == N
        for k in (1, 10, 100):
            hits = index.search(queries, k)
            assert hits.ids.shape == (len(queries), k) and not hits.partial
            assert_same(hits, single.search(queries, k))
        # More than the probed lists hold: both pad with -1 alike.
        assert_same(index.search(queries[:3], N), single.search(queries[:3], N))
    finally:
        index.close()


def test_adds_and_removes_go_to_the_owning_shard_and_match_one_index(
    sharded: RayShardedIndex, data, tmp_path: Path
) -> None:
    ids, vectors, queries = data
    single = create_index(SINGLE, dim=DIM, metric="cosine")
    # Before training (fewer than 16 * nlist vectors) every shard searches its vectors exactly.
    sharded.add(ids[:200], vectors[:200])
    single.add(ids[:200], vectors[:200])
    assert not sharded.is_trained
    assert_same(sharded.search(queries, 10), single.search(queries, 10))
    for start in range(200, N, 700):
        sharded.add(ids[start : start + 700], vectors[start : start + 700])
    assert sharded.is_trained
    held = sharded.shard_ids()
    for got, want in zip(held, expected_shards(ids), strict=True):
        assert np.array_equal(got, want)
    assert [len(h) for h in held] == [int(np.sum(ids % SHARDS == s)) for s in range(SHARDS)]

    # Removes go to their shards only; unknown ids are ignored.
    gone = ids[ids % SHARDS == 1][:50]
    assert sharded.remove(np.concatenate([gone, [10 * N + 1]])) == 50
    after = sharded.shard_ids()
    assert np.array_equal(after[0], held[0]) and np.array_equal(after[2], held[2])
    assert np.array_equal(after[1], np.setdiff1d(held[1], gone))
    # An upsert and a new id land in their owners.
    moved = rng_vectors(2, seed=9)
    sharded.add(np.array([ids[0], 10 * N + 2]), moved)
    kept = np.setdiff1d(ids, gone)
    final_ids = np.concatenate([kept, [10 * N + 2]])
    for got, want in zip(sharded.shard_ids(), expected_shards(final_ids), strict=True):
        assert np.array_equal(got, want)
    assert len(sharded) == len(final_ids)

    # One IVF index with the shards' quantiser, holding the same vectors, answers the same.
    sharded.save(tmp_path / "sharded.lkx")
    reference = one_index_like(tmp_path / "sharded.lkx")
    # The first 200 waited as float16 before training, as in any IVF index with sq=16.
    waited = np.concatenate([vectors[:200].astype(np.float16), vectors[200:]])
    final = {int(i): v for i, v in zip(ids, waited.astype(np.float32), strict=True)}
    final[int(ids[0])] = moved[0]
    final[10 * N + 2] = moved[1]
    for i in gone.tolist():
        del final[i]
    reference.add(np.array(list(final)), np.array(list(final.values())))
    for k in (10, 50):
        assert_same(sharded.search(queries, k), reference.search(queries, k))


def rng_vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def one_index_like(path: Path) -> IVFIndex:
    """An empty single IVF index with the quantiser the shards in ``path`` share."""
    import faiss

    file = read_index_file(path)
    ivf = faiss.deserialize_index(file.array("0.ivf"))
    ivf.reset()  # keeps the trained quantiser, drops shard 0's vectors
    single = IVFIndex(dim=DIM, metric="cosine", nlist=16, nprobe=3, sq=16)
    single._ivf = ivf
    return single


def test_save_and_load_round_trip(sharded: RayShardedIndex, data, tmp_path: Path) -> None:
    ids, vectors, queries = data
    sharded.add(ids, vectors)
    before = sharded.search(queries, 10)
    held = sharded.shard_ids()
    path = tmp_path / "index.lkx"
    sharded.save(path, metadata={"owner": "test"})
    sharded.close()
    loaded = load_index(path)
    try:
        assert isinstance(loaded, RayShardedIndex)
        assert loaded.spec == SPEC and len(loaded) == N and loaded.metadata == {"owner": "test"}
        assert_same(loaded.search(queries, 10), before)
        for got, want in zip(loaded.shard_ids(), held, strict=True):
            assert np.array_equal(got, want)
        loaded.add(np.array([10 * N + 5]), queries[:1])  # it keeps working after loading
        assert loaded.search(queries[:1], 1).ids[0, 0] == 10 * N + 5
    finally:
        loaded.close()


def test_a_killed_actor_is_replaced_and_the_query_answers_in_full(
    sharded: RayShardedIndex, data
) -> None:
    ids, vectors, queries = data
    single = create_index(SINGLE, dim=DIM, metric="cosine")
    sharded.add(ids, vectors)
    single.add(ids, vectors)
    # Changes after the last snapshot live in the shard's log: the replacement replays them.
    late_ids, late = np.array([10 * N + 1, 10 * N + 4]), queries[:2] * 1.01
    sharded.add(late_ids, late)
    single.add(late_ids, late)
    sharded.remove(ids[ids % SHARDS == 1][:20])
    single.remove(ids[ids % SHARDS == 1][:20])
    expected = single.search(queries, 10)
    assert set(late_ids.tolist()) <= set(expected.ids[:, 0].tolist())

    victim = sharded.shard_actors()[1]
    kill(victim)
    hits = sharded.search(queries, 10)
    assert not hits.partial and hits.missing == ()
    assert_same(hits, expected)
    replacement = sharded.shard_actors()[1]
    assert replacement is not None and replacement is not victim

    # A write to a shard whose actor died is routed to its replacement.
    kill(sharded.shard_actors()[2])
    sharded.add(np.array([10 * N + 2]), queries[5:6])
    assert 10 * N + 2 in sharded.shard_ids()[2].tolist()
    assert sharded.search(queries[5:6], 1).ids[0, 0] == 10 * N + 2


def test_without_room_for_a_replacement_the_live_shards_answer_partially(data) -> None:
    """The cluster is full when an actor dies: the query returns within its timeouts from
    the two live shards, flagged partial with the lost shard named, and answers in full
    again once the shard can be replaced."""
    ids, vectors, queries = data
    timeout = 8  # short, to keep the test short; long enough to start an actor
    index = create_index(f"ray:shards=3,nlist=16,nprobe=3,timeout={timeout}", dim=DIM)
    assert isinstance(index, RayShardedIndex)
    blocker = ray.remote(num_cpus=1)(blocker_class())
    holders = []
    try:
        index.add(ids, vectors)
        full = index.search(queries, 200)
        holders.append(blocker.remote())  # the fourth CPU
        ray.get(holders[0].ready.remote(), timeout=60)
        kill(index.shard_actors()[1])
        holders.append(blocker.remote())  # takes the CPU the dead actor freed
        ray.get(holders[1].ready.remote(), timeout=60)

        with ThreadPoolExecutor(1) as pool:
            # Bounded by the timeouts (never hangs): the wait guards against a hang only.
            hits = pool.submit(index.search, queries, 10).result(timeout=3 * timeout + 60)
        assert hits.partial and hits.missing == (1,)
        assert not np.any(hits.ids % SHARDS == 1)
        for row, got in zip(full.ids, hits.ids, strict=True):
            assert np.array_equal(got, row[row % SHARDS != 1][:10])
        # Until the back-off passes, the lost shard is reported again without a new wait.
        again = index.search(queries, 10)
        assert again.partial and again.missing == (1,)
        assert_same(again, hits)

        # Writes must reach their shard: with no room they fail loudly, not silently.
        with pytest.raises(DistributedError, match="shard"):
            index.add(np.array([10 * N + 1]), queries[:1])

        for holder in holders:
            ray.kill(holder, no_restart=True)
        holders.clear()
        index.add(np.array([10 * N + 4]), queries[:1])  # a write replaces the shard at once
        recovered = index.search(queries, 10)
        assert not recovered.partial
        assert recovered.ids[0, 0] == 10 * N + 4
        assert np.array_equal(recovered.ids[1:], full.ids[1:, :10])
    finally:
        for holder in holders:
            ray.kill(holder, no_restart=True)
        index.close()


def blocker_class() -> type:
    """An actor class that only holds a CPU (defined in a function so that Ray ships it by
    value: the workers cannot import this test module)."""

    class Blocker:
        def ready(self) -> bool:
            return True

    return Blocker


def test_nprobe_is_the_tuning_knob(sharded: RayShardedIndex, data) -> None:
    ids, vectors, queries = data
    sharded.add(ids, vectors)
    assert sharded.tuning_knob == "nprobe" and sharded.tuning_value == 3
    assert isinstance(sharded, Tunable)
    one = IVFIndex(dim=DIM, nlist=16)
    assert sharded.tuning_values() == one.tuning_values() == [1, 2, 3, 4, 6, 8, 11, 16]
    single = create_index("ivf:nlist=16,nprobe=16,sq=16", dim=DIM, metric="cosine")
    single.add(ids, vectors)
    sharded.set_tuning(16)
    assert sharded.nprobe == 16 and "nprobe=16" in sharded.spec
    assert_same(sharded.search(queries, 10), single.search(queries, 10))


# -- through a collection and its interfaces ---------------------------------------------


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 photos: ten crops of each of six real photos (enough to train 2 clusters)."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(4)
    for name in PHOTO_NAMES:
        image = photo(name)
        width, height = image.size
        for i in range(10):
            left, top = int(rng.integers(0, width // 3)), int(rng.integers(0, height // 3))
            box = (left, top, left + width // 2, top + height // 2)
            image.crop(box).save(folder / f"{name}-{i}.jpg", quality=90)
    return folder


def jpeg_of(path: Path) -> bytes:
    return path.read_bytes()


def test_a_collection_on_ray_shards_answers_and_reports_a_lost_shard(
    crops: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A collection indexed on Ray shards finds what exact search finds; REST says
    ``partial: false``. With replacement off and one actor killed, REST, gRPC and the CLI
    (through the running server) all say the answer is partial."""
    with Collection(tmp_path / "exact", model=toy_encoder.NAME, index_spec="exact") as exact:
        exact.index(crops, workers=0)
        queries = [crops / f"{name}-0.jpg" for name in PHOTO_NAMES]
        expected = [exact.search(q, k=8) for q in queries]

    spec = "ray:shards=3,nlist=2,nprobe=2,sq=0,cpus=0,timeout=20,replace=false"
    folder = tmp_path / "sharded"
    collection = Collection(folder, model=toy_encoder.NAME, index_spec=spec)
    try:
        collection.index(crops, workers=0)
        for query, want in zip(queries, expected, strict=True):
            got = collection.search(query, k=8)
            assert not got.partial
            assert {r.id: r.path for r in got} == {r.id: r.path for r in want}
            scores = {r.id: r.score for r in want}
            for result in got:
                assert result.score == pytest.approx(scores[result.id], abs=1e-5)

        service = SearchService(collection)
        port = free_port()
        with announce(folder, host="127.0.0.1", port=port, db=None) as key:
            server = LiveServer(create_app(service, local_key=key))
            # On the port announced (the key had to exist before the app).
            server.port = server.server.config.port = port
            served = Served(service)
            with server, httpx.Client(base_url=server.url, timeout=60) as http:
                body = rest_search(http, queries[0])
                assert body["partial"] is False
                assert [r["id"] for r in body["results"]] == [r.id for r in expected[0]]

                index = collection.vector_index().index
                assert isinstance(index, RayShardedIndex)
                kill(index.shard_actors()[0])

                body = rest_search(http, queries[0])
                assert body["partial"] is True
                assert body["results"] and all(r["id"] % SHARDS != 0 for r in body["results"])
                request = v1.SearchRequest(image=jpeg_of(queries[0]), k=8)
                assert served.v1.Search(request, timeout=60).partial is True

                capsys.readouterr()
                argv = ["-c", str(folder), "search", str(queries[0]), "-k", "3"]
                assert lookalike_main(argv) == 0
                out, err = capsys.readouterr()
                assert "warning: part of the sharded index did not answer" in err
                assert len(out.strip().splitlines()) == 3
            served.close()
    finally:
        collection.close()


def rest_search(http: httpx.Client, path: Path) -> dict:
    image = ("q.jpg", io.BytesIO(jpeg_of(path)), "image/jpeg")
    reply = http.post("/search", files={"image": image}, data={"k": 8})
    assert reply.status_code == 200, reply.text
    body: dict = reply.json()
    return body


def test_a_spec_costs_nothing_until_used() -> None:
    """Creating the index from a spec, or searching it empty, starts no actor (no CPU is
    taken); options are checked at once."""
    before = ray.available_resources().get("CPU")
    index = create_index("ray:shards=2,address=local,timeout=5,replace=false", dim=DIM)
    assert index.spec == "ray:shards=2,timeout=5,replace=false,address=local"
    assert len(index) == 0 and index.search(np.zeros((1, DIM), np.float32), 5).ids.shape == (1, 0)
    assert ray.available_resources().get("CPU") == before
    for bad in ("ray:address=http://x", "ray:sq=4", "ray:shards=0", "ray:timeout=0"):
        with pytest.raises(IndexSpecError):
            create_index(bad, dim=DIM)
