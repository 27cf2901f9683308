"""A weighted sum of normalized quality heads, for guidance by several signals at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from acpo_lightning.losses import normalize_score
from acpo_lightning.quality.base import QualityHead


def normalize_quality(
    score: Tensor, higher_is_better: bool, score_range: tuple[float, float]
) -> Tensor:
    """Map a raw score to "higher is better, 1.0 is the nominal span".

    ``(s - lo) / (hi - lo)`` if higher is better, else ``(hi - s) / (hi - lo)``. Not clamped: a
    score outside its nominal range still moves, and still has a gradient.

    Example:
        >>> normalize_quality(torch.tensor([25.0]), False, (0.0, 100.0)).tolist()
        [0.75]
    """
    return normalize_score(score, higher_is_better, score_range)


class CompositeQualityHead(QualityHead):
    """``sum_k w_k * normalize(head_k(images))``: higher is better, nominal range ``(0, sum(w))``.

    Each head keeps its own preprocessing (resizing to its native size, prompts if it uses them).

    Args:
        heads: quality heads (any ``nn.Module`` with ``higher_is_better`` and ``score_range``).
        weights: one non-negative weight per head, not all zero (default: all 1).
        names: one label per head for :meth:`component_scores` (default: class names, deduplicated).

    Raises:
        ValueError: no heads, a weight count or name count that does not match, a negative
            weight, all weights zero, or a head without a valid direction and range.

    Example:
        >>> from acpo_lightning.quality.sharpness import SharpnessHead
        >>> head = CompositeQualityHead([SharpnessHead(), SharpnessHead(scale=1.0)], weights=[2.0, 1.0])
        >>> head.score_range, head(torch.rand(2, 3, 16, 16)).shape
        ((0.0, 3.0), torch.Size([2]))
    """

    higher_is_better = True

    def __init__(
        self,
        heads: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        heads = list(heads)
        weights = [1.0] * len(heads) if weights is None else [float(w) for w in weights]
        if not heads or len(weights) != len(heads) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"CompositeQualityHead needs one weight >= 0 per head with a positive sum; got "
                f"{len(heads)} heads and weights {weights}."
            )
        for head in heads:
            _check_direction_and_range(head)
        self.names = list(names) if names is not None else _default_names(heads)
        if len(self.names) != len(heads) or len(set(self.names)) != len(heads):
            raise ValueError(f"names must be {len(heads)} distinct labels, got {self.names}.")
        self.heads = nn.ModuleList(heads)
        self.weights = weights
        self.score_range = (0.0, sum(weights))
        self.freeze()

    def component_scores(
        self, images: Tensor, prompts: list[str] | None = None
    ) -> dict[str, Tensor]:
        """The normalized score ``[B]`` of every head, by name (for logging each signal)."""
        return {
            name: normalize_quality(
                head(images, prompts), head.higher_is_better, tuple(head.score_range)
            )
            for name, head in zip(self.names, self.heads, strict=True)
        }

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        parts = self.component_scores(images, prompts).values()
        return torch.stack([w * part for w, part in zip(self.weights, parts, strict=True)]).sum(
            dim=0
        )


def _check_direction_and_range(head: nn.Module) -> None:
    name = type(head).__name__
    direction = getattr(head, "higher_is_better", None)
    score_range = getattr(head, "score_range", None)
    valid_range = (
        isinstance(score_range, tuple | list)
        and len(score_range) == 2
        and float(score_range[1]) > float(score_range[0])
    )
    if not isinstance(direction, bool) or not valid_range:
        raise ValueError(
            f"head {name} needs a boolean `higher_is_better` and `score_range = (low, high)` with "
            f"high > low; got {direction!r} and {score_range!r}."
        )


def _default_names(heads: Sequence[nn.Module]) -> list[str]:
    names: list[str] = []
    for head in heads:
        base = getattr(head, "metric_name", None) or type(head).__name__
        label, n = base, 1
        while label in names:
            n += 1
            label = f"{base}_{n}"
        names.append(label)
    return names
