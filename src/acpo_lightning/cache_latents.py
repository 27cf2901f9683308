"""``acpo cache-latents``: encode a training set once with the frozen VAE, for ``CachedLatentsDataModule``.

    acpo cache-latents --config configs/acpo.yaml --data.init_args.path data/train --out data/latents

The run config(s) are parsed exactly as ``acpo fit`` parses them (the same files, overlays and
``--key value`` overrides), but only ``model.vae`` and ``data`` are built: no UNet, text encoder,
quality head or trainer callbacks (``configs/acpo.yaml``'s evaluation callbacks would download
reward models). The DataModule (a ``PromptImageDataModule``) runs ``setup("fit")``, so bad rows
are reported or skipped as in training, then every training row is encoded, batched, on
``--device``, in the VAE's dtype, and its posterior parameters are written to the cache folder
(format: :mod:`acpo_lightning.data.latent_cache`).

Transforms: the cache holds the deterministic image (resize, centre crop, normalize); with
``random_flip: true`` it also holds the flipped image, and the cached dataset picks one of the two
at random per item, with the original size and crop offset of that view (SDXL's ``time_ids``, as
the image path gives them). A random crop cannot be cached: ``center_crop: false`` is refused as
soon as an image is not exactly the crop (a square image with ``resize``), naming the row and the
fix.

``--prompt-embeds`` also caches every row's prompt conditioning, made by the run's denoiser
(``Denoiser.encode_prompts``: model.denoiser, or the flat unet/text_encoder/tokenizer), and the
empty prompt's, with a fingerprint of the text encoders. Its text encoders run on ``--device``;
the trained network is built too (a denoiser needs it) but stays on the CPU, and a separate
anchor network is not built. Training on such a cache runs no text encoder in the data
objective's steps (prompt dropout included); see :mod:`acpo_lightning.prompt_cache`.
"""

from __future__ import annotations

import functools
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from acpo_lightning.data.cache_checks import text_encoders
from acpo_lightning.data.datamodule import PromptImageDataModule
from acpo_lightning.data.images import describe_ref, load_image
from acpo_lightning.data.latent_cache import (
    CROP_TOP_LEFTS,
    MANIFEST_NAME,
    NULL_FILE,
    ORIGINAL_SIZES,
    LatentCacheWriter,
)
from acpo_lightning.data.transforms import TransformedImage
from acpo_lightning.models.fingerprint import vae_fingerprint
from acpo_lightning.prompt_cache import (
    PROMPT_EMBEDS_HELP,
    check_denoiser,
    encode_embeds,
    load_denoiser,
    write_null,
)

if TYPE_CHECKING:
    from argparse import ArgumentParser

    from acpo_lightning.denoisers import Denoiser


#: Data settings recorded in the manifest (those that shape the cached tensors or pick the rows).
_DATA_SETTINGS = (
    "source",
    "path",
    "image_column",
    "caption_column",
    "split",
    "val_fraction",
    "resolution",
    "resize",
    "upscale",
    "center_crop",
    "random_flip",
    "normalize",
    "interpolation",
    "data_seed",
    "on_bad_sample",
)


