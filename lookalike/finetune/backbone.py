"""Training the last stages of an EfficientNet-Lite backbone along with the head.

The frozen stages below the trained ones compute the same activations every epoch, so they run
once: each image is decoded once, its activations entering the first trained stage are kept
(as float16), and training runs only the trained stages over those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lookalike.encoders.base import EncoderIdentity
from lookalike.encoders.efficientnet_lite import (
    VARIANTS,
    EfficientNetLite,
    LiteVariant,
    PooledFeatures,
    lite_preprocess,
    pool_map,
)
from lookalike.errors import FinetuneError

# Activations are cached in memory; refuse runs whose cache would not comfortably fit.
MAX_CACHE_BYTES = 4 << 30


def lite_variant(identity: EncoderIdentity) -> LiteVariant:
    """The EfficientNet-Lite variant behind an encoder identity, when its stages can be trained
    (head layer, average or GeM pooling at one scale); raises ``FinetuneError`` otherwise."""
    variant = VARIANTS.get(identity.model)
    if variant is None:
        raise FinetuneError(
            f"--unfreeze-last trains EfficientNet-Lite stages; {identity.model} is not one "
            f"(use {', '.join(VARIANTS)}, or train the head alone)"
        )
    if identity.layer != "head" or tuple(identity.scales) != (1.0,):
        raise FinetuneError(
            "--unfreeze-last needs the base encoder's head layer at one scale; the collection "
            f"uses {identity.key}"
        )
    return variant


def first_trained_stage(network: EfficientNetLite, unfreeze_last: int) -> int:
    """The 1-based stage where training starts when the last ``unfreeze_last`` stages train."""
    stages = len(network.stage_ends)
    if not 1 <= unfreeze_last <= stages:
        raise FinetuneError(f"--unfreeze-last must be 1..{stages}, got {unfreeze_last}")
    return stages - unfreeze_last + 1


class BackboneTail(nn.Module):
    """Stages from ``first_stage`` on, the head convolution and the base encoder's pooling; the
    earlier stages' weights are frozen (they run once, to cache activations)."""

    def __init__(self, network: EfficientNetLite, first_stage: int, pooling: str = "avg") -> None:
        super().__init__()
        self.network = network
        self.first_stage = first_stage
        self.pooling = pooling
        start = network.stage_start(first_stage)
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(
                name.startswith(("_conv_head", "_bn1")) or _block_at_or_after(name, start)
            )

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return pool_map(self.network.forward_from(activations, self.first_stage), self.pooling)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The network's entries that training changes (weights and batch-norm buffers of the
        trained stages and the head convolution), which is all that needs saving."""
        start = self.network.stage_start(self.first_stage)
        return {
            name: value.detach().clone()
            for name, value in self.network.state_dict().items()
            if name.startswith(("_conv_head", "_bn1")) or _block_at_or_after(name, start)
        }


def _block_at_or_after(name: str, start: int) -> bool:
    parts = name.split(".")
    return parts[0] == "_blocks" and int(parts[1]) >= start


def cache_activations(
    network: EfficientNetLite,
    variant: LiteVariant,
    paths: Sequence[str],
    stage: int,
    *,
    batch_size: int = 32,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """float16 [n, c, h, w]: the activations entering ``stage`` for each image file, each file
    decoded once. Raises ``FinetuneError`` when a file cannot be decoded (the collection
    indexed it, so it changed since) or the cache would be too large."""
    from lookalike.core.ingest import decode_all

    config = lite_preprocess(variant)
    normalise = PooledFeatures(network, "head", config)
    probe = np.zeros((1, config.resolution, config.resolution, 3), dtype=np.uint8)
    with torch.inference_mode():
        shape = network.forward_until(_network_input(normalise, probe), stage).shape[1:]
    needed = len(paths) * int(np.prod(shape)) * 2
    if needed > MAX_CACHE_BYTES:
        raise FinetuneError(
            f"caching the activations entering stage {stage} for {len(paths)} images needs "
            f"{needed / 2**30:.1f} GiB; unfreeze fewer stages"
        )
    cache = torch.empty((len(paths), *shape), dtype=torch.float16)
    batch: list[np.ndarray] = []
    done = 0

    def flush() -> None:
        nonlocal done
        with torch.inference_mode():
            x = _network_input(normalise, np.stack(batch))
            cache[done : done + len(batch)] = network.forward_until(x, stage).half()
        done += len(batch)
        batch.clear()
        if progress:
            progress(done, len(paths))

    for decoded in decode_all(list(paths), config, workers=workers):
        if decoded.error is not None:
            raise FinetuneError(f"{decoded.path}: {decoded.error}")
        assert decoded.pixels is not None  # a file decoded without an error has its pixels
        batch.append(decoded.pixels)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return cache


def _network_input(normalise: PooledFeatures, pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    return (x - normalise.mean) * normalise.inv_std
