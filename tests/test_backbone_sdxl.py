"""SDXL: SDXLDenoiser on the sizes of diffusers' SDXL pipeline tests, against the real pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.cli import build_cli, main
from acpo_lightning.data import collate_prompt_images
from acpo_lightning.data.dataset import PromptImageDataset
from acpo_lightning.data.sources import RecordTable
from acpo_lightning.data.transforms import ImageTransform
from acpo_lightning.denoisers import UNetDenoiser
from acpo_lightning.denoisers.sdxl import SDXLDenoiser
from acpo_lightning.models import add_lora
from acpo_lightning.models.lora import LORA_WEIGHT_NAME
from acpo_lightning.sampling import per_sample_generators
from acpo_lightning.tiny import sdxl as S
from conftest import CONFIGS, shapes_batch

PROMPTS = ["a red square", "a blue circle on grass"]
SEED, STEPS, GUIDANCE = 3, 3, 5.0


def _sdxl_module(
    tokenizer_dir, lora_init: bool | str = True, force_zeros: bool = True, vae=None, **kwargs
) -> ACPOModule:
    tokenizer = T.tiny_tokenizer(str(tokenizer_dir))
    denoiser = SDXLDenoiser(
        add_lora(S.tiny_sdxl_unet(), rank=4, init_lora_weights=lora_init),
        S.tiny_sdxl_text_encoder(),
        S.tiny_sdxl_text_encoder_2(),
        tokenizer,
        tokenizer,
        force_zeros_for_empty_prompt=force_zeros,
        vae_scale_factor=2,
    )
    return ACPOModule(
        denoiser=denoiser,
        quality_head=T.TinyQualityHead(),
        vae=vae or S.tiny_sdxl_vae(),
        noise_scheduler=T.tiny_scheduler(),
        **kwargs,
    )


def _pipeline(module: ACPOModule, force_zeros: bool) -> StableDiffusionXLPipeline:
    """The diffusers pipeline on the module's parts, with a fresh base UNet (no adapter)."""
    denoiser = module.denoiser
    pipe = StableDiffusionXLPipeline(
        vae=module.vae,
        text_encoder=denoiser.text_encoder,
        text_encoder_2=denoiser.text_encoder_2,
        tokenizer=denoiser.tokenizer,
        tokenizer_2=denoiser.tokenizer_2,
        unet=S.tiny_sdxl_unet(),  # the same seed: the policy's base weights
        scheduler=module.sample_scheduler,
        force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_images(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    generators = per_sample_generators(SEED, len(PROMPTS))
    return pipe(
        PROMPTS,
        generator=generators,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="pt",
    ).images


@pytest.mark.parametrize("force_zeros", [True, False], ids=["zeros", "encoded-empty"])
def test_generate_equals_the_sdxl_pipeline_before_and_after_loading_our_lora(
    force_zeros, tokenizer_dir, tmp_path
) -> None:
    module = _sdxl_module(tokenizer_dir, lora_init=False, force_zeros=force_zeros)
    pipe = _pipeline(module, force_zeros)
    kwargs = dict(seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    base = module.generate(PROMPTS, use_anchor=True, **kwargs)
    torch.testing.assert_close(base, _pipe_images(pipe), rtol=0, atol=1e-5)
    tuned = module.generate(PROMPTS, **kwargs)
    module.save_lora(tmp_path)
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(tuned, _pipe_images(pipe), rtol=0, atol=1e-5)
    assert (tuned - base).abs().max() > 1e-2  # the adapter matters: 1000x the tolerance


def test_empty_prompt_is_zeros_or_the_encoded_empty_string(tokenizer_dir) -> None:
    zeros = _sdxl_module(tokenizer_dir).denoiser.null_condition()
    encoded = _sdxl_module(tokenizer_dir, force_zeros=False).denoiser
    assert set(zeros) == {"encoder_hidden_states", "text_embeds"}
    assert all(not value.any() for value in zeros.values())
    expected = encoded.encode_prompts([""])
    assert all(torch.equal(encoded.null_condition()[k], expected[k]) for k in expected)
    assert expected["encoder_hidden_states"].abs().sum() > 0
    cached = {name: torch.full_like(value, 0.5) for name, value in expected.items()}
    encoded.set_null_condition(cached)  # a prompt cache's empty prompt: no encoder run
    assert all(torch.equal(encoded.null_condition()[k], cached[k]) for k in cached)


def _geometry_batch(original: list[tuple[int, int]], crops: list[tuple[int, int]]) -> dict:
    batch = shapes_batch(size=2)
    batch["original_sizes"] = torch.tensor(original)
    batch["crop_top_lefts"] = torch.tensor(crops)
    return batch


def test_micro_conditioning_from_the_batch_reaches_the_unet(tokenizer_dir) -> None:
    denoiser = _sdxl_module(tokenizer_dir, lora_init=False).denoiser
    prompts = PROMPTS
    default = denoiser.conditioning(prompts, 2, batch=shapes_batch(size=2))
    assert default["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    batch = _geometry_batch([(64, 48), (40, 90)], [(8, 0), (0, 29)])
    cond = denoiser.conditioning(prompts, 2, batch=batch)
    assert cond["time_ids"].tolist() == [[64, 48, 8, 0, 32, 32], [40, 90, 0, 29, 32, 32]]
    cached = {
        "latent_moments": torch.zeros(2, 8, 24, 20),
        "original_sizes": batch["original_sizes"],
    }
    ids = denoiser.conditioning(prompts, 2, batch=cached)["time_ids"]  # target: latents x 2
    assert ids.tolist() == [[64, 48, 0, 0, 48, 40], [40, 90, 0, 0, 48, 40]]
    dropped = denoiser.conditioning(prompts, 2, dropout=1.0, batch=batch)
    assert not dropped["encoder_hidden_states"].any() and not dropped["text_embeds"].any()
    assert torch.equal(dropped["time_ids"], cond["time_ids"])  # dropout keeps the sizes
    x, t = (
        torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.tensor([9, 700]),
    )
    with torch.no_grad():
        changed = (denoiser.policy(x, t, cond) - denoiser.policy(x, t, default)).abs()
    assert changed.flatten(1).amax(1).min() > 1e-4  # each sample's output moved
    with pytest.raises(ValueError, match="time_ids"):
        denoiser.policy(x, t, denoiser.encode_prompts(prompts))
    with pytest.raises(ValueError, match=r"original_sizes has shape \(2,\), expected \(2, 2\)"):
        denoiser.conditioning(prompts, 2, batch={"original_sizes": torch.tensor([64, 48])})


def test_image_geometry_is_what_the_sdxl_training_script_records() -> None:
    """original size before resize; crop top-left in the flipped image (flip, then crop)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), np.uint8))
    transform = ImageTransform(resolution=16, random_flip=True)
    resized = image.resize((32, 16), Image.Resampling.BILINEAR, reducing_gap=None)
    table = RecordTable("test images", ["a", "b"], [image, image])
    dataset = PromptImageDataset(table, [0, 1], transform)
    flips = set()
    torch.manual_seed(0)
    for _ in range(12):
        item = dataset[0]
        top, left = item["crop_top_left"].tolist()
        assert item["original_size"].tolist() == [20, 40]
        for flipped, source in (
            (0, resized),
            (1, resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        ):
            window = np.array(source.crop((left, top, left + 16, top + 16)), np.float32)
            expected = torch.from_numpy(window).permute(2, 0, 1) / 255 * 2 - 1
            if torch.equal(expected, item["pixel_values"]):
                flips.add(flipped)
    assert flips == {0, 1}  # both branches seen, each matching its recorded window
    batch = collate_prompt_images([dataset[0], dataset[1]])
    assert batch["original_sizes"].tolist() == [[20, 40]] * 2
    assert batch["crop_top_lefts"].shape == (2, 2) and batch["crop_top_lefts"].dtype == torch.long


def test_anchor_penalty_is_exactly_zero_with_a_fresh_adapter(tokenizer_dir) -> None:
    module = _sdxl_module(tokenizer_dir, w_perc=1.0, perceptual_share=0.5)
    module.train()
    terms, _ = module.compute_terms(
        _geometry_batch([(64, 48)] * 2, [(0, 0)] * 2), torch.Generator().manual_seed(0)
    )
    assert terms.anchor.item() == 0.0 and math.isfinite(terms.loss.item())


def _assert_lora_gradients(module: ACPOModule) -> None:
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.parametrize("rollout", [False, True], ids=["data", "rollout"])
def test_a_training_step_gives_finite_terms_and_lora_gradients(rollout, tokenizer_dir) -> None:
    module = _sdxl_module(
        tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5, rollout_steps=4,
        k_late=2, guidance_scale=GUIDANCE,
    )  # fmt: skip
    module.train()
    batch = _geometry_batch([(64, 48), (40, 90)], [(8, 0), (0, 29)])
    if rollout:
        batch = {"prompts": batch["prompts"]}  # prompt-only: the policy's own samples
    result = module.objectives.training_step(
        module.context(), batch, torch.Generator().manual_seed(0), rollout,
        torch.Generator().manual_seed(1),
    )  # fmt: skip
    terms = result.terms
    assert all(math.isfinite(float(v)) for v in (terms.loss, terms.anchor, terms.perc))
    assert terms.perc != 0 and terms.anchor > 0
    terms.loss.backward()
    _assert_lora_gradients(module)


def test_bad_parts_are_refused_with_the_fix(tokenizer_dir) -> None:
    with pytest.raises(ValueError) as error:
        _sdxl_module(tokenizer_dir, vae=S.tiny_sdxl_vae(latent_channels=3))
    assert "latent_channels=3" in str(error.value) and "in_channels=4" in str(error.value)
    tokenizer = T.tiny_tokenizer(str(tokenizer_dir))
    with pytest.raises(ValueError, match="SDXLDenoiser"):
        UNetDenoiser(S.tiny_sdxl_unet(), T.tiny_text_encoder(), tokenizer)
    with pytest.raises(ValueError, match=r"not an SDXL UNet.*UNetDenoiser"):
        SDXLDenoiser(
            T.tiny_unet(), S.tiny_sdxl_text_encoder(), S.tiny_sdxl_text_encoder_2(), tokenizer,
            tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"32 \+ 32 = 64 do not match .*cross_attention_dim=32"):
        unet = S.tiny_sdxl_unet()
        unet.register_to_config(cross_attention_dim=32)
        SDXLDenoiser(
            unet, S.tiny_sdxl_text_encoder(), S.tiny_sdxl_text_encoder_2(), tokenizer, tokenizer
        )


def _cli_args(*extra: str) -> list[str]:
    files = ["--config", str(CONFIGS / "sdxl.yaml"), "--config", str(CONFIGS / "tiny_sdxl.yaml")]
    return [*files, *extra]


@pytest.mark.parametrize("tiny", [False, True], ids=["sdxl.yaml", "sdxl.yaml+tiny_sdxl.yaml"])
def test_sdxl_configs_parse(tiny, capsys) -> None:
    import yaml

    files = _cli_args() if tiny else ["--config", str(CONFIGS / "sdxl.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *files, "--print_config"])
    assert exit_info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    denoiser = model["denoiser"]
    assert denoiser["class_path"] == "acpo_lightning.denoisers.sdxl.SDXLDenoiser"
    lora = denoiser["init_args"]["unet"]["init_args"]
    assert model["guidance_scale"] == 5.0
    if tiny:
        assert lora["unet"]["class_path"] == "acpo_lightning.tiny.sdxl.tiny_sdxl_unet"
        assert denoiser["init_args"]["vae_scale_factor"] == 2
        return
    assert lora["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert lora["unet"]["init_args"]["pretrained_model_name_or_path"] == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )
    assert denoiser["init_args"]["text_encoder_2"]["init_args"]["subfolder"] == "text_encoder_2"
    assert model["noise_scheduler"]["init_args"]["scheduler_class"] == "DDPMScheduler"


@pytest.mark.slow
def test_tiny_sdxl_overlay_fits_validates_and_exports_for_the_pipeline(
    tmp_path, monkeypatch
) -> None:
    """Data and rollout terms at every step (`both`, ratio 1), validate, `acpo export`, and the
    exported file in StableDiffusionXLPipeline reproduces the trained module's images."""
    monkeypatch.chdir(tmp_path)
    extra = ("--model.objective", "both", "--model.rollout_ratio", "1.0", "--model.w_perc", "1.0")
    cli = build_cli(["fit", *_cli_args(*extra)])
    module = cli.model
    assert cli.trainer.global_step == 2 and int(module.guard.skipped_steps) == 0
    logged = cli.trainer.logged_metrics
    for name in ("train/loss_diff", "train/rollout_iqa", "train/loss_anchor_rollout"):
        assert math.isfinite(float(logged[name])), name
    lora_b = [p for n, p in module.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # zero at init: they trained
    ckpt = tmp_path / "outputs" / "tiny_sdxl" / "checkpoints" / "last.ckpt"
    main(["validate", *_cli_args("--ckpt_path", str(ckpt), "--trainer.logger", "false")])
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "lora")])
    assert (tmp_path / "lora" / LORA_WEIGHT_NAME).exists()
    pipe = _pipeline(module, force_zeros=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    images = module.generate(PROMPTS, seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    torch.testing.assert_close(images, _pipe_images(pipe), rtol=0, atol=1e-5)
