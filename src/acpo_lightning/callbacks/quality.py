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
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import Metric

from acpo_lightning.callbacks.evaluation import GenerationMetricCallback
from acpo_lightning.callbacks.lora_export import lora_folder


class HeadScore(Metric):
    """Mean raw score of a quality head (``QualityHead`` contract) over images, synced over ranks."""

    full_state_update = False

    def __init__(self, head: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head = head
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def info(self) -> dict[str, Any]:
        higher = bool(getattr(self.head, "higher_is_better", True))
        return {"head": type(self.head).__name__, "higher_is_better": higher}

    def update(self, images: Tensor, prompts: list[str] | None = None) -> None:
        with torch.no_grad():
            scores = self.head(images, prompts).double()
        self.total += scores.sum()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


class QualityHeadCallback(GenerationMetricCallback):
    """Log ``val/<name>``: a quality head's mean raw score of images generated on fixed prompts.

    Args:
        head: a frozen quality head (``QualityHead`` contract; prompts are passed to it). ``None``
            scores with the module's own ``quality_head``: the proxy the policy is trained on.
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
            if head is not self.head:
                self.head, self.metric = head, None  # rebuilt by the base class's setup
        super().setup(trainer, pl_module, stage)

    def build_metric(self) -> Metric:
        return HeadScore(self.head)


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
        mode: ``max`` (higher is better) or ``min``.
        dirpath: output folder (default: ``<log_dir>/lora``).
        patience: evaluations without improvement before stopping (``None``: never stop).
        min_delta: the least change that counts as an improvement.
    """

    def __init__(
        self,
        monitor: str = "val/heldout_iqa",
        mode: Literal["max", "min"] = "max",
        dirpath: str | Path | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode={mode!r} must be 'max' or 'min'.")
        if patience is not None and patience < 1:
            raise ValueError(f"patience={patience} must be >= 1 or null (never stop).")
        if min_delta < 0:
            raise ValueError(f"min_delta={min_delta} must be >= 0.")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.stale = 0  # evaluations since the last improvement
        self._seen: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dirpath = lora_folder(self, trainer, pl_module, self.dirpath)

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
