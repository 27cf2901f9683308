"""Callbacks: evaluation of generated images (PickScore, CLIPScore, MANIQA, any quality head),
LoRA export, and the LoRA kept at the best held-out value.

The three metric callbacks share one generation pass per evaluation (fixed prompts and seeds,
``ACPOModule.generate``), log ``val/<metric>``, ``val/<metric>_base`` and ``val/<metric>_delta``,
and a TensorBoard grid of base and tuned images with the prompts as captions.
"""

from acpo_lightning.callbacks.evaluation import (
    CLIPScoreCallback,
    GenerationMetricCallback,
    MANIQACallback,
    PickScoreCallback,
)
from acpo_lightning.callbacks.generation import EvaluationPass, GenerationSettings
from acpo_lightning.callbacks.lora_export import LoRAExportCallback
from acpo_lightning.callbacks.prompts import SHIPPED_PROMPT_LISTS, load_prompts
from acpo_lightning.callbacks.quality import BestLoRACallback, QualityHeadCallback

__all__ = [
    "SHIPPED_PROMPT_LISTS",
    "BestLoRACallback",
    "CLIPScoreCallback",
    "EvaluationPass",
    "GenerationMetricCallback",
    "GenerationSettings",
    "LoRAExportCallback",
    "MANIQACallback",
    "PickScoreCallback",
    "QualityHeadCallback",
    "load_prompts",
]
