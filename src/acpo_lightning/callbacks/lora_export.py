"""Write the LoRA adapter in diffusers' format during and at the end of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class LoRAExportCallback(Callback):
    """Save ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights`` reads it) while training.

    Writes ``<dirpath>/step-<global_step>/`` every ``every_n_steps`` steps or ``every_n_epochs``
    epochs, and ``<dirpath>/last/`` when training ends. Rank zero writes; the others wait.

    Args:
        dirpath: output folder (default: ``<log_dir>/lora``, or ``<default_root_dir>/lora`` without logger).
        every_n_steps: export after every N-th optimizer step (``None``: never).
        every_n_epochs: export at the end of every N-th epoch (``None``: never).
        save_last: export to ``last/`` at the end of training.

    Example:
        >>> callbacks = [LoRAExportCallback(dirpath="outputs/acpo/lora", every_n_steps=500)]
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_last: bool = True,
    ) -> None:
        for knob, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{knob}={value} must be >= 1 or null.")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps, self.every_n_epochs, self.save_last = (
            every_n_steps,
            every_n_epochs,
            save_last,
        )
        self.written: list[Path] = []
        self._last_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dirpath = lora_folder(self, trainer, pl_module, self.dirpath)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        n, step = self.every_n_steps, trainer.global_step
        if n and step > 0 and step % n == 0:
            self.export(trainer, pl_module, f"step-{step:06d}")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.export(trainer, pl_module, f"step-{trainer.global_step:06d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last:
            self.export(trainer, pl_module, "last", force=True)

    def export(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, force: bool = False
    ) -> None:
        """Write the adapter to ``dirpath/name`` (once per global step unless ``force``)."""
        if self._last_step == trainer.global_step and not force:
            return
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            self.written.append(pl_module.save_lora(self.dirpath / name))
        trainer.strategy.barrier("lora_export")


def lora_folder(
    callback: Callback, trainer: pl.Trainer, pl_module: pl.LightningModule, dirpath: Path | None
) -> Path:
    """Where ``callback`` writes adapters: ``dirpath``, else ``<log_dir>/lora`` (or
    ``<default_root_dir>/lora`` without a logger).

    Raises:
        TypeError: ``pl_module`` cannot save a LoRA (no ``save_lora(directory)``).
    """
    if not callable(getattr(pl_module, "save_lora", None)):
        raise TypeError(
            f"{type(callback).__name__} needs a module with save_lora(directory), such as "
            f"ACPOModule; got {type(pl_module).__name__}."
        )
    if dirpath is not None:
        return dirpath
    root = trainer.log_dir if trainer.loggers else trainer.default_root_dir
    return Path(root or ".") / "lora"
