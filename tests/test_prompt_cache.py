"""Prompt embeddings cached beside the latents: ``acpo cache-latents --prompt-embeds``."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from acpo_lightning import conditioning as C
from acpo_lightning import testing as T
from acpo_lightning.cache_latents import PROMPT_EMBEDS_HELP, cache_latents
from acpo_lightning.data import CachedLatentsDataModule, LatentCacheError, collate_prompt_images
from acpo_lightning.data.cache_checks import check_latent_cache
from acpo_lightning.denoisers import UNetDenoiser
from conftest import make_module
from test_latent_cache import PROMPTS, image_data, write_images

# float32 epsilon: the cached and the uncached text-encoder calls are the same calls (the same
# prompts in batches of the same size), so they may differ only by the rounding of kernels that
# order a sum differently between two runs (none do on one machine today): a few ulps.
EPS32 = torch.finfo(torch.float32).eps
EMBED_RTOL, EMBED_ATOL = 8 * EPS32, 8 * EPS32
# The loss is a mean over the tiny UNet's output after about ten layers (attention, convolutions,
# norms), each of which carries a relative input error to its output at most times its condition
# number, O(1) for these seeded weights: 8 ulps in, about 10 x 8 ulps = 1e-5 out.
LOSS_RTOL, LOSS_ATOL = 10 * EMBED_RTOL, 1e-7


def count_calls(module: torch.nn.Module) -> list[int]:
    """A one-item list counting ``module``'s forward calls from now on."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_step_on_cached_embeddings_equals_the_step_on_prompts_and_runs_no_text_encoder(
    tokenizer_dir, tmp_path
):
    module = make_module(
        tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5, prompt_dropout=0.5
    )
    images = image_data(write_images(tmp_path / "images"))
    out = tmp_path / "latents"
    manifest = cache_latents(
        module.vae, images, out, batch_size=4, shard_size=3, denoiser=module.denoiser
    )
    embeds = manifest["prompt_embeds"]
    assert (
        embeds["entries"] == [["encoder_hidden_states", [16, 32], "float32"]] and embeds["tensor"]
    )
    shard = load_file(out / "shard-00000.safetensors")
    assert shard["prompt_embeds.encoder_hidden_states"].shape == (3, 16, 32)

    cached = CachedLatentsDataModule(str(out))
    cached.setup("fit")
    pixel_batch = collate_prompt_images([images.train_dataset[i] for i in range(4)])
    latent_batch = collate_prompt_images([cached.train_dataset[i] for i in range(4)])
    assert latent_batch["prompts"] == PROMPTS[:4]
    torch.testing.assert_close(
        latent_batch["prompt_embeds"],
        module.encode_prompts(PROMPTS[:4]),
        rtol=EMBED_RTOL,
        atol=EMBED_ATOL,
    )
    pixel_batch["latent_moments"] = latent_batch["latent_moments"]  # the same x0 draws
    del pixel_batch["pixel_values"]

    def loss(batch: dict) -> torch.Tensor:
        terms, _ = module.compute_terms(batch, torch.Generator().manual_seed(7))
        return terms.loss.detach()

    calls = count_calls(module.text_encoder)
    module.train()
    uncached = loss(pixel_batch)
    assert calls[0] > 0  # the hook sees the encoder when the prompts are encoded
    check_latent_cache(cached, module.vae, module.codec.moments_shape, module.denoiser)
    calls[0] = 0
    torch.testing.assert_close(loss(latent_batch), uncached, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    null = module.denoiser.null_condition()
    assert calls[0] == 0
    torch.testing.assert_close(null, module.encode_prompts([""]), rtol=EMBED_RTOL, atol=EMBED_ATOL)


def trainer(tmp_path: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def test_fit_on_cached_embeddings_runs_no_text_encoder_and_refuses_another_one(
    tokenizer_dir, tmp_path
):
    module = make_module(tokenizer_dir, prompt_dropout=0.5)
    out = tmp_path / "latents"
    images = image_data(write_images(tmp_path / "images"))
    cache_latents(module.vae, images, out, batch_size=3, denoiser=module.denoiser)

    other = make_module(tokenizer_dir)
    other.text_encoder = other.denoiser.text_encoder = T.tiny_text_encoder(seed=1)  # same config
    other.text_encoder.requires_grad_(False)
    run = trainer(tmp_path)
    with pytest.raises(ValueError, match="other text encoders") as error:
        run.fit(other, CachedLatentsDataModule(str(out), batch_size=4))
    message = str(error.value)
    assert "text_encoder weights_digest" in message and str(out) in message
    assert "re-run `acpo cache-latents --prompt-embeds`" in message and run.global_step == 0

    calls = count_calls(module.text_encoder)
    run = trainer(tmp_path)
    run.fit(module, CachedLatentsDataModule(str(out), batch_size=4))
    assert run.global_step == 1 and calls[0] == 0
    assert module.denoiser.preset_null_condition() is not None


class DictDenoiser(UNetDenoiser):
    """SD-1.x with a dict conditioning: text states, a pooled vector and integer ids."""

    @torch.no_grad()
    def encode_prompts(self, prompts):
        states = super().encode_prompts(prompts)
        ids = torch.tensor([[len(prompt), prompt.count(" "), 7] for prompt in prompts])
        return {"encoder_hidden_states": states, "pooled": 2 * states[:, 0], "ids": ids}

    def null_condition(self, like=None):
        preset = self.preset_null_condition(like)
        return preset if preset is not None else self.encode_prompts([""])

    def _call(self, unet, sample, times, cond):
        return super()._call(unet, sample, times, cond["encoder_hidden_states"])


def test_a_dict_conditioning_round_trips_through_the_cache(tmp_path):
    denoiser = DictDenoiser(T.tiny_unet(sample_size=16), T.tiny_text_encoder(), T.tiny_tokenizer())
    images = image_data(write_images(tmp_path / "images", count=3))
    out = tmp_path / "latents"
    manifest = cache_latents(T.tiny_vae(), images, out, batch_size=2, denoiser=denoiser)
    assert not manifest["prompt_embeds"]["tensor"]
    assert [entry[0] for entry in manifest["prompt_embeds"]["entries"]] == [
        "encoder_hidden_states", "pooled", "ids",
    ]  # fmt: skip
    cached = CachedLatentsDataModule(str(out), batch_size=3)
    cached.setup("fit")
    batch = next(iter(cached.train_dataloader()))
    embeds = batch["prompt_embeds"]
    expected = denoiser.encode_prompts(batch["prompts"])
    assert list(embeds) == list(expected) and embeds["ids"].dtype == torch.int64
    for name, value in expected.items():
        torch.testing.assert_close(embeds[name], value, rtol=EMBED_RTOL, atol=EMBED_ATOL)

    check_latent_cache(cached, T.tiny_vae(), (8, 16, 16), denoiser)
    calls = count_calls(denoiser.text_encoder)
    cond = denoiser.conditioning(None, 3, dropout=0.5, generator=torch.Generator(), batch=batch)
    assert calls[0] == 0 and C.describe(cond) == C.describe(expected)
    null = denoiser.null_condition()
    assert list(null) == list(expected) and null["ids"].tolist() == [[0, 0, 7]]


@pytest.mark.parametrize("problem", ["missing tensor", "wrong shape", "no null file"])
def test_incomplete_prompt_embeddings_are_refused_naming_the_file(problem, tokenizer_dir, tmp_path):
    module = make_module(tokenizer_dir)
    out = tmp_path / "latents"
    images = image_data(write_images(tmp_path / "images", count=2))
    cache_latents(module.vae, images, out, denoiser=module.denoiser)
    shard = out / "shard-00000.safetensors"
    tensors = load_file(shard)
    if problem == "missing tensor":
        del tensors["prompt_embeds.encoder_hidden_states"]
        expected, error_type = "holds no 'prompt_embeds.encoder_hidden_states'", LatentCacheError
    elif problem == "wrong shape":
        tensors["prompt_embeds.encoder_hidden_states"] = torch.zeros(2, 4, 32)
        expected, error_type = "[2, 4, 32]", LatentCacheError
    else:
        (out / "null-prompt.safetensors").unlink()
        expected, error_type = "null-prompt.safetensors", FileNotFoundError
    save_file(tensors, shard)
    with pytest.raises(error_type, match="re-run `acpo cache-latents") as error:
        CachedLatentsDataModule(str(out))
    assert expected in str(error.value)


def test_unconditional_models_are_refused_and_a_cache_without_embeddings_keeps_none(
    tokenizer_dir, tmp_path
):
    unconditional = make_module(latent=False, conditional=False)
    images = image_data(write_images(tmp_path / "images", count=2))
    with pytest.raises(ValueError, match=r"takes no prompt.*drop --prompt-embeds"):
        cache_latents(T.tiny_vae(), images, tmp_path / "out", denoiser=unconditional.denoiser)
    out = tmp_path / "latents"
    cache_latents(T.tiny_vae(), images, out, denoiser=make_module(tokenizer_dir).denoiser)
    manifest = cache_latents(T.tiny_vae(), images, out, overwrite=True)
    assert "prompt_embeds" not in manifest and not (out / "null-prompt.safetensors").exists()
    cached = CachedLatentsDataModule(str(out))
    cached.setup("fit")
    assert (
        cached.prompt_cache_fingerprint is None and "prompt_embeds" not in cached.train_dataset[0]
    )
    assert "runs no text encoder in data-objective steps" in PROMPT_EMBEDS_HELP


def test_the_command_caches_the_configs_prompt_embeddings(tmp_path, monkeypatch, capsys):
    """acpo.yaml as shipped, its models pointed at a local SD-shaped folder: ``--prompt-embeds``
    builds the flat UNet denoiser (LoRA included) and caches what it encodes."""
    from acpo_lightning.cli import main
    from acpo_lightning.models import load_text_encoder, load_tokenizer
    from conftest import CONFIGS
    from test_latent_cache import _tiny_sd_repo

    repo = _tiny_sd_repo(tmp_path / "tiny-sd")
    images = write_images(tmp_path / "images", count=3, size=(32, 32))
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / "acpo.yaml"), "--out", str(tmp_path / "latents")]
    for name in ("vae", "text_encoder", "tokenizer", "unet.init_args.unet"):
        args += [f"--model.{name}.init_args.pretrained_model_name_or_path", str(repo)]
    args += ["--data.init_args.path", str(images), "--data.init_args.resolution", "32"]
    main(["cache-latents", *args, "--data.init_args.num_workers", "0", "--prompt-embeds"])
    assert "with prompt embeddings" in capsys.readouterr().out
    cached = CachedLatentsDataModule(str(tmp_path / "latents"))
    cached.setup("fit")
    encoder = load_text_encoder(str(repo), torch_dtype=torch.bfloat16)
    denoiser = UNetDenoiser(T.tiny_unet(), encoder, load_tokenizer(str(repo)))
    item = cached.train_dataset[0]
    assert item["prompt_embeds"].dtype == torch.bfloat16  # the config's encoder dtype
    torch.testing.assert_close(item["prompt_embeds"], denoiser.encode_prompts([item["prompt"]])[0])
    check_latent_cache(cached, cached_vae(repo), (8, 16, 16), denoiser)


