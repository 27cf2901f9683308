"""FLUX.1 (``FluxTransformer2DModel``) with its CLIP and T5 text encoders, as ``FluxPipeline`` runs it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from acpo_lightning import conditioning as C
from acpo_lightning.conditioning import Conditioning
from acpo_lightning.denoisers.base import Denoiser
from acpo_lightning.models.lora import has_lora


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` latents as ``[B, h/2 * w/2, 4C]`` tokens of 2x2 patches (``FluxPipeline``'s
    ``_pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"FLUX packs 2x2 latent patches, but the latents are {h}x{w}: train on images whose "
            "sides are multiples of 2 x the VAE's scale factor (16 px for FLUX.1)."
        )
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for ``height x width`` latents (``_unpack_latents``)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rotary position ids ``[h * w, 3]`` of a ``height x width`` token grid (row, column), as
    ``FluxPipeline._prepare_latent_image_ids`` builds them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


class FluxDenoiser(Denoiser):
    """A FLUX.1 transformer policy, its anchor, and its two text encoders.

    The denoiser's input space is the *unpacked* VAE latent ``[B, C, H/8, W/8]`` (``C`` = 16 for
    FLUX.1), where the flow process's element-wise math and the Euler sampler act exactly as on the
    pipeline's packed tokens. Each call packs 2x2 patches into tokens, builds the image and text
    position ids, passes the time as ``t / 1000`` and unpacks the velocity, as ``FluxPipeline`` and
    diffusers' ``train_dreambooth_lora_flux.py`` do.

    Conditioning is a dict: ``encoder_hidden_states`` (T5 states ``[B, L, 4096]``),
    ``pooled_projections`` (CLIP's pooled output ``[B, 768]``) and, for guidance-distilled
    transformers (``config.guidance_embeds``, FLUX.1-dev), ``guidance`` ``[B]``: the distilled
    guidance value. Training uses ``guidance_scale`` (3.5, the FLUX training script's default);
    sampling uses ``generate``'s ``guidance_scale``. There is no classifier-free guidance: the
    guidance value goes into the transformer and the empty prompt only serves prompt dropout.

    Note:
        FLUX.1-schnell has no guidance embedding (``guidance_embeds: false``): no ``guidance``
        entry is built and ``guidance_scale`` is ignored; it is timestep-distilled, so sample with
        ``num_inference_steps: 4``; its scheduler has ``use_dynamic_shifting: false`` (no resolution
        shift, ``shift: 1``), so ``FlowProcess`` needs no ``image_seq_len``; and its T5 takes at most
        256 tokens (``max_sequence_length: 256``).

    Args:
        transformer: the policy, a ``FluxTransformer2DModel`` with LoRA (``models.add_lora``) or
            fully trainable.
        text_encoder: CLIP text model (``CLIPTextModel``); its ``pooler_output`` is the pooled
            projection input.
        tokenizer: CLIP's tokenizer (its ``model_max_length``, 77, as the pipeline uses).
        text_encoder_2: T5 encoder (``T5EncoderModel``); its last hidden states are the text states.
        tokenizer_2: T5's tokenizer.
        anchor_transformer: a separate frozen anchor, or ``None`` for the adapter toggle.
        guidance_scale: the distilled guidance value of training steps.
        resolution: image side in pixels (1024 for FLUX.1); gives :meth:`latent_shape` for sampling.
        vae_scale_factor: image side over latent side (8 for FLUX.1's VAE).
        max_sequence_length: T5 tokens per prompt (512 for dev, at most 256 for schnell).

    Raises:
        ValueError: ``resolution`` not a multiple of ``2 * vae_scale_factor``, or the text
            encoders' widths do not fit the transformer.

    Example:
        >>> from acpo_lightning.tiny import flux as tiny
        >>> from acpo_lightning import testing as T
        >>> denoiser = FluxDenoiser(
        ...     tiny.tiny_flux_transformer(), T.tiny_text_encoder(), T.tiny_tokenizer(),
        ...     tiny.tiny_t5_encoder(), tiny.tiny_t5_tokenizer(), resolution=16,
        ...     vae_scale_factor=1, max_sequence_length=16,
        ... )
        >>> denoiser.latent_shape()
        (1, 16, 16)
    """

    is_conditional = True
    process_kind = "flow"
    trained_name = "transformer"
    anchor_name = "anchor_transformer"
    network_label = "FLUX transformer"

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder_2: nn.Module,
        tokenizer_2: PreTrainedTokenizerBase,
        anchor_transformer: nn.Module | None = None,
        guidance_scale: float = 3.5,
        resolution: int = 1024,
        vae_scale_factor: int = 8,
        max_sequence_length: int = 512,
    ) -> None:
        self.transformer, self.anchor_transformer = transformer, anchor_transformer
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.guidance_scale, self.max_sequence_length = guidance_scale, max_sequence_length
        self.resolution, self.vae_scale_factor = resolution, vae_scale_factor
        if resolution % (2 * vae_scale_factor):
            side = resolution - resolution % (2 * vae_scale_factor)
            raise ValueError(
                f"resolution={resolution} is not a multiple of 2 * vae_scale_factor = "
                f"{2 * vae_scale_factor} (FLUX packs 2x2 latent patches); use e.g. {side}."
            )
        config = transformer.config
        widths = {
            "text_encoder (CLIP) hidden_size": (
                text_encoder.config.hidden_size, config.pooled_projection_dim, "pooled_projection_dim"
            ),
            "text_encoder_2 (T5) d_model": (
                text_encoder_2.config.d_model, config.joint_attention_dim, "joint_attention_dim"
            ),
        }  # fmt: skip
        for what, (found, expected, name) in widths.items():
            if found != expected:
                raise ValueError(
                    f"{what} is {found} but the transformer's {name} is {expected}: the text "
                    "encoders come from another model; load them from the transformer's repository."
                )
        self.guidance_embeds = bool(config.get("guidance_embeds", False))

    def networks(self) -> dict[str, nn.Module | None]:
        return {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "anchor_transformer": self.anchor_transformer,
        }

    def frozen(self) -> list[nn.Module]:
        parts = (self.text_encoder, self.text_encoder_2, self.anchor_transformer)
        return [m for m in parts if m is not None]

    def latent_shape(self) -> tuple[int, int, int]:
        side = 2 * (self.resolution // (2 * self.vae_scale_factor))
        return int(self.transformer.config.in_channels) // 4, side, side

    def prompt_lengths(self) -> dict[str, int]:
        return {
            "tokenizer": int(self.tokenizer.model_max_length),
            "tokenizer_2": self.max_sequence_length,
        }

    def latent_side_multiple(self) -> tuple[int, str]:
        return 2, "FLUX packs 2x2 latent patches into tokens"

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """T5 states and CLIP's pooled output for ``prompts``, as ``FluxPipeline.encode_prompt``."""
        prompts = list(prompts)
        clip_ids = self.tokenizer(
            prompts, padding="max_length", max_length=int(self.tokenizer.model_max_length),
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        t5_ids = self.tokenizer_2(
            prompts, padding="max_length", max_length=self.max_sequence_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        device = next(self.text_encoder_2.parameters()).device
        states = self.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
        pooled = self.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        return {
            "encoder_hidden_states": states.to(self.text_encoder_2.dtype),
            "pooled_projections": pooled.to(self.text_encoder.dtype),
        }

    def with_guidance(self, cond: Conditioning, value: float) -> Conditioning:
        """``cond`` with a ``guidance`` entry of ``value`` per sample (float32, as the pipeline),
        for guidance-distilled transformers; unchanged otherwise."""
        if not self.guidance_embeds:
            return cond
        guidance = torch.full((C.batch_size(cond),), float(value), device=C.first(cond).device)
        return {**cond, "guidance": guidance}

    def add_batch_conditioning(self, cond: Conditioning, batch: dict, size: int) -> Conditioning:
        return self.with_guidance(cond, self.guidance_scale)

    def guidance_conditions(
        self, prompts: Sequence[str], guidance_scale: float
    ) -> tuple[Conditioning, Conditioning | None]:
        """The prompts' conditioning with ``guidance_scale`` as distilled guidance; no CFG branch."""
        return self.with_guidance(self.encode_prompts(list(prompts)), guidance_scale), None

    def sampler_kwargs(self, scheduler: object, num_inference_steps: int) -> dict:
        """``FluxPipeline``'s ``sigmas`` (``linspace(1, 1/n, n)``) and resolution shift ``mu``."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas"):
            sigmas = None
        _, height, width = self.latent_shape()
        mu = calculate_shift(
            (height // 2) * (width // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": sigmas, "mu": mu}

    def _call(
        self, transformer: nn.Module, sample: Tensor, times: Tensor, cond: Conditioning
    ) -> Tensor:
        b, _, height, width = sample.shape
        times = times.expand(b) if times.ndim == 0 else times
        guidance = cond.get("guidance")
        if self.guidance_embeds and guidance is None:
            raise ValueError(
                "this FLUX transformer is guidance-distilled (guidance_embeds) but the conditioning "
                "has no 'guidance'; build it with conditioning() or guidance_conditions()."
            )
        states = cond["encoder_hidden_states"]
        text_ids = torch.zeros(states.shape[1], 3, device=sample.device, dtype=states.dtype)
        image_ids = latent_image_ids(height // 2, width // 2, sample.device, sample.dtype)
        out = transformer(
            hidden_states=pack_latents(sample),
            timestep=times.to(sample.dtype) / 1000,
            guidance=guidance if self.guidance_embeds else None,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=states,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    def configure(self, channels_last: bool = False, compile_backend: str | None = None) -> None:
        """Make a transformer without adapters trainable; compile it if asked (``channels_last``
        does not apply: the transformer takes tokens)."""
        if not has_lora(self.transformer):
            self.transformer.requires_grad_(True)  # full fine-tuning
        if compile_backend is not None:
            self.transformer.compile(backend=compile_backend)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block (double- and single-stream) in the backward pass."""
        self.transformer.enable_gradient_checkpointing()

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype
