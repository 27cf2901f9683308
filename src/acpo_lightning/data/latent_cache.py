"""Cached VAE latents: the folder ``acpo cache-latents`` writes, and the DataModule that reads it.

Encoding each batch with the frozen VAE is about 40 % of the FLOPs of a plain Stable Diffusion
1.5 LoRA step. The cache stores the VAE's posterior *parameters* per image (mean and log-variance
stacked, ``DiagonalGaussianDistribution.parameters``, ``[2C, h, w]``), not a latent sample, so
training still draws a fresh latent each step, with the same random draws as the uncached path
(see ``ACPOModule.sample_latents``).

A cache folder holds::

    manifest.json              format, version, count, resolution, latent_shape ([2C, h, w]),
                               views (1, or 2 with random_flip), dtype, prompts, shards, the VAE's
                               fingerprint (models.vae_fingerprint) and the data settings used
    shard-00000.safetensors    ``moments`` [rows, views, 2C, h, w]; view 1 is the horizontally
    shard-00001.safetensors    flipped image. ``original_sizes`` [rows, 2] (``(h, w)`` before
                               resizing) and ``crop_top_lefts`` [rows, views, 2] (the crop's
                               ``(top, left)``, in the flipped image for view 1): SDXL's
                               micro-conditioning, as the image path computes it; the manifest
                               says ``"image_geometry": true`` (a cache written before has none)

With ``--prompt-embeds`` the cache also holds each row's prompt conditioning, as the model's
denoiser makes it (``Denoiser.encode_prompts``): every shard gains one tensor per conditioning
entry, ``prompt_embeds.<name>`` [rows, *shape] (``encoder_hidden_states`` for a one-tensor
conditioning; ``pooled_projections`` ... for a dict), the empty prompt's conditioning
(``Denoiser.empty_prompt_condition``: zeros for SDXL with ``force_zeros_for_empty_prompt``) is
stored once in ``null-prompt.safetensors`` (the same names, [1, *shape]), and the manifest
gains::

    prompt_embeds              {"entries": [[name, shape, dtype], ...] in the conditioning's
                               order, "tensor": true for a one-tensor conditioning,
                               "null_file": "null-prompt.safetensors", "fingerprint": the text
                               encoders', tokenizers' and token lengths'
                               (cache_checks.text_encoder_fingerprint)}

Every file is written to a temporary name and renamed into place, and the manifest is written
last, so a run that stopped part-way leaves no manifest and is refused when read.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from acpo_lightning.checkpoint_io import write_atomically
from acpo_lightning.conditioning import Conditioning
from acpo_lightning.data.collate import (
    PromptDataLoaders,
    resolve_data_seed,
)
from acpo_lightning.data.dataset import PromptImageDataset, scan_records
from acpo_lightning.data.images import BadSampleError
from acpo_lightning.data.latent_cache_format import (  # noqa: F401  (re-exported names)
    CROP_TOP_LEFTS,
    DTYPES,
    EMBEDS_PREFIX,
    ENTRY_DTYPES,
    FORMAT,
    MANIFEST_NAME,
    NULL_FILE,
    ORIGINAL_SIZES,
    SHARD_KEY,
    VERSION,
    LatentCacheError,
    embed_entries,
    read_latent_cache,
    rerun_hint,
)
from acpo_lightning.data.sources import RecordTable, read_prompts


class LatentCacheWriter:
    """Collect posterior parameters and write them as shards, then the manifest.

    Args:
        folder: the cache folder (created).
        shard_size: rows per shard file.

    Example:
        >>> writer = LatentCacheWriter("cache", shard_size=1024)  # doctest: +SKIP
        >>> writer.add(moments)  # [n, views, 2C, h, w]  # doctest: +SKIP
        >>> writer.finish({"count": n, ...})  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1 row, got {shard_size}")
        self.folder, self.shard_size = Path(folder), shard_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.rows = 0
        self._pending: list[Tensor] = []
        self._pending_rows = 0

    def add(
        self,
        moments: Tensor,
        embeds: dict[str, Tensor] | None = None,
        geometry: dict[str, Tensor] | None = None,
    ) -> None:
        """Queue ``moments`` (``[n, views, 2C, h, w]``), the rows' prompt conditioning
        ``embeds`` (``{name: [n, ...]}``) and their image ``geometry`` (``original_sizes``
        ``[n, 2]``, ``crop_top_lefts`` ``[n, views, 2]``), if any; full shards are written at once."""
        rows = {SHARD_KEY: moments, **(geometry or {})}
        rows.update({EMBEDS_PREFIX + name: value for name, value in (embeds or {}).items()})
        self._pending.append({k: v.detach().to("cpu").contiguous() for k, v in rows.items()})
        self._pending_rows += len(moments)
        self.rows += len(moments)
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        queued = {key: torch.cat([part[key] for part in self._pending]) for key in self._pending[0]}
        shard = {key: value[:rows].contiguous() for key, value in queued.items()}
        rest = {key: value[rows:] for key, value in queued.items()}
        left = len(rest[SHARD_KEY])
        self._pending, self._pending_rows = ([rest] if left else []), left
        name = f"shard-{len(self.shards):05d}.safetensors"
        self.write_file(name, shard)
        self.shards.append({"file": name, "rows": rows})

    def write_file(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Write ``tensors`` to ``folder/name`` (safetensors, atomically)."""
        from safetensors.torch import save

        data = save({key: value.detach().to("cpu").contiguous() for key, value in tensors.items()})
        write_atomically(self.folder / name, lambda handle: handle.write(data))

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the last shard, then ``manifest.json`` (``manifest`` plus format and shards).

        Returns:
            The manifest as written.
        """
        if self._pending_rows:
            self._flush(self._pending_rows)
        manifest = {"format": FORMAT, "version": VERSION, **manifest, "shards": self.shards}
        data = json.dumps(manifest, indent=1, ensure_ascii=False).encode()
        write_atomically(self.folder / MANIFEST_NAME, lambda handle: handle.write(data))
        return manifest


class CachedLatentsDataset(Dataset):
    """The rows of a latent cache as items ``{"prompt", "latent_moments"}`` (``[2C, h, w]``),
    plus ``original_size`` and ``crop_top_left`` (long ``[2]``, of the view read, as
    ``PromptImageDataset`` gives them) when the cache holds the image geometry, and
    ``prompt_embeds`` (the row's conditioning without the batch axis: a tensor, or a dict of
    tensors in the order the denoiser made them) when it holds prompt embeddings.

    With two views (a cache made with ``random_flip``), each read picks the flipped one with
    probability 1/2, from ``torch``'s global generator, as ``ImageTransform`` does for images.
    Shards are memory-mapped on first use in each process (DataLoader workers open their own).

    Args:
        folder: the cache folder.
        manifest: its manifest (:func:`read_latent_cache`).

    Example:
        >>> dataset = CachedLatentsDataset("cache", read_latent_cache("cache"))  # doctest: +SKIP
        >>> dataset[0]["latent_moments"].shape  # doctest: +SKIP
        torch.Size([8, 64, 64])
    """

    def __init__(self, folder: str | Path, manifest: dict[str, Any]) -> None:
        self.folder, self.prompts = Path(folder), list(manifest["prompts"])
        self.files = [shard["file"] for shard in manifest["shards"]]
        self.starts = [0]
        for shard in manifest["shards"]:
            self.starts.append(self.starts[-1] + int(shard["rows"]))
        self.views = int(manifest["views"])
        self.geometry = bool(manifest.get("image_geometry"))
        self.embed_names = [name for name, _, _ in embed_entries(manifest)]
        self.embeds_are_tensor = bool((manifest.get("prompt_embeds") or {}).get("tensor"))
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to workers

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a latent cache with {len(self)} rows")
        shard = bisect.bisect_right(self.starts, index) - 1
        local = index - self.starts[shard]
        view = int(torch.rand(()) < 0.5) if self.views == 2 else 0
        handle = self._handle(shard)
        moments = handle.get_slice(SHARD_KEY)[local : local + 1, view : view + 1]
        item = {"prompt": self.prompts[index], "latent_moments": moments[0, 0]}
        if self.geometry:
            item["original_size"] = handle.get_slice(ORIGINAL_SIZES)[local : local + 1][0]
            crops = handle.get_slice(CROP_TOP_LEFTS)[local : local + 1, view : view + 1]
            item["crop_top_left"] = crops[0, 0]
        if self.embed_names:
            embeds = {
                name: handle.get_slice(EMBEDS_PREFIX + name)[local : local + 1][0]
                for name in self.embed_names
            }
            item["prompt_embeds"] = (
                embeds[self.embed_names[0]] if self.embeds_are_tensor else embeds
            )
        return item

    def _handle(self, shard: int) -> Any:
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / self.files[shard]), framework="pt")
        return self._handles[shard]


