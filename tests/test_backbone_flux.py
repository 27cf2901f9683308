"""FLUX.1 on tiny real parts: generate() equals FluxPipeline (with and without our LoRA), the
distilled guidance reaches the transformer, the anchor, both objectives, and the CLI end to end."""

from __future__ import annotations

import math
import re

import pytest
import torch

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.denoisers.flux import (
    FluxDenoiser,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from acpo_lightning.models import add_lora
from acpo_lightning.models.lora import JOINT_ATTENTION_PROJECTIONS
from acpo_lightning.processes import FlowProcess
from acpo_lightning.sampling import initial_noise, per_sample_generators
from acpo_lightning.tiny import flux as tiny
from conftest import CONFIGS, rollout_terms, shapes_batch

with T.quiet_imports():
    from diffusers import FluxPipeline

SIZE = 16  # pixels; the tiny VAE keeps the side, so latents are 1 x 16 x 16 (64 packed tokens)
PROMPTS = ["a red square", "a blue circle"]
TOL = 1e-5


def _denoiser(lora_init: bool | None = True, guidance_embeds: bool = True) -> FluxDenoiser:
    transformer = tiny.tiny_flux_transformer(guidance_embeds=guidance_embeds)
    if lora_init is not None:
        transformer = add_lora(
            transformer, rank=4, alpha=4 if lora_init else 16,  # a random adapter at scale 4
            target_modules=JOINT_ATTENTION_PROJECTIONS, init_lora_weights=lora_init,
        )  # fmt: skip
    return FluxDenoiser(
        transformer, T.tiny_text_encoder(), T.tiny_tokenizer(), tiny.tiny_t5_encoder(),
        tiny.tiny_t5_tokenizer(), resolution=SIZE, vae_scale_factor=1, max_sequence_length=16,
    )  # fmt: skip


def _module(lora_init: bool = True, **kwargs) -> ACPOModule:
    kwargs.setdefault("num_inference_steps", 3)
    return ACPOModule(
        denoiser=_denoiser(lora_init),
        quality_head=T.TinyQualityHead(),
        vae=tiny.tiny_flux_vae(),
        process=FlowProcess(tiny.tiny_flux_scheduler(), sigma_max=0.4, image_seq_len=64),
        guidance_scale=3.5,
        **kwargs,
    )


def _pipeline(module: ACPOModule) -> FluxPipeline:
    """FluxPipeline on the module's own text encoders and VAE, with a fresh base transformer
    (the same seeded weights as the module's before LoRA)."""
    denoiser = module.denoiser
    return FluxPipeline(
        scheduler=tiny.tiny_flux_scheduler(), vae=module.vae, text_encoder=denoiser.text_encoder,
        tokenizer=denoiser.tokenizer, text_encoder_2=denoiser.text_encoder_2,
        tokenizer_2=denoiser.tokenizer_2, transformer=tiny.tiny_flux_transformer(),
    )  # fmt: skip


def _pipe_images(pipe: FluxPipeline, steps: int = 3, guidance: float = 3.5) -> torch.Tensor:
    return pipe(
        PROMPTS, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
        generator=per_sample_generators(0, len(PROMPTS)), max_sequence_length=16,
        output_type="pt",
    ).images  # fmt: skip


def test_packing_ids_and_initial_noise_match_the_pipeline() -> None:
    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), latents)
    assert torch.equal(
        unpack_latents(packed, 8, 6), FluxPipeline._unpack_latents(packed, 64, 48, 8)
    )
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(4, 3, "cpu", torch.float32), expected_ids)
    # our noise is drawn unpacked, as the pipeline draws it before packing
    module = _module()
    pipe = _pipeline(module)
    theirs, _ = pipe.prepare_latents(
        2, 1, SIZE, SIZE, torch.float32, "cpu", per_sample_generators(0, 2)
    )
    shape = (2, *module.denoiser.latent_shape())
    ours = initial_noise(shape, per_sample_generators(0, 2), torch.device("cpu"), torch.float32)
    assert torch.equal(pack_latents(ours), theirs)


