"""The demo's Fashion-MNIST classifier: prompt consistency and the feature space of KID/diversity.

It is an *evaluator*: never used for guidance. Inputs are RGB images in ``[0, 1]`` (what
``ACPOModule.generate`` returns); the luminance is taken, so three equal channels give the
grayscale image back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

_LUMA = (0.299, 0.587, 0.114)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.MaxPool2d(2),
    )  # fmt: skip


class FashionClassifier(nn.Module):
    """A small VGG-style CNN: ``[B, 3, 32, 32]`` in ``[0, 1]`` to 10 class logits.

    Args:
        width: channels of the first stage (doubled at each of the three stages).
        feature_dim: width of the penultimate layer (:meth:`features`).

    Example:
        >>> net = FashionClassifier(width=8, feature_dim=16)
        >>> net(torch.rand(2, 3, 32, 32)).shape, net.features(torch.rand(2, 3, 32, 32)).shape
        (torch.Size([2, 10]), torch.Size([2, 16]))
    """

    def __init__(self, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()
        self.width, self.feature_dim = width, feature_dim
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        self.body = nn.Sequential(
            _block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        )
        self.neck = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width * 16, feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``[B, feature_dim]`` (post-ReLU) of images in ``[0, 1]``."""
        gray = (images * self.luma).sum(1, keepdim=True) * 2 - 1
        return self.neck(self.body(gray))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> None:
        """``model.safetensors`` + ``config.json`` in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors"
        )
        config = {"width": self.width, "feature_dim": self.feature_dim, **(metadata or {})}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FashionClassifier:
        """Load a frozen, eval-mode classifier saved by :meth:`save_pretrained`."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        net = cls(width=config["width"], feature_dim=config["feature_dim"])
        net.load_state_dict(load_file(folder / "model.safetensors"))
        return net.requires_grad_(False).eval()


class ClassifierFeatures(nn.Module):
    """Wrap a classifier as a torchmetrics feature extractor (``KernelInceptionDistance(feature=...)``).

    Features are the penultimate activations scaled to norm ``sqrt(dim)``: KID's polynomial kernel
    ``(x.y / dim + 1)^3`` then sees cosine similarities, as with Inception's pooled features,
    instead of raw activations whose scale would dominate (and make KID noisy).
    Images: ``uint8`` in ``[0, 255]`` or floats in ``[0, 1]``.
    """

    def __init__(self, classifier: FashionClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.feature_dim

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        features = self.classifier.features(images.float())
        return torch.nn.functional.normalize(features, dim=1) * self.num_features**0.5
