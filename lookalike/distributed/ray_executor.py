"""Extraction on a Ray cluster: an ingest executor whose workers decode and embed.

Each worker is a Ray actor holding one encoder, loaded once. The driver sends it chunks of file
paths (one chunk = one batch), so the files must be readable at the same paths on every node
(a shared or network file system). A worker returns a :class:`~lookalike.core.ingest.Batch`:
each file's record, its vector and, when asked for, its local features (SIFT, or patch tokens
computed on the worker from the pixels it decoded); pixels never travel. The collection's
ingest pipeline stores every batch in one catalog transaction, exactly as for threads, keyed
by file path, so the run is idempotent:

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
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from lookalike.core.ingest import Batch, EncoderRecipe, IngestJob, decode_file, embed_batch
from lookalike.core.local_store import LocalFeatureKind
from lookalike.errors import DistributedError, LookalikeError, ModelMismatchError
from lookalike.images import DEFAULT_MAX_PIXELS

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

    def __init__(self, recipe: EncoderRecipe, local: LocalFeatureKind | None) -> None:
        self.encoder = recipe.build()
        self.local = local

    def identity_key(self) -> str:
        """The encoder identity, which the driver checks against its own before any work."""
        return self.encoder.identity.key

    def embed(self, paths: list[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Batch:
        """Decode and embed these files (and extract their local features); images above
        ``max_pixels`` are reported."""
        sift = self.local.sift if self.local is not None else None
        config = self.encoder.preprocess
        decoded = [decode_file(p, config, sift, max_pixels=max_pixels) for p in paths]
        return embed_batch(self.encoder, decoded, self.local)


@dataclass(frozen=True)
class RayExecutor:
    """An ingest executor that decodes and embeds on Ray workers (see :class:`RayOptions`)."""

    options: RayOptions = RayOptions()

    def batches(self, job: IngestJob) -> Iterator[Batch]:
        """Batches of the job's files, in the order workers finish them."""
        paths, size = job.paths, job.batch_size
        if not paths:
            return
        chunks = [paths[start : start + size] for start in range(0, len(paths), size)]
        with ray_session(self.options.address) as ray:
            workers = _start_workers(ray, job.recipe, self.options, job.local, len(chunks))
            try:
                _check_identity(ray, workers, job.encoder.identity.key)
                yield from _run_chunks(ray, workers, chunks, job.max_pixels)
            finally:
                for worker in workers:
                    ray.kill(worker, no_restart=True)


def _start_workers(
    ray: ModuleType,
    recipe: EncoderRecipe,
    options: RayOptions,
    local: LocalFeatureKind | None,
    chunks: int,
) -> list[Any]:
    count = options.workers
    if count is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = max(1, cpus // options.threads)
    count = min(count, chunks)
    worker_recipe = EncoderRecipe(recipe.name, {**recipe.options, "threads": options.threads})
    actor = ray.remote(EmbedWorker)
    run = uuid.uuid4().hex[:8]
    # Named so that operators (and tests) can find a run's workers with ray.util.
    return [
        actor.options(
            name=f"{ACTOR_PREFIX}-{run}-{i}",
            num_cpus=options.threads,
            max_restarts=options.max_restarts,
            max_task_retries=options.max_task_retries,
        ).remote(worker_recipe, local)
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
    ray: ModuleType, workers: list[Any], chunks: list[list[str]], max_pixels: int
) -> Iterator[Batch]:
    todo = iter(chunks)
    pending: dict[Any, tuple[Any, list[str]]] = {}

    def submit(worker: Any) -> None:
        chunk = next(todo, None)
        if chunk is not None:
            pending[worker.embed.remote(chunk, max_pixels)] = (worker, chunk)

    for _ in range(_IN_FLIGHT_PER_WORKER):
        for worker in workers:
            submit(worker)
    alive = set(range(len(workers)))
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        worker, chunk = pending.pop(ready)
        try:
            batch = ray.get(ready)
        except ray.exceptions.RayActorError as error:
            # Ray already restarted the worker and retried the chunk; give up on it for this
            # run rather than loop on a file that crashes its decoder.
            reason = f"worker lost while embedding this file ({type(error).__name__})"
            yield Batch([], np.empty((0, 0), np.float32), None, [(p, reason) for p in chunk])
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
            yield batch
        submit(worker)  # a lost worker gets no more; the others take what is left


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
