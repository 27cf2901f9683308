"""Factories for the demo's shipped weights (YAML ``class_path`` targets; nothing is downloaded).

The weights live in the repository's ``src/acpo_demo/weights/`` (``make pretrain-demo`` rebuilds
them; they are not in the ``acpo-lightning`` wheel); each factory takes an optional ``path`` to use
another copy, e.g. one retrained with other settings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from acpo_demo.classifier import FashionClassifier
from acpo_lightning.models.loading import ModelNotFoundError
from acpo_lightning.quality.composite import CompositeQualityHead
from acpo_lightning.quality.prompt_aware import PromptAwareIQA
from acpo_lightning.quality.two_stream import TwoStreamIQA
from acpo_lightning.quiet_imports import quiet_imports

with quiet_imports():  # diffusers' models import peft, then bitsandbytes: see quiet_imports
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def demo_weights(part: str, path: str | Path | None = None) -> Path:
    """The folder of one shipped part (``vae``, ``unet``, ``scheduler``, ``classifier``, ...).

    Raises:
        ModelNotFoundError: the folder does not exist (says how to rebuild it).
    """
    folder = Path(path) if path is not None else WEIGHTS_DIR / part
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"demo weights '{part}' not found at {folder}. They ship with the acpo-lightning "
            "repository in src/acpo_demo/weights (not in the wheel): run the demo from a checkout "
            "with src on PYTHONPATH, pass `path` to another copy, or rebuild them with `make "
            f"pretrain-demo` (python -m acpo_demo.pretrain {part} --out <folder>)."
        )
    return folder


def load_demo_vae(path: str | None = None) -> nn.Module:
    """The demo ``AutoencoderKL`` (32x32x3 <-> 8x8x4), frozen."""
    return AutoencoderKL.from_pretrained(demo_weights("vae", path)).requires_grad_(False).eval()


def load_demo_unet(path: str | None = None) -> nn.Module:
    """The demo base ``UNet2DConditionModel`` (fp32; wrap it with ``models.add_lora``)."""
    folder = demo_weights("unet", path)
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)


def load_demo_scheduler(path: str | None = None) -> DDPMScheduler:
    """The demo's DDPM training schedule (scaled-linear betas, epsilon prediction)."""
    return DDPMScheduler.from_pretrained(demo_weights("scheduler", path))


def load_demo_sampler(path: str | None = None) -> DDIMScheduler:
    """A DDIM sampler on the demo's schedule."""
    return DDIMScheduler.from_pretrained(demo_weights("scheduler", path))


def load_demo_guidance_head(path: str | None = None) -> TwoStreamIQA:
    """The demo's guidance head: a :class:`TwoStreamIQA` trained on Fashion-MNIST (frozen)."""
    return TwoStreamIQA.from_pretrained(demo_weights("guidance_iqa", path))


def load_demo_prompt_head(path: str | None = None) -> PromptAwareIQA:
    """The demo's prompt-aware guidance head with its MiniLM text encoder (frozen; needs prompts).

    Raises:
        ModelNotFoundError: the weights or the MiniLM package are missing (says how to get them).
    """
    from acpo_demo.text import load_minilm, load_minilm_tokenizer

    folder = demo_weights("prompt_iqa", path)
    return PromptAwareIQA.from_pretrained(folder, load_minilm(), load_minilm_tokenizer())


def load_demo_guidance(
    quality_path: str | None = None, prompt_path: str | None = None, prompt_weight: float = 1.0
) -> CompositeQualityHead:
    """The demo's guidance: image quality and prompt agreement, ``quality + w * prompt``.

    A :class:`CompositeQualityHead` of :func:`load_demo_guidance_head` (named ``quality``) and
    :func:`load_demo_prompt_head` (``prompt``, weight ``prompt_weight``); both score in ``(0, 1)``.
    """
    return CompositeQualityHead(
        [load_demo_guidance_head(quality_path), load_demo_prompt_head(prompt_path)],
        weights=[1.0, prompt_weight],
        names=["quality", "prompt"],
    )


def load_demo_classifier(path: str | None = None) -> FashionClassifier:
    """The evaluator classifier (never used for guidance), frozen."""
    return FashionClassifier.from_pretrained(demo_weights("classifier", path))


def load_demo_evaluator(path: str | None = None) -> nn.Module:
    """The independent quality evaluator (never used for guidance), frozen."""
    from acpo_demo.evaluator import PatchQualityNet

    return PatchQualityNet.from_pretrained(demo_weights("eval_iqa", path))
