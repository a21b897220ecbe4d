"""Sharded indexes, the way billion-vector deployments are built: train once, fill shards in
parallel, then merge them into one index or search them all and merge the top-k.

Building (IVF-PQ): :func:`train_ivfpq` trains the coarse and product quantisers once, on a
sample. :func:`build_shards` gives each part of the collection an empty copy of that trained
index and fills the copies in parallel (threads here, or Ray tasks across a cluster, each shard
travelling as faiss's serialised bytes). Because every shard shares the quantisers, a vector
gets the same list and the same code whichever shard encodes it, and :func:`merge_shards`
(faiss ``IndexIVF.merge_from``) only concatenates inverted lists: with parts in id order the
merged index is identical to one filled sequentially, and searches return the same ids and
scores.

Serving: :class:`ShardedIndex` holds several indexes of any backend, routes each id to one
shard (``id % shards``) and answers a search by asking every shard for its top-k and keeping
the best k of the union, which is the global top-k whenever each shard's own top-k is exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.errors import CorruptIndexError, VectorIndexError
from lookalike.knn._common import check_k, import_faiss, make_hits
from lookalike.knn.base import Index, Metric, SearchHits, as_ids, as_vectors
from lookalike.knn.exact import top_k
from lookalike.knn.ivfpq import IVFPQIndex

Part = tuple[np.ndarray, np.ndarray]  # ids, vectors
# Fills empty copies of a serialised trained index with parts: (template, parts, metric) ->
# one serialised shard per part.
ShardFiller = Callable[[np.ndarray, list[Part], Metric], list[np.ndarray]]
MANIFEST_FORMAT = "lookalike.sharded"


def train_ivfpq(
    sample: np.ndarray,
    *,
    metric: str | Metric = Metric.COSINE,
    nlist: int = 1024,
    m: int = 0,
    nbits: int = 8,
    nprobe: int = 16,
    rerank: int = 0,
) -> IVFPQIndex:
    """An empty IVF-PQ index whose quantisers are trained on ``sample`` (a few hundred thousand
    vectors suffice for billions: see ``train_size``)."""
    sample = np.asarray(sample, dtype=np.float32)
    index = IVFPQIndex(
        dim=sample.shape[1],
        metric=metric,
        nlist=nlist,
        m=m,
        nbits=nbits,
        nprobe=nprobe,
        rerank=rerank,
    )
    index.train(sample)
    return index


def split_by_id(ids: np.ndarray, vectors: np.ndarray, shards: int) -> list[Part]:
    """Parts for ``shards`` shards, id ``i`` going to part ``i % shards``, as ShardedIndex
    routes them."""
    ids = as_ids(ids)
    owner = ids % shards
    return [(ids[owner == s], vectors[owner == s]) for s in range(shards)]


def build_shards(
    trained: IVFPQIndex,
    parts: Sequence[Part],
    *,
    fill: ShardFiller | None = None,
    workers: int | None = None,
) -> list[IVFPQIndex]:
    """One shard per part, each an empty copy of ``trained`` filled with that part's vectors,
    built in parallel by ``workers`` threads, or by ``fill`` (e.g.
    :func:`lookalike.distributed.shards.fill_on_ray`, which runs them as Ray tasks). Ids must
    not repeat across parts."""
    if not trained.is_trained or len(trained):
        raise VectorIndexError("build_shards needs a trained, empty IVF-PQ index")
    parts = [(as_ids(ids), as_vectors(vectors, trained.dim)) for ids, vectors in parts]
    _check_disjoint([ids for ids, _ in parts])
    template = import_faiss().serialize_index(trained._ivf)
    if fill is not None:
        blobs = fill(template, parts, trained.metric)
    else:
        with ThreadPoolExecutor(workers or len(parts) or 1) as pool:
            jobs = [pool.submit(fill_shard, template, i, v, trained.metric) for i, v in parts]
            blobs = [job.result() for job in jobs]
    return [_shard(trained, blob, part) for blob, part in zip(blobs, parts, strict=True)]


def fill_shard(
    template: np.ndarray, ids: np.ndarray, vectors: np.ndarray, metric: Metric
) -> np.ndarray:
    """A serialised copy of the trained ``template`` holding these vectors (runs in a worker)."""
    from lookalike.knn.exact import faiss_ready

    faiss = import_faiss()
    ivf = faiss.deserialize_index(template)
    if len(ids):
        ivf.add_with_ids(faiss_ready(vectors, metric), ids)
    blob: np.ndarray = faiss.serialize_index(ivf)
    return blob


def merge_shards(shards: Sequence[IVFPQIndex]) -> IVFPQIndex:
    """One IVF-PQ index holding every shard's vectors; the inverted lists move, so the shards
    are left empty. Shards must come from the same trained index and hold distinct ids."""
    if not shards:
        raise VectorIndexError("merge_shards needs at least one shard")
    first = shards[0]
    if any(not s.is_trained for s in shards):
        raise VectorIndexError("merge_shards needs trained IVF-PQ shards")
    _check_disjoint([_ivf_ids(s) for s in shards])
    faiss = import_faiss()
    merged = IVFPQIndex(dim=first.dim, metric=first.metric, **first._options())
    ivf = faiss.deserialize_index(faiss.serialize_index(first._ivf))
    ivf.reset()
    for shard in shards:
        if not _same_quantisers(ivf, shard._ivf):
            raise VectorIndexError("shards were not built from the same trained index")
        ivf.merge_from(shard._ivf, 0)
        if merged.rerank:
            merged._store.upsert(shard._store.ids, vectors=shard._store["vectors"])
            shard._store.remove(shard._store.ids)
    merged._ivf = ivf
    return merged


class ShardedIndex:
    """Several indexes searched as one: ids are routed to shard ``id % len(shards)``, and a
    search merges every shard's top-k. Follows the Index protocol."""

    def __init__(self, shards: Sequence[Index]) -> None:
        if not shards:
            raise VectorIndexError("a sharded index needs at least one shard")
        first = shards[0]
        if any(s.dim != first.dim or s.metric != first.metric for s in shards):
            raise VectorIndexError("every shard must have the same dimension and metric")
        self.shards = list(shards)
        self.dim = first.dim
        self.metric = first.metric

    @property
    def spec(self) -> str:
        """The shards' spec (all shards share it) and their count."""
        return f"{self.shards[0].spec} x{len(self.shards)} shards"

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def _route(self, ids: np.ndarray) -> list[np.ndarray]:
        """Row positions of ``ids`` per shard, by the same rule as ``split_by_id``."""
        owner = ids % len(self.shards)
        return [np.flatnonzero(owner == i) for i in range(len(self.shards))]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors, each in the shard its id belongs to."""
        ids = as_ids(ids)
        vectors = as_vectors(vectors, self.dim)
        for shard, rows in zip(self.shards, self._route(ids), strict=True):
            if len(rows):
                shard.add(ids[rows], vectors[rows])

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids from their shards; returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        routed = zip(self.shards, self._route(ids), strict=True)
        return sum(shard.remove(ids[rows]) for shard, rows in routed if len(rows))

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        """Every shard's top-k (searched in parallel), merged into the best k overall."""
        queries = as_vectors(queries, self.dim)
        width = min(check_k(k), len(self))
        with ThreadPoolExecutor(len(self.shards)) as pool:
            hits = list(pool.map(lambda shard: shard.search(queries, width), self.shards))
        ids = np.concatenate([h.ids for h in hits], axis=1)
        scores = np.concatenate([h.scores for h in hits], axis=1)
        positions, best = top_k(scores, width, higher_is_better=self.metric.higher_is_better)
        return make_hits(np.take_along_axis(ids, positions, axis=1), best, self.metric)

    def save(self, path: str | Path, *, metadata: dict[str, Any] | None = None) -> None:
        """Each shard to its own index file (``PATH.0``, ``PATH.1``...), which one search node
        can load alone, and a JSON manifest naming them at ``path``."""
        path = Path(path)
        names = [f"{path.name}.{i}" for i in range(len(self.shards))]
        for shard, name in zip(self.shards, names, strict=True):
            shard.save(path.with_name(name))
        manifest = {"format": MANIFEST_FORMAT, "shards": names, "metadata": metadata or {}}
        path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ShardedIndex:
        """Load a sharded index written by ``save``."""
        from lookalike.knn import load_index

        path = Path(path)
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            names = manifest["shards"]
            if manifest.get("format") != MANIFEST_FORMAT or not isinstance(names, list):
                raise ValueError("not a sharded-index manifest")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CorruptIndexError(f"{path}: {error}") from error
        return cls([load_index(path.with_name(str(name))) for name in names])


