"""The functional core of the evaluation metrics: input checks, CLIP feature plumbing, formulas.

Nothing here loads weights; the ``Metric`` classes in this package wrap these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ImageInput = Tensor | Sequence[Tensor]


def as_unit_images(images: ImageInput) -> list[Tensor]:
    """Check images and bring them to float ``[0, 1]``; returns a list of ``[1, 3, H, W]`` tensors.

    Accepted: a ``[B, 3, H, W]`` or ``[3, H, W]`` tensor, or a sequence of ``[3, H, W]`` tensors
    (sizes may differ), either ``uint8`` in ``[0, 255]`` (divided by 255, as CLIP's processor
    rescales) or floating point in ``[0, 1]``.

    Raises:
        ValueError: wrong shape, an empty batch, or floating-point values outside ``[0, 1]``.
    """
    if isinstance(images, Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(
                f"images must be [B, 3, H, W] or [3, H, W], got shape {tuple(images.shape)}."
            )
        items = list(images.split(1))
    else:
        items = [image.unsqueeze(0) if image.ndim == 3 else image for image in images]
    if not items:
        raise ValueError("got an empty batch of images; pass at least one [3, H, W] image.")
    return [_to_unit(item) for item in items]


def _to_unit(image: Tensor) -> Tensor:
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ValueError(
            f"each image must be RGB [3, H, W], got shape {tuple(image.shape[-3:])}; convert "
            "grayscale with image.expand(3, -1, -1)."
        )
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got dtype {image.dtype}.")
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"floating-point images must lie in [0, 1], got values in [{low:.3f}, {high:.3f}]; "
            "for [-1, 1] images pass (x + 1) / 2, or pass uint8 images in [0, 255]."
        )
    return image.float().clamp(0, 1)


def batched(items: list[Tensor]) -> list[Tensor]:
    """One ``[B, 3, H, W]`` batch when all images share a size, else the images one by one."""
    return [torch.cat(items)] if len({item.shape for item in items}) == 1 else items


def as_prompt_list(prompts: str | Sequence[str], count: int) -> list[str]:
    """One prompt per image, as a list; a single string is allowed for a single image.

    Raises:
        ValueError: the number of prompts differs from the number of images.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != count:
        raise ValueError(
            f"got {len(prompts)} prompts for {count} images; pass exactly one prompt per image."
        )
    return prompts


def embedding(output: Tensor | object) -> Tensor:
    """The projected embedding from ``CLIPModel.get_image_features``/``get_text_features``.

    transformers 4.x returns the tensor itself; 5.x returns a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` holds the projected embedding.
    """
    if isinstance(output, Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(
        f"cannot find an embedding in {type(output).__name__}; expected a tensor or an output with "
        "`pooler_output` (transformers' CLIPModel.get_image_features / get_text_features)."
    )


def paired_cosine(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Cosine similarity of row ``i`` of ``image_embeds`` with row ``i`` of ``text_embeds``: ``[B]``."""
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    return (image_embeds * text_embeds).sum(dim=-1)


def clip_score_from_cosine(cosine: Tensor) -> Tensor:
    """CLIPScore as torchmetrics reports it: ``100 * max(cos, 0)``, in ``[0, 100]``."""
    return 100.0 * cosine.clamp(min=0.0)


def pickscore_from_cosine(cosine: Tensor, logit_scale: Tensor | float) -> Tensor:
    """PickScore: ``exp(logit_scale) * cos`` (the reward model's own logit scale, 100 for PickScore_v1).

    ``exp`` is taken in float32 whatever the dtype of ``logit_scale``; pass it in float32 (a
    bfloat16 ln 100 is 4.59375, exp 98.86).
    """
    scale = torch.as_tensor(logit_scale, device=cosine.device).float().exp()
    return scale * cosine.float()


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of ``count`` items for ``rank``; shards differ in size by at most 1.

    Example:
        >>> [shard_bounds(10, r, 3) for r in range(3)]
        [(0, 3), (3, 6), (6, 10)]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
    return count * rank // world_size, count * (rank + 1) // world_size
