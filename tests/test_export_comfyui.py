"""`acpo export --format comfyui`: kohya keys that ComfyUI's LoRA loader maps onto the real network,
carrying the same weight change as the peft adapter.

The loader side is restated here from ComfyUI's source, not from ``acpo_lightning.comfyui``:
``comfy/lora.py`` ``model_lora_keys_unet`` maps ``lora_unet_`` / ``lora_transformer_`` + the diffusers
weight name without ``.weight``, dots made underscores, for the names its ``comfy/utils.py``
tables list; ``comfy/weight_adapter/lora.py`` adds ``(alpha / down.shape[0]) * up @ down``.
"""

from __future__ import annotations

import re
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.cli import main
from acpo_lightning.comfyui import (
    COMFYUI_WEIGHT_NAME,
    comfyui_lora_state_dict,
    comfyui_metadata,
    guess_base_model,
)
from acpo_lightning.data import ShapesDataModule
from acpo_lightning.models import add_lora
from acpo_lightning.models.lora import (
    ATTENTION_PROJECTIONS,
    JOINT_ATTENTION_PROJECTIONS,
    adapters_disabled,
)

RANK, ALPHA = 4, 8  # alpha != rank: a loader that ignored .alpha would be off by 2

# Diffusers names ComfyUI's comfy/utils.py tables list (unet_to_diffusers' TRANSFORMER_BLOCKS,
# UNET_MAP_ATTENTIONS, UNET_MAP_RESNET, UNET_MAP_BASIC; flux_to_diffusers; mmdit_to_diffusers),
# as (block pattern, module names inside the block); "" is the root.
_UNET_TABLE = [
    (
        r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+",
        {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
         "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"},
    ),
    (r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+", {"proj_in", "proj_out"}),
    (
        r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+",
        {"conv1", "conv2", "time_emb_proj", "conv_shortcut"},
    ),
    (r"down_blocks\.\d+\.downsamplers\.0|up_blocks\.\d+\.upsamplers\.0", {"conv"}),
    ("", {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
          "add_embedding.linear_1", "add_embedding.linear_2", "class_embedding.linear_1",
          "class_embedding.linear_2"}),
]  # fmt: skip
_JOINT_ATTENTION = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "norm1.linear",
                    "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2"}  # fmt: skip
