"""ACPO's objectives: on noised real samples, on the policy's own rollouts, and their mix."""

from acpo_lightning.objectives.base import ObjectiveContext, batch_length, has_targets
from acpo_lightning.objectives.data import DataObjective
from acpo_lightning.objectives.mix import ObjectiveMix, StepResult
from acpo_lightning.objectives.rollout import RolloutObjective, RolloutTerms

__all__ = [
    "DataObjective",
    "ObjectiveContext",
    "ObjectiveMix",
    "RolloutObjective",
    "RolloutTerms",
    "StepResult",
    "batch_length",
    "has_targets",
]
