"""The embedded default: small models pretrained on Fashion-MNIST, shipped with the repository.

A package of its own beside ``acpo_lightning``, not part of the ``acpo-lightning`` wheel; it runs
from a source checkout (``make demo`` puts ``src`` on ``PYTHONPATH``).

``configs/demo.yaml`` fine-tunes the shipped latent text-to-image model with ACPO on CPU;
``python -m acpo_demo.pretrain`` rebuilds every shipped model; ``python -m
acpo_demo.evaluate`` writes the before/after table.
"""

from acpo_demo.assets import (
    WEIGHTS_DIR,
    demo_weights,
    load_demo_classifier,
    load_demo_evaluator,
    load_demo_guidance,
    load_demo_guidance_head,
    load_demo_prompt_head,
    load_demo_sampler,
    load_demo_scheduler,
    load_demo_unet,
    load_demo_vae,
)
from acpo_demo.fashion import (
    CLASS_NAMES,
    FashionMNISTDataModule,
    FashionMNISTNotFoundError,
    all_captions,
    caption,
    find_fashion_mnist,
    load_fashion_mnist,
)
from acpo_demo.text import load_minilm, load_minilm_tokenizer

__all__ = [
    "CLASS_NAMES",
    "WEIGHTS_DIR",
    "FashionMNISTDataModule",
    "FashionMNISTNotFoundError",
    "all_captions",
    "caption",
    "demo_weights",
    "find_fashion_mnist",
    "load_demo_classifier",
    "load_demo_evaluator",
    "load_demo_guidance",
    "load_demo_guidance_head",
    "load_demo_prompt_head",
    "load_demo_sampler",
    "load_demo_scheduler",
    "load_demo_unet",
    "load_demo_vae",
    "load_fashion_mnist",
    "load_minilm",
    "load_minilm_tokenizer",
]
