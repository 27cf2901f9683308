"""Batch items into the dict the ACPO module consumes, tokenizing prompts when a tokenizer is given.

The batch contract: ``prompts`` (``list[str]``) always; ``pixel_values`` (float ``[B, 3, H, W]``)
when items carry images, or ``latent_moments`` (float ``[B, 2C, h, w]``, cached VAE posterior
parameters, see :mod:`acpo_lightning.data.latent_cache`) when they carry cached latents;
``input_ids`` (``LongTensor [B, L]``) and ``attention_mask`` when a tokenizer is given, padded
and truncated to the text encoder's maximum length ``L``; ``indices`` (``LongTensor [B]``, each
item's position in its dataset) when the items carry an ``index`` (:class:`IndexedDataset`: the
prediction loaders, whose images are seeded by it); ``original_sizes`` (``(h, w)`` before
resizing) and ``crop_top_lefts`` (``(top, left)``), ``LongTensor [B, 2]``, when the items carry
``original_size`` and ``crop_top_left`` (SDXL's micro-conditioning, see
:meth:`~acpo_lightning.data.transforms.ImageTransform.apply`); ``prompt_embeds`` (the denoiser's
conditioning, a tensor or a dict of tensors, batch first) when the items carry cached prompt
embeddings (``acpo cache-latents --prompt-embeds``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_deprecation
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

from acpo_lightning.data.shuffle import SeededShuffle, distributed_shards

#: Per-item tensors that are stacked into the batch when the items carry them.
TENSOR_KEYS = ("pixel_values", "latent_moments")
#: Per-item image geometry and the batch key it is stacked under (``[B, 2]``).
GEOMETRY_KEYS = {"original_size": "original_sizes", "crop_top_left": "crop_top_lefts"}
# Tokenizers without a configured limit report a huge sentinel (int(1e30)) as model_max_length.
_UNSET_LIMIT = 1_000_000


def tokenizer_max_length(tokenizer: Any, max_length: int | None = None) -> int:
    """The length prompts are padded and truncated to: ``max_length``, else the tokenizer's own.

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_length: an explicit length, or ``None`` for ``tokenizer.model_max_length``.

    Returns:
        The length, a positive integer.

    Raises:
        ValueError: ``max_length`` is not positive, or it is ``None`` and the tokenizer has no
            real limit (set ``max_length`` to the text encoder's ``max_position_embeddings``).
    """
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or not 0 < limit < _UNSET_LIMIT:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no usable model_max_length ({limit!r}); "
            "set `max_length` to the text encoder's maximum (77 for CLIP)"
        )
    return limit


def tokenize_prompts(
    tokenizer: Any, prompts: list[str], max_length: int | None = None
) -> dict[str, Tensor]:
    """Tokenize ``prompts`` padded and truncated to :func:`tokenizer_max_length`.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompts: the batch's prompts.
        max_length: see :func:`tokenizer_max_length`.

    Returns:
        ``input_ids`` (``LongTensor [B, L]``) and, when the tokenizer makes one,
        ``attention_mask`` (``LongTensor [B, L]``).
    """
    encoded = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer_max_length(tokenizer, max_length),
        return_tensors="pt",
    )
    batch = {"input_ids": encoded["input_ids"].long()}
    if "attention_mask" in encoded:
        batch["attention_mask"] = encoded["attention_mask"].long()
    return batch


def collate_prompt_images(
    items: list[dict], tokenizer: Any | None = None, max_length: int | None = None
) -> dict:
    """Gather ``prompt`` strings into ``prompts``, stack the item tensors, tokenize if asked.

    Pass the tokenizer with ``functools.partial`` (picklable, so DataLoader workers get it).

    Args:
        items: dataset items, dicts with ``prompt`` and optionally ``pixel_values`` or
            ``latent_moments`` (:data:`TENSOR_KEYS`).
        tokenizer: a Hugging Face tokenizer, or ``None`` for no ``input_ids``.
        max_length: see :func:`tokenizer_max_length`.

    Returns:
        The batch dict described in this module's docstring.
    """
    batch: dict = {"prompts": [item["prompt"] for item in items]}
    if "index" in items[0]:
        batch["indices"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
    for key in TENSOR_KEYS:
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    if "prompt_embeds" in items[0]:  # a tensor or a dict of tensors per item
        batch["prompt_embeds"] = default_collate([item["prompt_embeds"] for item in items])
    for key, batch_key in GEOMETRY_KEYS.items():
        if key in items[0]:
            batch[batch_key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    if tokenizer is not None:
        batch.update(tokenize_prompts(tokenizer, batch["prompts"], max_length))
    return batch


def resolve_data_seed(data_seed: int, seed: int | None, owner: str) -> int:
    """The DataModule's ``data_seed``, from the deprecated ``seed`` key when only that is given.

    The data modules' seed was once called ``seed``, like ``ACPOModule``'s; Lightning merges the
    module's and the DataModule's hyperparameters into one table when a logger is attached and
    refuses one key with two values, so the data's knob is ``data_seed``.

    Args:
        data_seed: the DataModule's ``data_seed`` argument.
        seed: its deprecated ``seed`` argument (``None``: not given).
        owner: the DataModule's class name, for the messages.

    Returns:
        The seed to use, a non-negative integer.

    Raises:
        ValueError: both keys with different values, or a negative seed.
    """
    if seed is not None:
        if data_seed not in (0, seed):
            raise ValueError(
                f"{owner}: both `seed` ({seed}) and `data_seed` ({data_seed}) are set; `seed` is "
                "the old name of `data_seed`. Fix: keep `data_seed` only"
            )
        rank_zero_deprecation(
            f"{owner}: `seed` is renamed `data_seed` (the model's `seed` is another knob); "
            f"write `data_seed: {seed}`"
        )
        data_seed = seed
    if not isinstance(data_seed, int) or isinstance(data_seed, bool) or data_seed < 0:
        raise ValueError(
            f"{owner}: data_seed must be a non-negative integer, got {data_seed!r}. Fix: use a "
            "seed >= 0"
        )
    return data_seed


def record_data_seed(datamodule: Any, data_seed: int) -> None:
    """Put the resolved ``data_seed`` in ``datamodule``'s saved hyperparameters, after
    ``save_hyperparameters(ignore=[..., "seed"])``.

    LightningCLI hands ``save_hyperparameters`` its own parsed arguments, in which ``data_seed``
    is still the default when only the deprecated ``seed`` was given; the loggers log the
    initial copy (``hparams_initial``), so both are set.
    """
    datamodule.hparams["data_seed"] = data_seed
    datamodule._hparams_initial["data_seed"] = data_seed


def check_loader_numbers(owner: str, batch_size: int, num_workers: int) -> None:
    """Refuse a ``batch_size`` below 1 or a negative ``num_workers`` at construction.

    Raises:
        ValueError: naming the value and the fix.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{owner}: batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(
            f"{owner}: num_workers must be an integer >= 0 (0: load in the main process), got "
            f"{num_workers!r}"
        )


class IndexedDataset(Dataset):
    """``dataset`` whose items also carry ``index``, their position in it.

    Prediction seeds each image by its prompt's position in the whole prediction set, which no
    batch index can tell (a short last batch; each DDP rank's interleaved share).

    Example:
        >>> IndexedDataset([{"prompt": "a"}, {"prompt": "b"}])[1]
        {'prompt': 'b', 'index': 1}
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}


def seeded_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    collate_fn: Callable[[list[dict]], dict],
    num_workers: int = 0,
    shards: dict[str, int] | None = None,
    **loader_kwargs: Any,
) -> StatefulDataLoader:
    """A resumable ``DataLoader`` whose shuffle order is drawn from a generator seeded with ``seed``.

    Shared by the DataModules so that every one of them orders its batches the same way. It is
    torchdata's ``StatefulDataLoader``: Lightning stores its ``state_dict`` (the sampler's epoch
    and position within it) in every checkpoint and restores it on ``--ckpt_path``, so a resumed
    run sees exactly the batches an uninterrupted run would. Each epoch draws a fresh
    permutation; under DDP each rank takes its share of it (:class:`SeededShuffle`).

    Args:
        shards: ``num_replicas`` and ``rank`` of the shuffle (the Trainer's
            ``distributed_sampler_kwargs``); ``None``: from ``torch.distributed`` when the
            loader is iterated (one process when it is not initialized).
    """
    sampler = SeededShuffle(dataset, seed, **(shards or {})) if shuffle else None
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        **loader_kwargs,
    )


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` that also resumes cleanly from the end of an epoch.

    Lightning checkpoints after a step, when the last batch of an epoch has been yielded but the
    iterator has not yet raised ``StopIteration``; ``StatefulDataLoader`` then restores an
    exhausted epoch, which Lightning counts as one more (empty) epoch, shifting epoch numbers (and
    with them the shuffle order) against an uninterrupted run. Marking such a state finished makes
    the next ``iter()`` start the following epoch, which Lightning's ``set_epoch`` numbers as the
    uninterrupted run does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # torchdata 0.11's __init__ calls torch.set_vital, deprecated in torch 2.9+: the notice is
        # not ours nor the user's, so it is dropped here, where it arises, and nowhere else.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(*args, **kwargs)

    # Lightning rebuilds a loader (predict, DDP samplers) from its __init__ signature.
    __init__.__signature__ = inspect.signature(StatefulDataLoader.__init__)  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            main = state_dict.get("_snapshot", {}).get("_main_snapshot", state_dict)
            yielded = main.get("_sampler_iter_yielded")
            if yielded is not None and yielded >= len(self):
                state_dict = {**state_dict, "_iterator_finished": True}
        super().load_state_dict(state_dict)


class SeededLoaders:
    """Mixin for a ``LightningDataModule`` whose hyper-parameters hold ``batch_size``, ``data_seed`` and
    ``num_workers``: ``self._loader(dataset, shuffle)`` is :func:`seeded_loader` with those and the
    class's ``collate_fn``.
    """

    collate_fn: Callable[[list[dict]], dict] = staticmethod(collate_prompt_images)

    def _loader(self, dataset: Dataset, shuffle: bool) -> ResumableDataLoader:
        hp = self.hparams  # type: ignore[attr-defined]
        return seeded_loader(
            dataset,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            seed=hp.data_seed,
            collate_fn=self.collate_fn,
            num_workers=hp.num_workers,
            shards=distributed_shards(self),
        )


class PromptDataLoaders:
    r"""Mixin for a ``LightningDataModule`` of prompts with images (or cached latents): the train,
    val, test and predict loaders over the ``train_dataset``, ``val_dataset`` (``None``: no
    validation data) and ``predict_dataset`` its ``setup`` fills in.

    The loaders are :func:`seeded_loader`\ s (seeded shuffle, resumable) collated by
    :func:`collate_prompt_images`, with the options set by :meth:`_set_loader_options`.
    """

    train_dataset: Dataset | None
    val_dataset: Dataset | None
    predict_dataset: Dataset | None

    def _set_loader_options(
        self,
        batch_size: int,
        num_workers: int,
        data_seed: int,
        tokenizer: Any | None,
        max_length: int | None,
        pin_memory: bool | None,
        persistent_workers: bool,
    ) -> None:
        """Check and store the loader options (``data_seed`` in the saved hyper-parameters too,
        after ``save_hyperparameters``); no datasets yet (``setup`` makes them).

        Raises:
            ValueError: ``batch_size`` below 1 or a negative ``num_workers``.
        """
        check_loader_numbers(type(self).__name__, batch_size, num_workers)
        record_data_seed(self, data_seed)
        self.batch_size, self.num_workers, self.data_seed = batch_size, num_workers, data_seed
        self.tokenizer = tokenizer
        self.max_length = None if tokenizer is None else tokenizer_max_length(tokenizer, max_length)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_dataset = self.val_dataset = self.predict_dataset = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> ResumableDataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}: call setup() before asking for loaders "
                "(the Trainer does it for you)"
            )
        return seeded_loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            seed=self.data_seed,
            collate_fn=functools.partial(
                collate_prompt_images, tokenizer=self.tokenizer, max_length=self.max_length
            ),
            num_workers=self.num_workers,
            shards=distributed_shards(self),
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        """Training batches, shuffled."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> ResumableDataLoader | list:
        """Validation batches, or ``[]`` when there is no validation data (Lightning skips it)."""
        if self.train_dataset is not None and self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> ResumableDataLoader | list:
        """The validation batches."""
        return self.val_dataloader()

    def predict_dataloader(self) -> ResumableDataLoader:
        """Prompt-only batches with ``indices`` (see the DataModule's own documentation for which
        prompts)."""
        dataset = None if self.predict_dataset is None else IndexedDataset(self.predict_dataset)
        return self._loader(dataset, shuffle=False)