def cache_latents(
    vae: nn.Module,
    datamodule: PromptImageDataModule,
    out: str | Path,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    shard_size: int = 1024,
    overwrite: bool = False,
    denoiser: Denoiser | None = None,
) -> dict[str, Any]:
    """Encode every training row of ``datamodule`` with ``vae`` into the cache folder ``out``.

    Args:
        vae: the run's frozen ``AutoencoderKL`` (its dtype is the storage dtype).
        datamodule: the run's ``PromptImageDataModule`` (``setup("fit")`` is called here).
        out: the cache folder (created).
        batch_size: images per VAE call (both orientations of a row count as one).
        device: where the VAE runs.
        shard_size: rows per shard file.
        overwrite: replace a cache already in ``out``.
        denoiser: also cache each row's prompt conditioning (``denoiser.encode_prompts``), the
            empty prompt's and the text encoders' fingerprint; its text encoders are moved to
            ``device``.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        FileExistsError: ``out`` holds a cache and ``overwrite`` is not set.
        ValueError: the DataModule is not a ``PromptImageDataModule``, has no images, or takes
            random crops (``center_crop: false`` on an image larger than the crop); the VAE has
            no posterior (``latent_dist``); ``denoiser`` takes no prompt. Shards written before
            the error are removed.
        BadSampleError: bad rows (as in training, with ``on_bad_sample: error``).
    """
    out = Path(out).expanduser()
    _check_parts(vae, datamodule)
    check_denoiser(denoiser)
    _check_out(out, overwrite)
    datamodule.prepare_data()
    datamodule.setup("fit")
    _check_parts(vae, datamodule)  # a hub dataset is only read in setup()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # a run that stops now leaves no stale manifest
    before = {path.name for path in out.glob("shard-*.safetensors")}
    vae = vae.to(device).eval().requires_grad_(False)
    flip = datamodule.train_transform.random_flip
    rows = list(datamodule.train_dataset.indices)
    writer = LatentCacheWriter(out, shard_size)
    prompts, latent_shape, embeds = [], None, None
    if denoiser is not None:
        for encoder in text_encoders(denoiser).values():
            encoder.to(device).eval().requires_grad_(False)
    load = functools.partial(_load_row, datamodule)  # decoding threads: Pillow releases the GIL
    try:
        with ThreadPoolExecutor(max_workers=max(1, datamodule.num_workers)) as pool:
            for start in range(0, len(rows), batch_size):
                batch = list(pool.map(load, rows[start : start + batch_size]))
                prompts += [row.prompt for row in batch]
                pixels = torch.stack([row.image.pixel_values for row in batch])
                moments = encode_moments(vae, pixels, flip)
                latent_shape, shards = list(moments.shape[2:]), len(writer.shards)
                if denoiser is not None:
                    embeds = encode_embeds(denoiser, [row.prompt for row in batch])
                writer.add(moments, embeds, row_geometry(batch, flip))
                _progress(writer, len(rows), shards)
        extra = {} if denoiser is None else {"prompt_embeds": write_null(writer, denoiser)}
    except BaseException:
        for shard in writer.shards:  # no manifest refers to them: they would only take space
            (out / shard["file"]).unlink(missing_ok=True)
        raise
    manifest = writer.finish(
        {
            "count": len(rows),
            "resolution": datamodule.train_transform.resolution,
            "latent_shape": latent_shape,
            "views": 2 if flip else 1,
            "image_geometry": True,
            "dtype": str(vae.dtype).removeprefix("torch."),
            "prompts": prompts,
            "source_rows": rows,
            "vae": vae_fingerprint(vae),
            "data": _data_settings(datamodule),
            **extra,
        }
    )
    if denoiser is None:
        (out / NULL_FILE).unlink(missing_ok=True)  # a replaced cache's
    for stale in before - {shard["file"] for shard in manifest["shards"]}:
        (out / stale).unlink(missing_ok=True)
    return manifest


@torch.no_grad()
def encode_moments(vae: nn.Module, pixels: Tensor, flip: bool) -> Tensor:
    """The VAE posterior parameters of ``pixels`` (and of their mirror images with ``flip``).

    Args:
        vae: an ``AutoencoderKL``.
        pixels: images ``[B, 3, H, W]`` in the VAE's input range.
        flip: also encode the horizontally flipped images.

    Returns:
        ``[B, views, 2C, h, w]`` in the VAE's dtype, on the CPU; view 1 is the flipped image.
    """
    pixels = pixels.to(vae.device, vae.dtype)
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    posterior = getattr(vae.encode(pixels), "latent_dist", None)
    if posterior is None:
        raise ValueError(
            f"model.vae is a {type(vae).__name__}, whose encode() returns no posterior "
            "(latent_dist) to cache; use the run's AutoencoderKL."
        )
    moments = posterior.parameters.cpu()
    views = 2 if flip else 1
    return moments.view(views, -1, *moments.shape[1:]).transpose(0, 1).contiguous()


class CachedRow(NamedTuple):
    """A row as the cache stores it: its prompt, its deterministic image (with its original size
    and crop offset) and how far the crop can move horizontally (which places the flipped crop)."""

    prompt: str
    image: TransformedImage
    free_width: int