_EMBEDDERS = {
    f"time_text_embed.{e}_embedder.linear_{i}" for e in ("timestep", "text") for i in (1, 2)
}
_FLUX_TABLE = [
    (r"transformer_blocks\.\d+", _JOINT_ATTENTION),
    (r"single_transformer_blocks\.\d+",
     {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out"}),
    ("", _EMBEDDERS | {"context_embedder", "x_embedder", "norm_out.linear", "proj_out"}),
]  # fmt: skip
# mmdit_to_diffusers also maps SD3.5-Medium's second image attention (since 2024-10-30): attn2.to_q,
# to_k, to_v onto slices of x_block.attn2.qkv, attn2.to_out.0 onto x_block.attn2.proj (MMDIT_MAP_BLOCK)
_SD3_ATTENTION_2 = {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}
_SD3_TABLE = [
    (r"transformer_blocks\.\d+", _JOINT_ATTENTION | _SD3_ATTENTION_2),
    ("", _EMBEDDERS | {"context_embedder", "pos_embed.proj", "norm_out.linear", "proj_out"}),
]


def _documented(name: str, table) -> bool:
    for block, inner in table:
        for module in inner:
            pattern = re.escape(module) if not block else rf"(?:{block})\.{re.escape(module)}"
            if re.fullmatch(pattern, name):
                return True
    return False


def comfyui_key_map(base: nn.Module, prefix: str, table) -> dict[str, str]:
    """ComfyUI's table from LoRA key prefix to module name, for the weights of ``base`` (no LoRA)."""
    return {
        f"{prefix}_{key[: -len('.weight')].replace('.', '_')}": key[: -len(".weight")]
        for key in base.state_dict()
        if key.endswith(".weight") and _documented(key[: -len(".weight")], table)
    }


def comfyui_delta(lora: dict[str, torch.Tensor], key: str, shape: torch.Size) -> torch.Tensor:
    """The weight change ComfyUI's LoRAAdapter.calculate_weight adds for ``key`` (strength 1)."""
    up, down = lora[f"{key}.lora_up.weight"], lora[f"{key}.lora_down.weight"]
    scale = lora[f"{key}.alpha"].item() / down.shape[0] if f"{key}.alpha" in lora else 1.0
    return (scale * (up.flatten(1) @ down.flatten(1))).reshape(shape)


def assert_comfyui_loads_the_adapter(model: nn.Module, key_map, lora, network_prefix) -> None:
    """Every key maps to a module; its ComfyUI delta is the adapter's own (adapters on minus off)."""
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    assert all(p.startswith(f"{network_prefix}_") for p in prefixes)
    unmapped = sorted(p for p in prefixes if p not in key_map)
    assert not unmapped, f"ComfyUI would skip {unmapped[:3]}"
    adapted = {n for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert {key_map[p] + ".lora_A" for p in prefixes} == adapted, "some adapted modules missing"
    torch.manual_seed(1)
    cases = []  # (prefix, layer, input, ComfyUI's output change)
    for prefix in sorted(prefixes):
        assert lora[f"{prefix}.alpha"].ndim == 0
        layer = model.get_submodule(key_map[prefix])
        base = layer.get_base_layer()
        delta = comfyui_delta(lora, prefix, base.weight.shape)
        if isinstance(base, nn.Conv2d):
            assert delta.ndim == 4 and lora[f"{prefix}.lora_down.weight"].ndim == 4
            x = torch.randn(2, base.in_channels, 6, 6)
            expected = F.conv2d(x, delta, None, base.stride, base.padding, base.dilation)
        else:
            x = torch.randn(3, base.in_features)
            expected = F.linear(x, delta)
        cases.append((prefix, layer, x, expected))
    with torch.no_grad():
        with adapters_disabled(model):  # toggled once for all layers
            off = [layer(x) for _, layer, x, _ in cases]
        on = [layer(x) for _, layer, x, _ in cases]
    for (prefix, _, _, expected), before, after in zip(cases, off, on, strict=True):
        assert (after - before).abs().max() > 1e-3, f"{prefix}: the adapter changes nothing"
        torch.testing.assert_close(after - before, expected, atol=1e-5, rtol=1e-4, msg=prefix)


def _convert(base_factory, targets, network):
    base = base_factory()
    model = add_lora(base_factory(), RANK, ALPHA, targets, init_lora_weights=False)
    peft_state = get_peft_model_state_dict(model)
    return base, model, comfyui_lora_state_dict(peft_state, RANK, ALPHA, network)


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """SDXL's UNet shape at toy size (as diffusers' SDXL pipeline tests build it): text_time
    added conditioning, a first block without attention, two transformer layers in the second."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip


def tiny_sd3(dual_attention_layers: tuple[int, ...] = ()) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, dual_attention_layers=dual_attention_layers,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("factory", "targets"),
    [
        # conv LoRA too: resnet conv1 (3x3) and proj_in (1x1 conv in SD1.5's UNet)
        (T.tiny_unet, (*ATTENTION_PROJECTIONS, "conv1", "proj_in")),
        (tiny_sdxl_unet, (*ATTENTION_PROJECTIONS, "linear_1", "ff.net.2")),
    ],
    ids=["sd15", "sdxl"],
)
def test_unet_lora_maps_onto_every_adapted_module_with_its_delta(factory, targets) -> None:
    base, model, lora = _convert(factory, targets, "unet")
    key_map = comfyui_key_map(base, "lora_unet", _UNET_TABLE)
    assert_comfyui_loads_the_adapter(model, key_map, lora, "lora_unet")


@pytest.mark.parametrize(
    ("factory", "targets"),
    [
        (tiny_flux, (*JOINT_ATTENTION_PROJECTIONS, "proj_mlp")),
        (tiny_sd3, JOINT_ATTENTION_PROJECTIONS),
        # SD3.5-Medium: the second image attention (attn2) in block 0, with every other target
        (partial(tiny_sd3, dual_attention_layers=(0,)), JOINT_ATTENTION_PROJECTIONS),
    ],
    ids=["flux", "sd3", "sd35-attn2"],
)
def test_transformer_lora_maps_onto_every_adapted_module_with_its_delta(factory, targets) -> None:
    base, model, lora = _convert(factory, targets, "transformer")
    table = _FLUX_TABLE if factory is tiny_flux else _SD3_TABLE
    key_map = comfyui_key_map(base, "lora_transformer", table)
    if targets is JOINT_ATTENTION_PROJECTIONS and factory is not tiny_sd3:  # SD3.5-Medium
        assert any(".attn2." in name for name in key_map.values()), "no attn2 in the model"
    assert_comfyui_loads_the_adapter(model, key_map, lora, "lora_transformer")


def test_modules_comfyui_does_not_map_are_refused_by_name() -> None:
    # attn2 of SD3.5-Medium has no text-stream projections, so ComfyUI's table has none
    unmapped = "transformer_blocks.0.attn2.add_q_proj"
    state = {f"{unmapped}.lora_A.weight": torch.ones(RANK, 8),
             f"{unmapped}.lora_B.weight": torch.ones(8, RANK)}  # fmt: skip
    with pytest.raises(ValueError, match=rf"{re.escape(unmapped)}.*--format diffusers"):
        comfyui_lora_state_dict(state, RANK, ALPHA, "transformer")
    model = add_lora(T.tiny_unet(), RANK, ALPHA, ["linear_1"])  # time_embedding: mapped
    assert comfyui_lora_state_dict(get_peft_model_state_dict(model), RANK, ALPHA, "unet")
    with pytest.raises(ValueError, match=r"rank 4, expected 2"):
        comfyui_lora_state_dict(get_peft_model_state_dict(model), 2, ALPHA, "unet")
    with pytest.raises(ValueError, match=r"'unet'.*'transformer'.*'text_encoder'"):
        comfyui_lora_state_dict({}, RANK, ALPHA, "text_encoder")
    dora = {"conv_in.lora_magnitude_vector": torch.ones(4)}
    with pytest.raises(ValueError, match="DoRA"):
        comfyui_lora_state_dict(dora, RANK, ALPHA, "unet")


def test_metadata_and_base_model_from_the_lora_itself() -> None:
    assert comfyui_metadata(4, 8.0, "sdxl") == {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "8",
        "ss_base_model_version": "sdxl_base_v1-0",
    }
    assert "ss_base_model_version" not in comfyui_metadata(4, 0.5, None)
    assert comfyui_metadata(4, 0.5)["ss_network_alpha"] == "0.5"

    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"

    def cross_attention(width: int) -> dict[str, torch.Tensor]:
        return {key: torch.ones(RANK, width)}

    assert guess_base_model(cross_attention(768), "unet") == "sd1"
    assert guess_base_model(cross_attention(2048), "unet") == "sdxl"
    assert guess_base_model(cross_attention(32), "unet") is None
    flux = get_peft_model_state_dict(add_lora(tiny_flux(), RANK, ALPHA, ["to_q"]))
    assert guess_base_model(flux, "transformer") == "flux"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ACPOModule trained one step: its last.ckpt and the config it was trained with."""
    root = tmp_path_factory.mktemp("comfyui")
    module = ACPOModule(
        unet=add_lora(T.tiny_unet(), rank=RANK, alpha=ALPHA, init_lora_weights=False),
        quality_head=T.TinyQualityHead(),
        noise_scheduler=T.tiny_scheduler(),
        vae=T.tiny_vae(),
        text_encoder=T.tiny_text_encoder(),
        tokenizer=T.tiny_tokenizer(str(root / "tokenizer")),
        num_inference_steps=2,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    )
    trainer.fit(module, datamodule=ShapesDataModule(train_size=4, batch_size=4, image_size=32))
    lora = {
        "class_path": "acpo_lightning.models.add_lora",
        "init_args": {"rank": RANK, "alpha": ALPHA},
    }
    (root / "checkpoints" / "config.yaml").write_text(yaml.safe_dump({"model": {"unet": lora}}))
    return {"root": root, "ckpt": root / "checkpoints" / "last.ckpt", "module": module}


def test_acpo_export_format_comfyui_writes_kohya_keys_with_alpha(checkpoint) -> None:
    out = checkpoint["root"] / "comfyui"
    main(["export", "--ckpt", str(checkpoint["ckpt"]), "--out", str(out), "--format", "comfyui"])
    lora = load_file(str(out / COMFYUI_WEIGHT_NAME))
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    prefixes = {k.split(".", 1)[0] for k in lora}
    assert all(lora[f"{p}.alpha"].item() == ALPHA for p in prefixes)
    assert {k.split(".", 1)[1] for k in lora} == {"lora_down.weight", "lora_up.weight", "alpha"}
    key_map = comfyui_key_map(T.tiny_unet(), "lora_unet", _UNET_TABLE)
    assert_comfyui_loads_the_adapter(checkpoint["module"].unet, key_map, lora, "lora_unet")
    with safe_open(str(out / COMFYUI_WEIGHT_NAME), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_a_bad_format_is_refused_in_one_line_naming_the_choices(checkpoint, capsys) -> None:
    out = checkpoint["root"] / "bad"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(checkpoint["ckpt"]), "--out", str(out), "--format", "kohya"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert lines[-1] == "(set ACPO_DEBUG=1 for the traceback)" and len(lines) == 2, lines
    assert "--format" in lines[0] and "'kohya'" in lines[0]
    assert "'diffusers'" in lines[0] and "'comfyui'" in lines[0]
    assert not out.exists()
