"""Rollout objective: perceptual guidance on the model's own late denoising steps.

The policy samples from noise without gradient down to one of the last ``k_late`` sampler steps,
then takes the final ``draft_k`` steps with gradient (DRaFT-K style; ``draft_k=1`` is ReFL-like),
recovers the x0 estimate, decodes and scores it. The anchor penalty is taken on the same noisy input
and conditioning. Memory does not grow with the number of sampler steps: the no-grad part keeps no
activations, and steps with gradient beyond the last one are checkpointed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import SchedulerMixin
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from acpo_lightning import losses
from acpo_lightning.conditioning import Conditioning
from acpo_lightning.objectives.base import ObjectiveContext
from acpo_lightning.processes.base import DiffusionProcess
from acpo_lightning.sampling import combine_branches, denoise, uses_guidance


class RolloutTerms(NamedTuple):
    """Scalars of one rollout: mean anchor penalty per sample (raw outputs, each CFG branch on its
    own), perceptual loss, mean normalized score, timestep."""

    anchor: Tensor
    perc: Tensor
    iqa: Tensor
    timestep: Tensor


class RolloutObjective:
    """Sample with the policy, the last ``draft_k`` steps with gradient, and score the result.

    Args:
        steps: sampler steps of a rollout (the sample scheduler, DDIM by default).
        k_late: the scored step is drawn among the last ``k_late`` sampler steps.
        draft_k: number of final sampler steps taken with gradient (1 = ReFL-like).
        batch_size: prompts per rollout (default: all prompts of the batch).
        guidance_scale: CFG scale of rollouts (default: the context's, ``generate``'s).
    """

    def __init__(
        self,
        steps: int = 25,
        k_late: int = 5,
        draft_k: int = 1,
        batch_size: int | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        self.steps, self.k_late, self.draft_k = steps, k_late, draft_k
        self.batch_size, self.guidance_scale = batch_size, guidance_scale

    def check(self, process: DiffusionProcess, sampler: SchedulerMixin) -> None:
        """Raise a ``ValueError`` naming the setting when the rollout cannot run as configured."""
        steps, k_late, draft_k = self.steps, self.k_late, self.draft_k
        if steps < 1 or not 1 <= k_late <= steps:
            raise ValueError(
                f"need 1 <= k_late <= rollout_steps, got k_late={k_late}, rollout_steps={steps}; "
                "e.g. rollout_steps: 25, k_late: 5 (the last 5 of 25 steps)."
            )
        if not 1 <= draft_k <= steps - k_late + 1:
            raise ValueError(
                f"draft_k={draft_k} must be in [1, rollout_steps - k_late + 1] = "
                f"[1, {steps - k_late + 1}]."
            )
        process.check_sampler(sampler)

    def terms(
        self,
        ctx: ObjectiveContext,
        prompts: list[str] | None,
        count: int,
        generator: torch.Generator,
        host_generator: torch.Generator | None = None,
    ) -> RolloutTerms:
        """Sample ``count`` images, the last step(s) with gradient, and score them.

        Args:
            ctx: the step's parts.
            prompts: one prompt per sample for conditional models, else ``None``.
            count: number of samples.
            generator: the step's generator on the device (the noise is drawn from it).
            host_generator: CPU generator for the choice of the late step (default: a CPU
                generator seeded from ``generator``), so that the choice needs no device sync.
        """
        guidance = ctx.guidance_scale if self.guidance_scale is None else self.guidance_scale
        denoiser = ctx.denoiser
        cond = uncond = None
        if denoiser.is_conditional:
            cond, uncond = denoiser.guidance_conditions(prompts, guidance)
        shape = (count, *denoiser.latent_shape())
        # in the policy's own dtype, as generate() does (fp32 weights under mixed precision)
        noise = torch.randn(shape, generator=generator, device=ctx.device, dtype=denoiser.dtype)
        if host_generator is None:
            host_generator = torch.Generator().manual_seed(generator.initial_seed())
        offset = int(torch.randint(0, self.k_late, (1,), generator=host_generator))
        last = self.steps - 1 - offset  # index of the final step, the one scored
        first_grad = last - (self.draft_k - 1)

        def policy(x: Tensor, t: Tensor, c: Conditioning | None) -> Tensor:
            return denoiser.policy(x, t, c)

        with torch.no_grad():
            latents, run = denoise(
                policy,
                ctx.sampler,
                noise,
                cond,
                uncond,
                guidance,
                self.steps,
                generator=generator,
                stop_after=first_grad,
                timestep_kwargs=denoiser.sampler_kwargs(ctx.sampler, self.steps),
            )
        for _ in range(self.draft_k - 1):
            # the step index is bound now: the backward pass recomputes this call after `advance`
            pred = checkpoint(
                run.predict, policy, latents, cond, uncond, guidance, run.index, use_reentrant=False
            )
            latents = run.advance(pred, latents)
        timestep = run.timestep
        branches = run.predict_branches(policy, latents, cond, uncond, guidance)
        pred = combine_branches(branches, uses_guidance(uncond, guidance), guidance)
        if ctx.drift_measured:
            # on the raw outputs, each CFG branch on its own: the guided combination would scale
            # the drift by up to (2g - 1)^2 and give it another meaning than the data samples' drift
            anchor_branches = run.predict_branches(
                lambda x, t, c: denoiser.anchor(x, t, c), latents.detach(), cond, uncond, guidance
            )
            # at weight 0 (penalty mode) the drift is measured without gradient
            policy_branches = branches if ctx.anchor_on else branches.detach()
            per_output = losses.anchor_penalty(policy_branches, anchor_branches)
            anchor = per_output.view(-1, count).mean(dim=0).mean()
        else:  # no anchor to measure against, or measure_drift off: the anchor is not run
            anchor = pred.new_zeros((), dtype=torch.float32)
        timesteps = timestep.expand(count)
        x0_hat = ctx.process.predicted_original(latents, pred.float(), timesteps, run)
        scores = ctx.score(x0_hat, prompts, generator)
        perc = losses.perceptual_loss(scores, ctx.process.gate(timesteps))
        return RolloutTerms(
            anchor=anchor, perc=perc, iqa=scores.detach().mean(), timestep=timestep.float()
        )
