"""The denoising loop shared by ``ACPOModule.generate`` (and the rollout objective).

It follows diffusers' ``StableDiffusionPipeline`` step for step (latent scaling, classifier-free
guidance as ``uncond + g * (cond - uncond)``, ``scheduler.step``), so that a LoRA exported from ACPO
and loaded into that pipeline reproduces ``generate`` for the same seeds.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

UNetFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def per_sample_generators(
    seed: int, count: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per image, seeded ``seed + i``: image ``i`` does not depend on batching."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(count)]


def initial_noise(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Draw ``shape[0]`` noise maps, one per generator, as diffusers' ``randn_tensor`` does."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generators, device=device, dtype=dtype)


def fresh_scheduler(scheduler):  # type: ignore[no-untyped-def]
    """A private copy of a diffusers scheduler: ``set_timesteps`` mutates the instance."""
    return copy.deepcopy(scheduler)


def guided_prediction(
    unet_fn: UNetFn,
    latents: Tensor,
    timestep: Tensor,
    cond: Tensor | None,
    uncond: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """One UNet evaluation with classifier-free guidance when ``uncond`` is given and ``g > 1``."""
    if uncond is None or guidance_scale <= 1.0:
        return unet_fn(latents, timestep, cond)
    both = unet_fn(torch.cat([latents, latents]), timestep, torch.cat([uncond, cond]))
    pred_uncond, pred_cond = both.chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def denoise(
    unet_fn: UNetFn,
    scheduler,  # type: ignore[no-untyped-def]
    latents: Tensor,
    cond: Tensor | None,
    uncond: Tensor | None,
    guidance_scale: float,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    stop_after: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run the sampler from pure noise; optionally stop early.

    Args:
        unet_fn: ``(x, t, cond) -> model output`` (policy or anchor).
        scheduler: a diffusers scheduler; it is copied, never mutated.
        latents: initial noise (unscaled; multiplied by ``init_noise_sigma`` here).
        cond: text embeddings ``[B, L, D]`` or ``None`` for unconditional models.
        uncond: empty-prompt embeddings for classifier-free guidance, or ``None``.
        guidance_scale: CFG scale ``g``; guidance is skipped for ``g <= 1``.
        num_inference_steps: number of sampler steps.
        generator: randomness of stochastic samplers (DDPM, ancestral); DDIM with eta 0 ignores it.
        stop_after: if given, return after this many steps, before the next one is taken.

    Returns:
        ``(latents, next_timestep)``: the final latents, and the timestep the sampler would have
        used next (``None`` when the loop ran to the end).
    """
    scheduler = fresh_scheduler(scheduler)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = {}
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generator
    timesteps = scheduler.timesteps
    for index, timestep in enumerate(timesteps):
        if stop_after is not None and index == stop_after:
            return latents, timestep
        model_input = scheduler.scale_model_input(latents, timestep)
        pred = guided_prediction(unet_fn, model_input, timestep, cond, uncond, guidance_scale)
        latents = scheduler.step(pred, timestep, latents, **step_kwargs, return_dict=False)[0]
    return latents, None
