"""Denoiser calls: the policy, its anchor and their conditioning, per backbone family."""

from acpo_lightning.denoisers.base import Denoiser
from acpo_lightning.denoisers.unet import UNetDenoiser

__all__ = ["Denoiser", "UNetDenoiser"]
