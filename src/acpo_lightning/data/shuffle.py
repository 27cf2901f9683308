"""The training shuffle: the data seed's permutations, shared out over the DDP ranks, resumable."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


def distributed_shards(datamodule: Any) -> dict[str, int] | None:
    """``num_replicas`` and ``rank`` of the Trainer ``datamodule`` is attached to (``None``:
    no Trainer, or a single process): what Lightning would give its own ``DistributedSampler``."""
    trainer = getattr(datamodule, "trainer", None)
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if not kwargs:
        return None
    return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}


class SeededShuffle(DistributedSampler):
    """The training shuffle: the data seed's permutations, shared out over the DDP ranks.

    Epoch ``e``'s order is the ``e``-th ``randperm`` drawn from a generator seeded with ``seed``
    (in one process, exactly the order of torchdata's seeded ``RandomSampler``, which this
    replaces); with ``W`` ranks it is padded to a multiple of ``W`` and rank ``r`` takes items
    ``r, r + W, ...``, as torch's ``DistributedSampler`` shares one out.

    It *is* a ``DistributedSampler``, so Lightning keeps it under DDP instead of swapping in its
    own, which is seeded from ``seed_everything``'s seed, not the data's: with LightningCLI's
    default (a fresh seed per launch) a resumed run would continue its epoch on another
    permutation, repeating some items and skipping others. Lightning's ``set_epoch`` sets the
    epoch; without it each full pass moves on to the next epoch. Its state (epoch, items handed
    out in it) goes into the loader's ``state_dict``, so a resumed loader continues the epoch
    exactly, whatever the new launch's global seed.

    Args:
        dataset: the dataset to shuffle (only its length is used).
        seed: the data seed.
        num_replicas: number of ranks; ``None``: ``torch.distributed``'s world size at iteration
            (1 when it is not initialized).
        rank: this process's rank; ``None``: ``torch.distributed``'s rank at iteration.

    Example:
        >>> sampler = SeededShuffle(range(4), seed=0, num_replicas=2, rank=1)
        >>> len(sampler), len(list(sampler))
        (2, 2)
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # DistributedSampler.__init__ is not called: it reads the process group now, which may
        # not exist yet when the DataModule builds its loader; its attributes are set here
        Sampler.__init__(self)
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.shuffle, self.drop_last = True, False
        self._num_replicas, self._rank = num_replicas, rank
        self.yielded = 0  # items of this epoch handed out on this rank
        self._resume_at: int | None = None
        self._cached: tuple[int, Tensor, list[int]] | None = None  # epoch, generator, order

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        """Number of ranks sharing each epoch."""
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:  # type: ignore[override]
        """This process's rank."""
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """Items per rank and epoch."""
        return math.ceil(len(self.dataset) / self.num_replicas)  # type: ignore[arg-type]

    @property
    def total_size(self) -> int:  # type: ignore[override]
        """Items per epoch over all ranks, padded."""
        return self.num_samples * self.num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order over the whole dataset (all ranks).

        The generator's state after the last epoch asked for is kept, so successive epochs cost
        one ``randperm`` each; an earlier epoch replays the draws from the seed.
        """
        if self._cached is not None and self._cached[0] <= epoch:
            at, state, order = self._cached
            generator = torch.Generator().set_state(state)
        else:
            at, order, generator = -1, [], torch.Generator().manual_seed(self.seed)
        while at < epoch:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]
            at += 1
        self._cached = (at, generator.get_state(), order)
        return order

    def __iter__(self) -> Iterator[int]:  # type: ignore[override]
        epoch, start = self.epoch, self._resume_at or 0
        self._resume_at = None
        order = self.permutation(epoch)
        padded = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        self.yielded = start
        for index in padded[self.rank : self.total_size : self.num_replicas][start:]:
            self.yielded += 1
            yield index
        self.epoch, self.yielded = epoch + 1, 0  # a full pass: the next one is the next epoch

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s permutation from the next pass on (Lightning calls it).

        A restored position belongs to the restored epoch only: a checkpoint written at an
        epoch's last step holds all of it handed out, and Lightning resumes in the next epoch.
        """
        if epoch != self.epoch:
            self._resume_at = None
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the items of it already handed out on this rank."""
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue epoch ``state_dict["epoch"]`` after its first ``yielded`` items (the next
        epoch from its start once all were handed out)."""
        epoch, yielded = int(state_dict["epoch"]), int(state_dict["yielded"])
        if yielded >= self.num_samples:
            epoch, yielded = epoch + 1, 0
        self.epoch, self._resume_at = epoch, yielded or None