def test_generate_equals_flux_pipeline_before_and_after_the_exported_lora(tmp_path) -> None:
    module = _module(lora_init=False)  # random LoRA: it must change the images
    pipe = _pipeline(module)
    base = module.generate(PROMPTS, seed=0, use_anchor=True)
    expected_base = _pipe_images(pipe)
    assert (base - expected_base).abs().max() < TOL
    tuned = module.generate(PROMPTS, seed=0)
    pipe.load_lora_weights(str(module.save_lora(tmp_path)))
    expected_tuned = _pipe_images(pipe)
    assert (tuned - expected_tuned).abs().max() < TOL
    assert (tuned - base).abs().max() > 1000 * TOL  # the LoRA visibly changes the image


def test_distilled_guidance_reaches_the_transformer() -> None:
    module = _module()
    denoiser = module.denoiser
    cond, uncond = denoiser.guidance_conditions(PROMPTS, 5.0)
    assert uncond is None  # guidance-distilled: no classifier-free guidance branch
    assert torch.equal(cond["guidance"], torch.full((2,), 5.0))
    train = denoiser.conditioning(PROMPTS, 2)
    assert torch.equal(train["guidance"], torch.full((2,), 3.5))  # the constructor's value
    sample, times = torch.randn(2, *denoiser.latent_shape()), torch.tensor([900.0, 300.0])
    with torch.no_grad():
        at_5, at_1 = (
            denoiser.policy(sample, times, {**cond, "guidance": torch.full((2,), g)})
            for g in (5.0, 1.0)
        )
    assert (at_5 - at_1).abs().max() > 1e-3
    images = {g: module.generate(PROMPTS[:1], seed=0, guidance_scale=g) for g in (3.5, 1.0)}
    assert (images[3.5] - images[1.0]).abs().max() > 1e-3


def test_schnell_like_transformer_takes_no_guidance() -> None:
    denoiser = _denoiser(guidance_embeds=False)
    cond, uncond = denoiser.guidance_conditions(PROMPTS, 3.5)
    assert uncond is None and set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert "guidance" not in denoiser.conditioning(PROMPTS, 2)
    out = denoiser.policy(torch.randn(2, 1, SIZE, SIZE), torch.tensor(500.0), cond)
    assert out.shape == (2, 1, SIZE, SIZE) and torch.isfinite(out).all()


def test_data_step_anchor_is_zero_at_init_and_lora_gets_gradients() -> None:
    module = _module(perceptual_share=0.5, w_perc=1.0)
    module.train()
    batch = shapes_batch(2, SIZE)
    terms, stats = module.compute_terms(batch, torch.Generator().manual_seed(0))
    assert terms.anchor.item() == 0.0  # zero-init LoRA: the policy is the base
    assert stats["perc_share"] == 0.5
    assert all(torch.isfinite(t) for t in terms) and terms.diff > 0 and terms.perc != 0
    terms.loss.backward()
    grads = [p.grad for n, p in module.transformer.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_rollout_terms_are_finite_with_lora_gradients() -> None:
    module = _module(
        lora_init=False, objective="rollout", rollout_steps=4, k_late=2, w_perc=1.0
    ).train()
    terms = rollout_terms(module, PROMPTS, 2, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(t) for t in terms)
    assert terms.anchor > 0  # random LoRA: the policy drifts from the base
    (terms.perc + terms.anchor).backward()
    grads = [p.grad for n, p in module.transformer.named_parameters() if "lora_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 20}, "resolution=20 is not a multiple of 2 \\* vae_scale_factor = 8"),
        ({"text_encoder_2": "wide"}, "text_encoder_2 \\(T5\\) d_model is 64"),
    ],
)
def test_bad_settings_are_named(kwargs, message) -> None:
    from transformers import T5Config, T5EncoderModel

    args = dict(
        transformer=tiny.tiny_flux_transformer(), text_encoder=T.tiny_text_encoder(),
        tokenizer=T.tiny_tokenizer(), text_encoder_2=tiny.tiny_t5_encoder(),
        tokenizer_2=tiny.tiny_t5_tokenizer(), vae_scale_factor=4,
    )  # fmt: skip
    if kwargs.get("text_encoder_2") == "wide":
        kwargs["text_encoder_2"] = T5EncoderModel(T5Config(d_model=64, num_layers=1, vocab_size=8))
    with pytest.raises(ValueError, match=message):
        FluxDenoiser(**{**args, **kwargs})


