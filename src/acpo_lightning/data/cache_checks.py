"""Whether a latent cache fits the model it is about to train: its VAE and its latent shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from acpo_lightning.models.fingerprint import fingerprint_differences, vae_fingerprint


def check_latent_moments_shape(
    vae: nn.Module | None,
    expected: tuple[int, int, int],
    shape: Sequence[int] | None,
    where: str = "the batch",
) -> None:
    """Refuse cached moments that this model cannot sample from.

    Args:
        vae: the model's VAE (``None`` for a pixel-space model).
        expected: ``(2C, h, w)`` of one item's moments for the model's denoiser.
        shape: one item's moments shape; ``None`` checks only for a VAE.
        where: what holds them, for the message.

    Raises:
        ValueError: no VAE (a pixel-space model), or ``shape`` is not ``expected``.
    """
    if vae is None:
        raise ValueError(
            f"{where} holds cached VAE latents (latent_moments), but this model has no vae (a "
            "pixel-space UNet). Fix: train it on images (e.g. PromptImageDataModule), or "
            "configure model.vae."
        )
    if shape is not None and tuple(shape) != tuple(expected):
        channels, side = expected[0] // 2, expected[1]
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        raise ValueError(
            f"{where} holds latent moments of shape {list(shape)}, but this UNet needs "
            f"{list(expected)} (2 x {channels} latent channels, latent side {side} = resolution "
            f"{side * scale} / {scale}). Fix: re-run `acpo cache-latents` with the config you "
            "train with (its data.init_args.resolution and model.vae)."
        )


def check_latent_cache(
    datamodule: Any, vae: nn.Module | None, expected: tuple[int, int, int]
) -> None:
    """Refuse a latent cache (``CachedLatentsDataModule``) encoded by another VAE.

    Compares the cache's ``latent_cache_fingerprint`` with :func:`models.vae_fingerprint` of
    ``vae``, and the cached moments' shape with ``expected`` (``(2C, h, w)``). Any other
    DataModule passes.

    Raises:
        ValueError: no VAE, another VAE (the differing values named), or a moments shape
            the model cannot use.
    """
    cached = getattr(datamodule, "latent_cache_fingerprint", None)
    if cached is None:
        return
    where = f"the latent cache {getattr(datamodule, 'path', '')}".rstrip()
    shape = getattr(datamodule, "latent_moments_shape", None)
    check_latent_moments_shape(vae, expected, shape, where)
    differences = fingerprint_differences(cached, vae_fingerprint(vae))
    if differences:
        raise ValueError(
            f"{where} was encoded by another VAE than this model's: "
            f"{'; '.join(differences)}. Fix: re-run `acpo cache-latents` with the config(s) "
            "you train with (the same model.vae), or set model.vae to the VAE that encoded "
            "the cache."
        )
