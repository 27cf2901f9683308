"""SD3 / SD3.5 on tiny real parts: prompts encoded and images generated exactly as
StableDiffusion3Pipeline does (with and without T5, with our LoRA loaded into it), the anchor,
both objectives, constraint mode, checkpointing, and the CLI end to end."""

from __future__ import annotations

import math
import re

import lightning.pytorch as pl
import pytest
import torch

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.data import ShapesDataModule
from acpo_lightning.denoisers.sd3 import SD3Denoiser
from acpo_lightning.models import add_lora
from acpo_lightning.models.lora import JOINT_ATTENTION_PROJECTIONS
from acpo_lightning.processes import FlowProcess
from acpo_lightning.sampling import per_sample_generators
from acpo_lightning.tiny import flux as tiny_t5
from acpo_lightning.tiny import sd3 as tiny
from conftest import CONFIGS, rollout_terms, shapes_batch

with T.quiet_imports():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

SIZE = 16  # pixels; the tiny VAE keeps the side: latents 4 x 16 x 16, 64 tokens of 2x2 patches
PROMPTS = ["a red square", "a blue circle"]
T5_LENGTH = 8
TOL = 1e-5


def _denoiser(lora_init: bool | None = True, t5: bool = True, **kwargs) -> SD3Denoiser:
    transformer = tiny.tiny_sd3_transformer()
    if lora_init is not None:
        transformer = add_lora(
            transformer, rank=4, alpha=4 if lora_init else 16,  # a random adapter at scale 4
            target_modules=JOINT_ATTENTION_PROJECTIONS, init_lora_weights=lora_init,
        )  # fmt: skip
    return SD3Denoiser(
        transformer, tiny.tiny_sd3_clip_encoder(), T.tiny_tokenizer(),
        tiny.tiny_sd3_clip_encoder_2(), T.tiny_tokenizer(),
        tiny_t5.tiny_t5_encoder() if t5 else None, tiny_t5.tiny_t5_tokenizer() if t5 else None,
        max_sequence_length=T5_LENGTH, **kwargs,
    )  # fmt: skip


def _module(lora_init: bool = True, t5: bool = True, **kwargs) -> ACPOModule:
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("guidance_scale", 4.5)
    kwargs.setdefault("noise_scheduler", tiny.tiny_sd3_scheduler())
    kwargs.setdefault("quality_head", T.TinyQualityHead())
    return ACPOModule(
        denoiser=_denoiser(lora_init, t5),
        vae=tiny.tiny_sd3_vae(),
        **kwargs,
    )


def _pipeline(denoiser: SD3Denoiser, vae, scheduler=None) -> StableDiffusion3Pipeline:
    """The pipeline on the denoiser's own text encoders and the VAE, with a fresh base transformer
    (the seeded weights the module's had before LoRA)."""
    return StableDiffusion3Pipeline(
        transformer=tiny.tiny_sd3_transformer(), scheduler=scheduler or tiny.tiny_sd3_scheduler(),
        vae=vae, text_encoder=denoiser.text_encoder, tokenizer=denoiser.tokenizer,
        text_encoder_2=denoiser.text_encoder_2, tokenizer_2=denoiser.tokenizer_2,
        text_encoder_3=denoiser.text_encoder_3, tokenizer_3=denoiser.tokenizer_3,
    )  # fmt: skip


def _pipe_images(pipe: StableDiffusion3Pipeline, steps: int = 2, guidance: float = 4.5):
    return pipe(
        PROMPTS, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
        generator=per_sample_generators(0, len(PROMPTS)), max_sequence_length=T5_LENGTH,
        output_type="pt",
    ).images  # fmt: skip


