"""The command line: ``acpo``/``lightning`` ``fit|validate|test|predict|export|cache-latents``.

One jsonargparse parser with six subcommands (``acpo --help`` lists them). ``fit``, ``validate``,
``test`` and ``predict`` are ``LightningCLI``'s: the ``Trainer``'s methods over
:class:`~acpo_lightning.ACPOModule` and any ``LightningDataModule``, in omegaconf mode so that YAML
files can interpolate (``${model.init_args...}``). ``export`` (see :mod:`acpo_lightning.export`)
and ``cache-latents`` (see :mod:`acpo_lightning.cache_latents`) are added to the same subcommand
table; they run a function of this package and build no ``Trainer``. ``cache-latents`` reads
everything ``fit`` reads (the same ``--config`` files, overlays and ``--key value`` overrides).
Lightning 2.6 ships no ``lightning`` console script; this package installs one, which would clash
with another package that installs a script of the same name. ``fit`` also saves its config next
to every ``ModelCheckpoint``'s checkpoints, where ``acpo export`` looks for it.

**Errors the user can fix end in one line**, ``acpo: error: <what, which value, the fix>``, and a
non-zero exit, for every subcommand: 2 when the input is wrong (a bad value, missing weights or
data, a checkpoint that is refused, an output folder that cannot be written), found before or at
set-up, so nothing ran; 1 when a run stops part-way (a checkpoint that could not be written, too
many non-finite steps), after which ``--ckpt_path last`` resumes. ``ACPO_DEBUG=1`` raises the
exception instead. Before ``fit`` every output folder is created and a probe file written and
deleted in it, so a folder that cannot be written fails before any model weight is touched.
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from acpo_lightning import cache_latents, export
from acpo_lightning.checkpoint_io import (
    CheckpointWriteError,
    NotACheckpointError,
    SafeCheckpointIO,
    UnsafeCheckpointError,
    check_is_checkpoint,
    refusal_reason,
)
from acpo_lightning.config_errors import ConfigError, explain
from acpo_lightning.data.images import BadSampleError
from acpo_lightning.module import ACPOModule, NonFiniteTrainingError

#: Exit status of input errors (argparse's for usage errors) and of runs stopped part-way.
EXIT_INPUT, EXIT_RUN = 2, 1
#: Hooks where an exception is about the user's configuration or data, not a bug of the step.
_SETUP_HOOKS = frozenset({"prepare_data", "setup", "configure_optimizers", "on_load_checkpoint"})
_SETUP_ERRORS = (ValueError, TypeError, OSError, ImportError)
#: Errors that always speak to the user, wherever they are raised.
_INPUT_ERRORS = (
    BadSampleError,
    UnsafeCheckpointError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
#: ``--ckpt_path`` values that Lightning resolves itself (also ``registry:...`` and URLs).
_CKPT_KEYWORDS = frozenset({"last", "best", "hpc", "registry"})
#: Subcommands beside the Trainer's: each runs a function of this package and builds no Trainer.
_TOOLS = {
    "export": "Write a checkpoint's LoRA as pytorch_lora_weights.safetensors for diffusers' "
    "load_lora_weights.",
    "cache-latents": "Encode the training images of a run config once with its frozen VAE, for "
    "acpo_lightning.data.CachedLatentsDataModule.",
}


class OutputFolderError(OSError):
    """An output folder (checkpoints, LoRA exports, logs) cannot be created or written."""


def fail(error: BaseException, code: int = EXIT_INPUT) -> NoReturn:
    """End the command with one ``acpo: error:`` line (re-raise ``error`` under ``ACPO_DEBUG``).

    Call it inside the ``except`` block that caught ``error``.

    Raises:
        SystemExit: with ``code``.
    """
    if os.environ.get("ACPO_DEBUG"):
        raise error
    print(f"acpo: error: {describe(error)}\n(set ACPO_DEBUG=1 for the traceback)", file=sys.stderr)
    raise SystemExit(code) from error


def describe(error: BaseException) -> str:
    """The message of ``error``, without ``[Errno N]``; a bare OS error gets its path and a fix."""
    text = str(error).strip() or type(error).__name__
    if not (isinstance(error, OSError) and text.startswith("[Errno")):
        return text
    if error.filename:
        return f"{error.filename}: {_os_reason(error)}. Fix: {_os_fix(error, 'the path')}"
    return error.strerror or text  # OSError(errno, message) of ours: the message alone


def _os_reason(error: OSError) -> str:
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{error.strerror} (a part of the path is a file, not a folder)"
    return error.strerror or str(error)


def _os_fix(error: OSError, setting: str) -> str:
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"move the file out of the way or set {setting} to another folder"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make the folder writable for this user (chmod/chown) or set {setting} to a folder you can write"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"free disk space or set {setting} to a folder on a larger disk"
    return f"check {setting}"


def check_writable(folder: str | Path, setting: str) -> None:
    """Create ``folder`` and write, then delete, a probe file in it.

    ``os.access`` is not enough: it says yes to root whatever the mode, and knows nothing of
    read-only mounts, quotas or a file where a folder should be.

    Args:
        folder: the folder the run will write to.
        setting: the config setting it comes from, for the message.

    Raises:
        OutputFolderError: the folder cannot be created or written; the message names it and the fix.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".acpo-write-check-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as error:
        raise OutputFolderError(
            error.errno,
            f"cannot write to the output folder {folder} ({setting}): {_os_reason(error)}. "
            f"Fix: {_os_fix(error, setting)}",
        ) from error


