"""The denoising loop shared by ``ACPOModule.generate`` (and the rollout objective).

It follows the diffusers pipelines step for step (``StableDiffusionPipeline``, and through the
denoiser's conditioning and sampler arguments the SDXL, SD3 and FLUX ones: latent scaling,
classifier-free guidance as ``uncond + g * (cond - uncond)``, ``scheduler.step``), so that a LoRA
exported from ACPO and loaded into that pipeline reproduces ``generate`` for the same seeds.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from acpo_lightning import conditioning as C
from acpo_lightning.conditioning import Conditioning

if TYPE_CHECKING:
    from acpo_lightning.denoisers import Denoiser

UNetFn = Callable[[Tensor, Tensor, Conditioning | None], Tensor]


def per_sample_generators(
    seed: int | Sequence[int], count: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per image, seeded ``seed + i`` (or ``seed[i]``): image ``i`` does not depend
    on batching.

    Raises:
        ValueError: ``seed`` is a sequence whose length is not ``count``.
    """
    seeds = [seed + i for i in range(count)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images; pass one seed per image.")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


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


def uses_guidance(uncond: Conditioning | None, guidance_scale: float) -> bool:
    """Whether classifier-free guidance applies: an unconditional embedding and ``g > 1``."""
    return uncond is not None and guidance_scale > 1.0


def branch_outputs(
    unet_fn: UNetFn,
    latents: Tensor,
    timestep: Tensor,
    cond: Tensor | None,
    uncond: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """The raw model outputs: ``[uncond; cond]`` stacked (``[2B, ...]``) under CFG, else ``[B, ...]``."""
    if not uses_guidance(uncond, guidance_scale):
        return unet_fn(latents, timestep, cond)
    return unet_fn(torch.cat([latents, latents]), timestep, C.cat(uncond, cond))


def combine_branches(outputs: Tensor, guided: bool, guidance_scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + g * (cond - uncond)`` of :func:`branch_outputs`."""
    if not guided:
        return outputs
    pred_uncond, pred_cond = outputs.chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def guided_prediction(
    unet_fn: UNetFn,
    latents: Tensor,
    timestep: Tensor,
    cond: Tensor | None,
    uncond: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """One UNet evaluation with classifier-free guidance when ``uncond`` is given and ``g > 1``."""
    outputs = branch_outputs(unet_fn, latents, timestep, cond, uncond, guidance_scale)
    return combine_branches(outputs, uses_guidance(uncond, guidance_scale), guidance_scale)


class SamplerRun:
    """A sampler in progress: a private scheduler copy, its timesteps, and the index of the next step.

    Args:
        scheduler: a diffusers scheduler; it is copied, never mutated.
        num_inference_steps: number of sampler steps.
        device: where the timesteps live.
        generator: randomness of stochastic samplers (DDPM, ancestral); DDIM with eta 0 ignores it.
        timestep_kwargs: more arguments of ``set_timesteps`` (FLUX's ``sigmas`` and ``mu``).

    Example:
        >>> from diffusers import DDIMScheduler
        >>> run = SamplerRun(DDIMScheduler(), 4, "cpu")
        >>> run.timesteps.tolist()
        [750, 500, 250, 0]
    """

    def __init__(
        self,
        scheduler,  # type: ignore[no-untyped-def]
        num_inference_steps: int,
        device,  # type: ignore[no-untyped-def]
        generator: torch.Generator | list[torch.Generator] | None = None,
        timestep_kwargs: dict | None = None,
    ) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.scheduler = fresh_scheduler(scheduler)
        self.scheduler.set_timesteps(num_inference_steps, device=device, **(timestep_kwargs or {}))
        self.timesteps = self.scheduler.timesteps
        # host copies for the scheduler's own table lookups: indexing its CPU tables with a device
        # tensor would cost a device sync at every step (one sync here instead)
        self.host_timesteps: list[int | float] = self.timesteps.tolist()
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)
        #: the schedule on ``device``, for x0 recovery without a host-to-device copy per step
        self.alphas_cumprod = alphas_cumprod.to(device) if alphas_cumprod is not None else None
        self.index = 0
        self.step_kwargs = {}
        if (
            generator is not None
            and "generator" in inspect.signature(self.scheduler.step).parameters
        ):
            # a list (one per image) as the diffusers pipelines pass it to stochastic samplers
            self.step_kwargs["generator"] = generator

    @property
    def timestep(self) -> Tensor:
        """The timestep the next :meth:`advance` takes, as a tensor on the run's device."""
        return self.timesteps[self.index]

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    def start(self, noise: Tensor) -> Tensor:
        """Scale initial noise by the scheduler's ``init_noise_sigma`` (flow samplers have none)."""
        sigma = getattr(self.scheduler, "init_noise_sigma", None)
        return noise if sigma is None else noise * sigma

    def predict(
        self,
        unet_fn: UNetFn,
        latents: Tensor,
        cond: Tensor | None,
        uncond: Tensor | None,
        guidance_scale: float,
        index: int | None = None,
    ) -> Tensor:
        """The (guided) model output at step ``index`` (default: the current one), without stepping.

        Pass ``index`` explicitly when the call may be re-run later (activation checkpointing
        recomputes it in the backward pass, after :meth:`advance` has moved the run on).
        """
        outputs = self.predict_branches(unet_fn, latents, cond, uncond, guidance_scale, index)
        return combine_branches(outputs, uses_guidance(uncond, guidance_scale), guidance_scale)

    def predict_branches(
        self,
        unet_fn: UNetFn,
        latents: Tensor,
        cond: Tensor | None,
        uncond: Tensor | None,
        guidance_scale: float,
        index: int | None = None,
    ) -> Tensor:
        """The raw outputs of :func:`branch_outputs` at step ``index``, before guidance."""
        index = self.index if index is None else index
        model_input = latents
        if hasattr(self.scheduler, "scale_model_input"):  # flow samplers do not scale the input
            model_input = self.scheduler.scale_model_input(latents, self.host_timesteps[index])
        return branch_outputs(
            unet_fn, model_input, self.timesteps[index], cond, uncond, guidance_scale
        )

    def advance(self, pred: Tensor, latents: Tensor) -> Tensor:
        """Take the current step with a given model output; returns the next latents."""
        latents = self.scheduler.step(
            pred, self.host_timesteps[self.index], latents, **self.step_kwargs, return_dict=False
        )[0]
        self.index += 1
        return latents


def denoise(
    unet_fn: UNetFn,
    scheduler,  # type: ignore[no-untyped-def]
    latents: Tensor,
    cond: Tensor | None,
    uncond: Tensor | None,
    guidance_scale: float,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    stop_after: int | None = None,
    timestep_kwargs: dict | None = None,
) -> tuple[Tensor, SamplerRun]:
    """Run the sampler from pure noise; optionally stop early.

    Args:
        unet_fn: ``(x, t, cond) -> model output`` (policy or anchor).
        scheduler: a diffusers scheduler; it is copied, never mutated.
        latents: initial noise (unscaled; multiplied by ``init_noise_sigma`` here).
        cond: the denoiser's conditioning, or ``None`` for unconditional models.
        uncond: the empty prompt's conditioning for classifier-free guidance, or ``None``.
        guidance_scale: CFG scale ``g``; guidance is skipped for ``g <= 1``.
        num_inference_steps: number of sampler steps.
        generator: randomness of stochastic samplers: one generator, or one per image (as the
            diffusers pipelines pass them).
        stop_after: if given, return after this many steps, before the next one is taken.
        timestep_kwargs: more arguments of the scheduler's ``set_timesteps``.

    Returns:
        ``(latents, run)``: the latents reached, and the :class:`SamplerRun` (its ``timestep`` is the
        one the sampler would use next, so the caller can continue it).
    """
    run = SamplerRun(scheduler, num_inference_steps, latents.device, generator, timestep_kwargs)
    latents = run.start(latents)
    while not run.done and (stop_after is None or run.index < stop_after):
        latents = run.advance(run.predict(unet_fn, latents, cond, uncond, guidance_scale), latents)
    return latents, run


def sample_latents(
    denoiser: Denoiser,
    scheduler,  # type: ignore[no-untyped-def]
    prompts: Sequence[str] | int,
    seed: int | Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    device: torch.device | str,
    use_anchor: bool = False,
) -> Tensor:
    """Sample with a denoiser from seeded noise, as the diffusers pipelines do (no grad).

    Image ``i`` draws its noise (and a stochastic sampler's) from a generator seeded ``seed + i``
    (or ``seed[i]``), so an image does not depend on the batch it was generated in.

    Args:
        denoiser: a :class:`~acpo_lightning.denoisers.Denoiser`.
        scheduler: the sampler; it is copied, never mutated.
        prompts: one prompt per image, or a number of images for unconditional denoisers.
        seed: base seed, or one seed per image.
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale (1 disables).
        device: where the noise is drawn.
        use_anchor: sample with the anchor (the base model) instead of the policy.

    Returns:
        The final samples in the denoiser's input space.
    """
    count = prompts if isinstance(prompts, int) else len(prompts)
    if count < 1:
        raise ValueError("generate() needs at least one prompt (or a positive image count).")
    if denoiser.is_conditional and isinstance(prompts, int):
        raise ValueError("this model is text-conditional: pass a list of prompts, not a count.")
    with torch.no_grad():
        cond = uncond = None
        if denoiser.is_conditional:
            cond, uncond = denoiser.guidance_conditions(list(prompts), guidance_scale)
        generators = per_sample_generators(seed, count)
        dtype = C.first(cond).dtype if cond is not None else torch.float32
        noise = initial_noise((count, *denoiser.latent_shape()), generators, device, dtype)
        with denoiser.sampling_anchor() if use_anchor else nullcontext():
            latents, _ = denoise(
                lambda x, t, c: denoiser.policy(x, t, c),
                scheduler,
                noise,
                cond,
                uncond,
                guidance_scale,
                num_inference_steps,
                generator=generators,  # stochastic samplers: image i's noise from seed + i
                timestep_kwargs=denoiser.sampler_kwargs(scheduler, num_inference_steps),
            )
    return latents
