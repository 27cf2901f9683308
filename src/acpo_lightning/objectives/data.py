"""The data objective: diffusion loss, anchor and perceptual terms on noised real samples."""

from __future__ import annotations

import warnings

import torch

from acpo_lightning import losses
from acpo_lightning.objectives.base import ObjectiveContext


class DataObjective:
    """Noise real pairs; score the x0 estimates of the gated share of them.

    Args:
        perceptual_share: share of each batch drawn from the gated times and scored; only those
            samples are decoded, so the cost scales with the share.
        prompt_dropout: probability of replacing a prompt with the empty prompt (CFG training).
    """

    def __init__(self, perceptual_share: float = 0.25, prompt_dropout: float = 0.1) -> None:
        if not 0.0 <= perceptual_share <= 1.0:
            raise ValueError(f"perceptual_share={perceptual_share} must be in [0, 1] (e.g. 0.25).")
        if not 0.0 <= prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout={prompt_dropout} must be in [0, 1) (e.g. 0.1).")
        self.perceptual_share, self.prompt_dropout = perceptual_share, prompt_dropout
        self._warned_share = False

    def terms(
        self,
        ctx: ObjectiveContext,
        batch: dict,
        generator: torch.Generator,
        w_diff: float,
        w_perc: float,
        score: bool = True,
    ) -> tuple[losses.ACPOTerms, dict[str, float]]:
        """One data step's terms and host-side stats (``perc_share``, the scored share).

        With ``score=False`` no sample is decoded or scored (the perceptual term comes from a
        rollout).
        """
        x0 = ctx.codec.batch_latents(batch, generator, ctx.device)
        size = x0.shape[0]
        prompts = batch.get("prompts")
        dropout = self.prompt_dropout if ctx.training else 0.0
        cond = ctx.denoiser.conditioning(prompts, size, dropout, generator, batch)
        times, n_perc = ctx.process.sample_times(size, self.perceptual_share, generator)
        if n_perc == 0 and self.perceptual_share > 0 and w_perc > 0 and score:
            self._warn_share_rounds_to_zero(size)
        noise = torch.randn(x0.shape, generator=generator, device=ctx.device, dtype=x0.dtype)
        noisy = ctx.process.add_noise(x0, noise, times)
        pred = ctx.denoiser.policy(noisy, times, cond)
        diff = losses.diffusion_loss(pred, ctx.process.target(x0, noise, times))
        if ctx.anchor_on:
            anchor = losses.anchor_penalty(pred, ctx.denoiser.anchor(noisy, times, cond))
        else:
            anchor = torch.zeros_like(diff)
        count = n_perc if w_perc > 0 and score else 0
        if count == 0:
            scores = pred.new_zeros(0, dtype=torch.float32)
            gate = torch.zeros(0, dtype=torch.bool, device=pred.device)
        else:  # decode and score the perceptual share only
            x0_hat = ctx.process.predicted_original(
                noisy[:count], pred[:count].float(), times[:count]
            )
            scores = ctx.score(x0_hat, prompts[:count] if prompts is not None else None, generator)
            gate = ctx.process.gate(times[:count])
        terms = losses.acpo_objective(diff, anchor, scores, gate, w_diff, ctx.w_anchor, w_perc)
        return terms, {"perc_share": count / size}

    def _warn_share_rounds_to_zero(self, size: int) -> None:
        """Each process scores round(share x its own batch) samples; say so (once) when that is 0."""
        if self._warned_share:
            return
        self._warned_share = True
        share = self.perceptual_share
        warnings.warn(
            f"perceptual_share={share} x per-process batch size {size} rounds to 0: no sample of "
            "this batch is scored, so the data objective's perceptual term is off. Raise "
            f"perceptual_share to >= {0.5 / size:.2g} or the batch size.",
            stacklevel=3,
        )
