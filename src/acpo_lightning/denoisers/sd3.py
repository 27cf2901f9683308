"""SD3 / SD3.5 (``SD3Transformer2DModel``) with its two CLIP encoders and optional T5, as
``StableDiffusion3Pipeline`` runs it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from acpo_lightning.conditioning import Conditioning
from acpo_lightning.denoisers.base import Denoiser
from acpo_lightning.models.lora import has_lora


class SD3Denoiser(Denoiser):
    """An SD3 / SD3.5 transformer policy, its anchor, and its three text encoders.

    The input space is the VAE latent ``[B, C, H/8, W/8]`` (``C`` = 16); the transformer patches
    it itself. Calls pass ``hidden_states``, ``timestep`` (the flow scheduler's ``s * 1000``),
    ``encoder_hidden_states`` and ``pooled_projections`` as the pipeline does.

    Conditioning is a dict built as ``StableDiffusion3Pipeline.encode_prompt`` builds it:
    ``encoder_hidden_states`` ``[B, 77 + L, 4096]`` (the penultimate hidden states of both CLIP
    encoders, concatenated on the feature axis and zero-padded to T5's width, then T5's ``L``
    states appended on the sequence axis) and ``pooled_projections`` ``[B, 2048]`` (both CLIP
    encoders' projected ``text_embeds``, concatenated). Without T5 (``text_encoder_3=None``,
    about 10 GB less memory) its states are zeros, as in the pipeline. The unconditional branch of
    classifier-free guidance is the encoded empty prompt (not zeros), as the pipeline's default
    negative prompt.

    Args:
        transformer: the policy, an ``SD3Transformer2DModel`` with LoRA (``models.add_lora`` with
            ``JOINT_ATTENTION_PROJECTIONS``) or fully trainable.
        text_encoder: CLIP-L (``CLIPTextModelWithProjection``).
        tokenizer: CLIP-L's tokenizer; its ``model_max_length`` (77) is used for both CLIP encoders,
            as the pipeline does.
        text_encoder_2: OpenCLIP bigG (``CLIPTextModelWithProjection``).
        tokenizer_2: its tokenizer.
        text_encoder_3: T5-XXL (``T5EncoderModel``), or ``None`` for zero T5 states.
        tokenizer_3: T5's tokenizer (ignored without ``text_encoder_3``).
        anchor_transformer: a separate frozen anchor, or ``None`` for the adapter toggle.
        max_sequence_length: T5 tokens per prompt (the pipeline's default: 256).
        sample_size: latent side for sampling (default: the transformer's ``sample_size``, 128 for
            SD3.5 medium, i.e. 1024 px images).

    Raises:
        ValueError: the text encoders' widths do not fit the transformer, or ``text_encoder_3``
            is given without ``tokenizer_3``.

    Example:
        >>> from acpo_lightning import testing as T
        >>> from acpo_lightning.tiny import sd3 as tiny
        >>> denoiser = SD3Denoiser(
        ...     tiny.tiny_sd3_transformer(), tiny.tiny_sd3_clip_encoder(), T.tiny_tokenizer(),
        ...     tiny.tiny_sd3_clip_encoder_2(), T.tiny_tokenizer(), max_sequence_length=8,
        ... )
        >>> {k: tuple(v.shape) for k, v in denoiser.encode_prompts(["a cat"]).items()}
        {'encoder_hidden_states': (1, 24, 32), 'pooled_projections': (1, 32)}
    """

    is_conditional = True
    process_kind = "flow"
    trained_name = "transformer"
    anchor_name = "anchor_transformer"
    network_label = "SD3 transformer"

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder_2: nn.Module,
        tokenizer_2: PreTrainedTokenizerBase,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3: PreTrainedTokenizerBase | None = None,
        anchor_transformer: nn.Module | None = None,
        max_sequence_length: int = 256,
        sample_size: int | None = None,
    ) -> None:
        self.transformer, self.anchor_transformer = transformer, anchor_transformer
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.max_sequence_length, self.sample_size = max_sequence_length, sample_size
        if text_encoder_3 is not None and tokenizer_3 is None:
            raise ValueError(
                "text_encoder_3 (T5) was given without tokenizer_3; pass T5's tokenizer "
                "(models.load_tokenizer with subfolder: tokenizer_3), or drop both for zero T5 states."
            )
        self._check_widths()
        patch, why = self.latent_side_multiple()
        if self.latent_shape()[1] % patch:
            side = self.latent_shape()[1]
            raise ValueError(
                f"sample_size={side} latents, but {why}; use sample_size={side - side % patch}."
            )

    def _check_widths(self) -> None:
        config = self.transformer.config
        clip = self.text_encoder.config, self.text_encoder_2.config
        pooled = sum(int(c.projection_dim) for c in clip)
        if pooled != config.pooled_projection_dim:
            raise ValueError(
                f"the CLIP encoders' projection_dim sum to {pooled} but the transformer's "
                f"pooled_projection_dim is {config.pooled_projection_dim}: the text encoders come "
                "from another model; load text_encoder and text_encoder_2 from the transformer's "
                "repository (subfolders text_encoder, text_encoder_2)."
            )
        if self.text_encoder_3 is not None:
            width = int(self.text_encoder_3.config.d_model)
            if width != config.joint_attention_dim:
                raise ValueError(
                    f"text_encoder_3 (T5) d_model is {width} but the transformer's "
                    f"joint_attention_dim is {config.joint_attention_dim}: load text_encoder_3 "
                    "from the transformer's repository (subfolder text_encoder_3)."
                )

    def networks(self) -> dict[str, nn.Module | None]:
        return {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "text_encoder_3": self.text_encoder_3,
            "anchor_transformer": self.anchor_transformer,
        }

    def frozen(self) -> list[nn.Module]:
        parts = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return [m for m in (*parts, self.anchor_transformer) if m is not None]

    def latent_shape(self) -> tuple[int, int, int]:
        config = self.transformer.config
        size = self.sample_size or config.sample_size
        return int(config.in_channels), int(size), int(size)

    def latent_side_multiple(self) -> tuple[int, str]:
        patch = int(self.transformer.config.patch_size)
        return patch, f"the SD3 transformer cuts {patch}x{patch} latent patches"

    def prompt_lengths(self) -> dict[str, int]:
        """Both CLIP tokenizers at the first one's ``model_max_length`` (as the pipeline), T5's
        at ``max_sequence_length`` (also the length of the zeros that stand in for it)."""
        clip = int(self.tokenizer.model_max_length)
        return {"tokenizer": clip, "tokenizer_2": clip, "tokenizer_3": self.max_sequence_length}

    def _clip(self, index: int, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Penultimate hidden states and projected pooled output of CLIP encoder ``index``."""
        tokenizer = (self.tokenizer, self.tokenizer_2)[index]
        encoder = (self.text_encoder, self.text_encoder_2)[index]
        ids = tokenizer(
            prompts, padding="max_length", max_length=int(self.tokenizer.model_max_length),
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        output = encoder(ids.to(device), output_hidden_states=True)
        return output.hidden_states[-2].to(self.text_encoder.dtype), output[0]

    def _t5(self, prompts: list[str], device: torch.device) -> Tensor:
        """T5's last hidden states, or zeros of the transformer's text width without T5."""
        if self.text_encoder_3 is None:
            shape = (
                len(prompts),
                self.max_sequence_length,
                self.transformer.config.joint_attention_dim,
            )
            return torch.zeros(shape, device=device, dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(
            prompts, padding="max_length", max_length=self.max_sequence_length,
            truncation=True, add_special_tokens=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        return self.text_encoder_3(ids.to(device))[0].to(self.text_encoder_3.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Text states and pooled projections for ``prompts``, as the pipeline's ``encode_prompt``."""
        prompts = list(prompts)
        device = next(self.text_encoder.parameters()).device
        states, pooled = self._clip(0, prompts, device)
        states_2, pooled_2 = self._clip(1, prompts, device)
        t5 = self._t5(prompts, device)
        clip = torch.cat([states, states_2], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat([pooled, pooled_2], dim=-1),
        }

    def sampler_kwargs(self, scheduler: object, num_inference_steps: int) -> dict:
        """The resolution shift ``mu`` when the scheduler shifts dynamically, computed as
        ``StableDiffusion3Pipeline`` does (its defaults; SD3.5's own schedulers use a fixed shift
        and get nothing)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        config = scheduler.config
        if not config.get("use_dynamic_shifting", None):
            return {}
        _, height, width = self.latent_shape()
        patch = int(self.transformer.config.patch_size)
        mu = calculate_shift(
            (height // patch) * (width // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}

    def _call(
        self, transformer: nn.Module, sample: Tensor, times: Tensor, cond: Conditioning
    ) -> Tensor:
        times = times.expand(sample.shape[0]) if times.ndim == 0 else times
        patch, why = self.latent_side_multiple()
        if sample.shape[-2] % patch or sample.shape[-1] % patch:  # it would drop the last row
            raise ValueError(
                f"{why}, but the latents are {sample.shape[-2]}x{sample.shape[-1]}: train on "
                f"images whose sides are multiples of {patch} x the VAE's scale factor."
            )
        return transformer(
            hidden_states=sample,
            timestep=times,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def configure(self, channels_last: bool = False, compile_backend: str | None = None) -> None:
        """Make a transformer without adapters trainable; compile it if asked (``channels_last``
        does not apply: the transformer works on patch tokens)."""
        if not has_lora(self.transformer):
            self.transformer.requires_grad_(True)  # full fine-tuning
        if compile_backend is not None:
            self.transformer.compile(backend=compile_backend)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each joint transformer block in the backward pass."""
        self.transformer.enable_gradient_checkpointing()

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype
