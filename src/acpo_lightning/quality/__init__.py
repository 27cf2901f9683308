"""No-reference image-quality heads that ACPO optimizes against.

``PyiqaQualityHead`` (needs the ``iqa`` extra) and the training parts (``IQATrainingModule``,
``PromptIQATrainingModule``, ``IQADataModule``) are imported on first use, so
``import acpo_lightning.quality`` loads neither pyiqa nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from acpo_lightning.quality.assets import ClassicIQAParams, fetch_classic_iqa_params
from acpo_lightning.quality.base import QualityHead, QualityHeadProtocol, check_quality_head
from acpo_lightning.quality.composite import CompositeQualityHead, normalize_quality
from acpo_lightning.quality.prompt_aware import PromptAwareIQA, PromptAwareNet, PromptEmbedder
from acpo_lightning.quality.sharpness import SharpnessHead
from acpo_lightning.quality.two_stream import TwoStreamIQA, TwoStreamNet

if TYPE_CHECKING:
    from acpo_lightning.quality.iqa_data import (
        IQADataModule,
        MOSManifestDataset,
        SyntheticDistortionDataset,
    )
    from acpo_lightning.quality.prompt_data import PromptPairDataset, collate_prompt_groups
    from acpo_lightning.quality.pyiqa_head import PyiqaQualityHead, PyiqaWeightsError
    from acpo_lightning.quality.training import IQATrainingModule, PromptIQATrainingModule

_LAZY = {
    "PyiqaQualityHead": "acpo_lightning.quality.pyiqa_head",
    "PyiqaWeightsError": "acpo_lightning.quality.pyiqa_head",
    "IQATrainingModule": "acpo_lightning.quality.training",
    "PromptIQATrainingModule": "acpo_lightning.quality.training",
    "IQADataModule": "acpo_lightning.quality.iqa_data",
    "MOSManifestDataset": "acpo_lightning.quality.iqa_data",
    "SyntheticDistortionDataset": "acpo_lightning.quality.iqa_data",
    "PromptPairDataset": "acpo_lightning.quality.prompt_data",
    "collate_prompt_groups": "acpo_lightning.quality.prompt_data",
}

__all__ = [
    "ClassicIQAParams",
    "CompositeQualityHead",
    "IQADataModule",
    "IQATrainingModule",
    "MOSManifestDataset",
    "PromptAwareIQA",
    "PromptAwareNet",
    "PromptEmbedder",
    "PromptIQATrainingModule",
    "PromptPairDataset",
    "PyiqaQualityHead",
    "PyiqaWeightsError",
    "QualityHead",
    "QualityHeadProtocol",
    "SharpnessHead",
    "SyntheticDistortionDataset",
    "TwoStreamIQA",
    "TwoStreamNet",
    "check_quality_head",
    "collate_prompt_groups",
    "fetch_classic_iqa_params",
    "normalize_quality",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
