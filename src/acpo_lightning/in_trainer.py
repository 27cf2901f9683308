"""What ``ACPOModule`` needs from the Trainer it runs in, checked where a user's own pipeline
would otherwise go wrong silently: the Trainer itself, the first image batch, the LR scheduler's
entry and reloads from a checkpoint (README, "From Python")."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from acpo_lightning.batch_format import check_pixel_values
from acpo_lightning.checkpoint_io import use_safe_checkpoint_io
from acpo_lightning.data.cache_checks import check_latent_cache
from acpo_lightning.data.size_checks import check_training_images
from acpo_lightning.objectives.mix import StepResult

#: how ``assemble()`` refuses a module built without its policy network or quality head
_MISSING_NETWORK_ERRORS = ("quality_head is required", "pass unet (the policy) or a denoiser")


def refuse_outside_trainer(module: Any) -> None:
    """Refuse a training step outside ``Trainer.fit`` (Lightning Fabric or a loop of one's own).

    The step's seeds come from the Trainer's global step, the non-finite guard and the constraint
    anchor's dual step run in its ``optimizer_step`` hook, ``gradient_checkpointing`` in ``setup``:
    without the Trainer none of them runs and nothing says so.

    Raises:
        RuntimeError: no Trainer is attached; the message says what would go wrong and the fix.
    """
    if module._trainer is None:
        where = "Lightning Fabric" if module._fabric is not None else "a loop without a Trainer"
        raise RuntimeError(
            f"ACPOModule.training_step was called from {where}; it trains under "
            "Trainer.fit only: without the Trainer global_step stays 0 (every step repeats "
            "its timesteps and noise), optimizer_step (the non-finite guard, the constraint "
            "anchor's update) and setup() (gradient_checkpointing, the quality-head probe) "
            "never run. Fix: pl.Trainer(...).fit(module, train_dataloaders=your_loader); "
            "acpo_lightning.in_trainer.step_result(module, batch, batch_idx, step) gives a "
            "step's loss outside it."
        )


def check_trainer_and_data(module: Any, trainer: Any) -> None:
    """At ``setup``: make the Trainer's checkpoints atomic and ``weights_only`` loaded, check a
    latent cache against the module's VAE and text encoders (installing its empty prompt) and
    the training images' size against the denoiser and the perceptual crop.

    Raises:
        ValueError: the data cannot train this module; the message names the value and the fix.
    """
    use_safe_checkpoint_io(trainer)
    datamodule = getattr(trainer, "datamodule", None)
    check_latent_cache(datamodule, module.vae, module.codec.moments_shape, module.denoiser)
    scale = module.codec.scale_factor
    check_training_images(datamodule, module.denoiser, scale, module.perceptual_crop)


def amp_scaler(module: Any) -> Any:
    """The Trainer's enabled AMP gradient scaler, or ``None``."""
    trainer = module._trainer
    scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
    return scaler if scaler is not None and scaler.is_enabled() else None


def reducers(module: Any) -> tuple[Callable | None, Callable | None]:
    """Sum and mean over the processes of a multi-process run (``None`` in a single one)."""
    trainer = module._trainer
    if trainer is None or trainer.world_size <= 1:
        return None, None
    strategy = trainer.strategy
    return (
        lambda t: strategy.reduce(t, reduce_op="sum"),
        lambda t: strategy.reduce(t, reduce_op="mean"),
    )


def check_first_batch(module: Any, stage: str, batch: Any) -> None:
    """Check the first image batch of ``stage`` once (dtype, range, layout; one clear line)
    against the VAE's input channels, or a pixel-space denoiser's; batches of cached latents or
    prompts only are skipped."""
    checked = module.__dict__.setdefault("_checked_stages", set())  # set on the first call
    pixels = batch.get("pixel_values") if isinstance(batch, dict) else None
    if stage in checked or pixels is None:
        return
    vae, config = module.vae, getattr(module.vae, "config", None)
    channels = getattr(config, "in_channels", 3) if vae is not None else None
    check_pixel_values(pixels, channels or module.denoiser.latent_shape()[0])
    checked.add(stage)


def step_result(module: Any, batch: dict, batch_idx: int, step: int) -> StepResult:
    """Training step ``step``'s objective on ``batch`` with that step's seeds: what
    ``ACPOModule.training_step`` computes, also without a Trainer (no logging, no non-finite guard
    and no anchor-weight update: for cost measurements and notebooks)."""
    host = module.host_generator("train", step, batch_idx)
    use_rollout = module.objectives.is_rollout_step(host)
    # the scored count and the rollout's scored step are drawn with a rank-free seed (the same
    # on every process); at rank 0 it equals the step generator's seed, as in a single process
    generator, choice = module.step_generators("train", step, batch_idx)
    context = module.context()
    return module.objectives.training_step(context, batch, generator, use_rollout, choice)


def lr_scheduler_entry(scheduler: Any) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` entry: per optimizer step; a ``ReduceLROnPlateau`` once per
    epoch (after validation) on the metric its ``monitor`` names (``lightning.pytorch.cli``'s).

    Raises:
        ValueError: a ``ReduceLROnPlateau`` without ``monitor``; the message gives the fix.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return {"scheduler": scheduler, "interval": "step"}
    monitor = getattr(scheduler, "monitor", None)
    if not monitor:
        raise ValueError(
            f"lr_scheduler built a {type(scheduler).__name__} without the metric it watches; "
            "ACPOModule passes Lightning the scheduler's own `monitor`. Fix: use "
            'lightning.pytorch.cli.ReduceLROnPlateau(optimizer, monitor="val/loss") (in YAML: '
            "class_path: lightning.pytorch.cli.ReduceLROnPlateau, init_args: {monitor: val/loss})."
        )
    return {"scheduler": scheduler, "monitor": monitor, "interval": "epoch"}


class ReloadWithNetworks:
    """A ``LightningModule`` mixin: ``load_from_checkpoint`` that says which networks to pass.

    Mixed in before :class:`~acpo_lightning.checkpoint_io.TrainedStateCheckpoints`.
    """

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """Rebuild a module from a checkpoint and the networks it was built with.

        A checkpoint holds the trained weights (the LoRA), the parts' trained state and the
        hyper-parameters, never a network: pass them as keyword arguments, as to the constructor
        (``unet=...``, ``quality_head=...``, ...).

        Raises:
            ValueError: no policy network or no quality head was passed (names both and the fix).
        """
        try:
            with warnings.catch_warnings():
                # a checkpoint written by the CLI is rebuilt through Lightning's instantiate_module,
                # which calls jsonargparse's deprecated instantiate_classes (Lightning 2.6,
                # jsonargparse >= 4.49): their notice about their code, which no argument avoids
                for message in ("By default only one JsonargparseDeprecationWarning",
                                "``instantiate_classes``"):  # fmt: skip
                    warnings.filterwarnings(
                        "ignore", message=rf"\s*{message}", category=DeprecationWarning
                    )
                return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        except ValueError as error:  # the file is read first: a file that is not one says so
            missing = [name for name in ("unet", "quality_head") if kwargs.get(name) is None]
            if "unet" in missing and kwargs.get("denoiser") is not None:
                missing.remove("unet")
            if not missing or not str(error).startswith(_MISSING_NETWORK_ERRORS):
                raise
            raise ValueError(
                f"ACPOModule.load_from_checkpoint({str(checkpoint_path)!r}) got no "
                f"{' and no '.join(missing)}: a checkpoint holds the trained LoRA, the trained "
                "state and the hyper-parameters, never the networks. Fix: pass the networks the "
                "module was built with, e.g. load_from_checkpoint(path, unet=add_lora(load_unet("
                "sd), rank=16), quality_head=..., noise_scheduler=..., vae=..., text_encoder=..., "
                'tokenizer=...) (README, "From Python").'
            ) from None