def cached_vae(repo: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(repo / "vae", torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("change", ["prompt length", "tokenizer"])
def test_a_cache_of_another_prompt_length_or_tokenizer_is_refused_at_fit_setup(
    change, tokenizer_dir, tmp_path
):
    """A cache made at max_prompt_length 8 would train on [B, 8, D] states while generate(),
    rollouts and validation encode [B, 16, D]; a tokenizer that pads with "!" (as SD 2's does,
    where SD 1's pads with its end token) gives other states from the same encoder."""
    from transformers import CLIPTokenizer

    images = image_data(write_images(tmp_path / "images", count=2))
    out = tmp_path / "latents"
    maker = make_module(tokenizer_dir, max_prompt_length=8 if change == "prompt length" else None)
    cache_latents(maker.vae, images, out, denoiser=maker.denoiser)
    model = make_module(tokenizer_dir)  # 16 tokens: the tiny encoder's positions
    if change == "tokenizer":
        model.denoiser.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), pad_token="!")
    run = trainer(tmp_path)
    with pytest.raises(ValueError, match="re-run `acpo cache-latents --prompt-embeds`") as error:
        run.fit(model, CachedLatentsDataModule(str(out), batch_size=2))
    message = str(error.value)
    assert str(out) in message and run.global_step == 0 and "\n" not in message
    if change == "prompt length":
        assert "prompt lengths {'tokenizer': 8} (cache) vs {'tokenizer': 16} (model)" in message
    else:
        assert "tokenizer digest" in message