def row_geometry(rows: list[CachedRow], flip: bool) -> dict[str, Tensor]:
    """``original_sizes`` ``[n, 2]`` and ``crop_top_lefts`` ``[n, views, 2]`` of ``rows``: view 1's
    left is counted in the flipped image, as ``ImageTransform.apply`` counts it when it flips."""
    crops = []
    for row in rows:
        top, left = row.image.crop_top_left
        crops.append([(top, left), (top, row.free_width - left)][: 2 if flip else 1])
    return {
        ORIGINAL_SIZES: torch.tensor([row.image.original_size for row in rows], dtype=torch.long),
        CROP_TOP_LEFTS: torch.tensor(crops, dtype=torch.long),
    }


def _load_row(datamodule: PromptImageDataModule, row: int) -> CachedRow:
    """A row's prompt and its deterministic image; refuse a random crop that would matter."""
    table, transform = datamodule.table, datamodule.eval_transform
    ref = table.images[row]
    image = load_image(ref, table.origin, row)
    slack = transform.crop_slack(image)
    if not datamodule.train_transform.center_crop and slack != (0, 0):
        res = transform.resolution
        raise ValueError(
            f"{table.origin}, row {row} ({describe_ref(ref)}): the image is "
            f"{image.width}x{image.height}, and with center_crop: false training takes a random "
            f"{res}x{res} crop of it (the crop can move {slack[0]}x{slack[1]} pixels), which a "
            "latent cache cannot hold. Fix: set --data.init_args.center_crop true (the cache "
            "then holds the centre crop), or crop the images to squares first."
        )
    return CachedRow(table.prompt(row), transform.apply(image), slack[0])


def _check_out(out: Path, overwrite: bool) -> None:
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a latent cache ({MANIFEST_NAME}). Fix: pass --overwrite to "
            "replace it, or choose another --out."
        )


def _check_parts(vae: nn.Module | None, datamodule: Any) -> None:
    if vae is None:
        raise ValueError(
            "model.vae is null in the config: a pixel-space model has no latents to cache; train "
            "it on the images directly."
        )
    if not hasattr(vae, "encode"):
        raise ValueError(
            f"model.vae is a {type(vae).__name__}, which has no encode(); use AutoencoderKL."
        )
    if not isinstance(datamodule, PromptImageDataModule):
        raise ValueError(
            f"data is a {type(datamodule).__name__}; acpo cache-latents reads the rows of an "
            "acpo_lightning.data.PromptImageDataModule (imagefolder, manifest or hf source)."
        )
    table = datamodule.table
    if table is not None and not table.has_images:
        raise ValueError(
            f"{table.origin} has prompts but no images (source: {datamodule.source}): there is "
            "nothing to encode. Fix: cache an image/prompt source (source: imagefolder, manifest "
            "or hf); prompt-only data trains with objective: rollout, without a cache."
        )


def _data_settings(datamodule: PromptImageDataModule) -> dict[str, Any]:
    hparams = {**datamodule.hparams, "image_column": datamodule.image_column}
    if Path(datamodule.path).expanduser().exists():  # a local source, not a hub dataset name
        hparams["path"] = str(Path(datamodule.path).expanduser().resolve())
    return {key: hparams.get(key) for key in _DATA_SETTINGS if _is_json(hparams.get(key))}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _progress(writer: LatentCacheWriter, total: int, shards_before: int) -> None:
    """One updating line on a terminal; in a log, a line per shard written and at the end."""
    done, wrote = writer.rows == total, len(writer.shards) > shards_before
    line = f"acpo cache-latents: encoded {writer.rows}/{total} rows"
    if wrote:
        line += f" (wrote {writer.shards[-1]['file']})"
    if sys.stderr.isatty():
        print(f"\r{line}", end="\n" if done else "", file=sys.stderr, flush=True)
    elif done or wrote:
        print(line, file=sys.stderr, flush=True)


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"--device {device!r} is not a torch device; use cpu, cuda or cuda:1"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: no CUDA device is available here. Fix: use --device cpu."
        )
    return resolved


