"""The UNet LoRA file has one key layout, so diffusers' ``load_lora_weights`` loads every adapted
module; ``load_lora`` refuses a file that covers only part of the adapter.

diffusers' loader (``loaders/peft.py`` ``load_lora_adapter``) picks the layout from the file's first
key alone: it converts ``lora.down`` / ``lora.up`` names to peft's ``lora_A`` / ``lora_B`` only when
that key has no ``lora_A``. A file mixing both layouts therefore loses one of them without a word,
which depends on which module sorts first (a UNet whose first down block has only ResNets puts a
``conv1`` key first). Each case here adapts a UNet, writes the file as ``save_lora`` and
``acpo export`` do, loads it through the matching diffusers pipeline and compares the UNet outputs.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from torch import nn

from acpo_lightning import testing as T
from acpo_lightning.export import lora_settings
from acpo_lightning.models import LORA_WEIGHT_NAME, add_lora, load_lora, save_lora
from acpo_lightning.models.lora import ATTENTION_PROJECTIONS, adapters_disabled
from acpo_lightning.tiny import sdxl as S
from conftest import CONFIGS

RANK, ALPHA = 4, 8  # alpha != rank: a loader that dropped the file's alpha would be off by 2
#: Every UNet target of the shipped configs (acpo/sdxl: attention; demo/ddpm_church: + ResNet convs).
SHIPPED = {
    name: tuple(lora_settings([CONFIGS / f"{name}.yaml"], "unet")["target_modules"])
    for name in ("acpo", "sdxl", "demo", "ddpm_church")
}
#: Attention, the transformer's 1x1 projections and the ResNet convolutions together.
ATTENTION_AND_CONV = (*ATTENTION_PROJECTIONS, "proj_in", "proj_out", "conv1", "conv2")
TARGETS = {**SHIPPED, "attention+conv": ATTENTION_AND_CONV}
EPS = torch.finfo(torch.float32).eps


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler.from_config(T.tiny_scheduler().config, steps_offset=1)


def _sd15_pipeline(unet: UNet2DConditionModel, tokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        unet=unet, vae=T.tiny_vae(), text_encoder=T.tiny_text_encoder(), tokenizer=tokenizer,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def _sdxl_pipeline(unet: UNet2DConditionModel, tokenizer) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        unet=unet, vae=S.tiny_sdxl_vae(), text_encoder=S.tiny_sdxl_text_encoder(),
        text_encoder_2=S.tiny_sdxl_text_encoder_2(), tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=_scheduler(), add_watermarker=False,
    )  # fmt: skip


def _demo_unet() -> UNet2DConditionModel:
    from acpo_demo import load_demo_unet

    return load_demo_unet()


#: (UNet factory, the diffusers pipeline that loads its LoRA)
NETWORKS = {
    "sd15": (T.tiny_unet, _sd15_pipeline),  # first down block: cross-attention
    "sdxl": (S.tiny_sdxl_unet, _sdxl_pipeline),  # first down block: ResNets only, as in SDXL
}


def _unet_inputs(unet: UNet2DConditionModel) -> dict:
    """A seeded batch of two for ``unet``: latents, timesteps, text states (and SDXL's added ids)."""
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    side = config.sample_size
    inputs = {
        "sample": torch.randn(2, config.in_channels, side, side, generator=generator),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 6, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        ids = 6 * config.addition_time_embed_dim
        pooled = config.projection_class_embeddings_input_dim - ids
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32], [40, 32, 0, 4, 32, 32]]),
        }
    return inputs


def assert_diffusers_loads_the_whole_adapter(factory, pipeline, targets, tokenizer, folder) -> None:
    """Export a random adapter on ``factory()``, load it with ``pipe.load_lora_weights`` and compare."""
    model = add_lora(factory(), RANK, ALPHA, targets, init_lora_weights=False)
    save_lora(model, folder)
    pipe = pipeline(factory(), tokenizer)
    pipe.load_lora_weights(str(folder))
    inputs = _unet_inputs(model)
    with torch.no_grad():
        trained = model(**inputs).sample
        loaded = pipe.unet(**inputs).sample
        with adapters_disabled(model):
            base = model(**inputs).sample
    # The same fp32 weights through the same peft layers: only rounding may differ, bounded by a
    # few hundred fp32 ulps of the output's scale (a module the loader dropped moves it by > 0.1).
    tolerance = 256 * EPS * float(base.abs().max())
    effect = float((trained - base).abs().max())
    assert effect > 1000 * tolerance, f"the adapter barely changes the UNet ({effect:.3g})"
    difference = float((loaded - trained).abs().max())
    assert difference <= tolerance, (
        f"diffusers' UNet differs from the trained one by {difference:.3g} (LoRA effect {effect:.3g})"
    )
    keys = list(load_file(str(folder / LORA_WEIGHT_NAME)))
    assert all(".lora.down." in k or ".lora.up." in k for k in keys), "one layout for every key"


@pytest.mark.parametrize("targets", list(TARGETS), ids=list(TARGETS))
@pytest.mark.parametrize("network", list(NETWORKS))
def test_diffusers_pipeline_loads_every_adapted_module(
    network, targets, tokenizer_dir, tmp_path
) -> None:
    factory, pipeline = NETWORKS[network]
    tokenizer = T.tiny_tokenizer(str(tokenizer_dir))
    assert_diffusers_loads_the_whole_adapter(
        factory, pipeline, TARGETS[targets], tokenizer, tmp_path
    )


def test_demo_unet_with_demo_targets_loads_in_stable_diffusion_pipeline(
    tokenizer_dir, tmp_path
) -> None:
    tokenizer = T.tiny_tokenizer(str(tokenizer_dir))
    assert_diffusers_loads_the_whole_adapter(
        _demo_unet, _sd15_pipeline, SHIPPED["demo"], tokenizer, tmp_path
    )


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_unet_inputs(model)).sample


def test_load_lora_refuses_a_file_that_covers_part_of_the_adapter(tmp_path) -> None:
    save_lora(add_lora(T.tiny_unet(), RANK, ALPHA, ATTENTION_PROJECTIONS), tmp_path)
    model = add_lora(T.tiny_unet(), RANK, ALPHA, (*ATTENTION_PROJECTIONS, "conv1"))
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0\.conv1.*target_modules"):
        load_lora(model, tmp_path)


def test_load_lora_reads_the_mixed_layout_older_exports_wrote(tmp_path) -> None:
    """Files written before the layout was unified (attention lora.down, convs lora_A) still load."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    source = add_lora(T.tiny_unet(), RANK, ALPHA, ATTENTION_AND_CONV, init_lora_weights=False)
    old = convert_state_dict_to_diffusers(get_peft_model_state_dict(source))
    assert {".lora_A." in k for k in old} == {True, False}  # the mixed layout
    save_file({f"unet.{k}": v.contiguous() for k, v in old.items()}, tmp_path / LORA_WEIGHT_NAME)
    target = load_lora(add_lora(T.tiny_unet(), RANK, ALPHA, ATTENTION_AND_CONV), tmp_path)
    torch.testing.assert_close(_outputs(target), _outputs(source), rtol=0, atol=0)