def test_a_cache_made_at_the_resolved_default_length_is_accepted(tokenizer_dir, tmp_path):
    """max_prompt_length: null resolves to the tokenizer's 16 tokens: the same embeddings as 16."""
    images = image_data(write_images(tmp_path / "images", count=2))
    out = tmp_path / "latents"
    maker = make_module(tokenizer_dir)
    cache_latents(maker.vae, images, out, denoiser=maker.denoiser)
    model = make_module(tokenizer_dir, max_prompt_length=16)
    check_latent_cache(
        CachedLatentsDataModule(str(out)), model.vae, model.codec.moments_shape, model.denoiser
    )
    assert model.denoiser.preset_null_condition() is not None


def test_a_prompt_cache_of_an_earlier_version_is_refused_with_the_fix(tokenizer_dir, tmp_path):
    """Its fingerprint lacks the tokenizers and lengths (and an SDXL one may hold the encoded ""
    as its empty prompt, where the pipeline uses zeros): refused, not trusted (format-bound: the
    manifest is edited as the earlier writer wrote it)."""
    import json

    module = make_module(tokenizer_dir)
    out = tmp_path / "latents"
    cache_latents(module.vae, image_data(write_images(tmp_path / "images", count=2)), out,
                  denoiser=module.denoiser)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("tokenizers", "settings"):
        del manifest["prompt_embeds"]["fingerprint"][key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="written by an earlier acpo-lightning") as error:
        check_latent_cache(
            CachedLatentsDataModule(str(out)), module.vae, module.codec.moments_shape,
            module.denoiser,
        )  # fmt: skip
    assert "re-run `acpo cache-latents --prompt-embeds`" in str(error.value)
    assert module.denoiser.preset_null_condition() is None
