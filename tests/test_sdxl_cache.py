"""SDXL on a latent cache: the cached empty prompt and the cached size/crop micro-conditioning.

These tests speak through the cache's public path (``cache_latents`` writes it,
``CachedLatentsDataModule`` reads it, ``ACPOModule`` fits on it), not through its file layout.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from acpo_lightning.cache_latents import cache_latents
from acpo_lightning.data import CachedLatentsDataModule, collate_prompt_images
from acpo_lightning.data.cache_checks import check_latent_cache
from conftest import loss_and_gradients
from test_backbone_sdxl import GUIDANCE, PROMPTS, SEED, STEPS, _pipe_images, _pipeline, _sdxl_module
from test_latent_cache import image_data, write_images

# generate() and the pipeline run the same float32 ops in the same order; 1e-5 is the tolerance
# of test_backbone_sdxl's pipeline comparison (a few hundred ulps of a [0, 1] image), kept here.
PIPELINE_ATOL = 1e-5


def _cached(module, tmp_path, size=(32, 32), count=2, prompt_embeds=True, **data):
    """A cache of ``count`` images of ``size`` (width, height) made for ``module``."""
    images = image_data(write_images(tmp_path / "images", count=count, size=size), **data)
    out = tmp_path / "latents"
    denoiser = module.denoiser if prompt_embeds else None
    cache_latents(module.vae, images, out, batch_size=4, denoiser=denoiser)
    return images, CachedLatentsDataModule(str(out), batch_size=4)


def test_a_prompt_cache_keeps_the_sdxl_empty_prompt_zeros(tokenizer_dir, tmp_path) -> None:
    """force_zeros_for_empty_prompt (sdxl.yaml's default): CFG's unconditional branch is zeros
    before and after a prompt cache installs its empty prompt, as in the pipeline."""
    module = _sdxl_module(tokenizer_dir, lora_init=False, force_zeros=True)
    pipe = _pipeline(module, force_zeros=True)
    kwargs = dict(seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE, use_anchor=True)
    expected = _pipe_images(pipe)
    torch.testing.assert_close(
        module.generate(PROMPTS, **kwargs), expected, rtol=0, atol=PIPELINE_ATOL
    )
    _, cached = _cached(module, tmp_path)
    check_latent_cache(cached, module.vae, module.codec.moments_shape, module.denoiser)
    null = module.denoiser.null_condition()
    assert module.denoiser.preset_null_condition() is not None
    assert all(not value.any() for value in null.values())
    images = module.generate(PROMPTS, **kwargs)  # 8.3e-2 from the pipeline with "" encoded
    torch.testing.assert_close(images, expected, rtol=0, atol=PIPELINE_ATOL)


# The cached moments are the image path's VAE posterior (the same convolutions on the same
# pixels, batched alike), equal to float32 rounding: a few ulps. Through the tiny UNet (about ten
# layers, each of condition number O(1) for these seeded weights) and the VAE decoder of the
# perceptual term, a few ulps become at most ~1e2 ulps of the loss (1e-5 relative). A LoRA
# gradient entry is a sum of ~B*h*w = 1e3 products; summed in another order (the two paths need
# not run the same backward kernels) it moves by up to ~1e3 ulps of the magnitudes summed, which
# for an entry that cancels is ~1e-4 of the tensor's largest entry, not of its own: the absolute
# floor is therefore 1e-3 of each tensor's largest gradient. Without the cached geometry the
# gradients differ by 3.7 times that entry, so the bound still separates by three decades.
LOSS_RTOL, LOSS_ATOL, GRAD_RTOL, GRAD_FLOOR = 1e-5, 1e-6, 1e-4, 1e-3


@pytest.mark.parametrize(
    "flip", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["one-view", "random-flip"]
)
def test_a_cached_sdxl_step_has_the_image_steps_time_ids_loss_and_gradients(
    flip, tokenizer_dir, tmp_path
) -> None:
    """41x32 sources, 32-px centre crops: time_ids [32, 41, 0, 4, 32, 32], and [.., 0, 5, ..] for
    the flipped view (the crop's left counted in the flipped image), from images and cache."""
    module = _sdxl_module(tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5)
    images, cached = _cached(module, tmp_path, size=(41, 32), count=4, random_flip=flip)
    images.setup("fit")
    cached.setup("fit")
    seen = set()
    for seed in range(4 if flip else 1):
        torch.manual_seed(seed)  # both datasets draw each flip from torch's global generator
        pixel_batch = collate_prompt_images([images.train_dataset[i] for i in range(4)])
        torch.manual_seed(seed)
        latent_batch = collate_prompt_images([cached.train_dataset[i] for i in range(4)])
        ids = [
            module.denoiser.conditioning(batch["prompts"], 4, batch=batch)["time_ids"]
            for batch in (pixel_batch, latent_batch)
        ]
        assert torch.equal(ids[1], ids[0]), (ids[1].tolist(), ids[0].tolist())
        seen |= {tuple(row) for row in ids[0].int().tolist()}
        loss, grads = loss_and_gradients(module, pixel_batch)
        cached_loss, cached_grads = loss_and_gradients(module, latent_batch)
        torch.testing.assert_close(cached_loss, loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)
        assert grads.keys() == cached_grads.keys() and grads
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            floor = GRAD_FLOOR * float(grad.abs().max())
            torch.testing.assert_close(cached_grads[name], grad, rtol=GRAD_RTOL, atol=floor)
    expected = {(32, 41, 0, 4, 32, 32)} | ({(32, 41, 0, 5, 32, 32)} if flip else set())
    assert seen == expected


def _drop_geometry(folder) -> None:
    """Make ``folder`` what the writer wrote before caches held image geometry (format-bound:
    a cache format that moves these fields must keep a cache without them refused alike)."""
    import json

    from safetensors.torch import load_file, save_file

    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["image_geometry"]
    for shard in manifest["shards"]:
        tensors = load_file(folder / shard["file"])
        save_file({k: v for k, v in tensors.items() if "crop" not in k and "sizes" not in k},
                  folder / shard["file"])  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_sdxl_fit_refuses_a_cache_without_image_geometry_in_one_line(
    tokenizer_dir, tmp_path
) -> None:
    module = _sdxl_module(tokenizer_dir)
    _, cached = _cached(module, tmp_path, size=(41, 32), prompt_embeds=False)
    assert cached.image_geometry
    _drop_geometry(cached.path)
    old = CachedLatentsDataModule(str(cached.path))
    assert not old.image_geometry
    run = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match="original sizes and crop offsets") as error:
        run.fit(module, old)
    message = str(error.value)
    assert "\n" not in message and str(cached.path) in message and run.global_step == 0
    assert f"re-run `acpo cache-latents --config <your training config(s)> --out {cached.path}" in (
        message
    )
    old.setup("fit")
    assert "crop_top_left" not in old.train_dataset[0]  # an SD-1.x model trains on it as before