def test_missing_guidance_is_an_error() -> None:
    denoiser = _denoiser()
    cond = denoiser.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match=r"guidance-distilled .* has no 'guidance'"):
        denoiser.policy(torch.randn(2, 1, SIZE, SIZE), torch.tensor(500.0), cond)


@pytest.mark.slow
def test_tiny_flux_config_fits_validates_and_exports_for_the_pipeline(
    tmp_path, monkeypatch
) -> None:
    from acpo_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    configs = [a for f in ("flux.yaml", "tiny_flux.yaml") for a in ("--config", str(CONFIGS / f))]
    main([
        "fit", *configs, "--trainer.max_steps", "2", "--model.objective", "both",
        "--model.rollout_ratio", "1.0", "--model.w_perc", "1.0",
    ])  # fmt: skip
    out = tmp_path / "outputs" / "tiny_flux"
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert all(k in lora or k.startswith(("anchor_weight.", "guard.")) for k in state)  # no frozen
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # trained
    main(["validate", *configs, "--ckpt_path", str(last), "--trainer.logger", "false"])
    main(["export", "--ckpt", str(last), "--out", str(tmp_path / "lora")])
    pipe = FluxPipeline(
        scheduler=tiny.tiny_flux_scheduler(), vae=tiny.tiny_flux_vae(),
        text_encoder=T.tiny_text_encoder(), tokenizer=T.tiny_tokenizer(),
        text_encoder_2=tiny.tiny_t5_encoder(), tokenizer_2=tiny.tiny_t5_tokenizer(),
        transformer=tiny.tiny_flux_transformer(),
    )  # fmt: skip
    base = _pipe_images(pipe, steps=2)
    pipe.load_lora_weights(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    adapter = re.compile(r"\.(lora_[AB])\.[^.]+\.")  # the pipeline names its adapter default_0
    loaded = {adapter.sub(r".\1.", n): p for n, p in pipe.transformer.named_parameters()}
    for name, value in lora.items():  # every trained weight arrives unchanged
        assert torch.equal(loaded[adapter.sub(r".\1.", name.removeprefix("transformer."))], value)
    tuned = _pipe_images(pipe, steps=2)
    assert math.isfinite(tuned.sum().item()) and not torch.equal(tuned, base)


@pytest.mark.parametrize("overlay", [[], ["tiny_flux.yaml"]], ids=["flux.yaml", "+tiny_flux.yaml"])
def test_flux_configs_parse(overlay, capsys) -> None:
    import yaml

    from acpo_lightning.cli import main

    files = ["flux.yaml", *overlay]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[a for f in files for a in ("--config", str(CONFIGS / f))], "--print_config"])
    assert exit_info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    denoiser = model["denoiser"]
    assert denoiser["class_path"] == "acpo_lightning.denoisers.flux.FluxDenoiser"
    assert denoiser["init_args"]["transformer"]["class_path"] == "acpo_lightning.models.add_lora"
    process = model["process"]["init_args"]
    # the resolution shift agrees with the sampled resolution: (side / 16)^2 packed tokens
    side = denoiser["init_args"]["resolution"] // denoiser["init_args"]["vae_scale_factor"]
    assert process["image_seq_len"] == (side // 2) ** 2
    assert model["guidance_scale"] == 3.5 and denoiser["init_args"]["guidance_scale"] == 3.5


def test_a_resolution_shift_for_another_image_size_is_refused() -> None:
    """The process's image_seq_len must be the denoiser's token count: otherwise training draws
    sigmas shifted for another resolution than rollouts and generate() sample with."""
    with pytest.raises(ValueError, match=r"image_seq_len=256.*64 tokens"):
        ACPOModule(
            denoiser=_denoiser(),
            quality_head=T.TinyQualityHead(),
            vae=tiny.tiny_flux_vae(),
            process=FlowProcess(tiny.tiny_flux_scheduler(), image_seq_len=256),
        )
