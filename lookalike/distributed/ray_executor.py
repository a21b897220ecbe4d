"""Extraction on a Ray cluster: workers decode and embed, the driver writes the catalog.

Each worker is a Ray actor holding one encoder, loaded once. The driver sends it chunks of file
paths (one chunk = one batch), so the files must be readable at the same paths on every node
(a shared or network file system). A worker returns each file's record, its vector and, when
asked for, its local features; pixels never travel. The driver stores every returned chunk in
one catalog transaction through the same path as single-process indexing, keyed by file path,
so the run is idempotent:

- a worker that dies is restarted by Ray and its unfinished chunks run again; a result is only
  stored once it has arrived, and storing the same path twice updates it in place;
- a chunk whose worker keeps dying is recorded as failed (the next run tries it again);
- a driver that stops mid-run keeps every chunk it stored, and the next run embeds only what is
  missing, by the usual file-state check.

Ray is an optional dependency (``pip install lookalike[ray]``), imported only here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.core.ingest import Decoded, IndexReport, ProgressCallback, decode_file
from lookalike.errors import DistributedError, LookalikeError, ModelMismatchError

if TYPE_CHECKING:
    from lookalike.catalog import FileState
    from lookalike.core.collection import Collection
    from lookalike.local.features import SiftConfig

ACTOR_PREFIX = "lookalike-embed"
# Chunks queued per worker: one running, one waiting, so a worker never idles while the driver
# stores the previous result.
_IN_FLIGHT_PER_WORKER = 2
_PING_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run extraction on Ray.

    ``address``: None finds a running cluster (``RAY_ADDRESS``, or the last one started on this
    machine) or else starts a local one; ``"auto"`` requires a running cluster; ``"local"``
    always starts a new local one; ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` attaches to that
    cluster. When Ray is already initialised in this process, that session is used as it is.
    ``workers``: encoder actors (default: the cluster's CPUs divided by ``threads``).
    ``threads``: inference threads (and CPUs reserved) per worker.
    """

    address: str | None = None
    workers: int | None = None
    threads: int = 1
    max_restarts: int = 3
    max_task_retries: int = 2

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise DistributedError(f"workers must be at least 1, got {self.workers}")
        if self.threads < 1:
            raise DistributedError(f"threads must be at least 1, got {self.threads}")


def import_ray() -> ModuleType:
    """The ``ray`` module, or a DistributedError saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise DistributedError(
            "distributed indexing needs Ray: pip install 'lookalike[ray]' (or pip install ray)"
        ) from error
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[ModuleType]:
    """Ray, connected to ``address`` (see RayOptions); a connection opened here is closed on
    exit, one that was already open is left open."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as error:
        where = "a local Ray" if address in (None, "local") else f"the Ray cluster at {address}"
        raise DistributedError(f"cannot start or reach {where}: {error}") from error
    try:
        yield ray
    finally:
        ray.shutdown()


class EmbedWorker:
    """Runs on a Ray worker: one encoder, loaded once, embedding chunks of files by path."""

    def __init__(
        self, model: str, encoder_options: dict[str, Any], local: SiftConfig | None
    ) -> None:
        from lookalike.encoders.registry import create_encoder

        self.encoder = create_encoder(model, **encoder_options)
        self.local = local

    def identity_key(self) -> str:
        """The encoder identity, which the driver checks against its own before any work."""
        return self.encoder.identity.key

    def embed(self, paths: list[str]) -> tuple[list[Decoded], np.ndarray]:
        """Decode and embed these files: every file's Decoded (without pixels) and the vectors
        of the ones that decoded, in order."""
        decoded = [decode_file(path, self.encoder.preprocess, self.local) for path in paths]
        good = [d for d in decoded if d.error is None]
        if good:
            vectors = self.encoder.embed_pixels(np.stack([d.pixels for d in good]))
        else:
            vectors = np.empty((0, self.encoder.dim), dtype=np.float32)
        return [replace(d, pixels=None) for d in decoded], vectors


def embed_files_on_ray(
    collection: Collection,
    paths: list[str],
    known: dict[str, FileState],
    report: IndexReport,
    options: RayOptions,
    *,
    batch_size: int,
    progress: ProgressCallback | None = None,
    local: SiftConfig | None = None,
) -> None:
    """Embed ``paths`` on Ray workers and store them in ``collection``, one catalog
    transaction per chunk of ``batch_size`` files, recording files that fail."""
    if progress:
        progress(0, len(paths))
    if not paths:
        return
    chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    with ray_session(options.address) as ray:
        workers = _start_workers(ray, collection, options, local, len(chunks))
        try:
            _check_identity(ray, workers, collection.encoder.identity.key)
            _run_chunks(ray, collection, workers, chunks, known, report, local, progress)
        finally:
            for worker in workers:
                ray.kill(worker, no_restart=True)
    collection.indexes.flush()
    if progress:
        progress(len(paths), len(paths))


