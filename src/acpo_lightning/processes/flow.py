"""Flow matching (rectified flow) as SD3, SD3.5 and FLUX.1 are trained: a velocity target on a
straight path from data to noise, gated in sigma."""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin
from torch import Tensor

from acpo_lightning import losses
from acpo_lightning.processes.base import DiffusionProcess

WEIGHTINGS = ("logit_normal", "uniform", "mode")


def is_flow_scheduler(scheduler: object) -> bool:
    """Whether a diffusers scheduler samples a flow (``FlowMatch*``: sigmas, no ``alphas_cumprod``)."""
    return "FlowMatch" in type(scheduler).__name__


class FlowProcess(DiffusionProcess):
    """``x_t = (1 - s) x0 + s eps``, target ``eps - x0`` (the velocity), ``x0 = x_t - s v``.

    Times are the flow transformers' timesteps ``t = s * N`` (``N = num_train_timesteps``, 1000),
    the values ``FlowMatchEulerDiscreteScheduler`` samples with, so ``s = t / N`` everywhere.
    Training times are drawn as the diffusers SD3/FLUX training scripts draw them: ``u`` from the
    ``weighting`` density (``compute_density_for_timestep_sampling``), then the training
    scheduler's own (shifted) timestep at ``floor(u * N)``. With ``use_dynamic_shifting`` (FLUX)
    the sigmas are shifted for the resolution, ``mu`` from ``image_seq_len`` as the pipeline does.

    The late-denoising gate is a bound in sigma: a sample gets perceptual gradient when
    ``s <= sigma_max``. A VP gate ``tau`` maps to the sigma of equal signal-to-noise ratio,
    ``s = 1 / (1 + sqrt(snr))`` with ``snr = a_tau / (1 - a_tau)`` (README, Flow matching).

    Args:
        noise_scheduler: the training ``FlowMatchEulerDiscreteScheduler`` (its shift).
        sigma_max: the gate; perceptual samples are drawn uniformly from ``[sigma_min, sigma_max]``.
        sigma_min: lower end of the perceptual sigmas.
        weighting: density of the other samples' ``u``: ``logit_normal`` (SD3's default),
            ``uniform`` or ``mode``.
        logit_mean: mean of the logit-normal density.
        logit_std: standard deviation of the logit-normal density.
        mode_scale: scale of the ``mode`` density.
        image_seq_len: packed latent tokens per image, for the resolution shift of schedulers with
            ``use_dynamic_shifting`` (FLUX.1 at 1024 px: 4096); required there, ignored elsewhere.

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> process = FlowProcess(FlowMatchEulerDiscreteScheduler(shift=3.0), sigma_max=0.4)
        >>> x0, eps = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
        >>> process.add_noise(x0, eps, torch.tensor([250.0])).item()
        0.75
    """

    kind = "flow"

    def __init__(
        self,
        noise_scheduler: SchedulerMixin,
        sigma_max: float = 0.4,
        sigma_min: float = 0.0,
        weighting: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        image_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        if not is_flow_scheduler(noise_scheduler):
            raise ValueError(
                f"FlowProcess needs a flow-matching training scheduler, got "
                f"{type(noise_scheduler).__name__} (a variance-preserving one): use "
                "FlowMatchEulerDiscreteScheduler (SD3, FLUX) or drop the FlowProcess for VPProcess."
            )
        if not 0.0 <= sigma_min <= sigma_max <= 1.0:
            raise ValueError(
                f"sigma_min={sigma_min}, sigma_max={sigma_max} must satisfy "
                "0 <= sigma_min <= sigma_max <= 1; e.g. sigma_max: 0.4."
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}.")
        config = noise_scheduler.config
        if config.get("use_dynamic_shifting") and image_seq_len is None:
            raise ValueError(
                f"{type(noise_scheduler).__name__} shifts its sigmas by resolution "
                "(use_dynamic_shifting), so FlowProcess needs image_seq_len: the packed latent "
                "tokens per image, (height / 16) * (width / 16) for FLUX.1 (4096 at 1024 px)."
            )
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = int(config.num_train_timesteps)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.weighting, self.logit_mean, self.logit_std = weighting, logit_mean, logit_std
        self.mode_scale, self.image_seq_len = mode_scale, image_seq_len
        # the training table as the scheduler builds it (before any set_timesteps): times s * N
        fresh = type(noise_scheduler).from_config(config)
        sigmas = fresh.sigmas[: self.num_train_timesteps].double()
        if config.get("use_dynamic_shifting"):
            sigmas = fresh.time_shift(self.shift_mu(image_seq_len), 1.0, sigmas)
        self.register_buffer("train_times", (sigmas * self.num_train_timesteps).float(), False)

    def shift_mu(self, image_seq_len: int) -> float:
        """FLUX's resolution shift ``mu``: linear in the token count between the scheduler's bounds."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.noise_scheduler.config
        return calculate_shift(
            image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
        )

    def sigmas(self, times: Tensor) -> Tensor:
        """``s = t / N``."""
        return times.float() / self.num_train_timesteps

    def default_sampler(self) -> SchedulerMixin:
        """The training scheduler's configuration as a sampler (the SD3/FLUX pipelines' own)."""
        return type(self.noise_scheduler).from_config(self.noise_scheduler.config)

    def check_sampler(self, scheduler: SchedulerMixin) -> None:
        if not is_flow_scheduler(scheduler):
            raise ValueError(
                f"the rollout recovers x0 as x_t - sigma * v, but {type(scheduler).__name__} is a "
                "variance-preserving sampler; use FlowMatchEulerDiscreteScheduler as sample_scheduler."
            )

    def sample_times(
        self, size: int, share: float, generator: torch.Generator, count_seed: int | None = None
    ) -> tuple[Tensor, int]:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        count, _ = losses.scored_count(share, size, generator, count_seed)
        device = generator.device
        late = torch.rand(count, generator=generator, device=device)
        late = (
            self.sigma_min + (self.sigma_max - self.sigma_min) * late
        ) * self.num_train_timesteps
        u = compute_density_for_timestep_sampling(
            self.weighting, size - count, self.logit_mean, self.logit_std, self.mode_scale,
            device=device, generator=generator,
        )  # fmt: skip
        index = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        rest = self.train_times.to(device)[index]
        return torch.cat([late, rest]), count

    def _view(self, times: Tensor, like: Tensor) -> Tensor:
        sigma = self.sigmas(times).to(like.device)
        return sigma.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, times: Tensor) -> Tensor:
        sigma = self._view(times, x0)
        return ((1.0 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, times: Tensor) -> Tensor:
        return noise - x0

    def predicted_original(
        self, sample: Tensor, output: Tensor, times: Tensor, sampler_run: object | None = None
    ) -> Tensor:
        # the flow samplers' timesteps are their sigmas times N, so t / N is the sigma for rollouts too
        return sample.float() - self._view(times, sample) * output.float()

    def gate(self, times: Tensor) -> Tensor:
        # compared in time units: s * N is how the sampler stores its sigmas
        return times.float() <= self.sigma_max * self.num_train_timesteps + 1e-3
