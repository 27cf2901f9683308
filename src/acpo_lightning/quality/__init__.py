"""No-reference image-quality heads that ACPO optimizes against."""

from acpo_lightning.quality.base import QualityHead, QualityHeadProtocol, check_quality_head
from acpo_lightning.quality.sharpness import SharpnessHead

__all__ = ["QualityHead", "QualityHeadProtocol", "SharpnessHead", "check_quality_head"]
