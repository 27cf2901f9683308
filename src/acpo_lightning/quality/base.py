"""The quality-head contract: what ACPO needs from a no-reference IQA model.

A quality head maps images in ``[0, 1]`` (and optionally their prompts) to one score per image.
It is always frozen: its weights never receive gradients and it stays in eval mode even when the
parent ``LightningModule`` is put in train mode (MANIQA, for one, samples crops differently in train
mode). Gradients do flow to the *input* images: that is the perceptual signal ACPO follows.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@runtime_checkable
class QualityHeadProtocol(Protocol):
    """Duck-typed form of a quality head; any ``nn.Module`` with these members works.

    Attributes:
        higher_is_better: ``True`` when a larger raw score means a better image.
        score_range: nominal ``(low, high)`` span of the raw score; the loss divides by its width.
    """

    higher_is_better: bool
    score_range: tuple[float, float]

    def __call__(self, images: Tensor, prompts: list[str] | None = None) -> Tensor: ...


class QualityHead(nn.Module):
    """Base class for frozen, differentiable no-reference quality heads.

    Subclasses build their layers, then call :meth:`freeze` at the end of ``__init__`` (or after
    loading weights). From then on the head ignores ``train(True)`` and none of its parameters
    require gradients.

    Class attributes:
        higher_is_better: direction of the raw score.
        score_range: nominal ``(low, high)`` of the raw score, used by
            :func:`acpo_lightning.losses.normalize_score`.
        native_size: side length the head expects; inputs of another size are resized to it with
            :func:`resize_to_native` (antialiased, differentiable) before scoring (``None``: any size).

    Example:
        >>> class Brightness(QualityHead):
        ...     higher_is_better, score_range = True, (0.0, 1.0)
        ...     def score(self, images, prompts=None):
        ...         return images.mean(dim=(1, 2, 3))
        >>> Brightness().freeze()(torch.ones(2, 3, 8, 8)).tolist()
        [1.0, 1.0]
    """

    higher_is_better: bool = True
    score_range: tuple[float, float] = (0.0, 1.0)
    native_size: int | None = None

    def freeze(self) -> QualityHead:
        """Stop gradients to the weights and lock eval mode. Returns ``self``."""
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> QualityHead:
        """Stay in eval mode whatever ``mode`` is: a quality head is never trained in place."""
        return super().train(False)

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """Score ``images`` (``[B, 3, H, W]`` in ``[0, 1]``) and return a tensor of shape ``[B]``."""
        if self.native_size is not None:
            images = resize_to_native(images, self.native_size)
        return self.score(images, prompts)

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """Compute the raw score of images already at :attr:`native_size`."""
        raise NotImplementedError


def resize_to_native(images: Tensor, size: int) -> Tensor:
    """Resize ``[B, C, H, W]`` images to ``size x size``, antialiased when shrinking; differentiable.

    Shrinking uses bilinear interpolation with antialiasing (a triangle filter as wide as the
    scale factor), so every input pixel contributes to the output and receives gradient. Without
    it, bilinear reads only the 2x2 pixels nearest each output sample: at 512 -> 224 the reward's
    gradient would land on a sparse grid of pixels, which invites high-frequency reward hacking.
    Enlarging is plain bilinear (antialiasing changes nothing there). Half-precision inputs are
    resized in float32 (torch has no antialiased bfloat16 kernel on the CPU); the output keeps the
    input's dtype.

    Args:
        images: ``[B, C, H, W]`` images.
        size: output side length.

    Returns:
        ``[B, C, size, size]`` images (``images`` itself when already that size).

    Example:
        >>> resize_to_native(torch.rand(2, 3, 512, 512), 224).shape
        torch.Size([2, 3, 224, 224])
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    exact = images.dtype in (torch.float32, torch.float64)
    resized = F.interpolate(
        images if exact else images.float(),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=height > size or width > size,
    )
    return resized.to(images.dtype)


def check_quality_head(head: nn.Module, image_size: tuple[int, int], device: torch.device) -> None:
    """Probe ``head`` once and raise a clear error if it breaks the contract.

    Checks that ``higher_is_better`` and ``score_range`` exist and make sense, that the output has
    shape ``[B]``, is finite, that no head parameter requires gradients, and that no (sub-)head
    counted a random image as unscorable in its ``unscorable_images`` (heads such as
    :class:`~acpo_lightning.quality.pyiqa_head.PyiqaQualityHead` replace such scores by the worst).

    Args:
        head: the quality head to check.
        image_size: ``(H, W)`` of the images the module will feed it.
        device: where to run the probe.

    Raises:
        TypeError: a required attribute is missing or has the wrong type.
        ValueError: the output shape or values are wrong, or a head weight is trainable.
    """
    name = type(head).__name__
    if not isinstance(getattr(head, "higher_is_better", None), bool):
        raise TypeError(
            f"quality head {name} needs a boolean attribute `higher_is_better` "
            f"(got {getattr(head, 'higher_is_better', None)!r}); set it on the class, e.g. "
            "`higher_is_better = True` for MANIQA-like scores, False for NIQE/BRISQUE."
        )
    score_range = getattr(head, "score_range", None)
    if (
        not isinstance(score_range, tuple | list)
        or len(score_range) != 2
        or not float(score_range[1]) > float(score_range[0])
    ):
        raise TypeError(
            f"quality head {name} needs `score_range = (low, high)` with high > low "
            f"(got {score_range!r}); it is the nominal span used to normalize the score."
        )
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"quality head {name} has trainable parameters {trainable[:3]}...; a quality head must "
            "be frozen: call `head.requires_grad_(False)` (QualityHead subclasses: `.freeze()`)."
        )
    probe = torch.rand(2, 3, *image_size, device=device)
    unscorable = _unscorable_count(head)
    with torch.no_grad():
        out = head(probe, ["a probe prompt", "another probe prompt"])
    unscorable = _unscorable_count(head) - unscorable
    if not isinstance(out, Tensor) or out.shape != (2,):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"quality head {name} returned {shape} for a batch of 2 images; it must return one "
            "score per image, a tensor of shape [B]. Squeeze or average its output in forward()."
        )
    if not torch.isfinite(out).all():
        raise ValueError(
            f"quality head {name} returned non-finite scores {out.tolist()} on random images."
        )
    if unscorable:
        raise ValueError(
            f"quality head {name} could not score {unscorable} of 2 random images (its metric "
            f"returned NaN/inf or failed; it would score every image as the worst, {out.tolist()}); "
            "check its weight file and options, e.g. that pretrained_model_path holds that metric's "
            "weights."
        )


def _unscorable_count(head: nn.Module) -> int:
    """Sum of ``unscorable_images`` over ``head`` and its sub-heads (a host sync: probe only)."""
    counts = [getattr(m, "unscorable_images", None) for m in head.modules()]
    return sum(int(c) for c in counts if isinstance(c, Tensor))
