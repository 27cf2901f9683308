"""What an objective sees of the model: a narrow, typed view built by the module for each step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import SchedulerMixin
from torch import Tensor

from acpo_lightning.codec import LatentCodec
from acpo_lightning.denoisers.base import Denoiser
from acpo_lightning.processes.base import DiffusionProcess

#: batch keys that carry the data targets: images, or cached VAE posterior parameters
TARGET_KEYS = ("pixel_values", "latent_moments")


@dataclass(frozen=True)
class ObjectiveContext:
    """The parts one step of an objective uses.

    Attributes:
        process: noising, targets, x0 recovery and the gate.
        denoiser: the policy, the anchor and their conditioning.
        codec: images and cached posteriors to the denoiser's input space.
        score: decode-and-score, ``(x0_hat, prompts, generator) -> [B]`` normalized scores (the
            generator draws crop positions).
        sampler: the scheduler rollouts sample with.
        device: where the step runs.
        training: whether the step trains (prompt dropout applies).
        w_anchor: the anchor weight for this step (a detached copy).
        anchor_on: whether the anchor term trains (off in penalty mode with weight 0).
        guidance_scale: CFG scale of samples (``generate``'s default).
        measure_drift: with ``anchor_on`` off, whether the anchor still runs, without gradient,
            so that the logged drift is measured (penalty mode at weight 0 with an anchor).
    """

    process: DiffusionProcess
    denoiser: Denoiser
    codec: LatentCodec
    score: Callable[[Tensor, Sequence[str] | None, torch.Generator], Tensor]
    sampler: SchedulerMixin
    device: torch.device
    training: bool
    w_anchor: Tensor
    anchor_on: bool
    guidance_scale: float
    measure_drift: bool = False

    @property
    def drift_measured(self) -> bool:
        """Whether the step's drift is a measurement (else it is not logged)."""
        return self.anchor_on or self.measure_drift


def has_targets(batch: dict) -> bool:
    """Whether ``batch`` holds training targets: images, or their cached VAE posteriors."""
    return any(key in batch for key in TARGET_KEYS)


def batch_length(batch: dict) -> int:
    """The number of samples of ``batch``: its targets', else its prompts'."""
    key = next((key for key in TARGET_KEYS if key in batch), "prompts")
    return len(batch[key])
