"""Whether the training images fit the model: latent sides its network can take, and room for the
perceptual crop. Checked at ``fit`` set-up, so that a bad size is one message before the first
step rather than a failed reshape or a random draw from an empty range inside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acpo_lightning.crops import PerceptualCrop
    from acpo_lightning.denoisers import Denoiser


def training_image_size(datamodule: Any) -> tuple[int, str] | None:
    """The side of the square training images of one of this package's DataModules, and the
    setting that gives it; ``None`` for another DataModule or one without images.

    A latent cache is not read here: its moments must already have the model's latent shape
    (:func:`~acpo_lightning.data.cache_checks.check_latent_cache`).
    """
    from acpo_lightning.data.datamodule import PromptImageDataModule
    from acpo_lightning.data.synthetic import ShapesDataModule

    if isinstance(datamodule, ShapesDataModule):
        return int(datamodule.hparams["image_size"]), "data.init_args.image_size"
    if isinstance(datamodule, PromptImageDataModule):
        table = datamodule.table
        if table is None or not table.has_images:
            return None  # prompt-only data: the images are the model's own samples
        return int(datamodule.train_transform.resolution), "data.init_args.resolution"
    return None


def check_training_images(
    datamodule: Any, denoiser: Denoiser, scale_factor: int, crop: PerceptualCrop | None
) -> None:
    """Refuse training images whose latents the denoiser cannot take, or smaller than the crop.

    Args:
        datamodule: the run's DataModule (others than this package's pass).
        denoiser: its :meth:`~acpo_lightning.denoisers.Denoiser.latent_side_multiple` is checked.
        scale_factor: image side over latent side (1 for a pixel-space model).
        crop: the module's ``perceptual_crop``, or ``None``.

    Raises:
        ValueError: naming the image side, the setting that gives it, and the sizes that work.
    """
    found = training_image_size(datamodule)
    if found is None:
        return
    side, setting = found
    multiple, why = denoiser.latent_side_multiple()
    step = multiple * scale_factor
    if multiple > 1 and side % step:
        lower = side // step * step
        options = " or ".join(str(value) for value in (lower, lower + step) if value > 0)
        raise ValueError(
            f"the training images are {side}x{side} px, but {why}: an image side must be a "
            f"multiple of {multiple} latents x the VAE's scale factor {scale_factor} = {step} px. "
            f"Fix: set {setting} {options}."
        )
    if crop is not None and crop.size > side:
        fit = side // scale_factor * scale_factor
        smaller = f"perceptual_crop: {fit}, " if fit > 0 else ""
        raise ValueError(
            f"perceptual_crop size={crop.size} is larger than the training images ({side}x{side} "
            f"px, {setting} {side}): each scored image gives a crop of that size. Fix: set "
            f"{smaller}train on images of at least {crop.size} px ({setting}), or set "
            "perceptual_crop: null (score whole images)."
        )
