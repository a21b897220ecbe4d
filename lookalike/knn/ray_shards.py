"""Shards of an IVF index held by Ray actors and searched as one index: the ``ray`` backend.

What runs where:

- **The driver** (the process that holds this index: an API server, the CLI) keeps no vectors.
  It routes ids (id ``i`` lives in shard ``i % shards``, as :class:`~lookalike.knn.sharded.
  ShardedIndex` routes them), trains the coarse quantiser once, fans every search out to all
  shards (one batched call per shard, in parallel) and merges their top-k exactly as
  ``ShardedIndex`` does.
- **One Ray actor per shard** holds that shard's :class:`~lookalike.knn.ivf.IVFIndex`. Actors
  are placed with Ray's ``SPREAD`` strategy, so with several nodes they spread over them (one
  or more per node), each reserving ``cpus`` CPUs (faiss searches with that many threads).

Training: until ``16 * nlist`` vectors have arrived the shards keep their vectors flat and
search them exactly, as ``IVFIndex`` does. Then the driver gathers the stored vectors plus the
new ones, trains one empty IVF index on a sample exactly as ``IVFIndex.add`` would, and sends
its serialised bytes to every shard, which moves its vectors into a copy. Every shard thus
shares one coarse quantiser (and, with ``sq=8``, one set of ranges): a query visits the same
``nprobe`` clusters in each, every vector is scored as it would be in one index, and the merged
top-k equals the single index's (same ids, same scores) whenever no two scores tie.

Failures. Every remote call waits at most ``timeout`` seconds. A shard whose actor died or did
not answer in time is killed and, with ``replace=true``, replaced by a new actor refilled from
what the driver keeps to rebuild it (below); the query is then asked again of that shard once.
If that fails too (no room on the cluster for a replacement, a lost node, ``replace=false``) the
search answers from the live shards with ``SearchHits.partial`` set and the lost shards in
``SearchHits.missing``; the shard is tried again (one replacement) no sooner than ``timeout``
seconds later, so queries meanwhile answer at once. A search thus returns within about three
timeouts (the call, the replacement, the retry). A lost shard is never skipped silently, and
when no shard answers the search raises :class:`DistributedError`. Adds, removes and saves
must reach every shard they touch: after one replacement and retry they raise instead.

What is kept to rebuild a shard (its "recovery point"): the shard's last serialised state, as
an object in the Ray object store that the driver owns, plus the log of adds, removes and the
training since then (added vectors are kept as the object-store objects the adds sent anyway).
A shard's snapshot is taken again, and its log dropped, once the log holds more than a quarter
of the shard's rows (and at least ``_LOG_MIN_ROWS``) and at every save. The cost: about one
more copy of each shard, in the object store of the node where its actor ran (Ray spills it to
disk under pressure), plus a log of at most about a quarter of the shard as float32 in the
driver node's object store. The alternative, a copy of every vector in the driver, would put
the whole collection back into the API server's memory, which sharding exists to avoid. A
snapshot outlives its actor (it is owned by the driver), not its node: when a node is lost the
shard answers as missing until its owner (the collection) rebuilds the index from its catalog.
After loading a file, the recovery points are its sections, put into the driver node's object
store, until the shards are next snapshotted.

Ray is imported on first use; ``address`` picks the cluster (see :func:`ray_module`). Saving
collects every shard's state into the one self-describing index file (``{shard}.ids``,
``{shard}.vectors``, ``{shard}.ivf`` sections); loading starts the actors and fills them from
it, passing through the driver's memory once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from lookalike.errors import (
    CorruptIndexError,
    DistributedError,
    IndexSpecError,
    LookalikeError,
    VectorIndexError,
)
from lookalike.knn._common import (
    BaseIndex,
    Option,
    as_new_ids,
    check_bool,
    check_choice,
    check_int,
    check_k,
    empty_hits,
    fix_width,
    import_faiss,
    make_hits,
)
from lookalike.knn._format import IndexFile
from lookalike.knn.base import Metric, SearchHits, as_vectors

# Rows per add call to one shard: bounds each call's work (so that ``timeout`` fits it) and
# the size of the objects the log keeps.
_ADD_CHUNK = 8192
# A shard is snapshotted again once its log holds more rows than this, or than a quarter of
# the shard: replaying the log stays cheap and the log small next to the shard.
_LOG_MIN_ROWS = 10_000
_LOG_FRACTION = 4
# Queries up to this size travel inside each call; bigger batches go to the object store once.
_INLINE_BYTES = 100_000
_ADDRESS = re.compile(r"auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}")
_INIT_LOCK = threading.Lock()

# One entry of a shard's log: ("add", ids, vectors ObjectRef), ("remove", ids, None) or
# ("adopt", None, trained-template ObjectRef).
LogEntry = tuple[str, np.ndarray | None, Any]


@dataclass(frozen=True)
class _AddressOption(Option):
    """A spec option whose value is a Ray address, kept as text."""

    def parse(self, backend: str, name: str, text: str) -> Any:
        return _check_address(backend, text.strip())


def _check_address(backend: str, address: Any) -> str | None:
    if address is None:
        return None
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise IndexSpecError(
            f"{backend}: address must be auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}"
        )
    return address


def ray_module(address: str | None) -> ModuleType:
    """Ray, connected: the session already open in this process as it is; otherwise
    ``ray.init(address)``: None finds a running cluster (``RAY_ADDRESS``, or one started on
    this machine) or starts a local one, ``auto`` requires a running cluster, ``local``
    starts a new one, ``HOST:PORT`` / ``ray://HOST:PORT`` attaches to that cluster. A
    session opened here stays open for the life of the process (its actors hold the index)."""
    try:
        import ray
    except ImportError as error:
        raise DistributedError(
            "the ray index backend needs Ray: pip install 'lookalike[ray]' (or pip install ray)"
        ) from error
    with _INIT_LOCK:
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as error:
                where = "a local Ray" if address in (None, "local") else f"Ray at {address}"
                raise DistributedError(f"cannot start or reach {where}: {error}") from error
    return ray


class ShardActor:
    """One shard, on a Ray worker: an :class:`IVFIndex` whose quantiser the driver trained."""

    def __init__(
        self,
        dim: int,
        metric: str,
        options: dict[str, Any],
        snapshot: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None,
    ) -> None:
        from lookalike.knn.ivf import IVFIndex

        self.index = IVFIndex(dim=dim, metric=metric, **options)
        if snapshot is not None:
            state, arrays = snapshot
            self.index._restore(dict(state), IndexFile({}, dict(arrays)))

    def count(self) -> int:
        """How many vectors the shard holds."""
        return len(self.index)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace vectors; returns the shard's new size."""
        self.index.add(ids, vectors)
        return len(self.index)

    def remove(self, ids: np.ndarray) -> tuple[int, int]:
        """Remove ids; returns how many were removed and the shard's new size."""
        removed = self.index.remove(ids)
        return removed, len(self.index)

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's top-k ids and scores, visiting ``nprobe`` clusters."""
        self.index.nprobe = nprobe  # per call: the driver owns the knob (and tunes it)
        hits = self.index.search(queries, k)
        return hits.ids, hits.scores

    def stored(self) -> np.ndarray:
        """The vectors waiting in flat storage before training (what the driver trains on)."""
        vectors: np.ndarray = self.index._store["vectors"]
        return vectors

    def adopt(self, template: np.ndarray) -> int:
        """Move the stored vectors into a copy of the driver's trained, empty IVF index (the
        end of ``IVFIndex.train``); returns the shard's size."""
        index = self.index
        if index.is_trained:
            raise VectorIndexError("ray: this shard is already trained")
        ivf = import_faiss().deserialize_index(template)
        index._add_to_ivf(ivf, index._store.ids, index._store["vectors"])
        index._ivf = ivf
        index._store = index._empty_store()
        return len(index)

    def dump(self) -> tuple[int, tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """The shard's size and its state as ``IVFIndex`` saves it (called with two returns,
        so the driver can check the size without fetching the state)."""
        state, arrays = self.index._state()
        return len(self.index), (state, arrays)

    def ids(self) -> np.ndarray:
        """The ids the shard holds."""
        from lookalike.knn.sharded import _ivf_ids

        if self.index.is_trained:
            return _ivf_ids(self.index)
        return self.index._store.ids.copy()

    def memory_mib(self) -> tuple[float, float]:
        """Resident and peak resident size of this actor's process, in MiB (Linux)."""
        fields = {}
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    name, _, value = line.partition(":")
                    if name in ("VmRSS", "VmHWM"):
                        fields[name] = float(value.split()[0]) / 1024
        except OSError:
            pass
        return fields.get("VmRSS", math.nan), fields.get("VmHWM", math.nan)


class RayShardedIndex(BaseIndex):
    """An IVF index split into ``shards`` shards, each held by a Ray actor; searched as one."""

    backend: ClassVar[str] = "ray"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric.COSINE, Metric.DOT, Metric.EUCLIDEAN)
    options: ClassVar[dict[str, Option]] = {
        "shards": Option(int, 4, "shards, each held by one Ray actor"),
        "nlist": Option(int, 1024, "coarse clusters (shared by every shard)"),
        "nprobe": Option(int, 8, "clusters visited per query in every shard"),
        "sq": Option(int, 16, "stored precision: 16 float16, 8 8-bit codes, 0 float32"),
        "quantizer": Option(("flat", "hnsw"), "flat", "how the nearest clusters are found"),
        "cpus": Option(int, 1, "CPUs each shard actor reserves (its search threads)"),
        "timeout": Option(int, 30, "seconds any call to a shard may take"),
        "replace": Option(bool, True, "start a replacement for a lost shard actor"),
        "address": _AddressOption(
            str, None, "Ray cluster: auto, local, HOST:PORT or ray://HOST:PORT"
        ),
    }
    tuning_knob: ClassVar[str] = "nprobe"

    def __init__(
        self,
        *,
        dim: int,
        metric: str | Metric = Metric.COSINE,
        shards: int = 4,
        nlist: int = 1024,
        nprobe: int = 8,
        sq: int = 16,
        quantizer: str = "flat",
        cpus: int = 1,
        timeout: int = 30,
        replace: bool = True,
        address: str | None = None,
    ) -> None:
        from lookalike.knn.ivf import SQ_CHOICES

        self._setup(dim, metric)
        self.shards = check_int(self.backend, "shards", shards, low=1, high=4096)
        self.nlist = check_int(self.backend, "nlist", nlist, low=1, high=2**20)
        self.nprobe = check_int(self.backend, "nprobe", nprobe, low=1, high=2**20)
        self.sq = check_int(self.backend, "sq", sq, low=0, high=16)
        if self.sq not in SQ_CHOICES:
            raise IndexSpecError(f"ray: sq must be one of 0|8|16, got {sq}")
        self.quantizer = check_choice(self.backend, "quantizer", quantizer, ("flat", "hnsw"))
        self.cpus = check_int(self.backend, "cpus", cpus, low=0, high=1024)
        self.timeout = check_int(self.backend, "timeout", timeout, low=1, high=86_400)
        self.replace = check_bool(self.backend, "replace", replace)
        self.address = _check_address(self.backend, address)
        # Nothing starts until the index is first used (or loaded): a spec costs nothing.
        self._actors: list[Any] | None = None
        self._actor_class: Any = None
        self._counts = [0] * self.shards
        self._trained = False
        self._snapshots: list[Any] = [None] * self.shards  # None: empty and untrained
        self._logs: list[list[LogEntry]] = [[] for _ in range(self.shards)]
        self._log_rows = [0] * self.shards
        self._last_try: dict[int, float] = {}  # lost shard -> when a replacement last failed
        self._lock = threading.RLock()

    # -- the Index protocol ------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "sq": self.sq,
            "quantizer": self.quantizer,
            "cpus": self.cpus,
            "timeout": self.timeout,
            "replace": self.replace,
            "address": self.address,
        }

    def _ivf_options(self) -> dict[str, Any]:
        """What each shard's IVFIndex is built with."""
        return {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "sq": self.sq,
            "quantizer": self.quantizer,
        }

    def __len__(self) -> int:
        return sum(self._counts)

    @property
    def is_trained(self) -> bool:
        return self._trained

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors, each in the shard that owns its id."""
        vectors = as_vectors(vectors, self.dim)
        ids = as_new_ids(ids, len(vectors))
        if not len(ids):
            return
        with self._lock:
            ray = self._start()
            if not self._trained and len(self) + len(ids) >= self._train_size():
                self._train(ray, ids, vectors)
            owner = ids % self.shards
            rows = [np.flatnonzero(owner == s) for s in range(self.shards)]
            for start in range(0, max(len(r) for r in rows), _ADD_CHUNK):
                parts = {
                    s: r[start : start + _ADD_CHUNK] for s, r in enumerate(rows) if len(r) > start
                }
                self._add_round({s: (ids[p], ray.put(vectors[p])) for s, p in parts.items()})

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids from their shards; returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[ids >= 0]
        if not len(ids):
            return 0
        with self._lock:
            ray = self._start()
            return self._remove(ray, ids)

    def search(self, queries: np.ndarray, k: int) -> SearchHits:
        """Every shard's top-k (asked in parallel), merged into the best k overall; partial
        (with the missing shards named) when a shard could not answer."""
        queries = as_vectors(queries, self.dim)
        width = min(check_k(k), len(self))
        if width == 0 or not len(queries):
            return empty_hits(len(queries), width, self.metric)
        ray = self._start()
        payload = ray.put(queries) if queries.nbytes > _INLINE_BYTES else queries
        nprobe = self.nprobe

        def ask(actors: list[Any], shards: Iterable[int]) -> dict[int, Any]:
            return {s: actors[s].search.remote(payload, width, nprobe) for s in shards}

        actors = list(self._actors or [])
        alive = [s for s in range(self.shards) if actors[s] is not None]
        answers, failed = self._gather(ask(actors, alive))
        failed |= set(range(self.shards)) - set(alive)
        if failed:
            self._recover(failed, actors, force=False)
            actors = list(self._actors or [])
            replaced = [s for s in sorted(failed) if actors[s] is not None]
            more, _ = self._gather(ask(actors, replaced))
            answers.update(more)
            failed -= set(more)
        if not answers:
            raise DistributedError(
                f"ray: no shard of the index answered within {self.timeout}s "
                f"(shards {', '.join(map(str, sorted(failed)))} lost)"
            )
        ids = np.concatenate([answers[s][0] for s in sorted(answers)], axis=1)
        scores = np.concatenate([answers[s][1] for s in sorted(answers)], axis=1)
        from lookalike.knn.exact import top_k

        positions, best = top_k(scores, width, higher_is_better=self.metric.higher_is_better)
        best_ids, best = fix_width(np.take_along_axis(ids, positions, axis=1), best, width)
        hits = make_hits(best_ids, best, self.metric)
        if failed:
            hits = dataclasses.replace(hits, partial=True, missing=tuple(sorted(failed)))
        return hits

    # -- the Tunable protocol: nprobe, sent with every query -----------------------------------

    @property
    def tuning_value(self) -> int:
        """Clusters visited per query in every shard (``nprobe``)."""
        return self.nprobe

    def tuning_values(self) -> list[int]:
        """``nprobe`` candidates, as for one IVF index: powers of sqrt(2), rounded, up to
        ``nlist``, where the scan is exhaustive."""
        steps = range(2 * math.ceil(math.log2(self.nlist)) + 1)
        values = {min(self.nlist, round(2 ** (step / 2))) for step in steps}
        return sorted(values | {self.nlist})

    def set_tuning(self, value: int) -> None:
        """Visit ``value`` clusters per query from now on (nothing to send: every search
        call carries it)."""
        self.nprobe = check_int(self.backend, "nprobe", value, low=1, high=2**20)

    # -- introspection -------------------------------------------------------------------------

    def shard_ids(self) -> list[np.ndarray]:
        """The ids each shard's actor holds, asked of the actors themselves."""
        with self._lock:
            self._start()
            held = self._each_shard(lambda actor, _: actor.ids.remote(), range(self.shards))
            return [np.sort(np.asarray(held[s], dtype=np.int64)) for s in range(self.shards)]

    def shard_actors(self) -> list[Any]:
        """The actor handle of each shard (None while a shard is lost)."""
        self._start()
        return list(self._actors or [])

    def shard_memory_mib(self) -> list[tuple[float, float]]:
        """Each shard actor's resident and peak resident memory, in MiB (for benchmarks: the
        shards live in other processes than the driver)."""
        with self._lock:
            self._start()
            used = self._each_shard(lambda actor, _: actor.memory_mib.remote(), range(self.shards))
            return [(float(used[s][0]), float(used[s][1])) for s in range(self.shards)]

    def close(self) -> None:
        """Stop the shard actors now (dropping the last reference to the index does it too,
        when Ray collects the actor handles). The index must not be used afterwards."""
        with self._lock:
            if self._actors is None:
                return
            ray = ray_module(self.address)
            for actor in self._actors:
                if actor is not None:
                    ray.kill(actor, no_restart=True)
            self._actors = [None] * self.shards
            self._snapshots = [None] * self.shards
            self._logs = [[] for _ in range(self.shards)]
            self._last_try = {s: math.inf for s in range(self.shards)}

    # -- saving and loading --------------------------------------------------------------------

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        with self._lock:
            if self._actors is None:  # never used: every shard is empty
                from lookalike.knn.ivf import IVFIndex

                empty = IVFIndex(dim=self.dim, metric=self.metric, **self._ivf_options())
                states = [empty._state()] * self.shards
            else:
                ray = self._start()
                self._snapshot(range(self.shards))  # the file and the recovery point agree
                try:
                    states = ray.get(list(self._snapshots), timeout=self.timeout)
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as error:
                    raise DistributedError(f"ray: cannot collect the shards: {error}") from error
            arrays = {
                f"{s}.{name}": array
                for s, (_, shard_arrays) in enumerate(states)
                for name, array in shard_arrays.items()
            }
            return {"trained": self._trained, "counts": list(self._counts)}, arrays

    def _restore(self, state: dict[str, Any], file: IndexFile) -> None:
        counts = state.get("counts")
        if not isinstance(counts, list) or len(counts) != self.shards:
            raise CorruptIndexError(f"ray: the file does not describe {self.shards} shards")
        trained = bool(state.get("trained"))
        names = ("ids", "vectors", "ivf") if trained else ("ids", "vectors")
        ray = ray_module(self.address)
        with self._lock:
            self._trained = trained
            self._snapshots = [
                ray.put(({"trained": trained}, {n: file.array(f"{s}.{n}") for n in names}))
                for s in range(self.shards)
            ]
            self._start_actors(ray)
            if self._counts != [int(c) for c in counts]:
                raise CorruptIndexError(
                    f"ray: shards hold {self._counts} vectors, the file says {counts}"
                )

    # -- inside --------------------------------------------------------------------------------

    def _train_size(self) -> int:
        from lookalike.knn.ivfpq import _POINTS_PER_CENTROID

        return _POINTS_PER_CENTROID * self.nlist

    def _start(self) -> ModuleType:
        """Ray, with the shard actors started (empty) on first use."""
        ray = ray_module(self.address)
        if self._actors is None:
            with self._lock:
                if self._actors is None:
                    self._start_actors(ray)
        return ray

    def _start_actors(self, ray: ModuleType) -> None:
        """One actor per shard, filled from its snapshot; raises unless all start in time."""
        started = [self._new_actor(ray, s) for s in range(self.shards)]
        pings = [actor.count.remote() for actor in started]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=self.timeout)
        try:
            if len(ready) < len(pings):
                raise DistributedError(
                    f"ray: {self.shards} shard actors did not start within {self.timeout}s; "
                    f"the cluster needs {self.cpus} free CPU(s) per shard"
                )
            self._counts = [int(c) for c in self._get(ray, pings)]
        except BaseException:
            for actor in started:
                ray.kill(actor, no_restart=True)
            raise
        self._actors = started

    def _new_actor(self, ray: ModuleType, shard: int) -> Any:
        """A new actor for ``shard`` holding its snapshot; the caller replays the log."""
        if self._actor_class is None:
            self._actor_class = ray.remote(ShardActor)
        return self._actor_class.options(
            num_cpus=self.cpus,
            scheduling_strategy="SPREAD",
            # Ray's own restart would re-run the constructor with its first snapshot and lose
            # the log since: a lost actor is replaced here instead (``_recover``).
            max_restarts=0,
        ).remote(self.dim, self.metric.value, self._ivf_options(), self._snapshots[shard])

    def _get(self, ray: ModuleType, refs: list[Any]) -> list[Any]:
        """Values of finished calls; an error the shard itself raised comes back as it was."""
        try:
            return list(ray.get(refs, timeout=self.timeout))
        except ray.exceptions.RayTaskError as error:
            raise _task_error(error) from error

    def _gather(self, calls: dict[int, Any]) -> tuple[dict[int, Any], set[int]]:
        """Wait at most ``timeout`` for one call per shard: the answers, and the shards whose
        actor died or did not answer in time. An error the shard raised itself (bad input)
        is raised here as it was."""
        if not calls:
            return {}, set()
        ray = ray_module(self.address)
        refs = list(calls.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout)
        done = set(ready)
        answers: dict[int, Any] = {}
        failed: set[int] = set()
        for shard, ref in calls.items():
            if ref not in done:
                failed.add(shard)
                continue
            try:
                answers[shard] = ray.get(ref, timeout=self.timeout)
            except ray.exceptions.RayTaskError as error:
                raise _task_error(error) from error
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                failed.add(shard)  # the actor died, or its node (and the answer) was lost
        return answers, failed

    def _each_shard(self, call: Callable[[Any, int], Any], shards: Iterable[int]) -> dict[int, Any]:
        """One call per shard that must succeed (a write, a snapshot): a shard that fails is
        replaced and asked once more; failing again raises DistributedError."""
        shards = list(shards)
        actors = list(self._actors or [])
        alive = [s for s in shards if actors[s] is not None]
        answers, failed = self._gather({s: call(actors[s], s) for s in alive})
        failed |= set(shards) - set(alive)
        if failed:
            self._recover(failed, actors, force=True)
            actors = list(self._actors or [])
            lost = sorted(s for s in failed if actors[s] is None)
            retry = {s: call(actors[s], s) for s in sorted(failed) if actors[s] is not None}
            more, again = self._gather(retry)
            answers.update(more)
            if lost or again:
                shard_list = ", ".join(map(str, sorted({*lost, *again})))
                raise DistributedError(
                    f"ray: shard(s) {shard_list} lost and could not be replaced within "
                    f"{self.timeout}s; the change was not applied to them"
                )
        return answers

    def _recover(self, failed: set[int], seen: list[Any], *, force: bool) -> None:
        """Kill the failed shards' actors and start replacements refilled from each shard's
        snapshot and log, all waited for together (at most ``timeout``). Without ``force``
        (a search) a shard whose replacement failed less than ``timeout`` ago is left lost,
        and so is everything when a write holds the index for longer than ``timeout``."""
        if not self._lock.acquire(timeout=-1 if force else self.timeout):
            return
        try:
            self._replace(failed, seen, force=force)
        finally:
            self._lock.release()

    def _replace(self, failed: set[int], seen: list[Any], *, force: bool) -> None:
        ray = ray_module(self.address)
        assert self._actors is not None
        now = time.monotonic()
        starting: dict[int, tuple[Any, Any]] = {}
        for s in sorted(failed):
            current = self._actors[s]
            if current is not None and current is not seen[s]:
                continue  # another caller replaced it meanwhile
            if current is not None:
                # Dead, or hung: a hung actor must not answer (or change) anything later.
                ray.kill(current, no_restart=True)
                self._actors[s] = None
            if not self.replace:
                continue
            if not force and now - self._last_try.get(s, -math.inf) < self.timeout:
                continue
            actor = self._new_actor(ray, s)
            for op, ids, ref in self._logs[s]:
                if op == "add":
                    actor.add.remote(ids, ref)
                elif op == "remove":
                    actor.remove.remote(ids)
                else:
                    actor.adopt.remote(ref)
            starting[s] = (actor, actor.count.remote())
        if not starting:
            return
        pings = [ping for _, ping in starting.values()]
        ready = set(ray.wait(pings, num_returns=len(pings), timeout=self.timeout)[0])
        for s, (actor, ping) in starting.items():
            try:
                count = ray.get(ping, timeout=self.timeout) if ping in ready else None
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                count = None
            if count is not None and int(count) == self._counts[s]:
                self._actors[s] = actor
                self._last_try.pop(s, None)
            else:
                # Not scheduled (no room), or its refill failed: cancel it, try later.
                ray.kill(actor, no_restart=True)
                self._last_try[s] = time.monotonic()

    def _log(self, shard: int, entry: LogEntry, rows: int) -> None:
        self._logs[shard].append(entry)
        self._log_rows[shard] += rows

    def _snapshot_if_due(self, shards: Iterable[int]) -> None:
        due = [
            s
            for s in shards
            if self._log_rows[s] > max(_LOG_MIN_ROWS, self._counts[s] // _LOG_FRACTION)
        ]
        if due:
            self._snapshot(due)

    def _snapshot(self, shards: Iterable[int]) -> None:
        """New recovery points: each shard's state in the object store (owned by this
        driver, stored where the actor runs); their logs start again empty."""
        states: dict[int, Any] = {}

        def dump(actor: Any, shard: int) -> Any:
            count, state = actor.dump.options(num_returns=2).remote()
            states[shard] = state
            return count

        counts = self._each_shard(dump, shards)
        for s, count in counts.items():
            if int(count) != self._counts[s]:
                raise DistributedError(f"ray: shard {s} holds {count}, expected {self._counts[s]}")
            self._snapshots[s] = states[s]
            self._logs[s] = []
            self._log_rows[s] = 0

    def _add_round(self, chunks: dict[int, tuple[np.ndarray, Any]]) -> None:
        """One add call per shard (ids, vectors in the object store), logged once done."""
        counts = self._each_shard(
            lambda actor, s: actor.add.remote(chunks[s][0], chunks[s][1]), chunks
        )
        for s, (chunk_ids, ref) in chunks.items():
            self._counts[s] = int(counts[s])
            self._log(s, ("add", chunk_ids, ref), len(chunk_ids))
        self._snapshot_if_due(chunks)

    def _remove(self, ray: ModuleType, ids: np.ndarray) -> int:
        owner = ids % self.shards
        parts = {s: ids[owner == s] for s in range(self.shards) if np.any(owner == s)}
        answers = self._each_shard(lambda actor, s: actor.remove.remote(parts[s]), parts)
        removed = 0
        for s, (count, size) in answers.items():
            self._counts[s] = int(size)
            removed += int(count)
            if count:
                self._log(s, ("remove", parts[s], None), len(parts[s]))
        self._snapshot_if_due(answers)
        return removed

    def _train(self, ray: ModuleType, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Train one IVF index on the stored and the new vectors, exactly as ``IVFIndex.add``
        does for a single index, and move every shard's stored vectors into a copy of it."""
        from lookalike.knn.ivf import IVFIndex
        from lookalike.knn.ivfpq import _training_sample

        self._remove(ray, ids)  # the new vectors replace these ids (upsert)
        stored = self._each_shard(lambda actor, _: actor.stored.remote(), range(self.shards))
        waiting = np.concatenate([stored[s] for s in range(self.shards)])
        if len(waiting) + len(ids) < self._train_size():
            return  # upserts of stored ids: still too few to train on
        trainer = IVFIndex(dim=self.dim, metric=self.metric, **self._ivf_options())
        most = trainer._training_points()
        trainer.train(
            np.concatenate([_training_sample(waiting, most), _training_sample(vectors, most)])
        )
        template = ray.put(import_faiss().serialize_index(trainer._ivf))
        del trainer, stored, waiting
        counts = self._each_shard(lambda actor, _: actor.adopt.remote(template), range(self.shards))
        for s in range(self.shards):
            self._counts[s] = int(counts[s])
            self._log(s, ("adopt", None, template), 0)
        self._trained = True


def _task_error(error: Exception) -> LookalikeError:
    """The typed error a shard raised, as it was raised there; anything else wrapped."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LookalikeError):
        return cause
    return DistributedError(f"ray: a shard failed: {cause or error}")