def _start_workers(
    ray: ModuleType,
    collection: Collection,
    options: RayOptions,
    local: SiftConfig | None,
    chunks: int,
) -> list[Any]:
    count = options.workers
    if count is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = max(1, cpus // options.threads)
    count = min(count, chunks)
    encoder_options = {**collection.encoder_options(), "threads": options.threads}
    actor = ray.remote(EmbedWorker)
    run = uuid.uuid4().hex[:8]
    # Named so that operators (and tests) can find a run's workers with ray.util.
    return [
        actor.options(
            name=f"{ACTOR_PREFIX}-{run}-{i}",
            num_cpus=options.threads,
            max_restarts=options.max_restarts,
            max_task_retries=options.max_task_retries,
        ).remote(collection.model_name, encoder_options, local)
        for i in range(count)
    ]


def _check_identity(ray: ModuleType, workers: list[Any], expected: str) -> None:
    """Fail before any work when a worker cannot load the model or loads different weights."""
    try:
        keys = ray.get([worker.identity_key.remote() for worker in workers])
    except ray.exceptions.RayTaskError as error:
        raise _worker_error(error, "a worker could not load the encoder") from error
    except ray.exceptions.RayActorError as error:
        raise DistributedError(f"a worker could not start: {error}") from error
    for key in keys:
        if key != expected:
            raise ModelMismatchError(
                f"a worker's encoder is {key}, the collection's is {expected}; every node needs "
                "the same model weights"
            )


def _run_chunks(
    ray: ModuleType,
    collection: Collection,
    workers: list[Any],
    chunks: list[list[str]],
    known: dict[str, FileState],
    report: IndexReport,
    local: SiftConfig | None,
    progress: ProgressCallback | None,
) -> None:
    total = sum(len(chunk) for chunk in chunks)
    todo = iter(chunks)
    pending: dict[Any, tuple[Any, list[str]]] = {}

    def submit(worker: Any) -> None:
        chunk = next(todo, None)
        if chunk is not None:
            pending[worker.embed.remote(chunk)] = (worker, chunk)

    for _ in range(_IN_FLIGHT_PER_WORKER):
        for worker in workers:
            submit(worker)
    done = 0
    alive = set(range(len(workers)))
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        worker, chunk = pending.pop(ready)
        try:
            decoded, vectors = ray.get(ready)
        except ray.exceptions.RayActorError as error:
            # Ray already restarted the worker and retried the chunk; give up on it for this
            # run rather than loop on a file that crashes its decoder.
            reason = f"worker lost while embedding this file ({type(error).__name__})"
            for path in chunk:
                report.failed.append((path, reason))
                collection.catalog.record_failure(path, reason)
            if not _responds(ray, worker):
                alive.discard(workers.index(worker))
                if not alive:
                    raise DistributedError(
                        "every Ray worker was lost; stored work is kept, index again to finish"
                    ) from error
                continue
        except ray.exceptions.RayTaskError as error:
            raise _worker_error(error, f"a worker failed on {chunk[0]}") from error
        else:
            _store(collection, decoded, vectors, known, report, local)
        done += len(chunk)
        if progress:
            progress(done, total)
        submit(worker)  # a lost worker gets no more; the others take what is left


def _store(
    collection: Collection,
    decoded: list[Decoded],
    vectors: np.ndarray,
    known: dict[str, FileState],
    report: IndexReport,
    local: SiftConfig | None,
) -> None:
    good = []
    for item in decoded:
        if item.error is not None:
            report.failed.append((item.path, item.error))
            collection.catalog.record_failure(item.path, item.error)
        else:
            good.append(item)
    if good:
        collection._store_batch(good, known, report, local, vectors=vectors)


def _responds(ray: ModuleType, worker: Any) -> bool:
    try:
        ray.get(worker.identity_key.remote(), timeout=_PING_TIMEOUT_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
    return True


def _worker_error(error: Exception, context: str) -> LookalikeError:
    """A worker's own typed error as it was raised there, anything else wrapped."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LookalikeError):
        return cause
    return DistributedError(f"{context}: {cause or error}")
