"""Synthetic distortions at graded severities, for training a tailored quality evaluator.

These run at data time, on single images, outside any gradient path (JPEG goes through Pillow's
encoder). Every function maps an image ``[3, H, W]`` in ``[0, 1]`` and a strength in ``[0, 1]``
(``0``: untouched, ``1``: the strongest level) to a distorted image; outputs are quantized to
8 bits, the pristine image included, so quantization alone never gives a level away.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

Distortion = Callable[[Tensor, float, torch.Generator], Tensor]


def gaussian_blur(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Gaussian blur with sigma up to 2.5 px."""
    sigma = 2.5 * strength
    radius = max(1, math.ceil(3 * sigma))
    size = min(2 * radius + 1, 2 * (min(image.shape[-2:]) // 2) - 1)
    return TF.gaussian_blur(image, kernel_size=[size, size], sigma=[sigma, sigma])


def gaussian_noise(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Additive white Gaussian noise with standard deviation up to 0.15."""
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
    return image + 0.15 * strength * noise


def jpeg(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """JPEG compression through Pillow, quality 95 down to 10."""
    return jpeg_at_quality(image, jpeg_quality(strength))


def jpeg_quality(strength: float) -> int:
    """Pillow's JPEG quality at ``strength``: 95 down to 10."""
    return round(95 - 85 * strength)


def jpeg_at_quality(image: Tensor, quality: int) -> Tensor:
    """Encode and decode ``image`` as a JPEG of ``quality`` (1..95) through Pillow."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(decoded / 255.0).permute(2, 0, 1).to(image.dtype)


def downscale(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Downscale by up to 4x (antialiased) and upscale back bilinearly."""
    height, width = image.shape[-2:]
    return downscale_to(
        image, (downscale_height(height, strength), downscale_height(width, strength))
    )


def downscale_height(height: int, strength: float) -> int:
    """The side an image side of ``height`` px is shrunk to at ``strength``: up to 4x smaller."""
    return max(1, round(height / (1.0 + 3.0 * strength)))


def downscale_to(image: Tensor, small: tuple[int, int]) -> Tensor:
    """Shrink ``image`` to ``small`` (height, width) px, antialiased, and enlarge it back bilinearly."""
    height, width = image.shape[-2:]
    low = F.interpolate(
        image[None], size=small, mode="bilinear", antialias=True, align_corners=False
    )
    return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]


def contrast(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Pull every pixel towards the image mean, keeping down to 30% of the contrast."""
    mean = image.mean()
    return mean + (1.0 - 0.7 * strength) * (image - mean)


DISTORTIONS: dict[str, Distortion] = {
    "blur": gaussian_blur,
    "noise": gaussian_noise,
    "jpeg": jpeg,
    "downscale": downscale,
    "contrast": contrast,
}


def quantize(image: Tensor) -> Tensor:
    """Clamp to ``[0, 1]`` and round to 8-bit levels."""
    return (image.clamp(0.0, 1.0) * 255.0).round() / 255.0


def distort(
    image: Tensor, kind: str, strength: float, generator: torch.Generator | None = None
) -> Tensor:
    """Apply the distortion ``kind`` at ``strength``; strength 0 returns the image quantized.

    Args:
        image: ``[3, H, W]`` float image in ``[0, 1]``.
        kind: a key of :data:`DISTORTIONS` (``blur``, ``noise``, ``jpeg``, ``downscale``, ``contrast``).
        strength: severity in ``[0, 1]``.
        generator: randomness for the noise distortion (default: a fresh seeded generator).

    Returns:
        The distorted image, ``[3, H, W]`` in ``[0, 1]``, quantized to 8 bits.

    Raises:
        ValueError: unknown ``kind``, strength outside ``[0, 1]``, or an image that is not ``[3, H, W]``.
    """
    if kind not in DISTORTIONS:
        raise ValueError(f"unknown distortion {kind!r}; choose from {sorted(DISTORTIONS)}.")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"distortion strength must be in [0, 1], got {strength}.")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"distort expects one RGB image [3, H, W], got shape {tuple(image.shape)}."
        )
    if strength == 0.0:
        return quantize(image)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return quantize(DISTORTIONS[kind](image.float(), strength, generator))


#: the most levels a ladder of each discrete distortion can hold: one setting per level
#: (JPEG qualities 94..1 below the pristine image; downscale heights H-1..1 px)
_STEPS = {"jpeg": lambda height: 94, "downscale": lambda height: height - 1}


def check_ladder(kinds: Sequence[str], height: int, width: int, levels: int) -> None:
    """Raise a ``ValueError`` when a ladder of ``levels`` cannot give every level its own setting.

    Args:
        kinds: the distortions the ladders will use.
        height, width: the images' size in pixels.
        levels: levels above the pristine one.
    """
    for kind in (k for k in kinds if k in _STEPS):
        steps = _STEPS[kind](min(height, width))
        if levels > steps:
            raise ValueError(
                f"levels={levels} is more than the {steps} distinct settings {kind} has for "
                f"{height}x{width} px images: two levels would be one image under two targets. "
                f"Use levels <= {steps}, larger images, or leave {kind!r} out of distortions."
            )


def severity_ladder(
    image: Tensor, kind: str, levels: int, generator: torch.Generator | None = None
) -> Tensor:
    """The image under ``kind`` at levels ``0..levels``: ``[levels + 1, 3, H, W]``, 8-bit.

    Level ``l`` is :func:`distort` at strength ``l / levels``, except for the two distortions with
    discrete settings, whose nominal steps can repeat or reverse at small sizes (at 16 px with 8
    levels, downscale gives 6 px at levels 4 and 5; a lower JPEG quality can land closer to the
    image). A JPEG (downscale) level takes the nominal quality (height) or, when that is not
    strictly stronger than the level below or not strictly farther from the pristine image (mean
    squared error), the next stronger setting that is. Every level is then a different image,
    farther from the pristine one than the level below, for any image that is not flat (where the
    settings run out: quality 1, height 1 px).

    Args:
        image: ``[3, H, W]`` in ``[0, 1]``.
        kind: a key of :data:`DISTORTIONS`.
        levels: levels above the pristine one.
        generator: randomness for the noise distortion.

    Raises:
        ValueError: as :func:`distort`, or more levels than ``kind`` has settings
            (:func:`check_ladder`).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    pristine = distort(image, kind, 0.0)
    if kind not in _STEPS:
        rungs = [distort(image, kind, level / levels, generator) for level in range(1, levels + 1)]
        return torch.stack([pristine, *rungs])
    check_ladder([kind], *image.shape[-2:], levels)
    image, height = image.float(), image.shape[-2]
    if kind == "jpeg":
        nominal, apply, setting = jpeg_quality, jpeg_at_quality, 95
    else:  # a height, the width in proportion
        width = image.shape[-1]
        nominal, setting = partial(downscale_height, height), height
        apply = lambda x, h: downscale_to(x, (h, max(1, round(width * h / height))))  # noqa: E731
    ladder, error = [pristine], 0.0
    for level in range(1, levels + 1):
        first = min(nominal(level / levels), setting - 1)  # strictly stronger than the level below
        rung, setting, error = _farther_rung(image, pristine, apply, range(first, 0, -1), error)
        ladder.append(rung)
    return torch.stack(ladder)


def _farther_rung(
    image: Tensor,
    pristine: Tensor,
    apply: Callable[[Tensor, int], Tensor],
    settings: range,
    error: float,
) -> tuple[Tensor, int, float]:
    """The first of ``settings`` (weaker to stronger) whose image is farther than ``error`` (mean
    squared error) from ``pristine``, else the last; with its setting and its error."""
    for setting in settings:
        rung = quantize(apply(image, setting))
        farther = float((rung - pristine).double().pow(2).mean())
        if farther > error:
            break
    return rung, setting, max(error, farther)
