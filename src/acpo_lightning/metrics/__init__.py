"""Evaluation metrics as torchmetrics ``Metric`` subclasses: PickScore, CLIPScore and MANIQA.

Each takes images in ``[0, 1]`` (or uint8), keeps sum/count states reduced by ``sum`` across
processes, and documents its backbone, formula and range (also in its ``info`` dictionary, which
the callbacks log as hyper-parameters). MANIQA needs the ``iqa`` extra (pyiqa), imported only when
a ``MANIQA`` metric is built.
"""

from acpo_lightning.metrics.clip import CLIPScore, PickScore, load_clip
from acpo_lightning.metrics.functional import (
    as_unit_images,
    clip_score_from_cosine,
    paired_cosine,
    pickscore_from_cosine,
    shard_bounds,
)
from acpo_lightning.metrics.maniqa import MANIQA, MANIQA_VARIANTS
from acpo_lightning.metrics.preprocess import CLIPImagePreprocess

__all__ = [
    "MANIQA",
    "MANIQA_VARIANTS",
    "CLIPImagePreprocess",
    "CLIPScore",
    "PickScore",
    "as_unit_images",
    "clip_score_from_cosine",
    "load_clip",
    "paired_cosine",
    "pickscore_from_cosine",
    "shard_bounds",
]
