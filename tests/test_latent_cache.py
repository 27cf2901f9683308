"""Cached VAE latents: ``acpo cache-latents``, ``CachedLatentsDataModule`` and the cached step."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from acpo_lightning import testing as T
from acpo_lightning.cache_latents import cache_latents
from acpo_lightning.cli import build_cli, main
from acpo_lightning.data import (
    CachedLatentsDataModule,
    LatentCacheError,
    PromptImageDataModule,
    collate_prompt_images,
    open_image,
)
from acpo_lightning.data.cache_checks import check_latent_cache
from acpo_lightning.models import vae_fingerprint
from conftest import CONFIGS, loss_and_gradients, make_module

PROMPTS = ["a red square", "a blue circle", "a green stripe", "a white square", "a yellow circle"]


def write_images(folder: Path, count: int = 4, size: tuple[int, int] = (40, 32)) -> Path:
    """``count`` seeded random-texture PNGs of ``size`` (width, height) and a ``metadata.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        coarse = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
        image.save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": PROMPTS[index % len(PROMPTS)]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


def image_data(folder: Path, **kwargs) -> PromptImageDataModule:
    options = dict(resolution=32, center_crop=True, random_flip=False, batch_size=4)
    return PromptImageDataModule("imagefolder", str(folder), **{**options, **kwargs})


def make_cache(tmp_path: Path, vae=None, shard_size: int = 3, **data) -> Path:
    out = tmp_path / "latents"
    dm = image_data(write_images(tmp_path / "images"), **data)
    cache_latents(vae or T.tiny_vae(), dm, out, batch_size=3, shard_size=shard_size)
    return out


