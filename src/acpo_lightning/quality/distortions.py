"""Synthetic distortions at graded severities, for training a tailored quality evaluator.

These run at data time, on single images, outside any gradient path (JPEG goes through Pillow's
encoder). Every function maps an image ``[3, H, W]`` in ``[0, 1]`` and a strength in ``[0, 1]``
(``0``: untouched, ``1``: the strongest level) to a distorted image; outputs are quantized to
8 bits, the pristine image included, so quantization alone never gives a level away.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

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
    quality = round(95 - 85 * strength)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(decoded / 255.0).permute(2, 0, 1).to(image.dtype)


def downscale(image: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Downscale by up to 4x (antialiased) and upscale back bilinearly."""
    height, width = image.shape[-2:]
    factor = 1.0 + 3.0 * strength
    small = (max(1, round(height / factor)), max(1, round(width / factor)))
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
