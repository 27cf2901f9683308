"""Factories that load pretrained parts; usable as YAML ``class_path`` targets.

Each takes a hub id or a local directory. With no network (``HF_HUB_OFFLINE=1`` or
``local_files_only=True``) only the local cache or directory is read. When the weights cannot be
found, one :class:`ModelNotFoundError` says which model, where it was looked for, and how to
provide it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import SchedulerMixin
from torch import nn
from transformers import PreTrainedTokenizerBase

T = TypeVar("T")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelNotFoundError(OSError):
    """Pretrained weights or configs could not be found where they were looked for."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turn ``"bfloat16"``/``"bf16"``/``torch.bfloat16``/``None`` into a ``torch.dtype`` or ``None``.

    Raises:
        ValueError: the name is not a known floating dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off by ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):  # pragma: no cover - very old huggingface_hub
        return os.path.expanduser("~/.cache/huggingface/hub")


def missing_weights_message(
    what: str, name_or_path: str, subfolder: str | None, cause: BaseException
) -> str:
    """Build the user-facing explanation for weights that could not be loaded."""
    where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
    if Path(name_or_path).exists():
        looked = f"the local directory {Path(name_or_path).resolve()}"
        fix = (
            f"check that it holds {subfolder + '/' if subfolder else ''}config.json and the weights "
            "(diffusion_pytorch_model.safetensors or model.safetensors)"
        )
    elif _looks_like_a_path(name_or_path):
        looked = f"the local directory {Path(name_or_path).expanduser()}, which does not exist"
        fix = "check the path, or pass a Hugging Face hub id (namespace/name) to load from the hub or its cache"
    else:
        offline = " (HF_HUB_OFFLINE is set, so only the cache was read)" if hub_offline() else ""
        looked = f"the Hugging Face cache {_cache_dir()}{offline}"
        fix = (
            f"on a machine with network run `hf download {name_or_path}` (moves with HF_HOME), or "
            "download the repository and pass its local directory as pretrained_model_name_or_path"
        )
    return f"could not load the {what} '{where}' from {looked}: {cause}. Fix: {fix}."


def _looks_like_a_path(name_or_path: str) -> bool:
    """A hub id is ``name`` or ``namespace/name``; anything else can only be a local path."""
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
    )


def load_pretrained(
    loader: Callable[..., T], what: str, name_or_path: str, subfolder: str | None, **kwargs: Any
) -> T:
    """Call ``loader(name_or_path, subfolder=..., **kwargs)``, turning "not found" into one clear error.

    Raises:
        ModelNotFoundError: the files are not in the local directory or cache.
    """
    if hub_offline():
        kwargs["local_files_only"] = True
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError, pickle.UnpicklingError) as error:  # missing files: both kinds
        text = str(error)
        refusal = _refused_pickle(error)
        if refusal is not None:
            from acpo_lightning.checkpoint_io import refusal_reason

            raise ValueError(
                f"{what} weights at {name_or_path}{f' (subfolder {subfolder})' if subfolder else ''} "
                "hold pickled Python objects that a weights_only load refuses "
                f"({refusal_reason(refusal)}); nothing in them was run. Fix: use the model's .safetensors weights (or convert the .bin in an "
                "environment you trust)."
            ) from error
        if (
            isinstance(error, ValueError)
            and "local_files_only" not in text
            and "connect" not in text.lower()
            and type(error).__name__ != "HFValidationError"  # a local path that does not exist
        ):
            raise
        raise ModelNotFoundError(
            missing_weights_message(what, name_or_path, subfolder, error)
        ) from error


