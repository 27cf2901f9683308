"""A peft LoRA in the kohya key layout that ComfyUI's LoRA loader reads (``acpo export --format comfyui``).

ComfyUI does not read peft's own keys (``<module>.lora_A.default.weight``), which is why LoRAs
saved by peft fail to load there. What it reads, and where that is written down:

* **Key names.** ComfyUI's ``comfy/lora.py`` ``model_lora_keys_unet`` builds the table from LoRA
  key prefixes to model weights. For UNets (SD1.x, SD2.x, SDXL) it walks
  ``comfy.utils.unet_to_diffusers`` and maps ``"lora_unet_{}".format(k[:-len(".weight")]
  .replace(".", "_"))`` for every diffusers weight name ``k``. For FLUX (``isinstance(model,
  comfy.model_base.Flux)``, over ``comfy.utils.flux_to_diffusers``) and SD3 (``comfy.model_base.SD3``,
  over ``comfy.utils.mmdit_to_diffusers``) it maps ``"lora_transformer_{}"`` of the diffusers
  name with dots made underscores (commented ``#onetrainer`` / ``#OneTrainer lora``), beside the
  diffusers form ``transformer.<name>``. We write ``lora_unet_`` for UNets and
  ``lora_transformer_`` for transformers: one kohya-style rule for all backbones. The prefix
  ``lora_unet`` is also kohya sd-scripts' ``LORA_PREFIX_UNET`` (``networks/lora.py``), whose
  ``LoRAModule`` names a module ``lora_unet_<path with "." -> "_">``.
* **Tensors.** ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load`` reads
  ``{prefix}.lora_up.weight`` and ``{prefix}.lora_down.weight`` (its "regular_lora" form, the one
  kohya's ``LoRAModule`` saves as ``lora_up`` / ``lora_down`` submodules); ``comfy/lora.py``
  ``load_lora`` reads ``{prefix}.alpha`` with ``.item()``; ``LoRAAdapter.calculate_weight`` adds
  ``strength * (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))`` reshaped to the
  weight, and uses a scale of 1 when there is no ``.alpha``. kohya registers ``alpha`` as a
  scalar buffer (``register_buffer("alpha", torch.tensor(alpha))``). So every module gets
  ``.alpha`` = peft's ``lora_alpha``: ComfyUI's ``alpha / rank`` is then peft's scaling. A conv
  LoRA keeps its 4-D weights (down ``r x in x kh x kw``, up ``out x r x 1 x 1``), as kohya's.
* **Which modules.** ComfyUI maps only the diffusers names its ``*_to_diffusers`` tables list
  (``UNET_MAP_ATTENTIONS``, ``TRANSFORMER_BLOCKS``, ``UNET_MAP_RESNET``, ``UNET_MAP_BASIC``;
  ``flux_to_diffusers``' block maps; ``MMDIT_MAP_BLOCK`` / ``MMDIT_MAP_BASIC``); a key outside them
  is logged as "lora key not loaded" and ignored. :data:`COMFYUI_MODULES` restates those tables,
  and a module outside them is refused here instead. SD3.5-Medium's second image attention
  (``attn2``) is in ``mmdit_to_diffusers``: ``attn2.to_q`` / ``to_k`` / ``to_v`` patch slices of
  ``x_block.attn2.qkv`` (as ``attn.to_q`` ... patch ``x_block.attn.qkv``) and ``attn2.to_out.0``
  patches ``x_block.attn2.proj``, so it is exported like ``attn``.
* **Metadata.** kohya's ``train_network.py`` writes ``ss_network_module`` (``networks.lora``),
  ``ss_network_dim``, ``ss_network_alpha`` and ``ss_base_model_version`` as strings; the version
  strings are kohya's ``get_model_version_str_for_sd1_sd2`` (``sd_v1``),
  ``MODEL_VERSION_SDXL_BASE_V1_0`` (``sdxl_base_v1-0``) and ``MODEL_VERSION_FLUX_V1`` (``flux1``).

Pure functions on tensors: no diffusers, no Lightning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

#: The key prefix ComfyUI maps for each network a LoRA can live in (see the module doc).
COMFYUI_PREFIXES = {"unet": "lora_unet", "transformer": "lora_transformer"}
#: kohya's ``ss_base_model_version`` strings for the backbones it names.
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
COMFYUI_WEIGHT_NAME = "lora_comfyui.safetensors"

_UNET_BLOCK = r"(?:(?:down|up)_blocks\.\d+|mid_block)"
_FLUX_DOUBLE = (
    r"attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|norm1(?:_context)?\.linear"
    r"|ff(?:_context)?\.(?:net\.0\.proj|net\.2|linear_in|linear_out)"
)
# SD3.5-Medium's second image attention: comfy/utils.py mmdit_to_diffusers maps attn2.to_q/k/v
# onto slices of x_block.attn2.qkv and (MMDIT_MAP_BLOCK) attn2.to_out.0 onto x_block.attn2.proj,
# since ComfyUI commit 09fdb2b "Support SD3.5 medium diffusers format weights and loras" (2024-10-30)
_SD3_BLOCK = (
    r"attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|attn2\.(?:to_[qkv]|to_out\.0)"
    r"|norm1(?:_context)?\.linear|ff(?:_context)?\.net\.(?:0\.proj|2)"
)
_EMBEDDERS = r"time_text_embed\.(?:timestep|text|guidance)_embedder\.linear_[12]"
#: The diffusers module names ComfyUI maps, per backbone (restated from the tables in the doc).
COMFYUI_MODULES = {
    "unet": re.compile(
        rf"{_UNET_BLOCK}\.attentions\.\d+\.(?:proj_in|proj_out"
        r"|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_[qkv]|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
        rf"|{_UNET_BLOCK}\.resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut)"
        r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
        r"|(?:class_embedding|add_embedding|time_embedding)\.linear_[12]|conv_in|conv_out"
    ),
    "flux": re.compile(
        rf"transformer_blocks\.\d+\.(?:{_FLUX_DOUBLE})"
        r"|single_transformer_blocks\.\d+\.(?:attn\.to_[qkv]|proj_mlp|norm\.linear|proj_out)"
        rf"|{_EMBEDDERS}|context_embedder|x_embedder|norm_out\.linear|proj_out"
    ),
    "sd3": re.compile(
        rf"transformer_blocks\.\d+\.(?:{_SD3_BLOCK})"
        rf"|{_EMBEDDERS}|context_embedder|pos_embed\.proj|norm_out\.linear|proj_out"
    ),
}
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


def comfyui_lora_state_dict(
    peft_state: Mapping[str, torch.Tensor], rank: int, alpha: float, network: str = "unet"
) -> dict[str, torch.Tensor]:
    """peft LoRA weights as the kohya keys ComfyUI loads.

    Args:
        peft_state: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` tensors with the
            adapter name removed (peft's ``get_peft_model_state_dict``), module paths as in the
            diffusers network.
        rank: the LoRA rank ``r`` (checked against every ``lora_A``).
        alpha: peft's ``lora_alpha`` (scale ``alpha / rank``), written as each module's ``.alpha``.
        network: ``unet`` (SD1.x, SDXL) or ``transformer`` (FLUX, SD3).

    Returns:
        ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (or
        ``lora_transformer_...``), tensors contiguous on the CPU.

    Raises:
        ValueError: an unknown ``network``; a key that is not a LoRA A/B weight (DoRA magnitudes,
            embedding LoRA); a rank other than ``rank``; a module ComfyUI does not map.

    Example:
        >>> state = {"conv_in.lora_A.weight": torch.ones(2, 4, 3, 3),
        ...          "conv_in.lora_B.weight": torch.ones(8, 2, 1, 1)}
        >>> sorted(comfyui_lora_state_dict(state, rank=2, alpha=4.0))
        ['lora_unet_conv_in.alpha', 'lora_unet_conv_in.lora_down.weight', 'lora_unet_conv_in.lora_up.weight']
    """
    if network not in COMFYUI_PREFIXES:
        raise ValueError(
            f"ComfyUI export supports LoRA on a 'unet' (SD1.x, SDXL) or a 'transformer' (FLUX, SD3), "
            f"got network {network!r}."
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(
                f"cannot write {key!r} for ComfyUI: only plain LoRA A/B weights "
                "(<module>.lora_A.weight, <module>.lora_B.weight) have a kohya form; DoRA and "
                "embedding LoRA do not. Export with --format diffusers instead."
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    allowed = _allowed_modules(network, parts)
    prefix = COMFYUI_PREFIXES[network]
    out: dict[str, torch.Tensor] = {}
    for module in sorted(parts):
        pair = parts[module]
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} has only lora_{''.join(pair)}; need A and B.")
        if int(pair["A"].shape[0]) != rank:
            raise ValueError(
                f"LoRA module {module!r} has rank {pair['A'].shape[0]}, expected {rank}; ComfyUI "
                "scales each module by alpha / its own rank, so one alpha needs one rank."
            )
        if not any(pattern.fullmatch(module) for pattern in allowed):
            raise ValueError(
                f"ComfyUI maps no weight to the LoRA module {module!r} ({network}); its loader "
                "would skip it with 'lora key not loaded'. Train without it (target_modules "
                "such as to_q, to_k, to_v, to_out.0) or export with --format diffusers."
            )
        name = f"{prefix}_{module.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = pair["A"].detach().contiguous().cpu()
        out[f"{name}.lora_up.weight"] = pair["B"].detach().contiguous().cpu()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def comfyui_metadata(rank: int, alpha: float, base_model: str | None = None) -> dict[str, str]:
    """The safetensors metadata kohya's ``train_network.py`` writes that we know the value of.

    Args:
        rank: ``ss_network_dim``.
        alpha: ``ss_network_alpha``.
        base_model: ``sd1``, ``sdxl`` or ``flux`` for ``ss_base_model_version``; ``None``
            (or a backbone kohya names no version for, such as ``sd3``) leaves it out.
    """
    meta = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": _number(alpha),
    }
    if base_model in BASE_MODEL_VERSIONS:
        meta["ss_base_model_version"] = BASE_MODEL_VERSIONS[base_model]
    return meta


def guess_base_model(peft_state: Mapping[str, torch.Tensor], network: str) -> str | None:
    """``sd1``, ``sdxl``, ``flux`` or ``sd3`` where the LoRA's own keys tell, else ``None``.

    FLUX alone has ``single_transformer_blocks``, SD3.5-Medium alone ``attn2`` in a transformer;
    a UNet's cross-attention width (the input of ``attn2.to_k``) is 768 in SD1.x and 2048 in SDXL.
    """
    modules = {_PEFT_KEY.sub(r"\g<module>", k) for k in peft_state}
    if network == "transformer":
        if any(m.startswith("single_transformer_blocks.") for m in modules):
            return "flux"
        return "sd3" if any(".attn2." in m for m in modules) else None
    widths = {
        int(v.shape[1]) for k, v in peft_state.items() if re.search(r"attn2\.to_[kv]\.lora_A\.", k)
    }
    return {768: "sd1", 2048: "sdxl"}.get(widths.pop()) if len(widths) == 1 else None


def _allowed_modules(network: str, parts: Mapping[str, object]) -> list[re.Pattern[str]]:
    if network == "unet":
        return [COMFYUI_MODULES["unet"]]
    if any(m.startswith("single_transformer_blocks.") for m in parts):
        return [COMFYUI_MODULES["flux"]]
    return [COMFYUI_MODULES["flux"], COMFYUI_MODULES["sd3"]]  # both name their blocks alike


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(float(value))
