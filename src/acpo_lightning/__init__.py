"""acpo-lightning: fine-tune diffusion models with ACPO (Anchor-Constrained Perceptual Optimization).

``ACPOModule`` is imported on first use, so that ``acpo_lightning.quality`` or
``acpo_lightning.data`` can be imported without loading Lightning and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ACPOModule", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from acpo_lightning.module import ACPOModule


def __getattr__(name: str) -> Any:
    if name == "ACPOModule":
        from acpo_lightning.module import ACPOModule

        return ACPOModule
    raise AttributeError(f"module 'acpo_lightning' has no attribute {name!r}")
