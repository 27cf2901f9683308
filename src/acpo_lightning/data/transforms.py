"""Resize, crop, flip and normalize an RGB image into the tensor a diffusion model trains on."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

Normalize = Literal["minus_one_one", "zero_one"]
Interpolation = Literal["bilinear", "bicubic", "lanczos"]
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class TransformedImage(NamedTuple):
    """An image as the model trains on it, with where it came from (SDXL's micro-conditioning)."""

    #: ``[3, resolution, resolution]`` float tensor
    pixel_values: Tensor
    #: ``(height, width)`` of the image before resizing
    original_size: tuple[int, int]
    #: ``(top, left)`` of the crop in the resized image, after the flip (as diffusers'
    #: ``train_text_to_image_lora_sdxl.py`` flips, then crops)
    crop_top_left: tuple[int, int]


class ImageTransform:
    """Turn an RGB image into a ``[3, resolution, resolution]`` float tensor.

    The steps are those of diffusers' training scripts: resize the shorter side to
    ``resolution`` (antialiased), crop a ``resolution`` square (centre, or random when
    ``augment`` and not ``center_crop``), flip horizontally with probability 1/2 when
    ``augment`` and ``random_flip``, then scale to ``[-1, 1]`` (``minus_one_one``, what Stable
    Diffusion's VAE expects) or ``[0, 1]`` (``zero_one``).

    Images are never enlarged unless ``upscale`` is set: an upscaled image is a blurred one, and
    a model trained towards perceptual quality should not be shown blur as a target. An image
    whose shorter side is below ``resolution`` is therefore reported by :meth:`problem` and
    treated as a bad sample.

    Random choices use ``torch``'s global generator, which DataLoader workers seed per worker.

    Args:
        resolution: side of the square output, in pixels.
        resize: resize the shorter side to ``resolution`` before cropping; without it the crop
            is taken from the image at its own size.
        upscale: allow enlarging images smaller than ``resolution`` instead of rejecting them.
        center_crop: always crop the centre (else a random crop when ``augment``).
        random_flip: flip horizontally at random when ``augment``.
        normalize: output range, ``minus_one_one`` or ``zero_one``.
        interpolation: resampling filter of the resize.
        augment: apply the random crop and flip (training); ``False`` gives the deterministic
            centre crop used for validation.

    Raises:
        ValueError: ``resolution`` below 1, or an unknown ``normalize``/``interpolation``.

    Example:
        >>> transform = ImageTransform(resolution=16)
        >>> transform(Image.new("RGB", (40, 20), "white")).shape
        torch.Size([3, 16, 16])
    """

    def __init__(
        self,
        resolution: int,
        resize: bool = True,
        upscale: bool = False,
        center_crop: bool = False,
        random_flip: bool = False,
        normalize: Normalize = "minus_one_one",
        interpolation: Interpolation = "bilinear",
        augment: bool = True,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        if normalize not in ("minus_one_one", "zero_one"):
            raise ValueError(f"normalize must be 'minus_one_one' or 'zero_one', got {normalize!r}")
        if interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}"
            )
        self.resolution, self.resize, self.upscale = resolution, resize, upscale
        self.center_crop, self.random_flip, self.augment = center_crop, random_flip, augment
        self.normalize, self.interpolation = normalize, interpolation

    def problem(self, image: Image.Image) -> str | None:
        """Why ``image`` can't give a ``resolution`` crop without enlarging it, or ``None``."""
        if self.upscale and self.resize:
            return None
        width, height = image.size
        if min(width, height) >= self.resolution:
            return None
        return (
            f"image is {width}x{height}, smaller than the {self.resolution}x{self.resolution} crop; "
            "lower `resolution`, or set `upscale: true` to enlarge small images"
        )

    def __call__(self, image: Image.Image) -> Tensor:
        """Resize, crop, flip and normalize ``image`` (RGB).

        Raises:
            ValueError: the image is smaller than the crop (see :meth:`problem`).
        """
        return self.apply(image).pixel_values

    def apply(self, image: Image.Image) -> TransformedImage:
        """As calling the transform, also returning the original size and the crop's top-left.

        The random draws are the same as the call's, so both give the same pixels.

        Raises:
            ValueError: the image is smaller than the crop (see :meth:`problem`).

        Example:
            >>> out = ImageTransform(resolution=16, center_crop=True).apply(Image.new("RGB", (40, 20), "white"))
            >>> out.original_size, out.crop_top_left
            ((20, 40), (0, 8))
        """
        reason = self.problem(image)
        if reason is not None:
            raise ValueError(reason)
        original_size = (image.height, image.width)
        if self.resize:
            image = self._resize(image)
        left, top = self._crop_origin(image)
        free_x = image.width - self.resolution
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.augment and self.random_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = free_x - left  # the same window, counted in the flipped image
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        pixels = pixels * 2.0 - 1.0 if self.normalize == "minus_one_one" else pixels
        return TransformedImage(pixels, original_size, (top, left))

    def crop_slack(self, image: Image.Image) -> tuple[int, int]:
        """How many pixels the crop window can move horizontally and vertically in ``image``.

        ``(0, 0)`` means every crop of ``image`` is the same one, random or not (a square image
        when ``resize`` is set, else an image of exactly ``resolution`` on both sides).
        """
        width, height = self._resized_size(image.size) if self.resize else image.size
        return width - self.resolution, height - self.resolution

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        width, height = size
        scale = self.resolution / min(width, height)
        return (
            max(self.resolution, round(width * scale)),
            max(self.resolution, round(height * scale)),
        )

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self._resized_size(image.size)
        if size == image.size:
            return image
        return image.resize(size, _RESAMPLE[self.interpolation], reducing_gap=None)

    def _crop_origin(self, image: Image.Image) -> tuple[int, int]:
        """``(left, top)`` of the crop window (drawn at random when augmenting)."""
        width, height = image.size
        free_x, free_y = width - self.resolution, height - self.resolution
        if self.augment and not self.center_crop:
            left = int(torch.randint(0, free_x + 1, ()))
            top = int(torch.randint(0, free_y + 1, ()))
            return left, top
        return free_x // 2, free_y // 2
