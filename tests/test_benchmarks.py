"""The cost benchmarks' backbone layouts and FLOP counter (benchmarks/), on the meta device."""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import backbones
import component_flops
import step_cost

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------ step_cost.py: what it measures
def test_every_ratio_is_against_plain_lora_whatever_the_variants_listed() -> None:
    """The README's reference points list no plain_lora: it is added, and every ratio divides by
    its row (it was the first listed variant's: share 1.0 printed as 1.00 x plain)."""
    listed = ["acpo_toggle_share1.0", "acpo_rollout_k1", "draft_k1_chain"]
    assert step_cost.with_reference(listed) == ["plain_lora", *listed]
    assert step_cost.with_reference(["acpo_crop", "plain_lora"]) == ["acpo_crop", "plain_lora"]
    rows = [
        {"variant": "acpo_toggle_share1.0", "step_s": 6.0, "flops": 9.0, "peak_bytes": 15},
        {"variant": "plain_lora", "step_s": 2.0, "flops": 3.0, "peak_bytes": 10},
    ]
    step_cost.add_ratios(rows)
    assert [(r["time_ratio"], r["flops_ratio"], r["memory_ratio"]) for r in rows] == [
        (3.0, 3.0, 1.5), (1.0, 1.0, 1.0)
    ]  # fmt: skip


def test_cpu_flop_counts_include_attention_as_meta_counts_do() -> None:
    """On the CPU ``scaled_dot_product_attention`` runs a fused kernel that torch's
    FlopCounterMode has no formula for (0 FLOPs); on the meta device it decomposes into counted
    matmuls. Forward counts agree exactly; the fused backward also recomputes the scores
    ``q @ k^T`` (one matmul more than the decomposition's four), which torch counts for the CUDA
    kernels and which is counted here for the CPU one."""
    from diffusers.models.attention_processor import Attention

    batch, heads, dim, queries, keys = 2, 4, 8, 24, 7

    def count(device: str, backward: bool) -> int:
        torch.manual_seed(0)
        with torch.device(device):
            attention = Attention(query_dim=32, heads=heads, dim_head=dim, cross_attention_dim=16)
            x = torch.randn(batch, queries, 32, requires_grad=True)
            context = torch.randn(batch, keys, 16)
        with step_cost.flop_counter() as counter:
            out = attention(x, encoder_hidden_states=context)
            if backward:
                out.sum().backward()
        return counter.get_total_flops()

    scores = 2 * batch * heads * queries * keys * dim  # one q @ k^T (or attention @ v)
    projections = 2 * 2 * (batch * queries * 32 * 32 + batch * keys * 16 * 32)  # q, out; k, v
    assert count("cpu", False) == count("meta", False) == projections + 2 * scores
    assert count("cpu", True) == count("meta", True) + scores


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux: peak RSS reset")
def test_cpu_peak_memory_is_the_models_and_the_step_not_the_process() -> None:
    """Neither the ~1 GiB of imported libraries nor a peak left before the step (building the
    models) enters the figure: the models' tensors plus the growth over the built state."""
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights
    transient = torch.ones(160 * 2**20 // 4)  # a peak above the step's, before it (160 MiB)
    del transient
    step_bytes = 64 * 2**20

    def step() -> None:  # touches 64 MiB and frees them
        torch.ones(step_bytes // 4).add_(1)

    rows: queue.Queue = queue.Queue()
    args = argparse.Namespace(device="cpu", warmup=0, steps=1)
    step_cost.measure_steps("x", step, args, rows, models=(model,))
    row = rows.get_nowait()
    model_bytes = 512 * 512 * 4 + 512 * 4
    # RSS moves by whole pages, by the allocator's own bookkeeping and by whatever else this
    # (test) process frees or touches meanwhile, either way: 16 MiB of slack on both sides, far
    # from the 0 a peak hidden by the earlier 160 MiB would give
    slack = 16 * 2**20
    assert step_bytes - slack <= row["peak_bytes"] - model_bytes <= step_bytes + slack
    assert row["peak_total_bytes"] > row["peak_bytes"] + 200 * 2**20  # imports excluded


@pytest.mark.slow  # builds SDXL's layout at 1/25 width (a few seconds)
def test_raw_step_checkpoints_the_decoders_as_training_does() -> None:
    """``--backbone`` steps checkpoint the VAE decoder one ResNet block at a time, as
    ``LatentCodec.enable_gradient_checkpointing`` does in training, not per up-block."""
    from acpo_lightning.codec import checkpoint_resnets

    args = argparse.Namespace(
        backbone="sdxl", scale=0.04, latent=8, batch=1, head_size=32, bf16=False,
        device="cpu", checkpointing=True,
    )  # fmt: skip
    _, _, decoders, _, _ = step_cost.build_raw(args)
    for decoder in decoders.values():
        parts = [m for m in decoder.modules() if hasattr(m, "gradient_checkpointing")]
        assert parts and all(m.gradient_checkpointing for m in parts)
        assert all(m._gradient_checkpointing_func is checkpoint_resnets for m in parts)


@pytest.mark.slow  # 2 fresh processes of the real step at a tiny width: 40 s (100 s on a busy machine)
def test_a_variant_list_without_plain_lora_is_measured_against_it(tmp_path: Path) -> None:
    """As the README's reference points (``--variants acpo_toggle_share1.0 ...``), tiny."""
    tiny = ["--scale", "0.05", "--latent", "8", "--head-size", "32", "--device", "cpu"]
    command = [
        sys.executable, str(REPO / "benchmarks" / "step_cost.py"), *tiny, "--steps", "1",
        "--warmup", "0", "--threads", "1", "--out", str(tmp_path),
        "--variants", "acpo_toggle_share1.0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True)
    rows = json.loads((tmp_path / "step_cost.json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["plain_lora", "acpo_toggle_share1.0"]
    plain, share1 = rows
    assert plain["flops_ratio"] == plain["time_ratio"] == plain["memory_ratio"] == 1.0
    assert share1["flops_ratio"] == pytest.approx(share1["flops"] / plain["flops"])
    assert share1["flops_ratio"] > 1.0
    assert share1["memory_ratio"] == pytest.approx(share1["peak_bytes"] / plain["peak_bytes"])
    assert all(r["peak_bytes"] < r["peak_total_bytes"] for r in rows)


def test_a_raw_step_scores_a_whole_share_of_its_batch_or_refuses_the_fraction() -> None:
    """ACPOModule scores a fractional count on average; a timed raw step cannot, so it says so
    rather than rounding 0.25 x 1 to no scored image (what it did before issue 24)."""
    assert step_cost.whole_scored_count(0.25, 4) == 1
    with pytest.raises(SystemExit, match=r"--share 0.25 x --batch 1 = 0.25 .* --share 1 "):
        step_cost.whole_scored_count(0.25, 1)
