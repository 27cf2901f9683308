"""diffusers UNets (``UNet2DConditionModel`` with one text encoder, or ``UNet2DModel``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from acpo_lightning.denoisers.base import Denoiser
from acpo_lightning.models.lora import has_lora


class UNetDenoiser(Denoiser):
    """A UNet policy, its anchor (adapters off, or a separate frozen UNet) and its text encoder.

    Args:
        unet: the policy, a diffusers ``UNet2DConditionModel`` (text-conditional) or
            ``UNet2DModel`` (unconditional), with LoRA (``models.add_lora``) or fully trainable.
        text_encoder: text encoder for conditional UNets (output ``[0]`` = hidden states).
        tokenizer: the text encoder's tokenizer.
        anchor_unet: a separate frozen anchor UNet, or ``None`` for the adapter toggle.
        max_prompt_length: token length for prompts (default: the tokenizer's, capped by the encoder).
        channels_last: feed the UNet NHWC inputs (see ``ACPOModule``'s ``channels_last``).

    Raises:
        ValueError: a conditional UNet without text encoder and tokenizer, or an unconditional
            one with a text encoder.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        anchor_unet: nn.Module | None = None,
        max_prompt_length: int | None = None,
        channels_last: bool = False,
    ) -> None:
        self.unet, self.anchor_unet = unet, anchor_unet
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.max_prompt_length, self.channels_last = max_prompt_length, channels_last
        self.is_conditional = unet.config.get("cross_attention_dim") is not None
        name = type(unet).__name__
        if unet.config.get("addition_embed_type") == "text_time":
            raise ValueError(f"{name} has addition_embed_type='text_time' (an SDXL UNet): inject "
                             "denoiser: acpo_lightning.denoisers.sdxl.SDXLDenoiser instead of unet.")  # fmt: skip
        if self.is_conditional and (text_encoder is None or tokenizer is None):
            raise ValueError(
                f"{name} is text-conditional (cross_attention_dim="
                f"{unet.config.cross_attention_dim}) but text_encoder/tokenizer is missing; "
                "pass both (e.g. models.load_text_encoder and models.load_tokenizer)."
            )
        if not self.is_conditional and text_encoder is not None:
            raise ValueError(
                f"{name} is unconditional but a text_encoder was given; drop "
                "text_encoder/tokenizer or use a UNet2DConditionModel."
            )

    def networks(self) -> dict[str, nn.Module | None]:
        return {
            "unet": self.unet,
            "text_encoder": self.text_encoder,
            "anchor_unet": self.anchor_unet,
        }

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.anchor_unet) if m is not None]

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        side = int(size[0] if isinstance(size, list | tuple) else size)
        return int(self.unet.config.in_channels), side, side

    def prompt_lengths(self) -> dict[str, int]:
        return {"tokenizer": self._prompt_length()} if self.is_conditional else {}

    def _prompt_length(self) -> int:
        length = self.max_prompt_length or int(self.tokenizer.model_max_length)
        positions = getattr(self.text_encoder.config, "max_position_embeddings", None)
        return min(length, positions) if positions else length

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder hidden states ``[B, L, D]`` for ``prompts`` (frozen, no grad)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self._prompt_length(),
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def _call(self, unet: nn.Module, sample: Tensor, times: Tensor, cond: Tensor | None) -> Tensor:
        times = times.expand(sample.shape[0]) if times.ndim == 0 else times
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        if self.is_conditional:
            out = unet(sample, times, encoder_hidden_states=cond).sample
        else:
            out = unet(sample, times).sample
        if out.shape[1] == 2 * sample.shape[1]:  # learned variance: the first half is the mean
            out = out[:, : sample.shape[1]]
        return out

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
        if hasattr(self.unet, "enable_gradient_checkpointing"):
            self.unet.enable_gradient_checkpointing()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype
