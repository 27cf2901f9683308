"""An image grid with each row's prompt written above it (TensorBoard images carry no captions)."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

_PAD = 6
_MAX_LINES = 3


def caption_grid(
    columns: list[Tensor],
    captions: list[str],
    headers: list[str],
    max_side: int = 256,
    min_side: int = 128,
) -> Tensor:
    """Lay out images as rows (one per caption) and columns (e.g. base | tuned), with text.

    Args:
        columns: one ``[N, 3, H, W]`` tensor in ``[0, 1]`` per column.
        captions: ``N`` captions, written above their row (wrapped, at most three lines).
        headers: one title per column, written above the first row.
        max_side: larger images are shrunk (antialiased) to this side.
        min_side: smaller images are enlarged (nearest neighbour, integer factor) towards this side.

    Returns:
        A ``[3, H, W]`` uint8 tensor.
    """
    if len(headers) != len(columns) or any(len(c) != len(captions) for c in columns):
        raise ValueError(
            f"caption_grid needs one header per column and one caption per row; got {len(columns)} "
            f"columns, {len(headers)} headers, {len(captions)} captions, rows {[len(c) for c in columns]}."
        )
    cells = [_thumbnails(column, max_side, min_side) for column in columns]
    height, width = cells[0].shape[1:3]
    font = _font()
    line_height = font.getbbox("Ag")[3] + 3
    total_width = _PAD + len(columns) * (width + _PAD)
    chars = max(12, int((total_width - 2 * _PAD) / max(font.getlength("abcdefghij") / 10, 1)))
    wrapped = [textwrap.wrap(f"{i}. {c}", width=chars)[:_MAX_LINES] for i, c in enumerate(captions)]
    row_heights = [len(lines) * line_height + _PAD + height + _PAD for lines in wrapped]
    canvas = Image.new("RGB", (total_width, line_height + _PAD + sum(row_heights)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, header in enumerate(headers):
        draw.text((_PAD + j * (width + _PAD), _PAD // 2), header, fill="black", font=font)
    top = line_height + _PAD
    for i, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((_PAD, top + k * line_height), line, fill="black", font=font)
        image_top = top + len(lines) * line_height + _PAD // 2
        for j, column in enumerate(cells):
            canvas.paste(Image.fromarray(column[i]), (_PAD + j * (width + _PAD), image_top))
        top += row_heights[i]
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _thumbnails(images: Tensor, max_side: int, min_side: int) -> np.ndarray:
    """``[N, 3, H, W]`` in ``[0, 1]`` to ``[N, h, w, 3]`` uint8 within ``[min_side, max_side]``."""
    images = images.detach().float().cpu().clamp(0, 1)
    side = max(images.shape[-2:])
    if side > max_side:
        scale = max_side / side
        size = [max(1, round(s * scale)) for s in images.shape[-2:]]
        images = F.interpolate(
            images, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    elif side < min_side:
        images = F.interpolate(images, scale_factor=min_side // side, mode="nearest")
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
