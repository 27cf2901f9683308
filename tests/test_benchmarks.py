"""The cost benchmarks' backbone layouts and FLOP counter (benchmarks/), on the meta device."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import backbones
import component_flops


def test_sdxl_unet_is_diffusers_mapping_of_stabilitys_config() -> None:
    """Our SDXL UNet equals what diffusers derives from sgm's ``sd_xl_base.yaml`` network config."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    network = {  # generative-models/configs/inference/sd_xl_base.yaml, network_config.params
        "adm_in_channels": 2816,
        "num_classes": "sequential",
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4],
        "num_head_channels": 64,
        "use_linear_in_transformer": True,
        "transformer_depth": [1, 2, 10],
        "context_dim": 2048,
    }
    first_stage = {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}
    original = {
        "model": {"params": {"network_config": {"params": network}, "first_stage_config": {"params": first_stage}}}
    }  # fmt: skip
    expected = create_unet_diffusers_config_from_ldm(original, {}, image_size=1024)
    with torch.device("meta"):
        unet = backbones.sdxl_unet()
    for key, value in expected.items():
        if key == "sample_size" or value is None:
            continue
        got = unet.config[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_flux_dev_has_its_published_size() -> None:
    """FLUX.1-dev's transformer has 11.9 B parameters (``black-forest-labs/FLUX.1-dev``)."""
    with torch.device("meta"):
        model = backbones.flux_dev_transformer()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.9e9, rel=0.005)


@pytest.mark.slow  # 10-20 s each: FlopCounterMode dispatches every op of 24-57 blocks in Python
@pytest.mark.parametrize("name", ["sdxl", "sd35m", "flux"])
def test_flop_counter_runs_on_a_tiny_backbone(name: str) -> None:
    """Every part is counted at a tiny width; the anchor forward costs less than LoRA fwd+bwd."""
    flops = component_flops.parts(2, 1, 8, 32, backbone=name, scale=0.04)
    assert set(flops) == {
        "vae_encode", "denoiser_lora_fwd_bwd", "anchor_fwd", "head_fwd_bwd",
        "vae_decode_fwd_bwd", "taesd_decode_fwd_bwd", "vae_crop_decode_fwd_bwd",
        "taesd_crop_decode_fwd_bwd",
    }  # fmt: skip
    assert all(v > 0 for v in flops.values())
    # a 32-px crop of 64-px images: a window of 4 + 2 x 4 latents of 8 is the whole image here
    assert flops["vae_crop_decode_fwd_bwd"] <= flops["vae_decode_fwd_bwd"]
    assert flops["anchor_fwd"] < flops["denoiser_lora_fwd_bwd"]
    steps = component_flops.step_totals(flops, per_scored=0.0)  # nothing scored: anchor only
    added = steps["ACPO, VAE decoder, cached latents"] - steps["plain LoRA, cached latents"]
    assert added == pytest.approx(flops["anchor_fwd"])


def test_flux_packing_round_trips() -> None:
    latents = torch.randn(2, 16, 8, 8)
    packed = backbones.pack_latents(latents)
    assert packed.shape == (2, 16, 64)
    assert torch.equal(backbones.unpack_latents(packed, 8), latents)
