"""Model factories: real loading code on local files, and the missing-weights error."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from acpo_lightning import testing as T
from acpo_lightning.models import (
    ModelNotFoundError,
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_unet,
    load_vae,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A Stable-Diffusion-shaped repository of tiny models, written with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny-sd")
    T.tiny_unet().save_pretrained(root / "unet")
    T.tiny_vae().save_pretrained(root / "vae")
    T.tiny_text_encoder().save_pretrained(root / "text_encoder")
    T.tiny_tokenizer().save_pretrained(root / "tokenizer")
    T.tiny_scheduler(prediction_type="v_prediction").save_pretrained(root / "scheduler")
    T.tiny_pixel_unet().save_pretrained(root / "pixel")  # root-level layout, like google/ddpm-*
    return root


def test_loaders_read_a_local_repository(sd_dir) -> None:
    unet = load_unet(str(sd_dir), torch_dtype="bfloat16")
    assert unet.dtype == torch.bfloat16
    x, t, h = torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 16, T.TINY_TEXT_DIM)
    reference = T.tiny_unet()(x, t, h).sample
    torch.testing.assert_close(load_unet(str(sd_dir))(x, t, h).sample, reference)
    assert load_vae(str(sd_dir)).config.latent_channels == 4
    tokenizer = load_tokenizer(str(sd_dir))
    encoder = load_text_encoder(str(sd_dir))
    ids = tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    torch.testing.assert_close(encoder(ids)[0], T.tiny_text_encoder()(ids)[0])
    scheduler = load_scheduler(str(sd_dir))
    assert (
        type(scheduler).__name__ == "DDPMScheduler"
        and scheduler.config.prediction_type == "v_prediction"
    )
    assert (
        load_scheduler(str(sd_dir), prediction_type="epsilon").config.prediction_type == "epsilon"
    )
    assert (
        type(load_scheduler(str(sd_dir), scheduler_class="DDIMScheduler")).__name__
        == "DDIMScheduler"
    )


def test_unet_class_is_read_from_the_config(sd_dir) -> None:
    assert isinstance(load_unet(str(sd_dir / "pixel"), subfolder=None), UNet2DModel)


def test_missing_local_weights_name_the_directory_and_fix(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_unet(str(tmp_path))
    text = str(info.value)
    assert "UNet config" in text and str(tmp_path) in text and "config.json" in text


def test_missing_hub_weights_offline_name_model_cache_and_fix(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        load_vae("acpo-tests/not-a-real-model")
    text = str(info.value)
    assert "acpo-tests/not-a-real-model/vae" in text
    assert "HF_HUB_OFFLINE" in text and "hf download acpo-tests/not-a-real-model" in text
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        load_tokenizer("acpo-tests/not-a-real-model")
    with pytest.raises(ModelNotFoundError, match="text encoder"):
        load_text_encoder("acpo-tests/not-a-real-model")


def test_bad_names_are_rejected() -> None:
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="NotAScheduler"):
        load_scheduler("unused", scheduler_class="NotAScheduler")


def test_load_vae_loads_a_tiny_autoencoder_for_the_perceptual_path(tmp_path) -> None:
    from acpo_lightning.testing import tiny_taesd

    tiny_taesd().save_pretrained(tmp_path / "taesd")
    decoder = load_vae(str(tmp_path / "taesd"), subfolder=None, model_class="AutoencoderTiny")
    assert type(decoder).__name__ == "AutoencoderTiny"
    with pytest.raises(
        ValueError, match="model_class='UNet2DModel' is not a diffusers autoencoder"
    ):
        load_vae(str(tmp_path / "taesd"), subfolder=None, model_class="UNet2DModel")
