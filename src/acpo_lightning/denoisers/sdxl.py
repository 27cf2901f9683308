"""Stable Diffusion XL: a ``text_time`` UNet, two CLIP text encoders and micro-conditioning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from acpo_lightning import conditioning as C
from acpo_lightning.conditioning import Conditioning
from acpo_lightning.denoisers.base import Denoiser
from acpo_lightning.models.lora import has_lora

#: the conditioning entries :meth:`SDXLDenoiser.policy` needs
_ENTRIES = ("encoder_hidden_states", "text_embeds", "time_ids")


class SDXLDenoiser(Denoiser):
    """An SDXL UNet policy, its anchor, both text encoders and the size/crop micro-conditioning.

    Conditioning follows diffusers' ``StableDiffusionXLPipeline``: ``encoder_hidden_states`` is
    the concatenation (last dim) of both encoders' penultimate hidden states, ``text_embeds`` the
    second encoder's projected pooled output, and ``time_ids`` ``[B, 6]`` the original size, crop
    top-left and target size, each ``(h, w)`` / ``(top, left)`` in pixels. Training batches give
    ``original_sizes`` and ``crop_top_lefts`` per sample (``data.PromptImageDataModule`` carries
    them as diffusers' ``train_text_to_image_lora_sdxl.py`` computes them); without them an image
    counts as uncropped at its own size, as sampling does.

    Args:
        unet: the policy, a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``,
            with LoRA (``models.add_lora``) or fully trainable.
        text_encoder: the first text encoder (``CLIPTextModel``, CLIP ViT-L).
        text_encoder_2: the second text encoder (``CLIPTextModelWithProjection``, OpenCLIP bigG).
        tokenizer: the first encoder's tokenizer.
        tokenizer_2: the second encoder's tokenizer.
        anchor_unet: a separate frozen anchor UNet, or ``None`` for the adapter toggle.
        force_zeros_for_empty_prompt: the empty prompt's conditioning (CFG's unconditional branch,
            prompt dropout) is all zeros, as the SDXL base model was trained and as its pipeline
            config sets; ``False`` encodes ``""`` instead.
        vae_scale_factor: image side over latent side, ``2 ** (len(vae.config.block_out_channels)
            - 1)``: 8 for SDXL's VAE. It sets the sampled image size the default ``time_ids`` name.
        max_prompt_length: token length for prompts (default: each tokenizer's, capped by its
            encoder).
        channels_last: feed the UNet NHWC inputs.

    Raises:
        ValueError: a UNet without ``text_time`` added conditioning, or encoders whose widths do
            not add up to the UNet's ``cross_attention_dim``.

    Example:
        >>> from acpo_lightning.tiny import sdxl as T
        >>> from acpo_lightning.testing import tiny_tokenizer
        >>> denoiser = SDXLDenoiser(T.tiny_sdxl_unet(), T.tiny_sdxl_text_encoder(),
        ...     T.tiny_sdxl_text_encoder_2(), tiny_tokenizer(), tiny_tokenizer(), vae_scale_factor=2)
        >>> cond, uncond = denoiser.guidance_conditions(["a red square"], 5.0)
        >>> {name: tuple(value.shape) for name, value in cond.items()}
        {'encoder_hidden_states': (1, 16, 64), 'text_embeds': (1, 32), 'time_ids': (1, 6)}
    """

    is_conditional = True
    uses_image_geometry = True
    process_kind = "vp"
    trained_name = "unet"
    network_label = "SDXL UNet"

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tokenizer_2: PreTrainedTokenizerBase,
        anchor_unet: nn.Module | None = None,
        force_zeros_for_empty_prompt: bool = True,
        vae_scale_factor: int = 8,
        max_prompt_length: int | None = None,
        channels_last: bool = False,
    ) -> None:
        self.unet, self.anchor_unet = unet, anchor_unet
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.vae_scale_factor, self.max_prompt_length = vae_scale_factor, max_prompt_length
        self.channels_last = channels_last
        _check_parts(unet, text_encoder, text_encoder_2)

    def networks(self) -> dict[str, nn.Module | None]:
        return {
            "unet": self.unet,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "anchor_unet": self.anchor_unet,
        }

    def frozen(self) -> list[nn.Module]:
        parts = (self.text_encoder, self.text_encoder_2, self.anchor_unet)
        return [m for m in parts if m is not None]

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        side = int(size[0] if isinstance(size, list | tuple) else size)
        return int(self.unet.config.in_channels), side, side

    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of a sampled image (the pipeline's default size)."""
        _, height, width = self.latent_shape()
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    # ------------------------------------------------------------------ text
    def prompt_lengths(self) -> dict[str, int]:
        return {
            "tokenizer": self._prompt_length(self.tokenizer, self.text_encoder),
            "tokenizer_2": self._prompt_length(self.tokenizer_2, self.text_encoder_2),
        }

    def prompt_settings(self) -> dict[str, Any]:
        """The prompt lengths and whether the empty prompt is zeros."""
        zeros = bool(self.force_zeros_for_empty_prompt)
        return {**super().prompt_settings(), "force_zeros_for_empty_prompt": zeros}

    def _prompt_length(self, tokenizer: PreTrainedTokenizerBase, encoder: nn.Module) -> int:
        length = self.max_prompt_length or int(tokenizer.model_max_length)
        positions = getattr(encoder.config, "max_position_embeddings", None)
        return min(length, positions) if positions else length

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``encoder_hidden_states`` ``[B, L, D1 + D2]`` and pooled ``text_embeds`` ``[B, P]``.

        As ``StableDiffusionXLPipeline.encode_prompt``: each encoder's penultimate hidden states,
        concatenated, in the second encoder's dtype; the pooled embedding of the second one.
        """
        states, pooled = [], None
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        for tokenizer, encoder in pairs:
            tokens = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=self._prompt_length(tokenizer, encoder),
                truncation=True,
                return_tensors="pt",
            )
            device = next(encoder.parameters()).device
            output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = output[0]
            states.append(output.hidden_states[-2])
        if pooled is None:
            raise ValueError(
                f"text_encoder_2 {type(self.text_encoder_2).__name__} gave no pooled projection; "
                "SDXL's second encoder is CLIPTextModelWithProjection (load_text_encoder reads "
                "it from the config's architectures, or pass model_class)."
            )
        dtype = self.text_encoder_2.dtype
        return {"encoder_hidden_states": torch.cat(states, dim=-1).to(dtype), "text_embeds": pooled}

    def empty_prompt_condition(self) -> dict[str, Tensor]:
        """Zeros when ``force_zeros_for_empty_prompt`` (as the pipeline does without a negative
        prompt), else the encoding of ``""``."""
        null = self.encode_prompts([""])
        if self.force_zeros_for_empty_prompt:
            null = {name: torch.zeros_like(value) for name, value in null.items()}
        return null

    # ------------------------------------------------------------------ micro-conditioning
    def time_ids(
        self,
        size: int,
        original_sizes: Tensor | None = None,
        crop_top_lefts: Tensor | None = None,
        target_size: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``[size, 6]`` micro-conditioning: original ``(h, w)``, crop ``(top, left)``, target
        ``(h, w)`` (``_get_add_time_ids`` of the pipeline; ``compute_time_ids`` of the training
        script). Defaults: the target size (the sampled image size), crop ``(0, 0)``.

        Raises:
            ValueError: ``original_sizes`` or ``crop_top_lefts`` is not ``[size, 2]``.
        """
        target = torch.tensor(target_size or self.image_size(), dtype=torch.float64)
        parts = []
        for name, given, default in (
            ("original_sizes", original_sizes, target),
            ("crop_top_lefts", crop_top_lefts, torch.zeros(2, dtype=torch.float64)),
        ):
            if given is not None and tuple(given.shape) != (size, 2):
                raise ValueError(
                    f"the batch's {name} has shape {tuple(given.shape)}, expected ({size}, 2): "
                    "one (height, width) or (top, left) pair per image."
                )
            value = given.to("cpu", torch.float64) if given is not None else default
            parts.append(value.expand(size, 2))
        parts.append(target.expand(size, 2))
        return torch.cat(parts, dim=1).to(device=device, dtype=dtype)

    def add_batch_conditioning(self, cond: Conditioning, batch: dict, size: int) -> Conditioning:
        """Add ``time_ids`` from the batch's ``original_sizes`` and ``crop_top_lefts``; the target
        size is the batch's image size (``pixel_values``, or cached latents times the VAE scale)."""
        target = None
        if batch.get("pixel_values") is not None:
            target = tuple(batch["pixel_values"].shape[-2:])
        elif batch.get("latent_moments") is not None:
            h, w = batch["latent_moments"].shape[-2:]
            target = (h * self.vae_scale_factor, w * self.vae_scale_factor)
        states = C.first(cond)
        ids = self.time_ids(
            size, batch.get("original_sizes"), batch.get("crop_top_lefts"), target,
            states.dtype, states.device,
        )  # fmt: skip
        return {**cond, "time_ids": ids}

    def guidance_conditions(
        self, prompts: Sequence[str], guidance_scale: float
    ) -> tuple[Conditioning, Conditioning | None]:
        """As the pipeline: both branches carry the default ``time_ids`` of the sampled size."""
        cond = self.encode_prompts(list(prompts))
        count, states = C.batch_size(cond), C.first(cond)
        ids = self.time_ids(count, dtype=states.dtype, device=states.device)
        cond = {**cond, "time_ids": ids}
        if guidance_scale <= 1.0:
            return cond, None
        uncond = C.expand(self.null_condition(cond), count)
        return cond, {**uncond, "time_ids": ids}

    # ------------------------------------------------------------------ network calls
    def _call(self, unet: nn.Module, sample: Tensor, times: Tensor, cond: Conditioning) -> Tensor:
        missing = [name for name in _ENTRIES if not isinstance(cond, dict) or name not in cond]
        if missing:
            found = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
            raise ValueError(
                f"SDXL conditioning lacks {missing} (got {found}); build it with "
                "denoiser.conditioning(...) or guidance_conditions(...), which add time_ids."
            )
        times = times.expand(sample.shape[0]) if times.ndim == 0 else times
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        states = cond["encoder_hidden_states"]
        return unet(sample, times, encoder_hidden_states=states, added_cond_kwargs=added).sample

    def configure(self, channels_last: bool = False, compile_backend: str | None = None) -> None:
        if not has_lora(self.unet):
            self.unet.requires_grad_(True)  # full fine-tuning
        if channels_last:
            for part in (self.unet, self.anchor_unet):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        if compile_backend is not None:
            self.unet.compile(backend=compile_backend)

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def _check_parts(unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module) -> None:
    """The UNet takes SDXL's added conditioning and the two encoders' concatenated states.

    Raises:
        ValueError: naming the mismatching values and the fix.
    """
    config = unet.config
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"{type(unet).__name__} has addition_embed_type="
            f"{config.get('addition_embed_type')!r}, not 'text_time': it is not an SDXL UNet. "
            "Use UNetDenoiser (the module's unet argument) for SD-1.x/2.x UNets."
        )
    widths = [int(enc.config.hidden_size) for enc in (text_encoder, text_encoder_2)]
    if sum(widths) != config.cross_attention_dim:
        raise ValueError(
            f"the text encoders' hidden sizes {widths[0]} + {widths[1]} = {sum(widths)} do not "
            f"match the UNet's cross_attention_dim={config.cross_attention_dim}; load "
            "text_encoder and text_encoder_2 from the same SDXL folder as the UNet."
        )
