"""LoRA adapters over peft: add them, toggle them (the default anchor), save and load them.

The adapter is described by one ``peft.LoraConfig``. Disabling it (not copying the UNet) gives the
frozen base model back for free, which is how ACPO's anchor costs no extra weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from acpo_lightning.quiet_imports import quiet_imports

with quiet_imports():  # peft imports bitsandbytes: see quiet_imports
    from peft import (
        LoraConfig,
        get_peft_model_state_dict,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )
    from peft.tuners.tuners_utils import BaseTunerLayer

#: Attention projections of diffusers' UNets (self- and cross-attention), the usual SD LoRA targets.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
#: Attention projections of the joint-attention transformers (SD3, FLUX): the image stream's and
#: the text stream's (``add_*_proj``, ``to_add_out``), as diffusers' SD3 and FLUX LoRA scripts target.
JOINT_ATTENTION_PROJECTIONS = (
    *ATTENTION_PROJECTIONS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: Safetensors metadata key under which diffusers stores the adapter's ``LoraConfig``.
LORA_METADATA_KEY = "lora_adapter_metadata"


def add_lora(
    unet: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    dropout: float = 0.0,
    init_lora_weights: bool | str = True,
    adapter_name: str = "default",
) -> nn.Module:
    """Freeze ``unet`` and add trainable LoRA adapters to it (in place); returns the same module.

    LoRA weights are created in fp32 even when the base weights are bf16/fp16, so that mixed
    precision keeps the trainable part at full precision.

    Args:
        unet: a diffusers UNet (``UNet2DConditionModel``, ``UNet2DModel``) or any ``nn.Module``.
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (``scale = alpha / rank``); defaults to ``rank`` (scale 1).
        target_modules: names (suffixes) of the linear/conv layers to adapt.
        dropout: dropout on the LoRA branch.
        init_lora_weights: peft's init; ``True`` makes the adapter a no-op at start (B = 0), ``False``
            random (for tests where the adapter must change outputs), or a peft scheme such as ``"gaussian"``.
        adapter_name: peft adapter name.

    Returns:
        ``unet`` with adapters; only LoRA parameters require gradients.

    Raises:
        ValueError: ``rank < 1`` or no module matches ``target_modules``.

    Example:
        >>> from acpo_lightning.testing import tiny_unet
        >>> unet = add_lora(tiny_unet(), rank=4)
        >>> all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
        True
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
    )
    try:
        if hasattr(unet, "add_adapter") and hasattr(unet, "disable_adapters"):
            unet.add_adapter(config, adapter_name=adapter_name)  # diffusers' PeftAdapterMixin
        else:
            inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    except ValueError as error:
        raise ValueError(
            f"could not add LoRA to {type(unet).__name__} with target_modules={list(target_modules)}: "
            f"{error}. Pick names of its nn.Linear/nn.Conv2d layers (e.g. {ATTENTION_PROJECTIONS})."
        ) from error
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    return unet


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` contains peft adapter layers."""
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every peft adapter layer of ``model`` is bypassed inside the block.

    Layers that were already disabled stay so on exit, and so does every adapter weight's
    ``requires_grad`` (peft's ``enable_adapters(True)`` sets it on all of them, which would
    unfreeze weights the user froze). Works for any module peft injected into.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [layer.disable_adapters for layer in layers]
    trainable = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)
        for param, requires_grad in trainable.items():
            param.requires_grad_(requires_grad)


def to_file_layout(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """peft LoRA keys (adapter name removed) in the layout of diffusers' ``save_lora_weights``.

    UNets (``prefix`` ``unet``) get diffusers' names, ``<module>.lora.down.weight`` /
    ``<module>.lora.up.weight``, for *every* module (attention, convolutions, projections): the
    names its SD and SDXL training scripts save for the attention projections they adapt.
    Transformers (``transformer``: SD3, FLUX) keep peft's ``lora_A`` / ``lora_B``, as its SD3
    and FLUX scripts save them. Either way the keys carry the ``prefix``.

    One layout for all keys matters: diffusers' loader (``loaders/peft.py``
    ``load_lora_adapter``) looks at the first key only and converts the whole file from
    ``lora.down`` names only if that key has no ``lora_A``, so the keys of a mixed file that
    sort after the first one in the other layout match no module and are dropped silently.

    Raises:
        ValueError: a UNet key that diffusers' conversion would not map back to itself.
    """
    if prefix == "unet":
        state = {_diffusers_unet_key(k): v for k, v in state.items()}
    return {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def _diffusers_unet_key(key: str) -> str:
    """``<module>.lora_A.<rest>`` as ``<module>.lora.down.<rest>`` (``lora_B``: ``lora.up``);
    checked against ``convert_unet_state_dict_to_peft``, the inverse diffusers' loader applies."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    renamed = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
    if list(convert_unet_state_dict_to_peft({renamed: None})) != [key]:
        raise ValueError(
            f"the LoRA key {key!r} has no diffusers name that its loader maps back to it; "
            "export this adapter with peft's save_pretrained instead."
        )
    return renamed


def lora_state_dict(model: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """LoRA weights of ``model`` in diffusers' file layout (``unet.<module>.lora.down.weight``,
    ``transformer.<module>.lora_A.weight`` ...); ``prefix`` names the pipeline component."""
    return to_file_layout(get_peft_model_state_dict(model), prefix)


def save_lora(model: nn.Module, directory: str | Path, prefix: str = "unet") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that diffusers' ``load_lora_weights`` reads.

    ``prefix`` is the pipeline component the adapter belongs to: ``unet`` (SD-1.x, SDXL) or
    ``transformer`` (SD3, FLUX).

    Returns:
        Path of the written file.

    Raises:
        ValueError: ``model`` has no LoRA adapter.
    """
    if not has_lora(model):
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapter to save; add one with add_lora()."
        )
    configs = getattr(model, "peft_config", None) or {}
    config = next(iter(configs.values())) if len(configs) == 1 else None
    return write_lora_file(lora_state_dict(model, prefix), directory, config, prefix)


def write_lora_file(
    state: dict[str, torch.Tensor],
    directory: str | Path,
    config: LoraConfig | None = None,
    prefix: str = "unet",
) -> Path:
    """Write ``state`` (diffusers layout, ``prefix``-ed) as ``directory/pytorch_lora_weights.safetensors``.

    With ``config``, the adapter's ``LoraConfig`` goes into the file's metadata as diffusers'
    ``save_lora_weights`` writes it, so that ``load_lora_weights`` uses its ``lora_alpha`` (without
    it, diffusers assumes ``alpha == rank``).
    """
    from safetensors.torch import save

    from acpo_lightning.checkpoint_io import write_atomically

    metadata = {"format": "pt"}
    if config is not None:
        packed = {
            f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v
            for k, v in config.to_dict().items()
        }
        metadata[LORA_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True, default=str)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LORA_WEIGHT_NAME
    try:  # atomic: a failed write never leaves a half file under the real name
        data = save(state, metadata=metadata)
        write_atomically(path, lambda handle: handle.write(data))
    except Exception as error:
        previous = "the previous export there is intact" if path.exists() else "no file was left"
        raise OSError(
            f"could not write LoRA weights {path}: {error}; {previous}. Fix: free disk space or "
            "choose another output folder"
        ) from error
    return path


def load_lora(model: nn.Module, path: str | Path, prefix: str = "unet") -> nn.Module:
    """Load LoRA weights written by :func:`save_lora` (or diffusers) into ``model``'s adapter.

    Args:
        model: a model that already has an adapter of matching shape (see :func:`add_lora`).
        path: the ``.safetensors`` file or the directory holding ``pytorch_lora_weights.safetensors``.
        prefix: the pipeline component the file's keys start with (``unet`` or ``transformer``).

    Raises:
        FileNotFoundError: no weight file at ``path``.
        ValueError: the file is not safetensors, or its modules are not exactly the adapter's (a
            module missing from the file, or one the model has no adapter on); nothing is loaded.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no LoRA weights at {path}; expected a {LORA_WEIGHT_NAME} written by save_lora"
        )
    try:
        raw = load_file(str(path))
    except (
        Exception
    ) as error:  # safetensors raises its own SafetensorError for non-safetensors bytes
        raise ValueError(
            f"{path} is not a safetensors file ({error}); LoRA weights are read from safetensors "
            f"only (never unpickled). Export with save_lora / `acpo export`, or convert the file "
            "in an environment you trust."
        ) from error
    state = {k.removeprefix(f"{prefix}."): v for k, v in raw.items()}
    state = convert_unet_state_dict_to_peft(state)  # either layout, key by key
    check_lora_coverage(set(get_peft_model_state_dict(model)), set(state), path)
    set_peft_model_state_dict(model, state)
    return model


def check_lora_coverage(expected: set[str], found: set[str], path: str | Path) -> None:
    """Refuse a LoRA file whose modules are not exactly the adapter's (peft key names).

    A partial file would leave the other modules' adapter weights as they were (random or zero)
    without a word; a file with modules the model lacks was trained with other targets.

    Raises:
        ValueError: naming the missing and the unknown modules.
    """
    missing, unknown = _modules(expected - found), _modules(found - expected)
    if not missing and not unknown:
        return
    parts = []
    if missing:
        parts.append(f"it has no weights for {len(missing)} adapted module(s) {_listed(missing)}")
    if unknown:
        parts.append(
            f"it has weights for {len(unknown)} module(s) without adapter {_listed(unknown)}"
        )
    raise ValueError(
        f"LoRA file {path} does not match the model's adapter: {'; '.join(parts)}. Build the "
        "adapter with the rank and target_modules the file was trained with (add_lora), or "
        "export the whole adapter again."
    )


def _modules(keys: set[str]) -> list[str]:
    return sorted({k.split(".lora_")[0] for k in keys})


def _listed(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