# ---------------------------------------------------------------- the pipeline's own numbers
@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_prompts_and_empty_prompt_are_encoded_as_the_pipeline_does(t5: bool) -> None:
    denoiser = _denoiser(t5=t5)
    pipe = _pipeline(denoiser, tiny.tiny_sd3_vae())
    with torch.no_grad():  # as in the pipeline's __call__ (T5 takes other kernels under grad)
        states, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
        max_sequence_length=T5_LENGTH,
    )  # fmt: skip
    cond = denoiser.encode_prompts(PROMPTS)
    assert torch.equal(cond["encoder_hidden_states"], states)
    assert torch.equal(cond["pooled_projections"], pooled)
    # 16 CLIP tokens (two 8-wide encoders, zero-padded to T5's 32), then T5's tokens (or zeros)
    assert states.shape == (2, 16 + T5_LENGTH, 32) and pooled.shape == (2, 32)
    assert torch.equal(states[:, :16, 16:], torch.zeros(2, 16, 16))
    assert bool((states[:, 16:] != 0).any()) == t5
    null = denoiser.null_condition()  # the empty prompt, as the pipeline's default negative
    # encoded alone, not in a batch of two: equal up to the projection's batch-size kernels
    expanded = {k: v.expand(2, *v.shape[1:]) for k, v in null.items()}
    torch.testing.assert_close(expanded["encoder_hidden_states"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(expanded["pooled_projections"], negative_pooled, rtol=0, atol=1e-6)
    assert negative_pooled.abs().sum() > 0  # not zeros


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_generate_equals_the_pipeline_before_and_after_the_exported_lora(
    t5: bool, tmp_path
) -> None:
    module = _module(lora_init=False, t5=t5)  # random LoRA: it must change the images
    pipe = _pipeline(module.denoiser, module.vae)
    base = module.generate(PROMPTS, seed=0, use_anchor=True)
    assert (base - _pipe_images(pipe)).abs().max() < TOL
    tuned = module.generate(PROMPTS, seed=0)
    pipe.load_lora_weights(str(module.save_lora(tmp_path)))
    assert (tuned - _pipe_images(pipe)).abs().max() < TOL
    assert (tuned - base).abs().max() > 1000 * TOL  # the LoRA visibly changes the image


def test_a_dynamically_shifting_scheduler_gets_the_pipelines_mu() -> None:
    dynamic = dict(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5,
        max_shift=1.15,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, **dynamic)
    module = _module(process=FlowProcess(scheduler, image_seq_len=64), noise_scheduler=None)
    # 64 tokens of 2x2 patches, between 16 (mu 0.5) and 256 (mu 1.15)
    expected_mu = 0.5 + (64 - 16) * (1.15 - 0.5) / (256 - 16)
    kwargs = module.denoiser.sampler_kwargs(scheduler, 2)
    assert kwargs == {"mu": pytest.approx(expected_mu)}
    images = module.generate(PROMPTS, seed=0, num_inference_steps=2, guidance_scale=1.0)
    pipe = _pipeline(
        module.denoiser, module.vae, FlowMatchEulerDiscreteScheduler(shift=3.0, **dynamic)
    )
    assert (images - _pipe_images(pipe, steps=2, guidance=1.0)).abs().max() < TOL
    # SD3.5's own scheduler has a fixed shift: nothing to pass
    assert module.denoiser.sampler_kwargs(tiny.tiny_sd3_scheduler(), 28) == {}


# ---------------------------------------------------------------- ACPO on SD3
def test_data_step_anchor_is_zero_at_init_and_lora_gets_gradients() -> None:
    module = _module(perceptual_share=0.5, w_perc=1.0).train()
    terms, stats = module.compute_terms(shapes_batch(2, SIZE), torch.Generator().manual_seed(0))
    assert terms.anchor.item() == 0.0  # zero-init LoRA: the policy is the base, exactly
    assert stats["perc_share"] == 0.5
    assert all(torch.isfinite(t) for t in terms) and terms.diff > 0 and terms.perc != 0
    terms.loss.backward()
    grads = [p.grad for n, p in module.transformer.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_draft_k_rollout_terms_are_finite_with_lora_gradients() -> None:
    module = _module(
        lora_init=False, objective="rollout", rollout_steps=3, k_late=2, draft_k=2, w_perc=1.0
    ).train()
    terms = rollout_terms(module, PROMPTS, 2, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(t) for t in terms)
    assert terms.anchor > 0  # random LoRA: the policy drifts from the base
    (terms.perc + terms.anchor).backward()
    grads = [p.grad for n, p in module.transformer.named_parameters() if "lora_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_constraint_mode_raises_w_anchor_while_the_policy_drifts(tmp_path) -> None:
    module = _module(lora_init=False, anchor_mode="constraint", anchor_delta=1e-8, dual_lr=1.0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, ShapesDataModule(train_size=6, val_size=2, image_size=SIZE, batch_size=2))
    drift = module.anchor_weight.drift_ema.item()
    assert drift > 0 and int(module.anchor_weight.drift_ema_steps) == 3
    assert module.w_anchor.item() > 1.0  # each step adds dual_lr * (drift - 1e-8)


def test_gradient_checkpointing_recomputes_the_blocks_with_the_same_gradients() -> None:
    def grads(checkpointing: bool) -> tuple[list[torch.Tensor], int]:
        module = _module(lora_init=False).train()
        calls = []
        block = module.transformer.transformer_blocks[0]
        # a pre-hook: the recomputation stops early, once it has what the backward pass needs
        block.register_forward_pre_hook(lambda *_: calls.append(1))
        if checkpointing:
            module.enable_gradient_checkpointing()
        terms, _ = module.compute_terms(shapes_batch(2, SIZE), torch.Generator().manual_seed(0))
        terms.loss.backward()
        lora = [p.grad for n, p in module.transformer.named_parameters() if "lora_B" in n]
        return lora, len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert checkpointed_calls > plain_calls  # the block ran again in the backward pass
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_separate_anchor_transformer_for_full_fine_tuning() -> None:
    denoiser = _denoiser(lora_init=None, anchor_transformer=tiny.tiny_sd3_transformer())
    with torch.no_grad():
        for p in denoiser.transformer.parameters():
            p.add_(0.01)  # the policy moves away from its base
    module = ACPOModule(
        denoiser=denoiser, quality_head=T.TinyQualityHead(), vae=tiny.tiny_sd3_vae(),
        noise_scheduler=tiny.tiny_sd3_scheduler(),
    )  # fmt: skip
    assert all(p.requires_grad for p in module.transformer.parameters())
    assert not any(p.requires_grad for p in module.anchor_transformer.parameters())
    anchor = module.generate(PROMPTS[:1], num_inference_steps=2, use_anchor=True)
    pipe = _pipeline(denoiser, module.vae)
    expected = pipe(
        PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=7.5,
        generator=per_sample_generators(0, 1), max_sequence_length=T5_LENGTH, output_type="pt",
    ).images  # fmt: skip
    assert (anchor - expected).abs().max() < TOL  # the anchor is the base transformer
    with pytest.raises(ValueError, match=r"no LoRA adapter .* pass anchor_transformer"):
        ACPOModule(
            denoiser=_denoiser(lora_init=None), quality_head=T.TinyQualityHead(),
            vae=tiny.tiny_sd3_vae(), noise_scheduler=tiny.tiny_sd3_scheduler(),
        )  # fmt: skip


def test_latent_shape_from_the_transformer_or_the_sample_size() -> None:
    assert _denoiser().latent_shape() == (4, 16, 16)
    assert _denoiser(sample_size=8).latent_shape() == (4, 8, 8)


def test_encoders_of_another_model_are_named() -> None:
    from transformers import T5Config, T5EncoderModel

    wide_t5 = T5EncoderModel(T5Config(d_model=64, num_layers=1, vocab_size=8))
    args = dict(
        transformer=tiny.tiny_sd3_transformer(num_layers=1),
        text_encoder=tiny.tiny_sd3_clip_encoder(), tokenizer=T.tiny_tokenizer(),
        text_encoder_2=tiny.tiny_sd3_clip_encoder_2(), tokenizer_2=T.tiny_tokenizer(),
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"text_encoder_3 \(T5\) d_model is 64 .* joint_attention_dim is 32"
    ):
        SD3Denoiser(**args, text_encoder_3=wide_t5, tokenizer_3=tiny_t5.tiny_t5_tokenizer())
    with pytest.raises(ValueError, match="without tokenizer_3"):
        SD3Denoiser(**args, text_encoder_3=tiny_t5.tiny_t5_encoder())
    with pytest.raises(
        ValueError, match=r"projection_dim sum to 48 .* pooled_projection_dim is 32"
    ):
        SD3Denoiser(**{**args, "text_encoder": _clip(projection_dim=32)})


def _clip(projection_dim: int):
    """A one-layer CLIP encoder with another projection width than the tiny SD3's (16)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=8, projection_dim=projection_dim,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config)


# ---------------------------------------------------------------- configs and the CLI
def _configs(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(CONFIGS / name))]


@pytest.mark.parametrize("overlay", [[], ["tiny_sd3.yaml"]], ids=["sd35.yaml", "+tiny_sd3.yaml"])
def test_sd3_configs_parse(overlay, capsys) -> None:
    import yaml

    from acpo_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_configs("sd35.yaml", *overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    denoiser = model["denoiser"]
    assert denoiser["class_path"] == "acpo_lightning.denoisers.sd3.SD3Denoiser"
    transformer = denoiser["init_args"]["transformer"]
    assert transformer["class_path"] == "acpo_lightning.models.add_lora"
    targets = [f"attn.{name}" for name in JOINT_ATTENTION_PROJECTIONS]  # not SD3.5's attn2
    assert transformer["init_args"]["target_modules"] == targets
    assert model["process"]["class_path"] == "acpo_lightning.processes.FlowProcess"
    if not overlay:
        assert model["num_inference_steps"] == 28 and model["guidance_scale"] == 4.5


@pytest.mark.slow
def test_tiny_sd3_config_fits_validates_and_exports_for_the_pipeline(tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    from acpo_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    configs = _configs("sd35.yaml", "tiny_sd3.yaml")
    main([
        "fit", *configs, "--trainer.max_steps", "2", "--model.objective", "both",
        "--model.rollout_ratio", "1.0", "--model.w_perc", "1.0",
    ])  # fmt: skip
    out = tmp_path / "outputs" / "tiny_sd3"
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(".attn.add_q_proj." in k for k in lora) and not any(".attn2." in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained
    main(["validate", *configs, "--ckpt_path", str(last), "--trainer.logger", "false"])
    main(["export", "--ckpt", str(last), "--out", str(tmp_path / "lora")])
    denoiser = _denoiser(lora_init=None)
    pipe = _pipeline(denoiser, tiny.tiny_sd3_vae())
    base = _pipe_images(pipe, steps=2)
    pipe.load_lora_weights(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    adapter = re.compile(r"\.(lora_[AB])\.[^.]+\.")  # the pipeline names its adapter default_0
    loaded = {adapter.sub(r".\1.", n): p for n, p in pipe.transformer.named_parameters()}
    for name, value in lora.items():  # every trained weight arrives unchanged
        assert torch.equal(loaded[adapter.sub(r".\1.", name.removeprefix("transformer."))], value)
    tuned = _pipe_images(pipe, steps=2)
    assert math.isfinite(tuned.sum().item()) and not torch.equal(tuned, base)
    main(["export", "--ckpt", str(last), "--out", str(tmp_path / "comfy"), "--format", "comfyui"])
    comfy = load_file(tmp_path / "comfy" / "lora_comfyui.safetensors")
    # two tensors (down, up) and an alpha per adapted module
    assert len(comfy) == 3 * len(lora) // 2 and all(
        k.startswith("lora_transformer_") for k in comfy
    )


@pytest.mark.slow
def test_sd35_yaml_real_loaders_bf16_on_a_local_repository(tmp_path, monkeypatch) -> None:
    """sd35.yaml as shipped (bf16 base weights, bf16-mixed, the real factories: three encoders
    and tokenizers from their subfolders, the flow scheduler) on a local SD3-shaped folder."""
    import yaml

    from acpo_lightning.cli import build_cli

    repo = tmp_path / "tiny-sd3"
    parts = {
        "transformer": tiny.tiny_sd3_transformer(), "vae": tiny.tiny_sd3_vae(),
        "text_encoder": tiny.tiny_sd3_clip_encoder(), "tokenizer": T.tiny_tokenizer(),
        "text_encoder_2": tiny.tiny_sd3_clip_encoder_2(), "tokenizer_2": T.tiny_tokenizer(),
        "text_encoder_3": tiny_t5.tiny_t5_encoder(), "tokenizer_3": tiny_t5.tiny_t5_tokenizer(),
        "scheduler": tiny.tiny_sd3_scheduler(),
    }  # fmt: skip
    for folder, part in parts.items():
        part.save_pretrained(repo / folder)
    local = {"init_args": {"pretrained_model_name_or_path": str(repo)}}
    names = [
        *(f"text_encoder{s}" for s in ("", "_2", "_3")),
        *(f"tokenizer{s}" for s in ("", "_2", "_3")),
    ]
    overlay = {
        "trainer": {
            "accelerator": "cpu", "max_steps": 2, "limit_val_batches": 0, "logger": False,
            "callbacks": [], "enable_checkpointing": False, "default_root_dir": str(tmp_path),
        },
        "model": {
            "denoiser": {"init_args": {
                "transformer": {"init_args": {"unet": local, "rank": 4}},
                **dict.fromkeys(names, local), "max_sequence_length": T5_LENGTH,
            }},
            "process": {"init_args": {"noise_scheduler": local}},
            "vae": local,
            "quality_head": {"class_path": "acpo_lightning.testing.TinyQualityHead"},
            "perceptual_share": 0.5,
            "perceptual_crop": 8,  # sd35.yaml's 224 px, on the tiny 16-px images
        },
        "data": {"class_path": "acpo_lightning.data.ShapesDataModule", "init_args": {
            "train_size": 4, "val_size": 2, "image_size": SIZE, "batch_size": 2,
        }},
    }  # fmt: skip
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(overlay))
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *_configs("sd35.yaml"), "--config", str(tmp_path / "local.yaml")])
    module = cli.model
    assert cli.trainer.global_step == 2 and int(module.guard.skipped_steps) == 0
    assert (
        module.transformer.dtype == torch.bfloat16 and module.text_encoder_3.dtype == torch.bfloat16
    )
    lora = {n: p for n, p in module.transformer.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # trained
