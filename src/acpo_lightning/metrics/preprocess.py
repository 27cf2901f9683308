"""CLIP's image processor, reproduced with torch ops on ``[0, 1]`` tensors (no PIL round trip).

``CLIPImageProcessor`` (PIL backend) resizes the shortest side with PIL's bicubic filter on uint8
images, center crops, rescales by 1/255 and normalizes. :class:`CLIPImagePreprocess` does the same
on tensors, following PIL step by step: ``F.interpolate(mode="bicubic", antialias=True)`` uses PIL's
kernel (a = -0.5, support widened when shrinking); the resize runs as PIL's two passes, horizontal
then vertical, clipping to ``[0, 1]`` in between; with ``quantize`` (the default) values are also
rounded to 8 bits before and after each pass, as PIL's uint8 buffers do. ``tests/test_metrics.py``
measures the gap to the PIL path on photos and noise: with ``quantize`` at most one uint8 level
(0.015 after normalization, mean below 1e-4); without, max 0.016 and mean about 0.004. A single
bicubic pass without the intermediate clip differs by up to 0.29 on high-contrast images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: PIL resampling codes used by transformers' image processors, and torch's matching mode.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_PIL_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class CLIPImagePreprocess(nn.Module):
    """Resize the shortest side, center crop and normalize images in ``[0, 1]``, as CLIP's processor.

    Args:
        shortest_edge: target of the shortest side (``None``: no resize).
        crop_size: ``(height, width)`` of the center crop (``None``: no crop).
        mean: per-channel mean of the normalization.
        std: per-channel std of the normalization.
        resample: ``"bicubic"`` (CLIP), ``"bilinear"`` or ``"nearest"``.
        quantize: round to 8 bits around the resize passes, as PIL's uint8 path does (not
            differentiable; turn off for a gradient path).

    Example:
        >>> pre = CLIPImagePreprocess(224, (224, 224), (0.5,) * 3, (0.5,) * 3)
        >>> pre(torch.rand(2, 3, 256, 320)).shape
        torch.Size([2, 3, 224, 224])
    """

    def __init__(
        self,
        shortest_edge: int | None,
        crop_size: tuple[int, int] | None,
        mean: Sequence[float],
        std: Sequence[float],
        resample: str = "bicubic",
        quantize: bool = True,
    ) -> None:
        super().__init__()
        self.quantize = quantize
        if resample not in _PIL_RESAMPLE.values():
            raise ValueError(
                f"resample={resample!r} must be one of {sorted(_PIL_RESAMPLE.values())}."
            )
        self.shortest_edge, self.crop_size, self.resample = shortest_edge, crop_size, resample
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    @classmethod
    def from_image_processor(
        cls, image_processor: Any, quantize: bool = True
    ) -> CLIPImagePreprocess:
        """Read the settings of a transformers ``CLIPImageProcessor`` (any backend, 4.x or 5.x).

        Raises:
            ValueError: a setting this class cannot reproduce (e.g. LANCZOS, an unusual rescale).
        """
        config = image_processor.to_dict()
        name = type(image_processor).__name__
        factor = float(config.get("rescale_factor", 1 / 255))
        if config.get("do_rescale", True) and abs(factor - 1 / 255) > 1e-9:
            raise ValueError(
                f"{name} rescales by {factor}; only 1/255 (uint8 to [0, 1]) is reproduced. Pass "
                "images already scaled as the model expects and a processor with do_rescale=False."
            )
        code = int(config.get("resample", 3))
        if code not in _PIL_RESAMPLE:
            raise ValueError(
                f"{name} resamples with PIL {_PIL_NAMES.get(code, code)}, which torch cannot "
                "reproduce; use a processor with resample=3 (BICUBIC), as CLIP's."
            )
        shortest = (
            _shortest_edge(config.get("size"), name) if config.get("do_resize", True) else None
        )
        crop = None
        if config.get("do_center_crop", True) and config.get("crop_size"):
            crop = (int(config["crop_size"]["height"]), int(config["crop_size"]["width"]))
        mean, std = config.get("image_mean"), config.get("image_std")
        if not config.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(shortest, crop, tuple(mean), tuple(std), _PIL_RESAMPLE[code], quantize)

    def extra_repr(self) -> str:
        return (
            f"shortest_edge={self.shortest_edge}, crop_size={self.crop_size}, "
            f"resample={self.resample!r}, quantize={self.quantize}"
        )

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` to normalized pixel values for the vision tower."""
        images = images.float()
        if self.shortest_edge is not None:
            images = self.resize(images)
        if self.crop_size is not None:
            images = center_crop(images, self.crop_size)
        return (images - self.mean) / self.std

    def resize(self, images: Tensor) -> Tensor:
        """Resize so the shortest side is ``shortest_edge`` (transformers' rounding), as PIL does.

        Two separable passes, horizontal first, each clipped to ``[0, 1]`` (PIL writes uint8
        buffers, so bicubic overshoot is clipped before the vertical pass).
        """
        height, width = images.shape[-2:]
        new_height, new_width = resized_shape(height, width, self.shortest_edge)
        images = self._to_8bit(images)
        if new_width != width:
            images = self._to_8bit(self._interpolate(images, (height, new_width)))
        if new_height != height:
            images = self._to_8bit(self._interpolate(images, (new_height, new_width)))
        return images

    def _interpolate(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        if self.resample == "nearest":
            return F.interpolate(images, size=size, mode="nearest")
        return F.interpolate(
            images, size=size, mode=self.resample, antialias=True, align_corners=False
        )

    def _to_8bit(self, images: Tensor) -> Tensor:
        images = images.clamp(0, 1)
        return (images * 255).round() / 255 if self.quantize else images


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(default_to_square=False)``: long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """transformers' center crop: top-left at ``int((H - h) / 2)``; zero padding when smaller."""
    crop_h, crop_w = size
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = images.shape[-2:]
    top, left = int((height - crop_h) / 2), int((width - crop_w) / 2)
    return images[..., top : top + crop_h, left : left + crop_w]


def _shortest_edge(size: Any, name: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size.get("shortest_edge"):
        return int(size["shortest_edge"])
    raise ValueError(
        f"{name} resizes to {size!r}; only {{'shortest_edge': N}} (CLIP's convention) is reproduced."
    )