def output_folders(trainer: pl.Trainer) -> dict[Path, str]:
    """Every folder ``fit`` will write to, with the setting that names it.

    Each callback's ``dirpath`` (``ModelCheckpoint``, ``LoRAExportCallback``, ...; when unset,
    the folder Lightning puts it under) and each logger's ``save_dir``; local folders only.
    """
    root = trainer.loggers[0].save_dir if trainer.loggers else None
    root = root or trainer.default_root_dir
    candidates = [
        (
            callback.dirpath or root,
            f"the {type(callback).__name__} callback's dirpath in trainer.callbacks",
        )
        for callback in trainer.callbacks
        if hasattr(callback, "dirpath")
    ]
    candidates += [
        (logger.save_dir, f"the {type(logger).__name__}'s save_dir in trainer.logger")
        for logger in trainer.loggers
        if getattr(logger, "save_dir", None)
    ]
    folders: dict[Path, str] = {}
    for folder, setting in candidates:
        if "://" not in str(folder):  # remote storage (s3://, gs://) is not probed
            folders.setdefault(Path(folder), setting)
    return folders


def _reported_cause(error: BaseException) -> BaseException:
    """The error to report: jsonargparse wraps a failing ``Optional[...]`` argument's own error
    (e.g. a ``ModelNotFoundError`` of the text encoder) in "Does not validate against any of the
    Union subtypes"; the innermost explicit cause is the one that speaks to the user."""
    cause = error
    while cause.__cause__ is not None and "Union subtypes" in str(cause):
        cause = cause.__cause__
    return cause


def _raised_in_setup(error: BaseException, owners: list[Any]) -> bool:
    """Whether ``error`` came out of a set-up hook (``setup``, ``prepare_data``, ...) of ``owners``."""
    owners = [owner for owner in owners if owner is not None]
    return any(
        frame.f_code.co_name in _SETUP_HOOKS
        and any(frame.f_locals.get("self") is owner for owner in owners)
        for frame, _ in traceback.walk_tb(error.__traceback__)
    )


class ACPOArgumentParser(LightningArgumentParser):
    """jsonargparse's parser whose usage errors end in one line (:mod:`acpo_lightning.config_errors`).

    An unknown key or a value of the wrong type, on the command line or in a ``--config`` file,
    prints ``acpo: error: <key>, <expected type or closest valid key>, <fix>`` and exits 2,
    instead of the parser's usage (about 85 lines) and a bare ``error:``.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """End the command with one line; jsonargparse's own handling when it catches the error."""
        if not self.exit_on_error:  # jsonargparse parses a nested value and expects the raise
            super().error(message, ex)
        error = ConfigError(explain(self, message, getattr(self, "args", None)))
        error.__cause__ = ex
        fail(error)


