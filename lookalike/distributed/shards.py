"""Index shards built on a Ray cluster: a filler for :func:`lookalike.knn.sharded.build_shards`."""

from __future__ import annotations

import numpy as np

from lookalike.distributed.ray_executor import ray_session
from lookalike.knn.base import Metric
from lookalike.knn.sharded import Part, fill_shard


def fill_on_ray(template: np.ndarray, parts: list[Part], metric: Metric) -> list[np.ndarray]:
    """Fill one shard per part as Ray tasks, in the current Ray session or a local one
    started for the call."""
    with ray_session(None) as ray:
        task = ray.remote(fill_shard)
        shared = ray.put(template)
        blobs: list[np.ndarray] = ray.get(
            [task.remote(shared, ids, vectors, metric) for ids, vectors in parts]
        )
        return blobs