def load_vae_and_data(run_config: Any) -> tuple[nn.Module | None, Any]:
    """Build only ``model.vae`` and ``data`` of a parsed run config.

    Args:
        run_config: the jsonargparse ``Namespace`` of ``acpo cache-latents`` (parsed as ``acpo fit``
            parses its files and overrides; see :mod:`acpo_lightning.cli`).

    Returns:
        The VAE (``None`` for a pixel-space model) and the DataModule, not set up.
    """
    import lightning.pytorch as pl
    from jsonargparse import ArgumentParser, Namespace

    parser = ArgumentParser(prog="acpo cache-latents")
    parser.add_argument("--vae", type=nn.Module | None)
    parser.add_argument("--data", type=pl.LightningDataModule)

    def plain(value: Any) -> Any:
        return value.as_dict() if isinstance(value, Namespace) else value

    model = run_config.model
    parts = parser.parse_object({"vae": plain(model.get("vae")), "data": plain(run_config.data)})
    built = parser.instantiate_classes(parts)
    return built.vae, built.data


def add_cache_arguments(parser: ArgumentParser) -> None:
    """The options of ``acpo cache-latents`` beside those of ``acpo fit`` (``acpo_lightning.cli``)."""
    group = parser.add_argument_group(
        "acpo cache-latents",
        "Every other option (--config FILE, --data.init_args.path DIR, ...) is read as by `acpo "
        "fit`; only model.vae and data are built.",
    )
    group.add_argument("--out", type=str, required=True, help="the cache folder")
    group.add_argument("--batch-size", type=int, default=8, help="images per VAE call")
    group.add_argument(
        "--device",
        type=str | None,
        default=None,
        help="cpu, cuda, cuda:1 (null: cuda if available)",
    )
    group.add_argument("--shard-size", type=int, default=1024, help="rows per shard")
    group.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")
    group.add_argument("--prompt-embeds", action="store_true", help=PROMPT_EMBEDS_HELP)


def cache_latents_command(
    run_config: Any,
    out: str,
    batch_size: int = 8,
    device: str | None = None,
    shard_size: int = 1024,
    overwrite: bool = False,
    prompt_embeds: bool | None = None,
) -> dict[str, Any]:
    """``acpo cache-latents``: check ``out``, build the VAE and data, cache, print a summary.

    Args:
        run_config: the parsed run config (its ``model.vae`` and ``data`` are built).
        out, batch_size, shard_size, overwrite: as for :func:`cache_latents`.
        device: where the VAE (and the text encoders) run (default: cuda if available).
        prompt_embeds: also cache prompt embeddings (the denoiser is built, see
            :func:`load_denoiser`); ``None``: ``run_config``'s ``--prompt-embeds`` flag.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        ValueError: no ``--config`` was given, a size below 1, an unknown ``device``, or any
            error of :func:`cache_latents`.
        FileExistsError: ``out`` holds a cache and ``overwrite`` is not set.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(
            f"--batch-size and --shard-size must be >= 1, got {batch_size}, {shard_size}"
        )
    if not run_config.get("config"):
        raise ValueError(
            "give the run config(s) you train with: --config configs/acpo.yaml [--config ...]"
        )
    resolved = _resolve_device(device)
    _check_out(Path(out).expanduser(), overwrite)  # before any weight is loaded
    if prompt_embeds is None:
        prompt_embeds = bool(run_config.get("prompt_embeds", False))
    vae, datamodule = load_vae_and_data(run_config)
    denoiser = load_denoiser(run_config) if prompt_embeds else None
    manifest = cache_latents(
        vae,
        datamodule,
        out,
        batch_size=batch_size,
        device=resolved,
        shard_size=shard_size,
        overwrite=overwrite,
        denoiser=denoiser,
    )
    views = " (each in both orientations)" if manifest["views"] == 2 else ""
    print(
        f"cached {manifest['count']} rows{views} in {len(manifest['shards'])} shards to "
        f"{out} ({manifest['dtype']}, moments {manifest['latent_shape']}"
        + (", with prompt embeddings" if "prompt_embeds" in manifest else "")
        + ")"
    )
    return manifest
