"""Over-optimization made visible and controllable: any quality head scored on generated images,
and the LoRA kept (and exported) at the best value of a held-out evaluator.

Rewards that rise while images get worse are the field's main failure. Score the same fixed
prompts and seeds with the guidance head (the proxy the policy is trained on) and with a held-out
evaluator that never guides (the gold): two :class:`QualityHeadCallback` share one generation pass
and log ``val/<name>`` side by side in TensorBoard, and :class:`BestLoRACallback` keeps the LoRA
of the best held-out value, optionally stopping when it has not improved for a while.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import Metric

from acpo_lightning.callbacks.evaluation import GenerationMetricCallback
from acpo_lightning.callbacks.lora_export import lora_folder
from acpo_lightning.crops import PerceptualCrop


def crops_at_native_resolution(
    images: Tensor, crop: PerceptualCrop, scale_factor: int, seeds: Sequence[int]
) -> Tensor:
    """The crops training would score: ``crop.count`` per image, cut at the image's own
    resolution, uniform on the latent grid (as :meth:`PerceptualCrop.windows` draws them).

    Image ``i``'s positions come from a generator seeded ``seeds[i]``, so they do not depend on
    the batch (or the rank) the image was scored in.

    Args:
        images: ``[B, 3, H, W]`` decoded images (``H``, ``W`` multiples of ``scale_factor``).
        crop: the module's ``perceptual_crop``.
        scale_factor: pixels per latent (the VAE's).
        seeds: one seed per image.

    Returns:
        ``[B * crop.count, 3, crop.size, crop.size]``, image ``i``'s crops in rows
        ``i * count ... (i + 1) * count - 1``.
    """
    height, width = images.shape[-2] // scale_factor, images.shape[-1] // scale_factor
    grid = images.new_zeros(1, 1, height, width)  # windows() needs only the latent grid's shape
    parts = []
    for image, seed in zip(images, seeds, strict=True):
        generator = torch.Generator().manual_seed(seed)
        parts.append(crop.windows(grid, scale_factor, generator).of_whole(image[None]))
    return torch.cat(parts)


def crop_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s crop positions: mixed, so that it shares no stream with the
    generation noise of the same image (seeded ``seed + index``)."""
    words = [seed, index, 0xC409]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


class HeadScore(Metric):
    """Mean raw score of a quality head (``QualityHead`` contract) over images, synced over ranks.

    Args:
        head: the quality head.
        crop: score the mean of ``crop.count`` native-resolution crops per image, placed as
            training places them (:func:`crops_at_native_resolution`); ``None``: whole images (the
            head resizes them to its size).
        scale_factor: pixels per latent (where crops may start), with ``crop``.
    """

    full_state_update = False

    def __init__(
        self,
        head: nn.Module,
        crop: PerceptualCrop | None = None,
        scale_factor: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.head, self.crop, self.scale_factor = head, crop, scale_factor
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def info(self) -> dict[str, Any]:
        higher = bool(getattr(self.head, "higher_is_better", True))
        scored = repr(self.crop) if self.crop is not None else "whole image"
        return {"head": type(self.head).__name__, "higher_is_better": higher, "scores": scored}

    def update(
        self,
        images: Tensor,
        prompts: list[str] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> None:
        """Add the scores of ``images``; with a crop, ``seeds`` (one per image) place the crops."""
        with torch.no_grad():
            if self.crop is None:
                scores = self.head(images, prompts)
            else:
                if seeds is None:
                    raise ValueError("HeadScore with a crop needs one seed per image (seeds=...).")
                count = self.crop.count
                crops = crops_at_native_resolution(images, self.crop, self.scale_factor, seeds)
                repeated = [p for p in prompts for _ in range(count)] if prompts else prompts
                scores = self.head(crops, repeated).view(-1, count).mean(dim=1)
        self.total += scores.double().sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


class QualityHeadCallback(GenerationMetricCallback):
    """Log ``val/<name>``: a quality head's mean raw score of images generated on fixed prompts.

    Args:
        head: a frozen quality head (``QualityHead`` contract; prompts are passed to it). ``None``
            scores with the module's own ``quality_head`` as training scores: the proxy the
            policy is trained on. With the module's ``perceptual_crop``, that is the mean over
            native-resolution crops placed as training places them (image ``i``'s from a seed
            mixed from ``seed`` and ``i``, the same at every evaluation); a given ``head`` scores
            whole images.
        name: the logged name (default ``guidance_iqa`` for the module's head, else ``heldout_iqa``).
        **kwargs: the generation and frequency options of
            :class:`~acpo_lightning.callbacks.GenerationMetricCallback`. Give the proxy and the
            held-out callbacks the same prompts, seed, steps, guidance and batch size: they then
            score the very same images, generated once.

    Example:
        >>> callbacks = [
        ...     QualityHeadCallback(every_n_steps=100, every_n_epochs=None),
        ...     QualityHeadCallback(head=my_evaluator, every_n_steps=100, every_n_epochs=None),
        ...     BestLoRACallback(monitor="val/heldout_iqa", patience=5),
        ... ]  # doctest: +SKIP
    """

    needs_prompts = False

    def __init__(
        self, head: nn.Module | None = None, name: str | None = None, **kwargs: Any
    ) -> None:
        self.head = head
        self.uses_module_head = head is None
        self._scored_as: tuple[nn.Module | None, PerceptualCrop | None, int] = (head, None, 1)
        name = name or ("guidance_iqa" if head is None else "heldout_iqa")
        super().__init__(name=name, **kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.uses_module_head:  # the head of the module this run trains, at every run
            head = getattr(pl_module, "quality_head", None)
            if head is None:
                raise TypeError(
                    f"QualityHeadCallback(head=None) scores with the module's quality_head, but "
                    f"{type(pl_module).__name__} has none; pass head=<a QualityHead>."
                )
            crop = getattr(pl_module, "perceptual_crop", None)
            scale = pl_module.codec.scale_factor if crop is not None else 1
            if (head, crop, scale) != self._scored_as:
                self.head, self.metric = head, None  # rebuilt by the base class's setup
                self._scored_as = (head, crop, scale)
        super().setup(trainer, pl_module, stage)

    def direction(self, pl_module: pl.LightningModule) -> tuple[bool, str] | None:
        """The head's ``higher_is_better`` and class name (the module's head for ``head=None``)."""
        head = getattr(pl_module, "quality_head", None) if self.uses_module_head else self.head
        if head is None:
            return None
        return bool(getattr(head, "higher_is_better", True)), type(head).__name__

    def build_metric(self) -> Metric:
        _, crop, scale = self._scored_as
        return HeadScore(self.head, crop, scale)

    def update(self, images: Tensor, prompts: list[str], first: int = 0) -> None:
        """Score a batch whose first image is image ``first`` of the prompt list."""
        if self.metric.device != images.device:
            self.metric.to(images.device)
        seeds = [crop_seed(self.settings.seed, first + i) for i in range(len(images))]
        self.metric.update(images, prompts, seeds)


class BestLoRACallback(Callback):
    """Keep the LoRA at the best value of a logged metric; optionally stop when it stalls.

    After every evaluation that logs ``monitor`` (e.g. ``val/heldout_iqa`` of a
    :class:`QualityHeadCallback` with a held-out evaluator), an improvement exports the adapter to
    ``<dirpath>/best/`` (``pytorch_lora_weights.safetensors``, as ``pipe.load_lora_weights``
    reads it) with ``best.json`` (the value, the step and the proxy's value at that step). With
    ``patience``, training stops after that many evaluations without improvement.

    A new value is taken up at the end of the step that logged it when this callback is listed
    after the evaluation callbacks, else at the start of the next step (before its optimizer step:
    the LoRA is still the one evaluated; a stop then comes one step later), and always before a
    checkpoint is written, so that a run resumed from the checkpoint keeps the same best.

    Args:
        monitor: the logged value to follow.
        mode: ``max`` (higher is better) or ``min``. ``None`` (the default) follows the direction
            of the evaluation callback that logs ``monitor`` (``val/<name>`` or
            ``val/<name>_delta``): a :class:`QualityHeadCallback`'s head says it with
            ``higher_is_better`` (``min`` for NIQE or BRISQUE); ``max`` when no such callback
            says. A ``mode`` against that direction is refused at setup.
        dirpath: output folder (default: ``<log_dir>/lora``).
        patience: evaluations without improvement before stopping (``None``: never stop).
        min_delta: the least change that counts as an improvement.
    """

    def __init__(
        self,
        monitor: str = "val/heldout_iqa",
        mode: Literal["max", "min"] | None = None,
        dirpath: str | Path | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("max", "min", None):
            raise ValueError(
                f"mode={mode!r} must be 'max' or 'min' (or null: the monitored head's direction)."
            )
        if patience is not None and patience < 1:
            raise ValueError(f"patience={patience} must be >= 1 or null (never stop).")
        if min_delta < 0:
            raise ValueError(f"min_delta={min_delta} must be >= 0.")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.requested_mode = mode
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.stale = 0  # evaluations since the last improvement
        self._seen: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the folder and the mode (before a checkpoint's state is restored: the state
        key holds the mode)."""
        self.dirpath = lora_folder(self, trainer, pl_module, self.dirpath)
        self.mode = self._resolve_mode(trainer, pl_module)

    def _resolve_mode(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """``mode`` as given, else the direction of the callback that logs ``monitor``.

        Raises:
            ValueError: the given mode is against that direction.
        """
        for callback in trainer.callbacks:
            if not isinstance(callback, GenerationMetricCallback):
                continue
            name = callback.metric_name
            direction = callback.direction(pl_module)
            if self.monitor in (f"val/{name}", f"val/{name}_delta") and direction is not None:
                higher, scorer = direction
                implied = "max" if higher else "min"
                if self.requested_mode not in (None, implied):
                    raise ValueError(
                        f"BestLoRACallback(mode={self.requested_mode!r}) follows {self.monitor}, "
                        f"but its scorer {scorer} has higher_is_better={higher}: the kept LoRA "
                        f"would be the worst. Use mode: {implied}, or leave mode out."
                    )
                return implied
        return self.requested_mode or "max"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        self._check(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        self._check(trainer, pl_module)  # an evaluation that ran after this callback's batch end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # An evaluation logged since the last hook of this callback (e.g. at the epoch end, where
        # ModelCheckpoint saves next) would otherwise be taken up only after the checkpoint is
        # written, and a run resumed from it would never see that value. Lightning has already
        # stored state_dict() when this hook runs: store it again with the value taken up.
        self._check(trainer, pl_module)
        states = checkpoint.get("callbacks")
        if states is not None and self.state_key in states:
            states[self.state_key] = self.state_dict()

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or value is self._seen or trainer.state.fn != TrainerFn.FITTING:
            return
        self._seen = value  # each evaluation logs a new tensor: this one is new
        current = float(value)
        if not math.isfinite(current):
            self.stale += 1
        elif self._improves(current):
            self.best_value, self.best_step, self.stale = current, trainer.global_step, 0
            self._export(trainer, pl_module)
        else:
            self.stale += 1
        if self.patience is not None and self.stale >= self.patience:
            trainer.should_stop = True
            pl_module.print(
                f"BestLoRACallback: {self.monitor} has not improved on {self.best_value} (step "
                f"{self.best_step}) for {self.stale} evaluations: stopping."
            )

    def _improves(self, current: float) -> bool:
        if self.best_value is None:
            return True
        if self.mode == "max":
            return current > self.best_value + self.min_delta
        return current < self.best_value - self.min_delta

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = self.dirpath / "best"
        if trainer.is_global_zero:
            pl_module.save_lora(folder)
            logged = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
            }
            record = {"monitor": self.monitor, "mode": self.mode, "value": self.best_value,
                      "step": self.best_step, "logged": logged}  # fmt: skip
            (folder / "best.json").write_text(json.dumps(record, indent=2))
        trainer.strategy.barrier("best_lora_export")

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "stale": self.stale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_value = state_dict["best_value"]
        self.best_step = state_dict["best_step"]
        self.stale = state_dict["stale"]
