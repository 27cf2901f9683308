"""The diffusion-process interface: how data is noised, what the network learns, how x0 is recovered.

ACPO's objectives and the module talk to the process only through :class:`DiffusionProcess`, so a
process with another parameterisation (flow matching: ``x_t = (1 - s) x0 + s eps``, a velocity
target, ``x0 = x_t - s v``, a gate in ``s``) is one more implementation, not a branch elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from diffusers import SchedulerMixin
from torch import Tensor, nn


class DiffusionProcess(nn.Module, ABC):
    """A forward process with its training target, x0 recovery and late-denoising gate.

    Times are what the denoiser is called with (integer timesteps for VP processes). An
    implementation is an ``nn.Module`` so that schedule tables follow the model's device; it holds
    no trainable state and nothing of it goes into checkpoints.
    """

    #: the family of models this process trains (``vp`` or ``flow``; see ``Denoiser.process_kind``)
    kind: str

    #: the sampler ``generate`` and rollouts use when none is given
    @abstractmethod
    def default_sampler(self) -> SchedulerMixin: ...

    @abstractmethod
    def check_sampler(self, scheduler: SchedulerMixin) -> None:
        """Raise a ``ValueError`` naming the scheduler when rollouts cannot recover x0 with it."""

    @abstractmethod
    def sample_times(
        self, size: int, share: float, generator: torch.Generator, count_seed: int | None = None
    ) -> tuple[Tensor, int]:
        """Training times for ``size`` samples; the first ``count`` are gated ones.

        ``count`` is :func:`~acpo_lightning.losses.scored_count`: ``floor(share * size)`` plus one
        with probability ``frac(share * size)``, so that its mean is ``share * size`` for any batch;
        ``count_seed`` (rank-free under DDP) seeds that draw instead of ``generator``'s seed.

        Returns ``(times, count)``: ``times`` on the generator's device, ``count`` the gated ones.
        """

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, times: Tensor) -> Tensor:
        """The noised sample ``x_t`` of ``x0`` at ``times``."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, times: Tensor) -> Tensor:
        """What the denoiser's output is trained towards at ``times``."""

    @abstractmethod
    def predicted_original(
        self, sample: Tensor, output: Tensor, times: Tensor, sampler_run: object | None = None
    ) -> Tensor:
        """The x0 estimate from the denoiser ``output`` at ``sample``.

        ``sampler_run`` (a :class:`~acpo_lightning.sampling.SamplerRun`) supplies the sampler's own
        schedule for samples of a rollout.
        """

    @abstractmethod
    def gate(self, times: Tensor) -> Tensor:
        """Boolean mask of the late-denoising samples that get perceptual gradient."""
