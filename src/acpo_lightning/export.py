"""``acpo export``: a Lightning checkpoint's LoRA as ``pytorch_lora_weights.safetensors`` for diffusers,
or (``--format comfyui``) as ``lora_comfyui.safetensors`` for ComfyUI (see :mod:`acpo_lightning.comfyui`).

The checkpoint is read with ``torch.load(weights_only=True)`` (through
:class:`~acpo_lightning.checkpoint_io.SafeCheckpointIO`, so a file holding pickled Python objects
is refused, not executed); no model is built and no base weights are needed. The LoRA settings the file's metadata needs (rank, alpha, target modules) come
from the training config: the ``config.yaml`` that ``acpo fit`` saves next to the checkpoints (or
one folder up, in Lightning's default layout), or the files given with ``--config``.

    acpo export --ckpt outputs/acpo/checkpoints/last.ckpt --out outputs/acpo/lora
    acpo export --ckpt outputs/acpo/checkpoints/last.ckpt --out outputs/acpo/lora --format comfyui
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import yaml

from acpo_lightning.checkpoint_io import SafeCheckpointIO
from acpo_lightning.comfyui import (
    COMFYUI_WEIGHT_NAME,
    comfyui_lora_state_dict,
    comfyui_metadata,
    guess_base_model,
)
from acpo_lightning.models.lora import LORA_WEIGHT_NAME, add_lora, to_file_layout, write_lora_file

if TYPE_CHECKING:
    from argparse import ArgumentParser

_LORA_KEY = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)\.([^.]+)\.")
CONFIG_NAME = "config.yaml"
#: ``acpo export --format``: diffusers' ``pytorch_lora_weights.safetensors`` or ComfyUI's kohya layout.
EXPORT_FORMATS = ("diffusers", "comfyui")


def trained_network_name(state_dict: dict[str, torch.Tensor]) -> str:
    """The network that holds the LoRA weights: ``unet`` or ``transformer`` (the first key part).

    Raises:
        ValueError: no LoRA weights, or LoRA weights in several networks.
    """
    names = {k.split(".", 1)[0] for k in state_dict if ".lora_" in k}
    if not names:
        raise ValueError(
            f"the checkpoint holds no LoRA weights (keys e.g. {sorted(state_dict)[:3]}); it comes "
            "from full fine-tuning, and has no adapter to export."
        )
    if len(names) != 1:
        raise ValueError(f"expected LoRA weights in one network, found them in {sorted(names)}.")
    return names.pop()


def peft_lora_weights(
    state_dict: dict[str, torch.Tensor], module: str = "unet"
) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``module`` in a LightningModule state dict, with peft's names
    (``<module path>.lora_A.weight``; prefix and adapter name removed).

    Raises:
        ValueError: no LoRA weights under ``module.``, or several adapters.
    """
    prefix = f"{module}."
    lora = {
        k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix) and ".lora_" in k
    }
    if not lora:
        raise ValueError(
            f"the checkpoint holds no LoRA weights under '{prefix}' (keys e.g. {sorted(state_dict)[:3]}); "
            "it comes from full fine-tuning or another module, and has no adapter to export."
        )
    adapters = {m.group(1) for k in lora if (m := _LORA_KEY.search(k))}
    if len(adapters) != 1:
        raise ValueError(f"expected one LoRA adapter in the checkpoint, found {sorted(adapters)}.")
    adapter = adapters.pop()
    return {k.replace(f".{adapter}.", "."): v for k, v in lora.items()}


