"""Rollout objective: perceptual guidance on the model's own late denoising steps.

The policy samples from noise without gradient down to one of the last ``k_late`` sampler steps,
then takes the final ``draft_k`` steps with gradient (DRaFT-K style; ``draft_k=1`` is ReFL-like),
recovers the x0 estimate, decodes and scores it. The anchor penalty is taken on the same noisy input
and conditioning. Memory does not grow with the number of sampler steps: the no-grad part keeps no
activations, and steps with gradient beyond the last one are checkpointed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from acpo_lightning import losses
from acpo_lightning.sampling import combine_branches, denoise, uses_guidance

if TYPE_CHECKING:
    from acpo_lightning.module import ACPOModule


class RolloutTerms(NamedTuple):
    """Scalars of one rollout: mean anchor penalty per sample (raw outputs, each CFG branch on its
    own), perceptual loss, mean normalized score, timestep."""

    anchor: Tensor
    perc: Tensor
    iqa: Tensor
    timestep: Tensor


def check_rollout_settings(rollout_steps: int, k_late: int, draft_k: int, sample_scheduler) -> None:  # type: ignore[no-untyped-def]
    """Raise a ``ValueError`` naming the setting when the rollout cannot run as configured."""
    if rollout_steps < 1 or not 1 <= k_late <= rollout_steps:
        raise ValueError(
            f"need 1 <= k_late <= rollout_steps, got k_late={k_late}, rollout_steps={rollout_steps}; "
            "e.g. rollout_steps: 25, k_late: 5 (the last 5 of 25 steps)."
        )
    if not 1 <= draft_k <= rollout_steps - k_late + 1:
        raise ValueError(
            f"draft_k={draft_k} must be in [1, rollout_steps - k_late + 1] = [1, {rollout_steps - k_late + 1}]."
        )
    if float(getattr(sample_scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(
            f"the rollout recovers x0 in variance-preserving form, but {type(sample_scheduler).__name__} "
            "works in sigma space (init_noise_sigma != 1); use DDIMScheduler, DPMSolverMultistepScheduler "
            "or DDPMScheduler as sample_scheduler."
        )


def rollout_terms(
    module: ACPOModule,
    prompts: list[str] | None,
    count: int,
    generator: torch.Generator,
    host_generator: torch.Generator | None = None,
) -> RolloutTerms:
    """Sample ``count`` images with the policy, the last step(s) with gradient, and score them.

    Args:
        module: the ACPOModule (its policy, anchor, VAE, quality head and settings are used).
        prompts: one prompt per sample for conditional models, else ``None``.
        count: number of samples.
        generator: the step's generator on the module's device (the noise is drawn from it).
        host_generator: CPU generator for the choice of the late step (default: a CPU generator
            seeded from ``generator``), so that the choice needs no device sync.

    Returns:
        :class:`RolloutTerms`.
    """
    hp = module.hparams
    guidance = hp.guidance_scale if hp.rollout_guidance_scale is None else hp.rollout_guidance_scale
    cond = uncond = None
    if module.is_conditional:
        cond = module.encode_prompts(prompts)
        uncond = module.null_embedding(cond).expand_as(cond) if guidance > 1.0 else None
    shape = (count, module.latent_channels, module.latent_size, module.latent_size)
    # in the policy's own dtype, as generate() does (fp32 weights under mixed precision)
    noise = torch.randn(shape, generator=generator, device=module.device, dtype=module.unet.dtype)
    if host_generator is None:
        host_generator = torch.Generator().manual_seed(generator.initial_seed())
    offset = int(torch.randint(0, hp.k_late, (1,), generator=host_generator))
    last = hp.rollout_steps - 1 - offset  # index of the final step, the one scored
    first_grad = last - (hp.draft_k - 1)

    def policy(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        return module.unet_output(module.unet, x, t, c)

    with torch.no_grad():
        latents, run = denoise(
            policy,
            module.sample_scheduler,
            noise,
            cond,
            uncond,
            guidance,
            hp.rollout_steps,
            generator=generator,
            stop_after=first_grad,
        )
    for _ in range(hp.draft_k - 1):
        # the step index is bound now: the backward pass recomputes this call after `advance`
        pred = checkpoint(
            run.predict, policy, latents, cond, uncond, guidance, run.index, use_reentrant=False
        )
        latents = run.advance(pred, latents)
    timestep = run.timestep
    branches = run.predict_branches(policy, latents, cond, uncond, guidance)
    pred = combine_branches(branches, uses_guidance(uncond, guidance), guidance)
    if module.hparams.anchor_mode == "constraint" or module.hparams.w_anchor > 0:
        # on the raw outputs, each CFG branch on its own: the guided combination would scale the
        # drift by up to (2g - 1)^2 and give it another meaning than the data samples' drift
        anchor_branches = run.predict_branches(
            module.anchor_output, latents.detach(), cond, uncond, guidance
        )
        per_output = losses.anchor_penalty(branches, anchor_branches)
        anchor = per_output.view(-1, count).mean(dim=0).mean()
    else:  # penalty mode with w_anchor 0: the anchor network is not run
        anchor = pred.new_zeros((), dtype=torch.float32)
    timesteps = timestep.expand(count)
    x0_hat = losses.predicted_original(
        latents, pred.float(), run.alphas_cumprod, timesteps, module.prediction_type
    )
    scores = module.normalized_quality(x0_hat, prompts)
    perc = losses.perceptual_loss(scores, losses.late_mask(timesteps, hp.tau))
    return RolloutTerms(
        anchor=anchor, perc=perc, iqa=scores.detach().mean(), timestep=timestep.float()
    )