class ACPOCLI(LightningCLI):
    """LightningCLI with ``export`` and ``cache-latents`` beside the Trainer's subcommands, whose
    errors that the user can fix end in one clear line (see the module doc).

    Example:
        ``acpo fit --config configs/acpo.yaml --config configs/tiny.yaml --trainer.max_steps 10``
    """

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """The Trainer's subcommands, then ``export`` and ``cache-latents`` in the same table."""
        super()._add_subcommands(parser, **kwargs)
        table = parser._subcommands_action  # jsonargparse allows one add_subcommands() per parser
        # ``--config`` of ``export`` names training configs to read, not a file of its arguments.
        export_parser = self.parser_class(description=_TOOLS["export"])
        export.add_export_arguments(export_parser)
        table.add_subcommand("export", export_parser, help=_TOOLS["export"])
        cache_parser = self.init_parser(description=_TOOLS["cache-latents"])
        cache_latents.add_cache_arguments(cache_parser)  # first, so --help shows them first
        self._add_arguments(cache_parser)  # everything ``fit`` reads, so its configs parse as-is
        skip = set(self.subcommands()["fit"])
        cache_parser.add_method_arguments(self._trainer_type(), "fit", skip=skip)
        table.add_subcommand("cache-latents", cache_parser, help=_TOOLS["cache-latents"])

    def _trainer_type(self) -> type:
        from jsonargparse import class_from_function

        trainer = self.trainer_class
        return trainer if isinstance(trainer, type) else class_from_function(trainer)

    def _runs_a_tool(self) -> bool:
        return self.config.get("subcommand") in _TOOLS

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path``'s hyper-parameters (``weights_only``) before anything else."""
        subcommand = self.config.get("subcommand")
        if self._runs_a_tool() or not subcommand:  # run=False parses no subcommand, no ckpt_path
            return
        path = self.config[subcommand].get("ckpt_path")
        if path and Path(path).is_file():  # not `last`/`best`: a text or image file, refused
            try:  # before torch's unpickler reads its bytes as opcodes
                check_is_checkpoint(path)
            except NotACheckpointError as error:
                fail(error)
        try:
            super()._parse_ckpt_path()
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            ValueError,
            OSError,
            KeyError,
        ) as error:
            try:  # the same load, explained: which file, why it is refused, what to do
                SafeCheckpointIO().load_checkpoint(path, map_location="cpu")
            except (UnsafeCheckpointError, FileNotFoundError) as explained:
                fail(explained)
            fail(error)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's, without its notice that ``args`` and ``sys.argv`` are both given: ``main(
        args)`` from Python (a notebook, a test, the demo) parses ``args`` only, and the caller's
        own ``sys.argv`` is not meant for it."""
        argv = sys.argv
        if args is not None:
            sys.argv = argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def _set_seed(self) -> None:
        if not self._runs_a_tool():  # a tool draws no random numbers: no seed, no log line
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if self._runs_a_tool():  # a tool builds only what it needs, itself
            self.model, self.datamodule, self.trainer = None, None, None
            return
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError, pickle.UnpicklingError) as error:
            cause = _reported_cause(error)
            if not isinstance(cause, pickle.UnpicklingError):
                fail(cause)
            fail(  # a model loader's torch.load(weights_only=True) refused a .bin file
                UnsafeCheckpointError(
                    "a weights file of a configured model holds pickled Python objects that a "
                    f"weights_only load refuses ({refusal_reason(cause)}); nothing was executed. "
                    "Fix: use the model's .safetensors weights, or convert its .bin file to "
                    "safetensors in an environment you trust."
                )
            )

    def before_fit(self) -> None:
        """Pre-flight: every output folder can be created and written (see :func:`check_writable`)."""
        for folder, setting in output_folders(self.trainer).items():
            check_writable(folder, setting)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in _TOOLS:
            self._run_tool(subcommand, self.config[subcommand])
            return
        try:
            self._check_ckpt_path(subcommand)
            super()._run_subcommand(subcommand)
        except Exception as error:
            code = self._exit_code(error)
            if code is None:
                raise
            fail(error, code)

    @staticmethod
    def _run_tool(subcommand: str, args: Any) -> None:
        """Run ``export`` or ``cache-latents``; an input error ends in one line (exit 2)."""
        try:
            if subcommand == "export":
                export.export_command(args.ckpt, args.out, args.config, args.format, args.overwrite)
            else:
                cache_latents.cache_latents_command(
                    args, args.out, args.batch_size, args.device, args.shard_size, args.overwrite
                )
        except (ValueError, OSError) as error:
            fail(_reported_cause(error))

    def _exit_code(self, error: Exception) -> int | None:
        """``EXIT_INPUT``/``EXIT_RUN`` for an error the user can fix; ``None`` for a bug (re-raised)."""
        from acpo_lightning.models.loading import ModelNotFoundError
        from acpo_lightning.quality.pyiqa_head import PyiqaWeightsError

        if isinstance(error, (CheckpointWriteError, NonFiniteTrainingError)):
            return EXIT_RUN
        user = (ModelNotFoundError, PyiqaWeightsError, OutputFolderError, *_INPUT_ERRORS)
        if isinstance(error, user):
            return EXIT_INPUT
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return EXIT_RUN
        owners = [self.datamodule, self.model, *self.trainer.callbacks]
        if isinstance(error, _SETUP_ERRORS) and _raised_in_setup(error, owners):
            return EXIT_INPUT
        return None

    def _check_ckpt_path(self, subcommand: str) -> None:
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if ckpt_path is None or str(ckpt_path) in _CKPT_KEYWORDS:
            return
        if str(ckpt_path).startswith("registry:") or "://" in str(ckpt_path):
            return
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(
                f"--ckpt_path {ckpt_path}: no such file. Fix: pass a checkpoint written by `acpo "
                "fit` (e.g. outputs/acpo/checkpoints/last.ckpt), or `last` to resume from the "
                "newest checkpoint of the configured ModelCheckpoint."
            )


class ACPOSaveConfigCallback(SaveConfigCallback):
    """Save the config to the log folder and, for ``acpo export``, next to the checkpoints."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Defer the copy next to the checkpoints to :meth:`on_fit_start` (rank 0 calls this)."""
        self._pending_checkpoint_copy = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the config next to the checkpoints, after every callback's ``setup``: written in
        ``setup`` it put a file in ``ModelCheckpoint``'s folder before that callback's own
        ``setup``, which then warned "exists and is not empty" on every fit."""
        if not getattr(self, "_pending_checkpoint_copy", False):
            return
        self._pending_checkpoint_copy = False
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath:
                os.makedirs(dirpath, exist_ok=True)
                path = os.path.join(dirpath, self.config_filename)
                self.parser.save(
                    self.config, path, skip_none=False, overwrite=True, multifile=False
                )


_DESCRIPTION = (
    "ACPO fine-tuning of diffusion models: the Trainer's fit, validate, test and predict over "
    "ACPOModule, LoRA export and latent caching."
)


def build_cli(
    args: list[str] | None = None, run: bool = True, cli_class: type[ACPOCLI] = ACPOCLI
) -> ACPOCLI:
    """Build (and by default run) the CLI; ``args`` defaults to ``sys.argv[1:]``."""
    return cli_class(
        ACPOModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "prog": "acpo", "description": _DESCRIPTION},
        parser_class=ACPOArgumentParser,
        save_config_callback=ACPOSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point of ``acpo`` and ``lightning``; ``args`` defaults to ``sys.argv[1:]``."""
    with warnings.catch_warnings():
        # ACPOModule keeps its frozen parts in eval mode on purpose (see ACPOModule.train), so
        # Lightning's notice about them is noise in this command's output; library users who
        # build their own Trainer still see it. Scoped to the command, restored on return.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