def _shard(trained: IVFPQIndex, blob: np.ndarray, part: Part) -> IVFPQIndex:
    shard = IVFPQIndex(dim=trained.dim, metric=trained.metric, **trained._options())
    shard._ivf = import_faiss().deserialize_index(blob)
    if shard.rerank and len(part[0]):
        shard._store.upsert(part[0], vectors=part[1])
    return shard


def _check_disjoint(id_lists: list[np.ndarray]) -> None:
    ids = np.concatenate(id_lists) if id_lists else np.empty(0, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise VectorIndexError("the same id appears in more than one shard")


def _ivf_ids(shard: IVFPQIndex) -> np.ndarray:
    invlists = shard._ivf.invlists
    faiss = import_faiss()
    chunks = [
        faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
        for i in range(invlists.nlist)
        if invlists.list_size(i)
    ]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)


def _same_quantisers(a: Any, b: Any) -> bool:
    faiss = import_faiss()
    n = a.quantizer.ntotal
    same_coarse = n == b.quantizer.ntotal and np.array_equal(
        a.quantizer.reconstruct_n(0, n), b.quantizer.reconstruct_n(0, n)
    )
    same_pq = np.array_equal(
        faiss.vector_to_array(a.pq.centroids), faiss.vector_to_array(b.pq.centroids)
    )
    return bool(same_coarse and same_pq)