def _refused_pickle(error: BaseException) -> pickle.UnpicklingError | None:
    """torch's weights_only refusal in ``error``'s cause/context chain, if there is one."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def load_unet(
    pretrained_model_name_or_path: str,
    subfolder: str | None = "unet",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: str | None = None,
    local_files_only: bool | None = None,
    model_class: str | None = None,
) -> nn.Module:
    """Load a diffusers UNet (``UNet2DConditionModel``, ``UNet2DModel``, ...) by its config's class.

    Args:
        pretrained_model_name_or_path: hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or directory.
        subfolder: folder of the UNet inside the repository (``None`` when it is at the root).
        revision: git revision on the hub.
        variant: weight variant such as ``fp16``.
        torch_dtype: dtype of the frozen base weights (``bfloat16`` halves memory).
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        model_class: diffusers class name; by default read from the config's ``_class_name``.

    Returns:
        The UNet, on the CPU.

    Raises:
        ModelNotFoundError: weights or config missing.
    """
    import diffusers

    kwargs = dict(revision=revision, variant=variant, local_files_only=local_files_only)
    if model_class is None:
        config = load_pretrained(
            diffusers.UNet2DConditionModel.load_config,
            "UNet config",
            pretrained_model_name_or_path,
            subfolder,
            **kwargs,
        )
        model_class = config.get("_class_name", "UNet2DConditionModel")
    cls = getattr(diffusers, model_class, None)
    if cls is None:
        raise ValueError(
            f"model_class {model_class!r} is not a diffusers class; e.g. UNet2DConditionModel"
        )
    return load_pretrained(
        cls.from_pretrained,
        "UNet",
        pretrained_model_name_or_path,
        subfolder,
        torch_dtype=resolve_dtype(torch_dtype),
        **kwargs,
    )


def load_transformer(
    pretrained_model_name_or_path: str,
    subfolder: str | None = "transformer",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: str | None = None,
    local_files_only: bool | None = None,
    model_class: str | None = None,
) -> nn.Module:
    """Load a diffusion transformer (``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...).

    Like :func:`load_unet` (the class from the config's ``_class_name``), from the ``transformer``
    folder of a pipeline.

    Raises:
        ModelNotFoundError: weights or config missing.
    """
    return load_unet(
        pretrained_model_name_or_path, subfolder, revision, variant, torch_dtype,
        local_files_only, model_class,
    )  # fmt: skip


def load_vae(
    pretrained_model_name_or_path: str,
    subfolder: str | None = "vae",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: str | None = None,
    local_files_only: bool | None = None,
    model_class: str = "AutoencoderKL",
) -> nn.Module:
    """Load a diffusers autoencoder (arguments as in :func:`load_unet`).

    ``model_class`` picks the diffusers class: ``AutoencoderKL`` (Stable Diffusion's VAE) or
    ``AutoencoderTiny`` (TAESD, e.g. ``madebyollin/taesd`` with ``subfolder: null``, a cheap
    decoder for ``ACPOModule(perceptual_decoder=...)``).

    Raises:
        ModelNotFoundError: weights or config missing.
        ValueError: ``model_class`` is not a diffusers autoencoder class.
    """
    import diffusers

    cls = getattr(diffusers, model_class, None)
    if cls is None or not model_class.startswith("Autoencoder"):
        raise ValueError(
            f"model_class={model_class!r} is not a diffusers autoencoder; use AutoencoderKL or "
            "AutoencoderTiny."
        )
    return load_pretrained(
        cls.from_pretrained,
        "VAE",
        pretrained_model_name_or_path,
        subfolder,
        revision=revision,
        variant=variant,
        torch_dtype=resolve_dtype(torch_dtype),
        local_files_only=local_files_only,
    )


def load_text_encoder(
    pretrained_model_name_or_path: str,
    subfolder: str | None = "text_encoder",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: str | None = None,
    local_files_only: bool | None = None,
    model_class: str | None = None,
) -> nn.Module:
    """Load a transformers text encoder (CLIP, BERT/MiniLM, T5 encoder).

    The class is ``model_class``, else the config's ``architectures`` entry (SDXL's second encoder
    is ``CLIPTextModelWithProjection``, SD3's and FLUX's T5 ``T5EncoderModel``), else
    ``CLIPTextModel`` for CLIP configs and ``AutoModel`` otherwise.

    Raises:
        ModelNotFoundError: weights or config missing.
        ValueError: ``model_class`` is not a transformers class.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, CLIPTextModel

    kwargs = dict(revision=revision, local_files_only=local_files_only)
    config = load_pretrained(
        AutoConfig.from_pretrained,
        "text encoder config",
        pretrained_model_name_or_path,
        subfolder,
        **kwargs,
    )
    # A full CLIP config loads as CLIPModel via AutoModel; the text tower alone is what we want.
    loader = (
        CLIPTextModel.from_pretrained
        if config.model_type in {"clip", "clip_text_model"}
        else AutoModel.from_pretrained
    )
    named = model_class or next(iter(getattr(config, "architectures", None) or []), None)
    if named is not None and named != "CLIPModel":
        cls = getattr(transformers, named, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(
                f"model_class {named!r} is not a transformers model class; e.g. CLIPTextModel, "
                "CLIPTextModelWithProjection or T5EncoderModel."
            )
        loader = cls.from_pretrained
    return load_pretrained(
        loader,
        "text encoder",
        pretrained_model_name_or_path,
        subfolder,
        variant=variant,
        dtype=resolve_dtype(torch_dtype),
        **kwargs,
    )


def load_tokenizer(
    pretrained_model_name_or_path: str,
    subfolder: str | None = "tokenizer",
    revision: str | None = None,
    local_files_only: bool | None = None,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerBase:
    """Load a transformers tokenizer with ``AutoTokenizer``.

    Raises:
        ModelNotFoundError: tokenizer files missing.
    """
    from transformers import AutoTokenizer

    return load_pretrained(
        AutoTokenizer.from_pretrained,
        "tokenizer",
        pretrained_model_name_or_path,
        subfolder,
        revision=revision,
        local_files_only=local_files_only,
        model_max_length=model_max_length,
    )


def load_scheduler(
    pretrained_model_name_or_path: str,
    subfolder: str | None = "scheduler",
    scheduler_class: str = "DDPMScheduler",
    revision: str | None = None,
    local_files_only: bool | None = None,
    prediction_type: str | None = None,
) -> SchedulerMixin:
    """Load a diffusers noise scheduler's config into ``scheduler_class`` (DDPM for training).

    Args:
        pretrained_model_name_or_path: hub id or directory.
        subfolder: folder of ``scheduler_config.json``.
        scheduler_class: diffusers scheduler class to build from that config.
        revision: git revision on the hub.
        local_files_only: never touch the network.
        prediction_type: override the config's prediction type (``epsilon``, ``v_prediction``, ``sample``).

    Raises:
        ModelNotFoundError: the config is missing.
        ValueError: ``scheduler_class`` is not a diffusers scheduler.
    """
    import diffusers

    cls = getattr(diffusers, scheduler_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(
            f"scheduler_class {scheduler_class!r} is not a diffusers scheduler; e.g. DDPMScheduler"
        )
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    return load_pretrained(
        cls.from_pretrained,
        "scheduler",
        pretrained_model_name_or_path,
        subfolder,
        revision=revision,
        local_files_only=local_files_only,
        **overrides,
    )
