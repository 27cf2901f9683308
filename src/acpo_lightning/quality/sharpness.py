"""A weight-free quality head: Laplacian sharpness energy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from acpo_lightning.quality.base import QualityHead

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


class SharpnessHead(QualityHead):
    """Mean squared Laplacian response of the luminance: higher means sharper.

    A classical no-reference focus measure with no learned weights, so the module runs with no
    download at all. It rewards high-frequency detail, including noise, so it is a smoke-test head
    rather than a perceptual judge: use a learned head (MANIQA, TwoStream) for real runs.

    Args:
        scale: the score is ``scale * mean(laplacian(luma)^2)``; the default maps typical photos
            into roughly ``[0, 1]``.

    Example:
        >>> head = SharpnessHead()
        >>> head(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    higher_is_better = True
    score_range = (0.0, 1.0)

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("kernel", _LAPLACIAN.view(1, 1, 3, 3), persistent=False)
        self.register_buffer("luma", _LUMA.view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        gray = (images * self.luma.to(images.dtype)).sum(dim=1, keepdim=True)
        response = F.conv2d(
            F.pad(gray, (1, 1, 1, 1), mode="replicate"), self.kernel.to(images.dtype)
        )
        return self.scale * response.pow(2).mean(dim=(1, 2, 3))
