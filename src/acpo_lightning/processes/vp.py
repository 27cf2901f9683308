"""Variance-preserving diffusion (DDPM/DDIM schedules): epsilon, v and sample prediction."""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin
from torch import Tensor

from acpo_lightning import losses
from acpo_lightning.processes.base import DiffusionProcess
from acpo_lightning.processes.flow import is_flow_scheduler


class VPProcess(DiffusionProcess):
    """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` on integer timesteps, gated at ``t <= tau``.

    Args:
        noise_scheduler: the diffusers training scheduler (its ``alphas_cumprod`` and
            ``prediction_type``: ``epsilon``, ``v_prediction`` or ``sample``).
        tau: late-denoising gate; only samples with ``t <= tau`` get perceptual gradient.
        t_min: lower end of the perceptual timesteps ``[t_min, tau]``.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> process = VPProcess(DDPMScheduler(), tau=400)
        >>> process.gate(torch.tensor([399, 400, 401])).tolist()
        [True, True, False]
    """

    kind = "vp"

    def __init__(self, noise_scheduler: SchedulerMixin, tau: int = 400, t_min: int = 0) -> None:
        super().__init__()
        if is_flow_scheduler(noise_scheduler) or not hasattr(noise_scheduler, "alphas_cumprod"):
            raise ValueError(
                f"VPProcess needs a variance-preserving training scheduler (DDPMScheduler, with "
                f"alphas_cumprod), got {type(noise_scheduler).__name__}: for a flow-matching model "
                "(SD3, FLUX) use process: acpo_lightning.processes.FlowProcess."
            )
        self.noise_scheduler = noise_scheduler
        self.prediction_type = losses.check_prediction_type(noise_scheduler.config.prediction_type)
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        if not 0 <= t_min <= tau < self.num_train_timesteps:
            raise ValueError(
                f"tau={tau}, t_min={t_min} must satisfy 0 <= t_min <= tau < num_train_timesteps "
                f"({self.num_train_timesteps}, from the noise scheduler); e.g. tau: 400, t_min: 0."
            )
        self.tau, self.t_min = tau, t_min
        self.register_buffer(
            "alphas_cumprod", noise_scheduler.alphas_cumprod.float().clone(), persistent=False
        )

    def default_sampler(self) -> SchedulerMixin:
        """DDIM from the training scheduler's config, as given: the call diffusers' pipelines are
        told to make (``DDIMScheduler.from_config(pipe.scheduler.config)``), so ``generate``
        samples the timesteps that pipeline samples. Nothing is overridden: a real model's config
        carries its own ``steps_offset`` and ``clip_sample``, and forcing them would move every
        timestep of a config without them (``steps_offset`` 0: [501, 1] instead of [500, 0])."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.noise_scheduler.config)

    def check_sampler(self, scheduler: SchedulerMixin) -> None:
        if is_flow_scheduler(scheduler):
            raise ValueError(
                f"the rollout recovers x0 in variance-preserving form, but {type(scheduler).__name__} "
                "samples a flow; use DDIMScheduler, DPMSolverMultistepScheduler or DDPMScheduler "
                "as sample_scheduler."
            )
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(
                f"the rollout recovers x0 in variance-preserving form, but {type(scheduler).__name__} "
                "works in sigma space (init_noise_sigma != 1); use DDIMScheduler, "
                "DPMSolverMultistepScheduler or DDPMScheduler as sample_scheduler."
            )

    def sample_times(
        self, size: int, share: float, generator: torch.Generator, count_seed: int | None = None
    ) -> tuple[Tensor, int]:
        return losses.sample_timesteps(
            size, self.num_train_timesteps, self.tau, self.t_min, share, generator, count_seed
        )

    def add_noise(self, x0: Tensor, noise: Tensor, times: Tensor) -> Tensor:
        alpha, sigma = losses.schedule_coefficients(self.alphas_cumprod, times, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, times: Tensor) -> Tensor:
        return losses.diffusion_target(x0, noise, self.alphas_cumprod, times, self.prediction_type)

    def predicted_original(
        self, sample: Tensor, output: Tensor, times: Tensor, sampler_run: object | None = None
    ) -> Tensor:
        table = getattr(sampler_run, "alphas_cumprod", None) if sampler_run else None
        alphas = self.alphas_cumprod if table is None else table
        return losses.predicted_original(sample, output, alphas, times, self.prediction_type)

    def gate(self, times: Tensor) -> Tensor:
        return losses.late_mask(times, self.tau)
