"""Conditioning as one tensor or a dict of tensors, each with the batch first.

SD-1.x conditions on text states ``[B, L, D]``; SDXL adds pooled embeddings and micro-conditioning
ids, SD3 pooled projections, FLUX a distilled-guidance value. The sampler and the objectives treat
all of them alike through these functions: classifier-free guidance stacks two conditionings,
prompt dropout picks per sample between a conditioning and the empty prompt's, a cache stores and
restores one sample's share. A dict's first entry is the one whose dtype the samples take (the text
states, as the diffusers pipelines draw their latents in ``prompt_embeds.dtype``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Conditioning = Tensor | dict[str, Tensor]


def apply(fn: Callable[[Tensor], Tensor], cond: Conditioning) -> Conditioning:
    """``fn`` on the tensor, or on every tensor of the dict."""
    if isinstance(cond, Tensor):
        return fn(cond)
    return {name: fn(value) for name, value in cond.items()}


def cat(first: Conditioning, second: Conditioning) -> Conditioning:
    """Stack two conditionings along the batch (``[uncond; cond]`` under CFG)."""
    if isinstance(first, Tensor):
        return torch.cat([first, second])
    return {name: torch.cat([value, second[name]]) for name, value in first.items()}


def expand(cond: Conditioning, size: int) -> Conditioning:
    """A one-sample conditioning (the empty prompt's) repeated to ``size`` samples, as a view."""
    return apply(lambda t: t.expand(size, *t.shape[1:]), cond)


def where(mask: Tensor, replacement: Conditioning, cond: Conditioning) -> Conditioning:
    """Per sample: ``replacement`` where ``mask`` (``[B]`` bool), else ``cond``.

    ``replacement`` may hold one sample (broadcast), as the empty prompt's conditioning does; a
    dict entry it lacks (micro-conditioning that prompt dropout keeps) is taken from ``cond``.
    """

    def pick(value: Tensor, other: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (value.ndim - 1)
        return torch.where(mask.view(shape), other.to(value.dtype), value)

    if isinstance(cond, Tensor):
        return pick(cond, replacement)
    return {
        name: pick(value, replacement[name]) if name in replacement else value
        for name, value in cond.items()
    }


def first(cond: Conditioning) -> Tensor:
    """The leading tensor (the text states): its dtype is the samples' dtype."""
    return cond if isinstance(cond, Tensor) else next(iter(cond.values()))


def to(
    cond: Conditioning, device: torch.device | str, dtype: torch.dtype | None = None
) -> Conditioning:
    """Move to ``device``; floating tensors also to ``dtype`` (ids keep theirs)."""

    def move(value: Tensor) -> Tensor:
        cast = dtype if dtype is not None and value.is_floating_point() else None
        return value.to(device=device, dtype=cast)

    return apply(move, cond)


def batch_size(cond: Conditioning) -> int:
    """The batch size."""
    return int(first(cond).shape[0])


def select(cond: Conditioning, index: int | slice | Tensor) -> Conditioning:
    """Some samples of a conditioning (``index`` along the batch)."""
    return apply(lambda t: t[index], cond)


def describe(cond: Conditioning) -> dict[str, tuple[int, ...]]:
    """Each tensor's per-sample shape by name (a tensor is named ``encoder_hidden_states``)."""
    named = {"encoder_hidden_states": cond} if isinstance(cond, Tensor) else cond
    return {name: tuple(value.shape[1:]) for name, value in named.items()}
