"""Denoiser calls: the policy, its anchor and their conditioning, per backbone family."""

from acpo_lightning.denoisers.base import Denoiser
from acpo_lightning.denoisers.flux import FluxDenoiser
from acpo_lightning.denoisers.sd3 import SD3Denoiser
from acpo_lightning.denoisers.sdxl import SDXLDenoiser
from acpo_lightning.denoisers.unet import UNetDenoiser

__all__ = ["Denoiser", "FluxDenoiser", "SD3Denoiser", "SDXLDenoiser", "UNetDenoiser"]
