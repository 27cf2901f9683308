"""The data objective: diffusion loss, anchor and perceptual terms on noised real samples."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from acpo_lightning import losses
from acpo_lightning.objectives.base import ObjectiveContext


class DataObjective:
    """Noise real pairs; score the x0 estimates of the gated share of them.

    The scored count of a step is ``floor(share x B)`` plus one with probability
    ``frac(share x B)`` (:func:`~acpo_lightning.losses.scored_count`), and the perceptual term is
    the sum of the scored samples' terms divided by the count expected of a step, so it is
    unbiased for any per-process batch ``B``: at batch 1 and share 0.25 one step in four scores
    its sample, with four times the weight. When ``share x B`` is whole, every step scores that
    many and the term is their mean, as before.

    A sample whose prompt was dropped (CFG training) is left out of the perceptual term: its
    prediction is the unconditional one, which its caption does not describe (a prompt-aware head
    would pull the unconditional branch towards the caption) and which an empty prompt gives a
    prompt-aware head nothing it was trained to judge. The divisor is then the expected count of
    kept scored samples, ``share x B x (1 - prompt_dropout)``, so the term stays the mean over
    conditional samples in expectation. It is still decoded (which samples drop is not known on
    the host without a device sync), so the cost does not change.

    On a rollout step (``score=False``) every timestep is drawn as in plain diffusion training:
    the perceptual term comes from the rollout, so no share is drawn from the gated range.

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

    def terms(
        self,
        ctx: ObjectiveContext,
        batch: dict,
        generator: torch.Generator,
        w_diff: float,
        w_perc: float,
        score: bool = True,
        choice: torch.Generator | None = None,
    ) -> tuple[losses.ACPOTerms, dict[str, float]]:
        """One data step's terms and host-side stats (``perc_share``, the scored share).

        ``choice``, a rank-free generator, seeds the scored count so that every process of a DDP
        run scores the same number of samples on a step (see :func:`losses.scored_count`).

        With ``score=False`` no sample is decoded or scored and every timestep is drawn as in
        plain diffusion training (the perceptual term comes from a rollout).
        """
        x0 = ctx.codec.batch_latents(batch, generator, ctx.device)
        size = x0.shape[0]
        prompts = batch.get("prompts")
        dropout = self.prompt_dropout if ctx.training else 0.0
        cond = ctx.denoiser.conditioning(prompts, size, 0.0, generator, batch)
        cond, dropped = ctx.denoiser.drop_prompts(cond, size, dropout, generator)
        share = self.perceptual_share if score else 0.0
        count_seed = choice.initial_seed() if choice is not None else None
        times, n_perc = ctx.process.sample_times(size, share, generator, count_seed)
        noise = torch.randn(x0.shape, generator=generator, device=ctx.device, dtype=x0.dtype)
        noisy = ctx.process.add_noise(x0, noise, times)
        pred = ctx.denoiser.policy(noisy, times, cond)
        diff = losses.diffusion_loss(pred, ctx.process.target(x0, noise, times))
        drift = measured_drift(ctx, pred, lambda: ctx.denoiser.anchor(noisy, times, cond))
        anchor = drift if ctx.anchor_on else torch.zeros_like(diff)
        count = n_perc if w_perc > 0 and score else 0
        expected = losses.expected_count(share, size)
        if dropped is not None:
            expected *= 1.0 - dropout
        if count == 0:
            scores = pred.new_zeros(0, dtype=torch.float32)
            gate = torch.zeros(0, dtype=torch.bool, device=pred.device)
        else:  # decode and score the perceptual share only
            x0_hat = ctx.process.predicted_original(
                noisy[:count], pred[:count].float(), times[:count]
            )
            scores = ctx.score(x0_hat, prompts[:count] if prompts is not None else None, generator)
            gate = ctx.process.gate(times[:count])
            if dropped is not None:
                gate = gate & ~dropped[:count].to(gate.device)
        terms = losses.acpo_objective(
            diff, anchor, scores, gate, w_diff, ctx.w_anchor, w_perc, expected
        )
        if drift is not None and not ctx.anchor_on:  # measured, not trained on (weight 0)
            terms = terms._replace(anchor=drift.mean())
        return terms, {"perc_share": count / size}


def measured_drift(
    ctx: ObjectiveContext, pred: Tensor, anchor_output: Callable[[], Tensor]
) -> Tensor | None:
    """Per-sample drift from the anchor: with gradient when its term counts, measured without
    gradient when ``ctx.measure_drift`` (penalty mode at weight 0), else ``None`` (not run)."""
    if ctx.anchor_on:
        return losses.anchor_penalty(pred, anchor_output())
    if ctx.measure_drift:
        with torch.no_grad():
            return losses.anchor_penalty(pred.detach(), anchor_output())
    return None
