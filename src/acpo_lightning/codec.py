"""Between images and the denoiser's input space: VAE encoding, cached posteriors, decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from acpo_lightning.data.cache_checks import check_latent_moments_shape


class LatentCodec:
    """Encode images to scaled VAE latents and decode them back (pixels pass through unchanged).

    Args:
        vae: ``AutoencoderKL`` for latent models; ``None`` for pixel-space models.
        perceptual_decoder: a cheaper frozen decoder for the perceptual path only (e.g. TAESD,
            with its own ``scaling_factor``); ``generate`` keeps the full ``vae``.
        latent_shape: ``(C, h, w)`` of the denoiser's input, to check cached moments against.
    """

    def __init__(
        self,
        vae: nn.Module | None,
        perceptual_decoder: nn.Module | None,
        latent_shape: tuple[int, int, int],
    ) -> None:
        if perceptual_decoder is not None and vae is None:
            raise ValueError(
                "perceptual_decoder was given but the model has no vae (a pixel-space UNet): "
                "there is nothing to decode; drop perceptual_decoder."
            )
        for role, decoder in (("vae", vae), ("perceptual_decoder", perceptual_decoder)):
            _check_latent_channels(role, decoder, latent_shape)
        self.vae, self.perceptual_decoder, self.latent_shape = vae, perceptual_decoder, latent_shape

    @property
    def scale_factor(self) -> int:
        """Image side over latent side (1 for pixel-space models)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def moments_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.latent_shape
        return 2 * channels, height, width

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        """Images in ``[-1, 1]`` to the denoiser's input space (scaled VAE latents, or the pixels)."""
        if self.vae is None:
            return pixel_values
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return self._scaled(posterior.sample(generator=generator))

    @torch.no_grad()
    def sample_latents(
        self, latent_moments: Tensor, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        """Cached VAE posterior parameters ``[B, 2C, h, w]`` to the denoiser's input space.

        Draws a fresh latent from each posterior with the same random draws, in the same dtype,
        as :meth:`encode_images` does for the images the moments were encoded from.

        Raises:
            ValueError: the model has no VAE, or the moments are not ``[B, 2C, h, w]`` for this
                denoiser's latents.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        check_latent_moments_shape(self.vae, self.moments_shape, latent_moments.shape[1:])
        moments = latent_moments.to(device, self.vae.dtype)
        return self._scaled(DiagonalGaussianDistribution(moments).sample(generator))

    def batch_latents(
        self, batch: dict, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        """The x0 of a paired batch: from ``latent_moments`` if cached, else ``pixel_values``."""
        if "latent_moments" in batch:
            return self.sample_latents(batch["latent_moments"], generator, device)
        return self.encode_images(batch["pixel_values"].to(device), generator)

    def _scaled(self, latents: Tensor) -> Tensor:
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode(self, latents: Tensor, perceptual: bool = False) -> Tensor:
        """Input-space samples to images in ``[0, 1]`` (differentiable).

        ``perceptual`` decodes with the ``perceptual_decoder`` when one is set.
        """
        decoder = self.perceptual_decoder if perceptual and self.perceptual_decoder else self.vae
        if decoder is not None:
            shift = decoder.config.get("shift_factor") or 0.0
            latents = latents / decoder.config.scaling_factor + shift
            latents = decoder.decode(latents.to(decoder.dtype)).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoders' activations in the backward pass, one ResNet block at a time.

        diffusers checkpoints a VAE decoder one up-block at a time; its backward then holds a
        whole up-block's activations at once. :func:`checkpoint_resnets` splits each up-block
        into its ResNet blocks and upsampler.
        """
        for part in (self.vae, self.perceptual_decoder):
            if part is not None and hasattr(part, "enable_gradient_checkpointing"):
                part.enable_gradient_checkpointing(checkpoint_resnets)


def checkpoint_resnets(block: nn.Module, *args: Tensor | None) -> Tensor:
    """A diffusers ``gradient_checkpointing_func``: an up-block's ResNets one checkpoint each.

    ``UpDecoderBlock2D`` (the up-blocks of the KL VAE's decoder) runs as its ``forward`` does, its
    ResNet blocks and upsampler each under its own checkpoint; any other block (the mid-block with
    its attention, at the latent resolution) is checkpointed whole, as diffusers does.
    """
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

    if type(block) is not UpDecoderBlock2D:
        return checkpoint(block.__call__, *args, use_reentrant=False)
    hidden, temb = args[0], args[1] if len(args) > 1 else None
    for resnet in block.resnets:
        hidden = checkpoint(resnet.__call__, hidden, temb, use_reentrant=False)
    for upsampler in block.upsamplers or []:
        hidden = checkpoint(upsampler.__call__, hidden, use_reentrant=False)
    return hidden


def _check_latent_channels(
    role: str, decoder: nn.Module | None, latent_shape: tuple[int, int, int]
) -> None:
    """A decoder must read the denoiser's samples: its latent channels are their channels.

    Raises:
        ValueError: naming both channel counts and the fix.
    """
    channels = None if decoder is None else decoder.config.get("latent_channels")
    if channels is not None and channels != latent_shape[0]:
        raise ValueError(
            f"the {role} {type(decoder).__name__} has latent_channels={channels}, but the "
            f"denoiser's network takes in_channels={latent_shape[0]} (samples {latent_shape}); "
            f"load the {role} from the same model folder as the denoiser's network."
        )
