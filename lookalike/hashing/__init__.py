"""Learned binary hashing: hash heads trained on a collection's frozen features.

Methods: ``hashnet`` (HashNet, ICCV 2017) and ``dch`` (Deep Cauchy Hashing, CVPR 2018) learn
from labels; ``itq`` (iterative quantization) and ``lsh`` (random hyperplanes) are the
unsupervised baselines. Every method yields a :class:`HashHead` that turns raw vectors into
packed codes with numpy alone; :mod:`lookalike.hashing.serving` stores heads with a collection
and searches the codes of its images by Hamming distance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from lookalike.errors import HashingError
from lookalike.hashing.head import METHODS, HashHead, Preprocessing
from lookalike.hashing.training import DeepConfig, TrainLog

__all__ = ["METHODS", "DeepConfig", "HashHead", "Preprocessing", "TrainLog", "train_head"]

MAX_BITS = 1024
_DEEP_OPTIONS = frozenset(DeepConfig.__dataclass_fields__)
_METHOD_OPTIONS = {
    "hashnet": frozenset({"alpha", "continuation"}),
    "dch": frozenset({"gamma", "quantization"}),
    "itq": frozenset({"iterations", "seed"}),
    "lsh": frozenset({"seed"}),
}


def train_head(
    method: str,
    raw: np.ndarray,
    labels: np.ndarray,
    bits: int,
    model_key: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> tuple[HashHead, TrainLog]:
    """Train a ``bits``-bit head of ``method`` on raw vectors (labels are ignored by ``itq``
    and ``lsh``). ``options`` are the method's own (``alpha``, ``continuation``; ``gamma``,
    ``quantization``; ``iterations``, ``seed``) and, for the deep methods, any
    :class:`DeepConfig` field (``epochs``, ``hidden``, ``seed``...)."""
    if method not in METHODS:
        raise HashingError(f"unknown hashing method {method!r}; expected one of {METHODS}")
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, np.integer))
        or not 1 <= bits <= MAX_BITS
    ):
        raise HashingError(f"bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")
    deep = method in ("hashnet", "dch")
    allowed = _METHOD_OPTIONS[method] | (_DEEP_OPTIONS if deep else frozenset())
    unknown = set(options) - allowed
    if unknown:
        raise HashingError(
            f"{method} has no option {sorted(unknown)}; its options are {sorted(allowed)}"
        )
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 2 or len(raw) < 2:
        raise HashingError(f"need a matrix of at least 2 training vectors, got {raw.shape}")
    if deep:
        config = DeepConfig(**{k: v for k, v in options.items() if k in _DEEP_OPTIONS})
        own = {k: v for k, v in options.items() if k not in _DEEP_OPTIONS}
        if method == "hashnet":
            from lookalike.hashing.hashnet import train_hashnet

            return train_hashnet(
                raw, labels, bits, model_key, config=config, progress=progress, **own
            )
        from lookalike.hashing.dch import train_dch

        return train_dch(raw, labels, bits, model_key, config=config, progress=progress, **own)
    started = time.perf_counter()
    if method == "itq":
        from lookalike.hashing.itq import train_itq

        head = train_itq(raw, bits, model_key, **options)
    else:
        from lookalike.hashing.lsh import train_lsh

        head = train_lsh(raw, bits, model_key, **options)
    log = TrainLog(seconds=time.perf_counter() - started)
    info = {**head.info, "train_vectors": len(raw), "train_seconds": round(log.seconds, 3)}
    return replace(head, info=info), log