class CachedLatentsDataModule(PromptDataLoaders, pl.LightningDataModule):
    """Train on a latent cache written by ``acpo cache-latents`` instead of encoding images.

    Training batches are ``{"prompts": [...], "latent_moments": [B, 2C, h, w]}``, with
    ``original_sizes`` and ``crop_top_lefts`` (``[B, 2]``) as ``PromptImageDataModule`` gives
    them; ``ACPOModule`` samples a latent from each posterior exactly as it does for
    ``pixel_values``. A cache made
    with ``--prompt-embeds`` adds ``prompt_embeds`` (the denoiser's conditioning, batch first),
    which the denoiser uses instead of running its text encoders; ``ACPOModule.setup`` checks
    :attr:`prompt_cache_fingerprint` against its text encoders and installs
    :meth:`null_condition` as the denoiser's empty prompt. The loaders are
    the resumable, seeded ones of ``PromptImageDataModule`` (:func:`seeded_loader`), so a resumed
    run sees the same batches.

    The folder is read and checked at construction (the manifest and every shard's header), so
    a missing or incomplete cache fails before any model is loaded. ``ACPOModule.setup`` compares
    :attr:`latent_cache_fingerprint` with its own VAE and refuses a cache of another VAE.

    **Loaders.** ``train``: every cached row, shuffled (seeded). ``val``/``test``: prompt-only
    batches of ``val_prompts_path`` (evaluated by rollouts, as with ``PromptImageDataModule``),
    else none. ``predict``: prompt-only batches of ``val_prompts_path``, else of the cached
    prompts.

    Args:
        path: the cache folder (``--out`` of ``acpo cache-latents``).
        batch_size: items per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        data_seed: seed of the training shuffle (also under DDP).
        val_prompts_path: prompts file for validation/prediction (``.txt`` or a table).
        val_prompts_column: its prompt column if it is a table.
        tokenizer: a Hugging Face tokenizer; ``None``: no ``input_ids`` in the batches.
        max_length: token length; default the tokenizer's ``model_max_length``.
        pin_memory: pin batches for faster host-to-GPU copies; ``None``: when CUDA is available.
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        seed: deprecated name of ``data_seed``.

    Raises:
        FileNotFoundError: no folder, no manifest, a missing shard, or no ``val_prompts_path``.
        LatentCacheError: a corrupt or inconsistent cache (the message names the file and the fix).

    Example:
        >>> dm = CachedLatentsDataModule("outputs/latents", batch_size=4)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader()))["latent_moments"].shape  # doctest: +SKIP
        torch.Size([4, 8, 64, 64])
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 4,
        num_workers: int = 0,
        data_seed: int = 0,
        val_prompts_path: str | None = None,
        val_prompts_column: str | None = "text",
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int | None = None,
    ) -> None:
        data_seed = resolve_data_seed(data_seed, seed, type(self).__name__)
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "seed"])
        self._set_loader_options(
            batch_size,
            num_workers,
            data_seed,
            tokenizer,
            max_length,
            pin_memory,
            persistent_workers,
        )
        self.path = Path(path).expanduser()
        self.manifest = read_latent_cache(self.path)
        self.val_prompts: RecordTable | None = None
        if val_prompts_path is not None:
            self.val_prompts = read_prompts(val_prompts_path, val_prompts_column)

    @property
    def latent_cache_fingerprint(self) -> dict[str, Any]:
        """The fingerprint of the VAE that encoded the cache (see ``models.vae_fingerprint``)."""
        return dict(self.manifest["vae"])

    @property
    def image_geometry(self) -> bool:
        """Whether the rows carry each image's original size and crop offset (SDXL's
        ``time_ids``); a cache written before they were stored has none."""
        return bool(self.manifest.get("image_geometry"))

    @property
    def prompt_cache_fingerprint(self) -> dict[str, Any] | None:
        """The text encoders that made the cached prompt embeddings (``None``: none cached); see
        ``cache_checks.text_encoder_fingerprint``."""
        embeds = self.manifest.get("prompt_embeds")
        return None if embeds is None else dict(embeds["fingerprint"])

    def null_condition(self) -> Conditioning:
        """The cached empty prompt's conditioning (one sample, batch first), for
        ``Denoiser.set_null_condition``.

        Raises:
            ValueError: the cache holds no prompt embeddings.
        """
        from safetensors.torch import load_file

        embeds = self.manifest.get("prompt_embeds")
        if embeds is None:
            raise ValueError(
                f"the latent cache {self.path} holds no prompt embeddings. Fix: re-run `acpo "
                "cache-latents` with --prompt-embeds."
            )
        tensors = load_file(str(self.path / embeds.get("null_file", NULL_FILE)))
        cond = {name: tensors[EMBEDS_PREFIX + name] for name, _, _ in embed_entries(self.manifest)}
        return next(iter(cond.values())) if embeds.get("tensor") else cond

    @property
    def latent_moments_shape(self) -> tuple[int, ...]:
        """The shape of one item's ``latent_moments``: ``(2C, h, w)``."""
        return tuple(int(side) for side in self.manifest["latent_shape"])

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets; check the validation prompts.

        Raises:
            BadSampleError: an unusable validation prompt (all of them listed).
        """
        if self.train_dataset is not None:
            return
        self.train_dataset = CachedLatentsDataset(self.path, self.manifest)
        prompts = self.manifest["prompts"]  # all "" for an uncaptioned source
        table = RecordTable(f"latent cache {self.path}", prompts, None, captioned=any(prompts))
        self.predict_dataset = PromptImageDataset(table, range(len(table)), transform=None)
        if self.val_prompts is not None:
            rows, problems = scan_records(self.val_prompts, None)
            if problems:
                raise BadSampleError.for_problems(self.val_prompts.origin, problems)
            self.val_dataset = PromptImageDataset(self.val_prompts, rows, transform=None)
            self.predict_dataset = self.val_dataset
        views = "both orientations" if self.manifest["views"] == 2 else "one orientation"
        if "prompt_embeds" in self.manifest:
            views += ", with prompt embeddings"
        rank_zero_info(
            f"CachedLatentsDataModule: {len(self.train_dataset)} cached training rows ({views}, "
            f"{self.manifest['dtype']}) from {self.path}"
            + (f", {len(self.val_dataset)} validation prompts" if self.val_dataset else "")
        )
