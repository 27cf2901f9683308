"""Checkpoint files that survive a kill and never unpickle code: :class:`SafeCheckpointIO`.

Lightning's default ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary
file lives in the system temp folder, so the final move can be a copy (not atomic) and nothing is
fsynced. Here a checkpoint is written to a temporary file beside its target, flushed to disk and
renamed over it (``os.replace`` is atomic on POSIX and Windows), so a kill or a full disk during a
write leaves the previous checkpoint as it was. Loads use ``torch.load(weights_only=True)``: a
checkpoint holding anything but tensors and plain containers is refused, not executed.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at that path is untouched."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects that a ``weights_only`` load refuses."""


class NotACheckpointError(UnsafeCheckpointError):
    """A file that is not a PyTorch checkpoint at all (text, an image, a safetensors file, ...).

    A subclass of :class:`UnsafeCheckpointError`, so that every caller that refuses a bad
    checkpoint refuses this one too.
    """


#: how ``torch.save`` files begin: a zip archive (since torch 1.6, what Lightning writes) or a
#: pickle of protocol 2 or later (torch's legacy format)
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_is_checkpoint(path: str | Path) -> None:
    """Refuse a file that does not begin as ``torch.save`` files do, before anything parses it.

    Without this check, torch's unpickler reads text as opcodes (``hello`` ends in ``KeyError:
    101``), a YAML, PNG or JSONL file is refused as "pickled Python objects", and torch >= 2.5
    loads a ``.safetensors`` file as if it were a checkpoint.

    Raises:
        NotACheckpointError: naming the file, what it looks like and the fix.
    """
    with open(path, "rb") as handle:
        head = handle.read(64)
    if any(head.startswith(magic) or magic.startswith(head) for magic in _CHECKPOINT_MAGIC):
        return  # a checkpoint, or one cut within its first bytes: torch's reader says which
    raise NotACheckpointError(
        f"{path} is not a PyTorch checkpoint: it is {_looks_like(head)}. A checkpoint is the "
        ".ckpt file that `acpo fit` writes (a zip archive written by torch.save). Fix: pass one, "
        "e.g. outputs/acpo/checkpoints/last.ckpt."
    )


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file say it is, in a few words."""
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "an image"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "a safetensors file (a LoRA export or model weights, not a training checkpoint)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of another format"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"text beginning {first[:40]!r}" if first else "blank text"


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced checkpoint writes and ``weights_only`` loads for local paths.

    Configure it as a Trainer plugin (``configs/acpo.yaml`` does)::

        trainer:
          plugins:
            - class_path: acpo_lightning.checkpoint_io.SafeCheckpointIO

    or ``Trainer(plugins=[SafeCheckpointIO()])`` in Python.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"SafeCheckpointIO takes no storage_options (got {storage_options!r}); use "
                "Lightning's TorchCheckpointIO for remote storage."
            )
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda handle: torch.save(checkpoint, handle))
        except (OSError, RuntimeError) as error:
            # torch.save reports a failed write of its zip writer as a RuntimeError ("unexpected
            # pos"), with the OSError (ENOSPC, EFBIG, ...) as its context
            cause = _os_error_in(error)
            if cause is None:
                raise
            raise _write_error(path, cause) from error

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise UnsafeCheckpointError(
                f"weights_only=False was asked for {path}, but SafeCheckpointIO never unpickles "
                "Python objects from a file; drop --weights_only false (our checkpoints need none)."
            )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path} (check --ckpt_path)")
        check_is_checkpoint(path)
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects that a weights_only load refuses "
                f"({refusal_reason(error)}); nothing in it was run. acpo loads checkpoints with "
                "weights_only=True only. Fix: use a checkpoint written by `acpo fit` (tensors and "
                "plain containers only); if you trust this file, re-save its tensors without the "
                "Python objects in an environment you trust."
            ) from error
        # torch's zip reader, a file cut short; the unpickler reading garbage as opcodes (KeyError)
        except (RuntimeError, EOFError, OSError, KeyError) as error:
            if isinstance(error, OSError) and error.errno != errno.EINVAL:
                raise  # e.g. permission denied: not the file's content
            first = str(error).strip().split(". ")[0] or type(error).__name__
            first = f"KeyError: {first}" if isinstance(error, KeyError) else first
            raise UnsafeCheckpointError(
                f"{path} is truncated or not a PyTorch checkpoint ({first}). Fix: resume from an "
                "earlier checkpoint (ModelCheckpoint keeps top-k beside last.ckpt)."
            ) from error


def refusal_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names the object (``Unsupported global: GLOBAL exec ...``).

    The rest of torch's message explains how to load the file anyway, which is what we refuse.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please", 1)[0].strip()
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _os_error_in(error: BaseException) -> OSError | None:
    """``error`` itself if it is an ``OSError``, else the first one it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _write_error(path: Path, error: OSError) -> CheckpointWriteError:
    previous = "the previous checkpoint there is intact" if path.exists() else "no file was left"
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno or 0, "")
    if error.errno == errno.EFBIG:
        hint = (
            "raise the file-size limit (`ulimit -f`) or point ModelCheckpoint's dirpath at a "
            "file system that takes larger files"
        )
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space or point ModelCheckpoint's dirpath at a larger disk"
    else:
        hint = "make the folder writable or point ModelCheckpoint's dirpath elsewhere"
    return CheckpointWriteError(
        error.errno,
        f"could not write checkpoint {path}: {reason}{f' ({code})' if code else ''}; "
        f"{previous}. Fix: {hint}, then resume with --ckpt_path last",
    )


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` so that readers see the old file or the whole new one, even after a crash.

    ``write(handle)`` fills a temporary file beside ``path`` (same file system), which is fsynced
    and renamed over ``path`` (``os.replace``); then the folder is fsynced so the rename lasts.
    On any failure the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to write.
        write: writes the content to an open binary file.
    """
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Persist a rename on POSIX (directories cannot be opened for fsync on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def use_safe_checkpoint_io(trainer: Any) -> None:
    """Swap the Trainer's default ``TorchCheckpointIO`` for :class:`SafeCheckpointIO`.

    Called by ``ACPOModule.setup``, which runs before Lightning restores ``--ckpt_path``, so every
    run of the module, from the CLI or a user's own ``Trainer``, writes atomically and loads with
    ``weights_only=True``. A CheckpointIO the user configured (any other class) is left alone.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()


#: checkpoint names of trained state from before it moved into the module's parts
LEGACY_STATE_NAMES = {
    "w_anchor_state": "anchor_weight.w_anchor_state",
    "drift_ema": "anchor_weight.drift_ema",
    "drift_ema_steps": "anchor_weight.drift_ema_steps",
    "skipped_steps": "guard.skipped_steps",
    "overflow_steps": "guard.overflow_steps",
}


def restore_trained_state(state: dict[str, Any], trained: set[str], optional: set[str]) -> None:
    """Prepare a checkpoint's ``state_dict`` for a module that trains ``trained`` (in place).

    Renames older checkpoints' state (:data:`LEGACY_STATE_NAMES`) and refuses one that lacks a
    trained name outside ``optional`` (counters and dual state a checkpoint may predate).

    Raises:
        ValueError: trainable weights are missing (another LoRA rank, targets, or network).
    """
    for old, new in LEGACY_STATE_NAMES.items():
        if old in state and new not in state:
            state[new] = state.pop(old)
    missing = sorted(trained - set(state) - optional)
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} trainable weights of this module (e.g. "
            f"{missing[:2]}); it was written with another LoRA rank/target_modules or another UNet."
        )


class TrainedStateCheckpoints:
    """A ``LightningModule`` mixin: checkpoints hold only what trains, and load safely.

    Frozen parts (VAE, text encoders, the base weights under LoRA, the quality head) are rebuilt
    from the config; a checkpoint holds the trainable weights and the parts' trained state.
    Mixed in before ``LightningModule``.
    """

    def trained_state_keys(self) -> set[str]:
        """Names in ``state_dict`` that a checkpoint must hold: trainable weights and part state."""
        # FSDP's auto-wrap adds `_fsdp_wrapped_module.` to parameter names, not to state-dict keys
        from torch.distributed.fsdp._common_utils import clean_tensor_name

        trainable = {clean_tensor_name(n) for n, p in self.named_parameters() if p.requires_grad}
        return trainable | set(LEGACY_STATE_NAMES.values())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what trains; frozen parts are rebuilt from the config on load."""
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Read older checkpoints' names; refuse one that lacks trainable weights."""
        optional = set(LEGACY_STATE_NAMES.values())
        restore_trained_state(checkpoint["state_dict"], self.trained_state_keys(), optional)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, always with ``weights_only=True``.

        Our checkpoints hold no model parts: pass them (``unet=..., quality_head=..., ...``) as
        keyword arguments. ``weights_only=False`` is refused: nothing from a file is unpickled.
        """
        if weights_only is False:
            raise ValueError(
                "load_from_checkpoint never unpickles Python objects (weights_only=False "
                "was asked); drop the argument, our checkpoints hold tensors only."
            )
        with warnings.catch_warnings():
            # Lightning lists every frozen weight (one line of ~20,000 characters at SD size);
            # they are left out on purpose, and a missing trainable weight is refused by
            # on_load_checkpoint before this warning. Keys the module lacks are still reported.
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
            )
