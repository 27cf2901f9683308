"""Decode-and-score: the perceptual path from x0 estimates to normalized quality scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from acpo_lightning import losses
from acpo_lightning.codec import LatentCodec
from acpo_lightning.crops import PerceptualCrop


class PerceptualScorer:
    """Decode x0 estimates (with the perceptual decoder when set) and score them with the head.

    Args:
        quality_head: a frozen NR-IQA head (``quality.QualityHead`` contract).
        codec: the model's :class:`~acpo_lightning.codec.LatentCodec`.
        checkpointed: recompute the head's activations in the backward pass.
        crop: score crops at native resolution (:class:`~acpo_lightning.crops.PerceptualCrop`)
            instead of whole images; ``None`` scores the whole decoded image.
    """

    def __init__(
        self,
        quality_head: nn.Module,
        codec: LatentCodec,
        checkpointed: bool = False,
        crop: PerceptualCrop | None = None,
    ) -> None:
        self.quality_head, self.codec, self.checkpointed = quality_head, codec, checkpointed
        self.crop = crop

    def raw(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """Raw quality scores of ``images`` (checkpointed when gradient checkpointing is on)."""
        prompts = list(prompts) if prompts is not None else None
        if self.checkpointed and torch.is_grad_enabled() and images.requires_grad:
            return checkpoint(self.quality_head, images, prompts, use_reentrant=False)
        return self.quality_head(images, prompts)

    def __call__(
        self, x0_hat: Tensor, prompts: Sequence[str] | None, generator: torch.Generator
    ) -> Tensor:
        """Normalized scores of the decoded ``x0_hat``: higher is better, 1.0 = the head's span.

        With a crop, ``generator`` (the step's) draws the crop positions.
        """
        if self.crop is None:
            raw = self.raw(self.codec.decode(x0_hat, perceptual=True), prompts)
        else:
            crops = self.crop.windows(x0_hat, self.codec.scale_factor, generator)
            images = crops.pixels(self.codec.decode(crops.latents, perceptual=True))
            if prompts is not None:
                prompts = [p for p in prompts for _ in range(self.crop.count)]
            raw = crops.per_image(self.raw(images, prompts))
        head = self.quality_head
        return losses.normalize_score(raw, head.higher_is_better, head.score_range)
