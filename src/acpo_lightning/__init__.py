"""acpo-lightning: fine-tune diffusion models with ACPO (Anchor-Constrained Perceptual Optimization)."""

from acpo_lightning.module import ACPOModule

__all__ = ["ACPOModule", "__version__"]
__version__ = "0.1.0"
