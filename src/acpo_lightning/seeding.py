"""Per-step randomness as a function of (seed, stage, step, batch, rank): resumes replay it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_STAGE_IDS = {"train": 0, "val": 1, "test": 2}


def check_seed(seed: Any) -> None:
    """Refuse a seed that is not a non-negative integer, naming it.

    Raises:
        ValueError: ``seed`` is negative, a bool or not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        # numpy's SeedSequence, which mixes every step's seed, takes no negative words
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}. Fix: use a seed >= 0")


# Host-side integer mixing, never traced: under ``torch.compile(module)`` (Lightning compiles its
# training_step) dynamo would trace numpy's uint64 arithmetic, which its fake tensors do not support.
@torch.compiler.disable
def step_seed(seed: int, stage: str, step: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed mixed from its words by ``numpy.random.SeedSequence``.

    Example:
        >>> step_seed(0, "train", 5, 0, 0) == step_seed(0, "train", 5, 0, 0)
        True
        >>> step_seed(0, "train", 5, 0, 0) == step_seed(0, "train", 5, 0, 1)
        False
    """
    words = [seed, _STAGE_IDS[stage], step, batch_idx, rank]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.compiler.disable
def host_seed(seed: int, stage: str, step: int, batch_idx: int) -> int:
    """The seed of host-side choices: rank-free, so every process makes the same choice."""
    return step_seed(seed, stage, step, batch_idx, 0) ^ 0x5EED


def sampler_indices(
    batch_idx: int, batch_size: int, count: int, world: int, rank: int
) -> list[int]:
    """Dataset indices of a batch under Lightning's (distributed) sampler without shuffling:
    item ``i`` of batch ``b`` on rank ``r`` of ``W`` is ``(b * batch_size + i) * W + r``.

    Example:
        >>> sampler_indices(1, 2, 2, world=2, rank=1)
        [5, 7]
    """
    return [(batch_idx * batch_size + i) * world + rank for i in range(count)]


def prediction_indices(
    trainer: Any, dataloader_idx: int, batch_idx: int, count: int, rank: int
) -> list[int]:
    """Dataset indices of a prediction batch whose items carry no ``indices``.

    Under a ``Trainer`` these are the indices Lightning's prediction loop records for each batch
    (its loader's batch sampler is wrapped to keep them): exact for a short last batch, a shuffled
    or a distributed sampler. Without them (no trainer, or a loader Lightning cannot wrap, such as
    an iterable data set) :func:`sampler_indices` infers them from the batch sampler's batch size,
    or from ``count`` in a single process without a trainer.
    """
    loaders = trainer.predict_dataloaders if trainer is not None else None
    loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
    batch_sampler = getattr(loader, "batch_sampler", None)
    seen = getattr(
        batch_sampler, "seen_batch_indices", None
    )  # Lightning's _IndexBatchSamplerWrapper
    if seen is not None and batch_idx < len(seen):
        indices = list(seen[batch_idx])
        if len(indices) == count and all(isinstance(i, int) for i in indices):
            return indices
    size = getattr(loader, "batch_size", None) or getattr(batch_sampler, "batch_size", None)
    world = trainer.world_size if trainer is not None else 1
    return sampler_indices(batch_idx, size or count, count, world, rank)
