"""Score crops at native resolution: decode only the latent window around each crop.

A quality head such as MANIQA takes 224-px inputs; pyiqa scores MANIQA on 224-px crops of the
image at its own resolution. Decoding a whole 512- or 1024-px image with gradient only to resize it
to 224 px spends most of the decoder (and its activations) on pixels the head never sees at their
own scale. :class:`PerceptualCrop` instead draws head-sized crops on the latent grid and decodes a
window of latents that covers each crop plus a ``margin`` on every side.

The margin stands in for the decoder's receptive field. Its convolutions reach a bounded distance
(:func:`conv_reach`); the KL VAE's GroupNorm layers and its mid-block attention see the whole
window, as in diffusers' tiled decoding (``AutoencoderKL.enable_tiling``). The window's
normalization statistics are therefore its own, and the crop's pixels equal the full decode's
only to within a tolerance that shrinks as the margin grows (measured by
``benchmarks/crop_margin.py``; the README gives the figures). TAESD has no normalization and no
attention: with ``margin >= conv_reach`` its crops equal the full decode to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class PerceptualCrop:
    """Where the perceptual path decodes and scores: ``count`` crops of ``size`` pixels per image.

    Args:
        size: side of a square crop in pixels, at the decoded image's own resolution; a multiple of
            the VAE's scale factor (8 for SD, SDXL, SD3 and FLUX: e.g. 224 for MANIQA-class heads).
        count: crops per image; an image's score is the mean of its crops' scores.
        margin: latents decoded beyond each side of a crop (the window is shifted inward at the
            image border, where the full decode sees the same padding). The default, 4 (32 px at
            8x), is where the SD-layout decoder's measured difference from the full decode stops
            falling fast (``benchmarks/crop_margin.py``; README, "Crops at native resolution").
    """

    def __init__(self, size: int, count: int = 1, margin: int = 4) -> None:
        if size < 1 or count < 1 or margin < 0:
            raise ValueError(
                f"PerceptualCrop(size={size}, count={count}, margin={margin}) needs size >= 1, "
                "count >= 1 and margin >= 0 (e.g. size=224, count=1, margin=4)."
            )
        self.size, self.count, self.margin = size, count, margin

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of a crop: what the quality head sees."""
        return self.size, self.size

    def as_hparam(self) -> int | dict[str, Any]:
        """This crop as a hyper-parameter that checkpoints store and ``as_crop`` (and a config)
        read back: the side alone at the default count and margin, else a ``class_path`` entry."""
        default = PerceptualCrop(self.size)
        if (self.count, self.margin) == (default.count, default.margin):
            return self.size
        fields = {"size": self.size, "count": self.count, "margin": self.margin}
        return {"class_path": f"{__name__}.PerceptualCrop", "init_args": fields}

    def __repr__(self) -> str:
        return f"PerceptualCrop(size={self.size}, count={self.count}, margin={self.margin})"

    def check(self, image_size: tuple[int, int], scale_factor: int) -> None:
        """Raise a ``ValueError`` naming the sizes when the crop cannot be cut on the latent grid."""
        if self.size % scale_factor:
            fit = max(scale_factor, self.size // scale_factor * scale_factor)
            raise ValueError(
                f"perceptual_crop size={self.size} is not a multiple of the VAE's scale factor "
                f"{scale_factor}: crops are cut on the latent grid; use size={fit}."
            )
        if self.size > min(image_size):
            raise ValueError(
                f"perceptual_crop size={self.size} is larger than the images ({image_size[0]}x"
                f"{image_size[1]} px); use size <= {min(image_size)} or perceptual_crop: null "
                "(score the whole image)."
            )

    def windows(self, latents: Tensor, scale_factor: int, generator: torch.Generator) -> Crops:
        """Draw ``count`` crop positions per image and cut their latent windows.

        Positions are uniform on the latent grid, drawn from ``generator`` on its device (no
        host sync).

        Raises:
            ValueError: the crop is larger than the images (a DataModule the set-up check cannot
                read, ``data.size_checks``, gave smaller ones).
        """
        batch, _, height, width = latents.shape
        side = self.size // scale_factor
        if side > min(height, width):
            raise ValueError(
                f"perceptual_crop size={self.size} is larger than the training images "
                f"({height * scale_factor}x{width * scale_factor} px); train on larger images, "
                f"use perceptual_crop <= {min(height, width) * scale_factor}, or perceptual_crop: "
                "null (score whole images)."
            )
        n = batch * self.count
        image = torch.arange(batch, device=latents.device).repeat_interleave(self.count)
        draws = [
            torch.randint(0, extent - side + 1, (n,), generator=generator, device=generator.device)
            for extent in (height, width)
        ]
        top, left = (d.to(latents.device) for d in draws)
        window_h, window_w = min(height, side + 2 * self.margin), min(width, side + 2 * self.margin)
        # shift a window inward at the border: the crop keeps >= margin latents on each inner side
        row0 = (top - self.margin).clamp(0, height - window_h)
        col0 = (left - self.margin).clamp(0, width - window_w)
        top_px, left_px = top * scale_factor, left * scale_factor
        if window_h == height and window_w == width:  # a window is the whole latent: decode
            return Crops(latents, image, top_px, left_px, image, top_px, left_px, self)  # each once
        cut = _gather(latents, image, row0, col0, window_h, window_w)
        window = torch.arange(n, device=latents.device)
        return Crops(cut, image, top_px, left_px, window,
                     (top - row0) * scale_factor, (left - col0) * scale_factor, self)  # fmt: skip


def crop_hparam(crop: PerceptualCrop | None) -> int | dict[str, Any] | None:
    """``crop`` as the hyper-parameter a checkpoint stores (see :meth:`PerceptualCrop.as_hparam`)."""
    return crop.as_hparam() if crop is not None else None


def as_crop(
    value: int | PerceptualCrop | Mapping[str, Any] | None,
    image_size: tuple[int, int],
    scale_factor: int,
) -> PerceptualCrop | None:
    """``perceptual_crop`` as given to ``ACPOModule`` (a side in pixels, a crop, its
    :meth:`PerceptualCrop.as_hparam` entry from a checkpoint, or ``None``), checked against the
    images it will cut.

    Raises:
        ValueError: the crop does not fit the latent grid or the images.
    """
    if isinstance(value, Mapping):  # a reloaded checkpoint's hyper-parameter
        value = PerceptualCrop(**value.get("init_args", value))
    crop = PerceptualCrop(value) if isinstance(value, int) else value
    if crop is not None:
        crop.check(image_size, scale_factor)
    return crop


class Crops:
    """Latent windows, and where each crop lies: in its image and in its decoded window (pixels).

    Attributes:
        latents: the windows to decode: ``[B * count, C, h, w]``, or the whole latents ``[B, ...]``
            when a window would cover the whole image (each image is then decoded once).
        image: the image index of each crop.
        origin_top, origin_left: the crop's top-left pixel in the whole image.
        window: the row of ``latents`` each crop is cut from.
        top, left: the crop's top-left pixel in its decoded window.
    """

    def __init__(
        self, latents: Tensor, image: Tensor, origin_top: Tensor, origin_left: Tensor,
        window: Tensor, top: Tensor, left: Tensor, spec: PerceptualCrop,
    ) -> None:  # fmt: skip
        self.latents, self.image, self.window, self.spec = latents, image, window, spec
        self.origin_top, self.origin_left, self.top, self.left = origin_top, origin_left, top, left

    def of_whole(self, images: Tensor) -> Tensor:
        """The same crops cut from whole decoded ``images`` ``[B, 3, H, W]`` (the reference)."""
        size = self.spec.size
        return _gather(images, self.image, self.origin_top, self.origin_left, size, size)

    def pixels(self, images: Tensor) -> Tensor:
        """The crops ``[B * count, 3, size, size]`` of the decoded windows ``images``."""
        size = self.spec.size
        if images.shape[-2:] == (size, size) and len(images) == len(self.window):
            return images  # one crop per image, the whole image
        return _gather(images, self.window, self.top, self.left, size, size)

    def per_image(self, scores: Tensor) -> Tensor:
        """Crop scores ``[B * count]`` to image scores ``[B]`` (the mean over an image's crops)."""
        return scores.view(-1, self.spec.count).mean(dim=1)


def _gather(x: Tensor, index: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """``x[index[n], :, top[n]:top[n]+height, left[n]:left[n]+width]`` for every ``n``, by index
    tensors (differentiable, and no device-to-host copy of the positions)."""
    rows = top[:, None] + torch.arange(height, device=x.device)
    cols = left[:, None] + torch.arange(width, device=x.device)
    cut = x[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # [N, h, w, C]
    return cut.permute(0, 3, 1, 2).contiguous()


def conv_reach(
    module: nn.Module, latents: Tensor, run: Callable[[Tensor], object] | None = None
) -> float:
    """An upper bound, in latents, on how far the convolutions of ``module`` see around a pixel.

    Runs ``run(latents)`` (default ``module.decode``, else ``module``) once and sums each ``Conv2d``'s half-kernel over the scale it runs at
    (its input side over the latent side): a path through the network passes some of these
    convolutions, so no output pixel depends on latents farther away than the sum through
    convolutions alone. Normalization and attention layers, which see the whole input, are not
    bounded by it.
    """
    reach, side = [0.0], latents.shape[-1]

    def count(module: nn.Module, args: tuple) -> None:
        kernel, dilation = module.kernel_size[-1], module.dilation[-1]
        reach[0] += dilation * (kernel - 1) / 2 / (args[0].shape[-1] / side)

    hooks = [
        m.register_forward_pre_hook(count) for m in module.modules() if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            (run or getattr(module, "decode", module))(latents)
    finally:
        for hook in hooks:
            hook.remove()
    return reach[0]


def window_margin_for(reach: float) -> int:
    """The smallest whole-latent margin covering ``reach``."""
    return math.ceil(reach - 1e-9)
