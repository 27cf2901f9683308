"""MANIQA as a torchmetrics ``Metric``, through pyiqa (the ``iqa`` extra, imported lazily).

The network is built by :class:`~acpo_lightning.quality.PyiqaQualityHead`, which also locks it in
eval mode (MANIQA random-crops in train mode), keeps torch's global flags intact and turns missing
weights into one error that says how to provide them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from acpo_lightning.metrics import functional as MF

#: pyiqa's MANIQA checkpoints: trained on KonIQ-10k (default), KADID-10k and PIPAL.
MANIQA_VARIANTS = ("maniqa", "maniqa-kadid", "maniqa-pipal")


class MANIQA(Metric):
    """MANIQA (Yang et al., 2022): no-reference perceptual quality of each image, mean over images.

    Backbone: pyiqa's ``MANIQA`` (ViT-B/8 features, transposed attention, scale swin blocks), with
    the ``maniqa`` (KonIQ-10k), ``maniqa-kadid`` or ``maniqa-pipal`` weights.
    Formula: pyiqa's evaluation protocol: the image at its own resolution (sides below 224 are
    upsampled by pyiqa), ``crops`` uniformly placed 224x224 crops, the network's score averaged over
    crops; the metric is the mean over images. ``pyiqa.create_metric("maniqa")`` gives the same value.
    Range: about ``[0, 1]``, higher is better.

    Args:
        variant: ``maniqa``, ``maniqa-kadid`` or ``maniqa-pipal``.
        pretrained_model_path: a local MANIQA checkpoint instead of pyiqa's download.
        crops: number of uniform 224-px crops per image (pyiqa's default 20).
        resize_to: resize images to this square side first (e.g. 224: one crop covers the whole
            image, as the ACPO training head does); ``None`` keeps pyiqa's protocol.
        head: an already built quality head used instead of pyiqa's (nothing is loaded).
        **kwargs: ``torchmetrics.Metric`` options.

    Raises:
        ImportError: pyiqa is not installed (``pip install 'acpo-lightning[iqa]'``).
        ValueError: unknown ``variant``.
        PyiqaWeightsError: the weights are neither cached nor downloadable (the message says how
            to provide them).

    Example:
        >>> metric = MANIQA()  # doctest: +SKIP
        >>> metric.update(torch.rand(2, 3, 512, 512))  # doctest: +SKIP
        >>> metric.compute()  # doctest: +SKIP
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(
        self,
        variant: str = "maniqa",
        pretrained_model_path: str | Path | None = None,
        crops: int = 20,
        resize_to: int | None = None,
        head: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if variant not in MANIQA_VARIANTS:
            raise ValueError(f"variant={variant!r} must be one of {MANIQA_VARIANTS}.")
        if crops < 1:
            raise ValueError(f"crops={crops} must be >= 1 (pyiqa's default is 20).")
        self.variant, self.crops, self.resize_to = variant, crops, resize_to
        if head is None:
            from acpo_lightning.quality.pyiqa_head import PyiqaQualityHead

            head = PyiqaQualityHead(variant, pretrained_model_path, test_sample=crops)
            head.native_size = None  # keep pyiqa's protocol: crops at the image's own resolution
        self.head = head.requires_grad_(False).eval()
        self.add_state("score_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> MANIQA:
        """The network stays in eval mode whatever ``mode`` is (its crops are random in train mode)."""
        super().train(mode)
        self.head.eval()
        return self

    @property
    def info(self) -> dict[str, str]:
        """Backbone, formula and range, for logging as hyper-parameters."""
        size = f"resized to {self.resize_to}, " if self.resize_to else ""
        return {
            "backbone": f"pyiqa {self.variant}",
            "formula": f"mean over images of the mean MANIQA score of {self.crops} uniform 224px crops ({size}pyiqa protocol)",
            "range": "about [0, 1], higher is better",
        }

    @torch.no_grad()
    def score(self, images: MF.ImageInput) -> Tensor:
        """Per-image scores ``[B]`` without touching the metric's state."""
        device = next(self.head.parameters(), torch.empty(0, device=self.device)).device
        scores = []
        for image in MF.batched(MF.as_unit_images(images)):
            image = image.to(device)
            if self.resize_to:
                size = (self.resize_to, self.resize_to)
                image = F.interpolate(image, size=size, mode="bicubic", antialias=True).clamp(0, 1)
            scores.append(self.head(image).reshape(-1).float())
        return torch.cat(scores)

    def update(self, images: MF.ImageInput, prompts: Any = None) -> None:
        """Add the scores of ``images`` (uint8 or ``[0, 1]`` float); ``prompts`` is ignored."""
        scores = self.score(images)
        self.score_sum += scores.sum().to(self.score_sum)
        self.n_samples += scores.numel()

    def compute(self) -> Tensor:
        """Mean score over all images seen (all processes once synced)."""
        return self.score_sum / self.n_samples
