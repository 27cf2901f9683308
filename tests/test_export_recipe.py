"""The README's export recipe, run as written, gives ``ACPOModule.generate``'s images.

README, "Export the LoRA": on a diffusers pipeline of the same base model,
``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`` and
``pipe.load_lora_weights("my_lora")`` give the images of ``generate`` for the generators
``torch.Generator().manual_seed(seed + i)``. The code block is read from the README and executed,
on SD 1.5- and SDXL-shaped pipelines built from tiny parts with the scheduler the module trains
with (the tiny one: ``steps_offset`` 0, as a config that does not set it).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.denoisers.sdxl import SDXLDenoiser
from acpo_lightning.models import add_lora
from acpo_lightning.tiny import sdxl as S
from conftest import REPO

PROMPTS = ["a red square", "a blue circle on grass"]
SEED, STEPS, GUIDANCE = 5, 2, 4.0
#: Images are in [0, 1]; 1e-5 is about 84 fp32 ulps at 1, room for the reassociation of the few
#: sums that differ between the pipeline and ``generate`` (sampling one timestep off moves >1e-2).
TOLERANCE = 1e-5


def readme_export_recipe() -> str:
    """The python block of the README's "Export the LoRA" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Export the LoRA", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _sd15(tokenizer) -> tuple[ACPOModule, StableDiffusionPipeline]:
    module = ACPOModule(
        unet=add_lora(T.tiny_unet(), rank=4, alpha=8, init_lora_weights=False),
        quality_head=T.TinyQualityHead(),
        noise_scheduler=T.tiny_scheduler(),
        vae=T.tiny_vae(),
        text_encoder=T.tiny_text_encoder(),
        tokenizer=tokenizer,
    )
    pipe = StableDiffusionPipeline(
        unet=T.tiny_unet(), vae=T.tiny_vae(), text_encoder=T.tiny_text_encoder(),
        tokenizer=tokenizer, scheduler=T.tiny_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return module, pipe


def _sdxl(tokenizer) -> tuple[ACPOModule, StableDiffusionXLPipeline]:
    denoiser = SDXLDenoiser(
        add_lora(S.tiny_sdxl_unet(), rank=4, alpha=8, init_lora_weights=False),
        S.tiny_sdxl_text_encoder(), S.tiny_sdxl_text_encoder_2(), tokenizer, tokenizer,
        vae_scale_factor=2,
    )  # fmt: skip
    module = ACPOModule(
        denoiser=denoiser,
        quality_head=T.TinyQualityHead(),
        vae=S.tiny_sdxl_vae(),
        noise_scheduler=T.tiny_scheduler(),
    )
    pipe = StableDiffusionXLPipeline(
        unet=S.tiny_sdxl_unet(), vae=S.tiny_sdxl_vae(), text_encoder=S.tiny_sdxl_text_encoder(),
        text_encoder_2=S.tiny_sdxl_text_encoder_2(), tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=T.tiny_scheduler(), add_watermarker=False,
    )  # fmt: skip
    return module, pipe


def _pipeline_images(pipe) -> torch.Tensor:
    """The pipeline's images of PROMPTS, image i from a generator seeded SEED + i (as generate)."""
    return pipe(
        PROMPTS,
        generator=[torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="pt",
    ).images


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")
@pytest.mark.parametrize("build", [_sd15, _sdxl], ids=["sd15", "sdxl"])
def test_readme_export_recipe_reproduces_generate(
    build, tokenizer_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    module, pipe = build(T.tiny_tokenizer(str(tokenizer_dir)))
    assert module.process.noise_scheduler.config.steps_offset == 0  # the case the recipe broke on
    pipe.set_progress_bar_config(disable=True)
    module.save_lora("my_lora")  # what `acpo export --out my_lora` writes (tests/test_export.py)
    exec(readme_export_recipe(), {"pipe": pipe, "DDIMScheduler": DDIMScheduler})
    images = _pipeline_images(pipe)
    kwargs = dict(seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    ours = module.generate(PROMPTS, **kwargs)
    difference = float((images - ours).abs().max())
    assert difference <= TOLERANCE, f"pipeline vs generate(): {difference:.3g}"
    effect = float((ours - module.generate(PROMPTS, use_anchor=True, **kwargs)).abs().max())
    assert effect > 1000 * TOLERANCE, f"the LoRA barely changes the images ({effect:.3g})"


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")
def test_an_outdated_sd_config_file_samples_as_the_pipeline_with_its_sampler(
    tokenizer_dir, tmp_path
) -> None:
    """``StableDiffusionPipeline`` (not SDXL's) rewrites a config *file* with ``steps_offset`` 0 to 1
    when it is built; the README's advice, the module's sampler taken from the pipeline, matches it."""
    from diffusers import DDPMScheduler

    tokenizer = T.tiny_tokenizer(str(tokenizer_dir))
    T.tiny_scheduler().save_config(tmp_path / "scheduler")  # writes steps_offset: 0
    pipe = StableDiffusionPipeline(
        unet=T.tiny_unet(), vae=T.tiny_vae(), text_encoder=T.tiny_text_encoder(),
        tokenizer=tokenizer, scheduler=DDPMScheduler.from_pretrained(tmp_path / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.steps_offset == 1  # the pipeline's rewrite
    module = ACPOModule(
        unet=add_lora(T.tiny_unet(), rank=4),
        quality_head=T.TinyQualityHead(),
        noise_scheduler=DDPMScheduler.from_pretrained(tmp_path / "scheduler"),
        sample_scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        vae=T.tiny_vae(),
        text_encoder=T.tiny_text_encoder(),
        tokenizer=tokenizer,
    )
    images = _pipeline_images(pipe)
    ours = module.generate(PROMPTS, seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    assert float((images - ours).abs().max()) <= TOLERANCE
