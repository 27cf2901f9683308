"""``PromptImageDataModule``: prompt/image pairs or prompts from files, a folder or a HF dataset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import PreTrainedTokenizerBase

from acpo_lightning.data.collate import (
    PromptDataLoaders,
    resolve_data_seed,
)
from acpo_lightning.data.dataset import PromptImageDataset, scan_records, split_rows
from acpo_lightning.data.hf_sources import read_hf
from acpo_lightning.data.images import BadSampleError, SampleProblem
from acpo_lightning.data.sources import (
    RecordTable,
    read_imagefolder,
    read_manifest,
    read_prompts,
)
from acpo_lightning.data.transforms import ImageTransform, Interpolation, Normalize

Source = Literal["imagefolder", "manifest", "hf", "prompts"]
SOURCES = ("imagefolder", "manifest", "hf", "prompts")
DEFAULT_IMAGE_COLUMN = {"imagefolder": "file_name", "manifest": "image", "hf": "image"}


class PromptImageDataModule(PromptDataLoaders, pl.LightningDataModule):
    """Prompt/image pairs (or prompts alone) from a folder, a manifest, a HF dataset or a text file.

    **Sources** (``source``, ``path``):

    * ``imagefolder``: a folder with ``metadata.jsonl`` (``file_name`` + ``text``, the
      convention of diffusers' scripts and HF ``imagefolder``), else ``<image>.txt`` captions;
    * ``manifest``: a ``.csv``/``.tsv``/``.jsonl``/``.json``/``.parquet`` table of image paths
      (relative to the manifest) and prompts;
    * ``hf``: a Hugging Face dataset: a ``save_to_disk`` folder, a local dataset folder or a
      hub name (downloaded in :meth:`prepare_data`), split ``split``;
    * ``prompts``: prompts alone (``.txt``, one a line, or a table column): prompt-only
      batches, for the rollout objective.

    **When things are checked.** Local sources are read at construction: a wrong path, a
    missing column or an empty file fails before any model is loaded. Hub datasets are read in
    :meth:`setup`. :meth:`setup` then *scans* every row once (caption a non-empty string,
    image fully decodable and at least ``resolution`` on its shorter side unless ``upscale``).
    With ``on_bad_sample: error`` (default) all bad rows are reported in one
    :class:`BadSampleError` naming each file and row; with ``skip`` they are dropped, their
    number is in :attr:`num_skipped` (the problems in :attr:`skipped`) and a warning gives the
    count and the first reasons. The scan runs in the main process of every rank, before any
    DataLoader worker exists, so the count is exact and all DDP ranks keep the same rows; it
    costs one decode of the data set. A source left with no usable row is an error.

    **Batches** (see :mod:`acpo_lightning.data.collate`): ``prompts`` always, ``pixel_values``
    ``[B, 3, resolution, resolution]`` for pairs, ``input_ids``/``attention_mask`` padded to
    the tokenizer's length when ``tokenizer`` is given.

    **Loaders.** ``train``: the training rows, shuffled (seeded), random crop/flip as set.
    ``val``/``test``: prompt-only batches of ``val_prompts_path`` if given, else the held-out
    ``val_fraction`` of the source (centre crop, no flip), else none (an empty list, which
    Lightning skips). ``predict``: prompt-only batches of ``val_prompts_path``, else of all
    usable rows. Under DDP the training shuffle is shared out over the ranks by ``data_seed``
    (:class:`~acpo_lightning.data.shuffle.SeededShuffle`); Lightning shards the others.

    Args:
        source: ``imagefolder``, ``manifest``, ``hf`` or ``prompts``.
        path: the folder, manifest, dataset (folder or hub name) or prompts file.
        image_column: column of images; default ``file_name`` for ``imagefolder`` metadata,
            ``image`` for ``manifest`` and ``hf``.
        caption_column: column of prompts (also of a tabular ``prompts`` file); ``None`` for
            unconditional images (an ``imagefolder`` without captions, e.g. LSUN church): every
            prompt is then ``""`` and no caption is read or checked.
        split: split of a ``hf`` dataset.
        val_fraction: share of the source's rows held out for validation, in ``[0, 1)``.
        val_prompts_path: prompts file for validation/prediction (then ``val_fraction`` must be 0).
        val_prompts_column: its prompt column if it is a table; default ``caption_column``.
        resolution: side of the square training images, in pixels.
        resize: resize the shorter side to ``resolution`` before cropping.
        upscale: enlarge images smaller than ``resolution`` instead of treating them as bad.
        center_crop: centre crops for training too (else random crops).
        random_flip: random horizontal flips for training.
        normalize: ``minus_one_one`` (``[-1, 1]``, the VAE's range), the only range the module and
            ``acpo cache-latents`` take; ``zero_one`` is refused.
        interpolation: resize filter, ``bilinear`` (diffusers' default), ``bicubic`` or ``lanczos``.
        tokenizer: a Hugging Face tokenizer (the text encoder's); ``None``: no ``input_ids``.
        max_length: token length; default the tokenizer's ``model_max_length``.
        batch_size: items per batch (per process under DDP).
        num_workers: DataLoader worker processes (also the scan's decoding threads).
        pin_memory: pin batches for faster host-to-GPU copies; ``None``: when CUDA is available.
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        data_seed: seed of the train/val split and of the training shuffle (also under DDP).
        on_bad_sample: ``error`` (default) or ``skip`` (counted and reported).
        seed: deprecated name of ``data_seed``.

    Raises:
        ValueError: an unknown ``source``/``on_bad_sample``, a bad number, a bad table.
        FileNotFoundError: a local ``path`` or ``val_prompts_path`` that does not exist.

    Example:
        >>> dm = PromptImageDataModule("manifest", "data/train.csv", resolution=512)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader()))["pixel_values"].shape  # doctest: +SKIP
        torch.Size([4, 3, 512, 512])
    """

    def __init__(
        self,
        source: Source,
        path: str,
        image_column: str | None = None,
        caption_column: str | None = "text",
        split: str = "train",
        val_fraction: float = 0.0,
        val_prompts_path: str | None = None,
        val_prompts_column: str | None = None,
        resolution: int = 512,
        resize: bool = True,
        upscale: bool = False,
        center_crop: bool = False,
        random_flip: bool = False,
        normalize: Normalize = "minus_one_one",
        interpolation: Interpolation = "bilinear",
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        data_seed: int = 0,
        on_bad_sample: Literal["error", "skip"] = "error",
        seed: int | None = None,
    ) -> None:
        data_seed = resolve_data_seed(data_seed, seed, type(self).__name__)
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "seed"])
        _check_choices(source, on_bad_sample, val_fraction, val_prompts_path, normalize)
        self.source, self.path, self.split = source, str(path), split
        self.image_column = image_column or DEFAULT_IMAGE_COLUMN.get(source, "image")
        self.caption_column, self.val_fraction = caption_column, val_fraction
        self.on_bad_sample = on_bad_sample
        self._set_loader_options(
            batch_size,
            num_workers,
            data_seed,
            tokenizer,
            max_length,
            pin_memory,
            persistent_workers,
        )
        options = dict(
            resize=resize, upscale=upscale, normalize=normalize, interpolation=interpolation
        )
        self.train_transform = ImageTransform(
            resolution, center_crop=center_crop, random_flip=random_flip, augment=True, **options
        )
        self.eval_transform = ImageTransform(resolution, augment=False, **options)
        self.table: RecordTable | None = None if self._is_hub_dataset() else self._read_source()
        self.val_prompts: RecordTable | None = None
        if val_prompts_path is not None:
            self.val_prompts = read_prompts(val_prompts_path, val_prompts_column or caption_column)
        self.skipped: list[SampleProblem] = []

    @property
    def num_skipped(self) -> int:
        """Rows dropped by the scan (``on_bad_sample: skip``), over the source and the val prompts."""
        return len(self.skipped)

    def _is_hub_dataset(self) -> bool:
        return self.source == "hf" and not Path(self.path).expanduser().exists()

    def _read_source(self) -> RecordTable:
        if self.source == "imagefolder":
            return read_imagefolder(self.path, self.image_column, self.caption_column)
        if self.source == "manifest":
            return read_manifest(self.path, self.image_column, self.caption_column)
        if self.source == "hf":
            return read_hf(self.path, self.image_column, self.caption_column, self.split)
        return read_prompts(self.path, self.caption_column)

    def prepare_data(self) -> None:
        """Download a hub dataset into the Hugging Face cache (rank 0 only, as Lightning calls it)."""
        if self._is_hub_dataset():
            read_hf(self.path, self.image_column, self.caption_column, self.split)

    def setup(self, stage: str | None = None) -> None:
        """Read a hub dataset, scan every row once, split, and build the datasets.

        Args:
            stage: Lightning's stage; the scan and split are the same for every stage.

        Raises:
            BadSampleError: bad rows with ``on_bad_sample: error`` (all of them listed).
            ValueError: no usable training row, or an empty validation split.
        """
        if self.train_dataset is not None:
            return
        if self.table is None:
            self.table = self._read_source()
        kept = self._scan(self.table, self.train_transform if self.table.has_images else None)
        train_rows, val_rows = split_rows(len(self.table), self.val_fraction, self.data_seed)
        train_rows = [row for row in train_rows if row in kept]
        val_rows = [row for row in val_rows if row in kept]
        self._check_not_empty(train_rows, "training", len(self.table))
        self.train_dataset = PromptImageDataset(self.table, train_rows, self.train_transform)
        self.predict_dataset = PromptImageDataset(self.table, sorted(kept), transform=None)
        if self.val_prompts is not None:
            prompt_rows = sorted(self._scan(self.val_prompts, None))
            self._check_not_empty(
                prompt_rows, "validation prompts", len(self.val_prompts), self.val_prompts
            )
            self.val_dataset = PromptImageDataset(self.val_prompts, prompt_rows, transform=None)
            self.predict_dataset = self.val_dataset
        elif self.val_fraction > 0:
            self._check_not_empty(val_rows, "validation", len(self.table))
            self.val_dataset = PromptImageDataset(self.table, val_rows, self.eval_transform)
        self._report()

    def _scan(self, table: RecordTable, transform: ImageTransform | None) -> set[int]:
        kept, problems = scan_records(table, transform, threads=max(1, self.num_workers))
        if problems and self.on_bad_sample == "error":
            raise BadSampleError.for_problems(table.origin, problems)
        self.skipped += problems
        if problems:
            reasons = Counter(_reason_kind(problem.reason) for problem in problems)
            summary = ", ".join(f"{count} {kind}" for kind, count in reasons.most_common())
            first = "; ".join(str(problem) for problem in problems[:3])
            rank_zero_warn(
                f"PromptImageDataModule skipped {len(problems)} of {len(table)} rows of "
                f"{table.origin} (on_bad_sample='skip'): {summary}. First: {first}"
            )
        return set(kept)

    def _check_not_empty(
        self, rows: list[int], what: str, total: int, table: RecordTable | None = None
    ) -> None:
        if rows:
            return
        origin = (table or self.table).origin
        raise ValueError(
            f"the {what} set of {origin} is empty: {total} rows, {self.num_skipped} skipped as "
            f"bad. A run with no data would do nothing; fix the data"
            + (" or lower val_fraction" if what == "training" and self.val_fraction else "")
            + (f". Skipped: {'; '.join(map(str, self.skipped[:3]))}" if self.skipped else "")
        )

    def _report(self) -> None:
        kind = "pairs" if self.table.has_images else "prompts"
        message = f"PromptImageDataModule: {len(self.train_dataset)} training {kind}"
        if self.val_prompts is not None:
            message += (
                f", {len(self.val_dataset)} validation prompts from {self.val_prompts.origin}"
            )
        elif self.val_dataset is not None:
            message += f", {len(self.val_dataset)} validation {kind}"
        rank_zero_info(f"{message}; source {self.table.origin}; {self.num_skipped} rows skipped")


def _check_choices(
    source: str,
    on_bad_sample: str,
    val_fraction: float,
    val_prompts_path: str | None,
    normalize: str,
) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_prompts_path is not None and val_fraction > 0:
        raise ValueError(
            f"give either val_prompts_path ({val_prompts_path!r}) or val_fraction ({val_fraction}) "
            "for validation, not both: the validation loader is one or the other"
        )
    if normalize != "minus_one_one":
        # ACPOModule and `acpo cache-latents` hand pixel_values to the VAE, whose range is [-1, 1]
        raise ValueError(
            f"normalize must be 'minus_one_one', got {normalize!r}: ACPOModule and acpo "
            "cache-latents take pixel_values in [-1, 1] (the VAE's range) and would train on "
            "[0, 1] images as washed-out ones. Fix: remove `normalize` (or set minus_one_one)"
        )


def _reason_kind(reason: str) -> str:
    """A short category of a problem's reason, for the skip summary."""
    for kind in ("file not found", "cannot decode", "no caption", "caption", "smaller than"):
        if kind in reason:
            return "too small" if kind == "smaller than" else kind
    return reason.split(";")[0].split("(")[0].strip()
