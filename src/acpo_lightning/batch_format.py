"""The image batch format ``ACPOModule`` trains on, checked once on the first batch of a stage."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

#: how far beyond [-1, 1] a float batch may reach: resampling (bicubic, Lanczos) of [-1, 1]
#: images overshoots at sharp edges by a fraction of the range; 0..255 or 0..1 data does not
#: stay inside this margin (the first by far, the second is told by its minimum)
RANGE_MARGIN = 0.25


def check_pixel_values(pixels: Tensor, channels: int) -> None:
    """Refuse ``pixel_values`` that are not ``[B, channels, H, W]`` floats in ``[-1, 1]``.

    A batch that looks like ``[0, 1]`` images (no value below 0) only warns: a batch of bright
    ``[-1, 1]`` images has no value below 0 either.

    Args:
        pixels: the batch's ``pixel_values``.
        channels: the image channels the VAE (or the pixel-space denoiser) takes.

    Raises:
        ValueError: the layout, the dtype or the range is wrong; the message names the found
            format and the conversion.

    Example:
        >>> import torch
        >>> images = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
        >>> check_pixel_values(images, 3)
        >>> check_pixel_values(images.permute(0, 2, 3, 1), 3)
        Traceback (most recent call last):
        ...
        ValueError: pixel_values has shape [2, 8, 8, 3], channels last ([B, H, W, C]); ACPOModule expects [B, 3, H, W] (channels first): convert with pixel_values.permute(0, 3, 1, 2) in your dataset or collate function.
    """
    shape = list(pixels.shape)
    if pixels.ndim != 4 or shape[1] != channels:
        last = pixels.ndim == 4 and shape[-1] == channels
        found = "channels last ([B, H, W, C])" if last else f"not [B, {channels}, H, W]"
        fix = "convert with pixel_values.permute(0, 3, 1, 2)" if last else "reshape it"
        raise ValueError(
            f"pixel_values has shape {shape}, {found}; ACPOModule expects [B, {channels}, H, W] "
            f"(channels first): {fix} in your dataset or collate function."
        )
    low, high = (float(v) for v in pixels.detach().aminmax())
    if not pixels.is_floating_point():
        raise ValueError(
            f"pixel_values is {pixels.dtype} (values {low:g} to {high:g}); ACPOModule expects "
            "float images in [-1, 1]: convert with pixel_values.float() / 127.5 - 1 for 0..255 "
            "integers."
        )
    if low < -1 - RANGE_MARGIN or high > 1 + RANGE_MARGIN:
        raise ValueError(
            f"pixel_values lie in [{low:g}, {high:g}]; ACPOModule expects float images in "
            "[-1, 1]: map 0..255 values with x / 127.5 - 1 (and [0, 1] values with x * 2 - 1)."
        )
    if low >= 0:
        rank_zero_warn(
            f"pixel_values of the first batch lie in [{low:g}, {high:g}], as [0, 1] images would; "
            "ACPOModule expects [-1, 1]: map [0, 1] images with x * 2 - 1 (ignore this line if "
            "these are bright [-1, 1] images)."
        )
