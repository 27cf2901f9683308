"""The command line: ``acpo``/``lightning`` ``fit|validate|test|predict --config ...`` and ``acpo export``.

A ``LightningCLI`` over :class:`~acpo_lightning.ACPOModule` with any ``LightningDataModule``, in
omegaconf mode so that YAML files can interpolate (``${model.init_args...}``). Lightning 2.6 ships
no ``lightning`` console script; this package installs one, which would clash with another package
that installs a script of the same name.

``acpo export --ckpt ... --out ...`` (see :mod:`acpo_lightning.export`) is dispatched before
LightningCLI, whose subcommands are the ``Trainer``'s methods. ``fit`` also saves its config next
to every ``ModelCheckpoint``'s checkpoints, where ``acpo export`` looks for it.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from acpo_lightning.module import ACPOModule


class ACPOCLI(LightningCLI):
    """LightningCLI whose set-up errors (bad values, missing weights) end in one clear line.

    Example:
        ``acpo fit --config configs/acpo.yaml --config configs/tiny.yaml --trainer.max_steps 10``
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError) as error:
            if os.environ.get("ACPO_DEBUG"):
                raise
            message = str(error).strip() or type(error).__name__
            print(f"acpo: error: {message}\n(set ACPO_DEBUG=1 for the traceback)", file=sys.stderr)
            raise SystemExit(2) from error

    def _run_subcommand(self, subcommand: str) -> None:
        """Missing weights found at ``setup`` (evaluation metrics) also end in one clear line."""
        from acpo_lightning.models.loading import ModelNotFoundError
        from acpo_lightning.quality.pyiqa_head import PyiqaWeightsError

        try:
            super()._run_subcommand(subcommand)
        except (ModelNotFoundError, PyiqaWeightsError) as error:
            if os.environ.get("ACPO_DEBUG"):
                raise
            print(f"acpo: error: {error}\n(set ACPO_DEBUG=1 for the traceback)", file=sys.stderr)
            raise SystemExit(2) from error


class ACPOSaveConfigCallback(SaveConfigCallback):
    """Save the config to the log folder and, for ``acpo export``, next to the checkpoints."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath:
                os.makedirs(dirpath, exist_ok=True)
                path = os.path.join(dirpath, self.config_filename)
                self.parser.save(
                    self.config, path, skip_none=False, overwrite=True, multifile=False
                )


_EPILOG = (
    "Also: acpo export --ckpt CKPT --out DIR [--config FILE]: write a checkpoint's LoRA as "
    "pytorch_lora_weights.safetensors for diffusers' load_lora_weights."
)


def build_cli(args: list[str] | None = None, run: bool = True) -> ACPOCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``."""
    return ACPOCLI(
        ACPOModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "epilog": _EPILOG},
        save_config_callback=ACPOSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point of ``acpo`` and ``lightning``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        run_export(argv[1:])
        return
    build_cli(args)


def run_export(argv: list[str]) -> None:
    """``acpo export``; errors end in one line naming the problem, as for the other subcommands."""
    from acpo_lightning.export import export_main

    try:
        export_main(argv)
    except (ValueError, OSError) as error:
        if os.environ.get("ACPO_DEBUG"):
            raise
        print(f"acpo: error: {error}\n(set ACPO_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":  # pragma: no cover
    main()