def lora_weights_from_checkpoint(
    state_dict: dict[str, torch.Tensor], module: str = "unet"
) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``module`` in a LightningModule state dict, in diffusers' file layout.

    Produces exactly what :func:`acpo_lightning.models.lora_state_dict` gives for the live module.

    Raises:
        ValueError: no LoRA weights under ``module.``, or several adapters.
    """
    return to_file_layout(peft_lora_weights(state_dict, module), module)


def find_training_config(ckpt_path: Path) -> Path | None:
    """``config.yaml`` next to the checkpoint, or one folder up (Lightning's default layout)."""
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    return None


def lora_settings(configs: Sequence[Path], network: str = "unet") -> dict[str, Any]:
    """``add_lora``'s arguments from the training config(s), later files overriding earlier ones.

    The adapted network is ``model.<network>``, or ``model.denoiser.init_args.<network>`` when the
    config injects a denoiser (SDXL, SD3, FLUX).

    Raises:
        ValueError: that network is not ``acpo_lightning.models.add_lora``.
    """
    merged: dict[str, Any] = {}
    for path in configs:
        merged = _merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    model = merged.get("model") or {}
    model = model.get("init_args", model) if "class_path" in model else model
    where = f"model.{network}"
    unet = model.get(network) or {}
    denoiser = model.get("denoiser") or {}
    if not unet and isinstance(denoiser, dict):
        where = f"model.denoiser.init_args.{network}"
        unet = (denoiser.get("init_args") or {}).get(network) or {}
    if not str(unet.get("class_path", "")).endswith("add_lora"):
        raise ValueError(
            f"{where} in {[str(p) for p in configs]} is {unet.get('class_path')!r}, not "
            "acpo_lightning.models.add_lora; only a LoRA-adapted network can be exported."
        )
    defaults = {
        name: p.default
        for name, p in inspect.signature(add_lora).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    args = unet.get("init_args") or {}
    return {**defaults, **{k: v for k, v in args.items() if k not in ("unet", network)}}


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    configs: Sequence[str | Path] = (),
    lora_format: str = "diffusers",
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint's LoRA to ``out``: diffusers' or ComfyUI's file.

    Args:
        ckpt: a Lightning checkpoint of an ``ACPOModule`` with a LoRA UNet or transformer.
        out: output folder (created).
        configs: the training config file(s); default: the saved ``config.yaml`` found beside ``ckpt``.
        lora_format: ``diffusers`` (``pytorch_lora_weights.safetensors``, read by
            ``load_lora_weights``) or ``comfyui`` (``lora_comfyui.safetensors`` in the kohya
            layout of :mod:`acpo_lightning.comfyui`, read by ComfyUI's LoRA loader).
        overwrite: replace that file when ``out`` already holds one (``acpo export --overwrite``).

    Returns:
        The written file.

    Raises:
        FileNotFoundError: no checkpoint, or no config found and none given.
        FileExistsError: ``out`` already holds this format's file and ``overwrite`` is not set.
        UnsafeCheckpointError: the checkpoint is truncated or holds pickled Python objects.
        ValueError: an unknown ``lora_format``, no LoRA in the checkpoint, a rank that disagrees
            with the config, or (``comfyui``) a module ComfyUI does not map.
    """
    if lora_format not in EXPORT_FORMATS:
        raise ValueError(
            f"unknown export format {lora_format!r}; choose one of {', '.join(EXPORT_FORMATS)}."
        )
    _check_out(Path(out), lora_format, overwrite)
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {ckpt}; pass the .ckpt file that `acpo fit` wrote."
        )
    checkpoint = SafeCheckpointIO().load_checkpoint(ckpt, map_location="cpu")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(
            f"{ckpt} has no state_dict, so it is not a Lightning checkpoint; pass the .ckpt file "
            "that `acpo fit` wrote."
        )
    paths = [Path(c) for c in configs] or [p for p in [find_training_config(ckpt)] if p]
    if not paths:
        raise FileNotFoundError(
            f"no {CONFIG_NAME} next to {ckpt} or in {ckpt.parent.parent}; pass the config(s) you trained "
            "with: --config configs/acpo.yaml [--config overlay.yaml]."
        )
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"config file(s) {missing} do not exist.")
    network = trained_network_name(checkpoint["state_dict"])
    weights = peft_lora_weights(checkpoint["state_dict"], network)
    settings = lora_settings(paths, network)
    rank = int(settings["rank"])
    ranks = {int(v.shape[0]) for k, v in weights.items() if k.endswith("lora_A.weight")}
    if ranks != {rank}:
        raise ValueError(
            f"the checkpoint's LoRA rank is {sorted(ranks)} but the config {[str(p) for p in paths]} says "
            f"rank: {rank}; pass the config the checkpoint was trained with."
        )
    alpha = settings.get("alpha") or rank
    if lora_format == "comfyui":
        return write_comfyui_file(weights, out, rank, alpha, network)
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(settings["target_modules"]),
        lora_dropout=float(settings.get("dropout") or 0.0),
        init_lora_weights=settings.get("init_lora_weights", True),
    )
    return write_lora_file(to_file_layout(weights, network), out, config, network)


def _check_out(out: Path, lora_format: str, overwrite: bool) -> None:
    """Refuse to replace an earlier export silently (as ``acpo cache-latents`` does)."""
    path = out / (COMFYUI_WEIGHT_NAME if lora_format == "comfyui" else LORA_WEIGHT_NAME)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already holds an exported LoRA. Fix: pass --overwrite to replace it, or "
            "choose another --out."
        )


def write_comfyui_file(
    weights: dict[str, torch.Tensor], out: str | Path, rank: int, alpha: float, network: str
) -> Path:
    """Write peft LoRA ``weights`` as ``out/lora_comfyui.safetensors`` in ComfyUI's kohya layout.

    The kohya metadata carries ``ss_base_model_version`` when the weights tell the backbone
    (:func:`~acpo_lightning.comfyui.guess_base_model`).

    Raises:
        ValueError: see :func:`~acpo_lightning.comfyui.comfyui_lora_state_dict`.
        OSError: the file cannot be written (a previous file there is left intact).
    """
    from safetensors.torch import save

    from acpo_lightning.checkpoint_io import write_atomically

    state = comfyui_lora_state_dict(weights, rank, alpha, network)
    metadata = comfyui_metadata(rank, alpha, guess_base_model(weights, network))
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / COMFYUI_WEIGHT_NAME
    try:  # atomic, as write_lora_file
        data = save(state, metadata=metadata)
        write_atomically(path, lambda handle: handle.write(data))
    except Exception as error:
        previous = "the previous export there is intact" if path.exists() else "no file was left"
        raise OSError(
            f"could not write the ComfyUI LoRA {path}: {error}; {previous}. Fix: free disk space "
            "or choose another output folder"
        ) from error
    return path


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            same_class = value.get("class_path", merged[key].get("class_path")) == merged[key].get(
                "class_path"
            )
            merged[key] = _merge(merged[key], value) if same_class else value
        else:
            merged[key] = value
    return merged


def add_export_arguments(parser: ArgumentParser) -> None:
    """The options of ``acpo export --ckpt CKPT --out DIR [--config FILE ...] [--format F]``
    (``acpo_lightning.cli``)."""
    parser.add_argument(
        "--ckpt", type=str, required=True, help="Lightning checkpoint written by `acpo fit`."
    )
    parser.add_argument("--out", type=str, required=True, help="output folder")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="training config (repeatable, later files override); default: the config.yaml saved "
        "next to the checkpoint or one folder up",
    )
    parser.add_argument(
        "--format",
        type=Literal[EXPORT_FORMATS],  # jsonargparse's help shows a Literal (choices= a lambda)
        default="diffusers",
        help=f"file layout, one of {', '.join(EXPORT_FORMATS)}: diffusers writes "
        "pytorch_lora_weights.safetensors for load_lora_weights; comfyui writes "
        f"{COMFYUI_WEIGHT_NAME} (kohya keys) for ComfyUI's LoRA loader",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an export of this format in --out"
    )


def export_command(
    ckpt: str,
    out: str,
    configs: Sequence[str] = (),
    lora_format: str = "diffusers",
    overwrite: bool = False,
) -> Path:
    """``acpo export``: :func:`export_checkpoint`, then print the written file."""
    path = export_checkpoint(ckpt, out, configs, lora_format, overwrite)
    print(f"wrote {path}")
    return path
