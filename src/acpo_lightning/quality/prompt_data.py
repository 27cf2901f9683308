"""Training data for a prompt-aware quality head: groups that teach quality and image-prompt agreement.

:class:`PromptPairDataset` gives one group per real image: a severity ladder of the image under its
own caption, the image under other classes' captions, and optionally a generated sample with its
prompt; :func:`collate_prompt_groups` batches them for
:class:`~acpo_lightning.quality.training.PromptIQATrainingModule`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from acpo_lightning.quality.distortions import (
    DISTORTIONS,
    check_ladder,
    quantize,
    severity_ladder,
)


class PromptPairDataset(Dataset):
    """Groups that teach image quality *and* image-prompt agreement, one group per real image.

    Group ``i`` holds, in this order (``K = 1 + levels + mismatches + (1 if generated)``):

    - the real image ``i`` with a caption of its own class: target ``1``;
    - that image under one distortion (drawn per group) at levels ``1..levels``, same caption:
      target ``1 - distortion_drop * level / levels``;
    - the real image with captions of ``mismatches`` other classes: target ``mismatch_target``;
    - optionally one generated sample with the caption it was made from: ``generated_target``.

    Every image is on the 8-bit grid (the ladder's and the generated sample alike), so that being
    off the grid never tells a row's kind. Everything is deterministic in ``(seed, i)``. Items: ``images [K, 3, S, S]``, ``target [K]``,
    ``prompts`` (``K`` strings) and ``mismatched [K]`` (``True`` on the mismatched rows).

    Args:
        images: real images ``[N, 3, S, S]`` in ``[0, 1]``.
        labels: their classes ``[N]``.
        captions_fn: ``captions_fn(label, generator) -> str``, a caption of that class.
        levels: distortion levels above the pristine one.
        distortion_drop: target lost at the strongest level.
        mismatches: mismatched captions per group.
        mismatch_target: target of a real image under another class's caption.
        generated: optional generated samples ``[M, 3, S, S]`` in ``[0, 1]``.
        generated_prompts: the ``M`` prompts they were generated from.
        generated_target: target of a generated sample with its own prompt.
        distortions: names from :data:`~acpo_lightning.quality.distortions.DISTORTIONS`.
        seed: seed of every random choice.

    Raises:
        ValueError: inconsistent lengths, fewer than two classes, bad targets, or more levels than
            a distortion has distinct settings at this size
            (:func:`~acpo_lightning.quality.distortions.check_ladder`).

    Example:
        >>> data = PromptPairDataset(
        ...     torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]),
        ...     lambda label, g: ["a cat", "a dog"][label], levels=2,
        ... )
        >>> item = data[0]
        >>> item["prompts"], item["target"].tolist()
        (['a cat', 'a cat', 'a cat', 'a dog'], [1.0, 0.75, 0.5, 0.20000000298023224])
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        captions_fn: Callable[[int, torch.Generator], str],
        levels: int = 4,
        distortion_drop: float = 0.5,
        mismatches: int = 1,
        mismatch_target: float = 0.2,
        generated: Tensor | None = None,
        generated_prompts: Sequence[str] | None = None,
        generated_target: float = 0.5,
        distortions: Sequence[str] = tuple(DISTORTIONS),
        seed: int = 0,
    ) -> None:
        self.classes = sorted({int(x) for x in labels.tolist()})
        unknown = [d for d in distortions if d not in DISTORTIONS]
        if images.ndim != 4 or len(images) != len(labels) or len(self.classes) < 2:
            raise ValueError(
                f"need images [N, 3, S, S] with N labels of at least 2 classes; got images "
                f"{tuple(images.shape)}, {len(labels)} labels, classes {self.classes}."
            )
        if levels < 1 or not distortions or unknown or mismatches < 0:
            raise ValueError(
                f"need levels >= 1, mismatches >= 0 and distortions from {sorted(DISTORTIONS)}; "
                f"got levels={levels}, mismatches={mismatches}, distortions={list(distortions)}."
            )
        if not 0.0 < distortion_drop <= 1.0 or not 0.0 <= mismatch_target < 1.0:
            raise ValueError(
                f"need 0 < distortion_drop <= 1 and 0 <= mismatch_target < 1; got "
                f"{distortion_drop} and {mismatch_target}."
            )
        if (generated is None) != (generated_prompts is None) or (
            generated is not None and len(generated) != len(generated_prompts)
        ):
            raise ValueError(
                "pass generated samples together with one prompt each (generated_prompts)."
            )
        check_ladder(distortions, images.shape[-2], images.shape[-1], levels)
        self.images, self.labels, self.captions_fn = images, labels, captions_fn
        self.levels, self.drop, self.mismatches = levels, distortion_drop, mismatches
        self.mismatch_target, self.generated_target = mismatch_target, generated_target
        self.generated = generated
        self.generated_prompts = list(generated_prompts) if generated_prompts else None
        self.distortions, self.seed = tuple(distortions), seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        real, label = self.images[index], int(self.labels[index])
        matched = self.captions_fn(label, gen)
        kind = self.distortions[int(torch.randint(len(self.distortions), (1,), generator=gen))]
        images = list(severity_ladder(real, kind, self.levels, gen))
        targets = [1.0 - self.drop * level / self.levels for level in range(self.levels + 1)]
        prompts = [matched] * (self.levels + 1)
        others = [c for c in self.classes if c != label]
        picks = torch.randperm(len(others), generator=gen)[: self.mismatches].tolist()
        for pick in picks:
            images.append(images[0])
            targets.append(self.mismatch_target)
            prompts.append(self.captions_fn(others[pick], gen))
        if self.generated is not None:
            pick = int(torch.randint(len(self.generated), (1,), generator=gen))
            images.append(quantize(self.generated[pick]))  # on the 8-bit grid, as every row
            targets.append(self.generated_target)
            prompts.append(self.generated_prompts[pick])
        mismatched = torch.zeros(len(images), dtype=torch.bool)
        mismatched[self.levels + 1 : self.levels + 1 + len(picks)] = True
        return {
            "images": torch.stack(images),
            "target": torch.tensor(targets, dtype=torch.float32),
            "prompts": prompts,
            "mismatched": mismatched,
        }


def collate_prompt_groups(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack groups into ``images [B, K, 3, S, S]``, ``target`` and ``mismatched`` ``[B, K]``.

    ``prompts`` stays a list of ``B`` lists of ``K`` strings (the default collate would transpose
    it).

    Raises:
        ValueError: the groups have different sizes.
    """
    sizes = {len(item["prompts"]) for item in items}
    if len(sizes) != 1:
        raise ValueError(
            f"prompt groups in one batch must have one size, got sizes {sorted(sizes)}."
        )
    batch: dict[str, Any] = {
        key: torch.stack([item[key] for item in items])
        for key in ("images", "target", "mismatched")
        if key in items[0]
    }
    batch["prompts"] = [list(item["prompts"]) for item in items]
    return batch