def test_a_cached_step_equals_the_uncached_step_on_the_same_images(tokenizer_dir, tmp_path):
    module = make_module(tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5)
    images = image_data(write_images(tmp_path / "images"))
    images.setup("fit")
    out = tmp_path / "latents"
    manifest = cache_latents(module.vae, images, out, batch_size=3, shard_size=3)
    assert manifest["count"] == 4 and [s["rows"] for s in manifest["shards"]] == [3, 1]
    cached = CachedLatentsDataModule(str(out))
    cached.setup("fit")
    pixel_batch = collate_prompt_images([images.train_dataset[i] for i in range(4)])
    latent_batch = collate_prompt_images([cached.train_dataset[i] for i in range(4)])
    assert latent_batch["prompts"] == pixel_batch["prompts"] == PROMPTS[:4]
    assert latent_batch["latent_moments"].shape == (4, 8, 16, 16)
    with torch.no_grad():
        posterior = module.vae.encode(pixel_batch["pixel_values"]).latent_dist
    torch.testing.assert_close(latent_batch["latent_moments"], posterior.parameters)

    loss, grads = loss_and_gradients(module, pixel_batch)
    cached_loss, cached_grads = loss_and_gradients(module, latent_batch)
    torch.testing.assert_close(cached_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == cached_grads.keys() and all("lora_" in name for name in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6)
    # a fresh sample each step, not the posterior mean
    first = module.codec.batch_latents(
        latent_batch, torch.Generator().manual_seed(1), module.device
    )
    second = module.codec.batch_latents(
        latent_batch, torch.Generator().manual_seed(2), module.device
    )
    assert (first - second).abs().max() > 1e-3


def test_random_flip_caches_both_orientations_and_draws_both(tmp_path):
    vae = T.tiny_vae()
    folder = write_images(tmp_path / "images", count=3, size=(32, 32))
    # square images at the resolution: the random crop of center_crop: false is the whole image
    dm = image_data(folder, center_crop=False, random_flip=True)
    manifest = cache_latents(vae, dm, tmp_path / "latents", batch_size=2, shard_size=8)
    assert manifest["views"] == 2 and manifest["latent_shape"] == [8, 16, 16]
    assert manifest["dtype"] == "float32" and manifest["resolution"] == 32
    assert manifest["data"]["random_flip"] is True and manifest["source_rows"] == [0, 1, 2]
    moments = load_file(tmp_path / "latents" / "shard-00000.safetensors")["moments"]
    assert moments.shape == (3, 2, 8, 16, 16) and moments.dtype == torch.float32

    image = open_image(folder / "1.png")
    pixels = dm.eval_transform(image)
    mirrored = dm.eval_transform(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert torch.equal(mirrored, pixels.flip(-1))  # what the image transform's flip gives
    with torch.no_grad():
        expected = vae.encode(torch.stack([pixels, mirrored])).latent_dist.parameters
    torch.testing.assert_close(moments[1], expected, rtol=1e-5, atol=1e-6)
    assert (moments[1, 0] - moments[1, 1]).abs().max() > 1e-2

    cached = CachedLatentsDataModule(str(tmp_path / "latents"))
    cached.setup("fit")
    torch.manual_seed(0)
    views = set()
    for _ in range(16):
        item = cached.train_dataset[1]
        assert item["prompt"] == PROMPTS[1]
        matches = [torch.equal(item["latent_moments"], moments[1, v]) for v in (0, 1)]
        assert sum(matches) == 1
        views.add(matches.index(True))
    assert views == {0, 1}

    with pytest.raises(FileExistsError, match="--overwrite"):
        cache_latents(vae, dm, tmp_path / "latents")
    again = cache_latents(vae, image_data(folder), tmp_path / "latents", overwrite=True)
    assert (
        again["views"] == 1 and CachedLatentsDataModule(str(tmp_path / "latents")).manifest == again
    )


def test_cached_batches_resume_from_the_loader_state(tmp_path):
    out = make_cache(tmp_path, shard_size=2)
    loader = CachedLatentsDataModule(str(out), batch_size=1, data_seed=3)
    loader.setup("fit")
    first = loader.train_dataloader()
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    rest = [batch["prompts"] for batch in iterator]
    resumed = CachedLatentsDataModule(str(out), batch_size=1, data_seed=3)
    resumed.setup("fit")
    loader = resumed.train_dataloader()
    loader.load_state_dict(state)
    assert [batch["prompts"] for batch in loader] == rest and len(rest) == 3
    # open shard files stay in their process: a spawned DataLoader worker opens its own
    copy = pickle.loads(pickle.dumps(resumed.train_dataset))
    assert resumed.train_dataset._handles and not copy._handles
    torch.testing.assert_close(
        copy[3]["latent_moments"], resumed.train_dataset[3]["latent_moments"]
    )


def test_random_crop_is_refused_naming_center_crop_and_the_fix(tmp_path):
    dm = image_data(write_images(tmp_path / "images", size=(40, 32)), center_crop=False)
    with pytest.raises(ValueError, match="center_crop") as error:
        cache_latents(T.tiny_vae(), dm, tmp_path / "latents")
    message = str(error.value)
    assert "row 0" in message and "0.png" in message and "40x32" in message
    assert "--data.init_args.center_crop true" in message
    assert not (tmp_path / "latents" / "manifest.json").exists()


@pytest.mark.parametrize("problem", ["missing shard", "wrong shape", "no manifest"])
def test_an_incomplete_cache_is_refused_naming_the_file_and_the_fix(problem, tmp_path):
    out = make_cache(tmp_path)
    if problem == "missing shard":
        (out / "shard-00001.safetensors").unlink()
        expected, error_type = "shard-00001.safetensors", FileNotFoundError
    elif problem == "wrong shape":
        save_file({"moments": torch.zeros(1, 1, 8, 8, 8)}, out / "shard-00001.safetensors")
        expected, error_type = "[1, 1, 8, 8, 8]", LatentCacheError
    else:
        (out / "manifest.json").unlink()
        expected, error_type = "no manifest.json", FileNotFoundError
    with pytest.raises(error_type) as error:
        CachedLatentsDataModule(str(out))
    assert expected in str(error.value) and str(out) in str(error.value)
    assert "re-run `acpo cache-latents" in str(error.value)


def test_another_vae_is_refused_at_fit_setup(tokenizer_dir, tmp_path):
    out = make_cache(tmp_path, vae=T.tiny_vae(seed=0))
    module = make_module(tokenizer_dir)
    module.vae = T.tiny_vae(seed=1).requires_grad_(False)  # the same config, other weights
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match="encoder weights digest") as error:
        trainer.fit(module, CachedLatentsDataModule(str(out)))
    assert str(out) in str(error.value) and "re-run `acpo cache-latents`" in str(error.value)
    assert trainer.global_step == 0

    cached = CachedLatentsDataModule(str(out))
    module.vae = T.tiny_vae(seed=0)
    check_latent_cache(
        cached, module.vae, module.codec.moments_shape
    )  # the VAE that encoded it: accepted
    module.vae.register_to_config(scaling_factor=0.5)
    with pytest.raises(ValueError, match=r"scaling_factor 0\.18215 \(cache\) vs 0\.5 \(model\)"):
        check_latent_cache(cached, module.vae, module.codec.moments_shape)
    small = make_module(tokenizer_dir)
    small.unet.register_to_config(sample_size=8)
    with pytest.raises(ValueError, match=r"shape \[8, 16, 16\], but this UNet needs \[8, 8, 8\]"):
        check_latent_cache(cached, small.vae, small.codec.moments_shape)
    pixel = make_module(tokenizer_dir, latent=False)
    with pytest.raises(ValueError, match="has no vae"):
        check_latent_cache(cached, pixel.vae, pixel.codec.moments_shape)
    cached.setup("fit")
    batch = collate_prompt_images([cached.train_dataset[i] for i in range(2)])
    with pytest.raises(ValueError, match="the batch holds cached VAE latents"):
        pixel.compute_terms(batch, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"needs \[8, 8, 8\]"):
        small.compute_terms(batch, torch.Generator().manual_seed(0))


def test_prompt_only_data_is_refused_in_one_line(tmp_path, capsys):
    T.tiny_vae().save_pretrained(tmp_path / "repo" / "vae")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = ["--config", str(CONFIGS / "acpo.yaml"), "--out", str(tmp_path / "latents")]
    args += ["--model.vae.init_args.pretrained_model_name_or_path", str(tmp_path / "repo")]
    args += ["--data.init_args.source", "prompts", "--data.init_args.path", str(prompts)]
    with pytest.raises(SystemExit) as exit_info:
        main(["cache-latents", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("acpo: error: prompts file") and str(prompts) in err
    assert "source: prompts" in err and "source: imagefolder, manifest or hf" in err
    assert not (tmp_path / "latents").exists()


def _tiny_sd_repo(folder: Path) -> Path:
    T.tiny_unet().save_pretrained(folder / "unet")
    T.tiny_vae().save_pretrained(folder / "vae")
    T.tiny_text_encoder().save_pretrained(folder / "text_encoder")
    T.tiny_tokenizer().save_pretrained(folder / "tokenizer")
    T.tiny_scheduler().save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.slow
def test_cache_latents_command_then_fit_and_resume_on_the_cache(tmp_path, monkeypatch, capsys):
    """acpo.yaml as shipped: only model.vae and data are built (its UNet, text encoder, MANIQA
    head and reward-model callbacks point at the hub, which is offline here), then fit trains
    on the cache with every model loaded from a local SD-shaped folder."""
    from diffusers import AutoencoderKL

    repo = _tiny_sd_repo(tmp_path / "tiny-sd")
    images = write_images(tmp_path / "images", count=5, size=(40, 32))
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "latents"
    args = ["--config", str(CONFIGS / "acpo.yaml"), "--out", str(cache)]
    args += ["--model.vae.init_args.pretrained_model_name_or_path", str(repo)]
    args += ["--data.init_args.path", str(images), "--data.init_args.resolution", "32"]
    args += ["--data.init_args.num_workers", "0", "--batch-size", "2", "--shard-size", "3"]
    main(["cache-latents", *args])
    out = capsys.readouterr().out
    assert "cached 5 rows (each in both orientations) in 2 shards" in out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["latent_shape"] == [8, 16, 16]
    assert manifest["prompts"] == PROMPTS and manifest["views"] == 2
    assert manifest["data"]["center_crop"] is True and manifest["data"]["path"] == str(images)
    vae = AutoencoderKL.from_pretrained(repo / "vae", torch_dtype=torch.bfloat16)
    assert manifest["vae"] == vae_fingerprint(vae)

    model = {
        name: {"init_args": {"pretrained_model_name_or_path": str(repo)}}
        for name in ("vae", "text_encoder", "tokenizer", "noise_scheduler")
    }
    model["unet"] = {
        "init_args": {"unet": {"init_args": {"pretrained_model_name_or_path": str(repo)}}}
    }
    model["quality_head"] = {"class_path": "acpo_lightning.testing.TinyQualityHead"}
    model["perceptual_crop"] = 16  # acpo.yaml's 224 px, on the 32-px images of this cache
    checkpoint = {"dirpath": "outputs/acpo/checkpoints", "save_last": True}
    overlay = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "val_check_interval": None,
            "check_val_every_n_epoch": 1,
            "default_root_dir": str(tmp_path),
            # acpo.yaml's evaluation callbacks load reward models from the hub
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": checkpoint,
                }
            ],
        },
        "model": model,
        "data": {
            "class_path": "acpo_lightning.data.CachedLatentsDataModule",
            "init_args": {"path": str(cache), "batch_size": 2, "num_workers": 0},
        },
    }
    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(overlay))
    configs = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(tmp_path / "cached.yaml")]
    cli = build_cli(["fit", *configs])
    assert isinstance(cli.datamodule, CachedLatentsDataModule)
    assert cli.trainer.global_step == 2
    last = tmp_path / "outputs" / "acpo" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 2 and any("lora_" in k for k in state["state_dict"])
    resumed = build_cli(["fit", *configs, "--trainer.max_steps", "3", "--ckpt_path", str(last)])
    assert resumed.trainer.global_step == 3
