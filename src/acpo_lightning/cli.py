"""The command line: ``acpo``/``lightning`` ``fit|validate|test|predict --config ...``.

A ``LightningCLI`` over :class:`~acpo_lightning.ACPOModule` with any ``LightningDataModule``, in
omegaconf mode so that YAML files can interpolate (``${model.init_args...}``). Lightning 2.6 ships
no ``lightning`` console script; this package installs one, which would clash with another package
that installs a script of the same name.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

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


def build_cli(args: list[str] | None = None, run: bool = True) -> ACPOCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``."""
    return ACPOCLI(
        ACPOModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point of ``acpo`` and ``lightning``."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
