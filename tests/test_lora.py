"""LoRA over peft: freezing, toggling, diffusers-format save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from acpo_lightning import testing as T
from acpo_lightning.models import (
    LORA_WEIGHT_NAME,
    adapters_disabled,
    add_lora,
    has_lora,
    load_lora,
    save_lora,
)


def _inputs() -> tuple:
    torch.manual_seed(1)
    return torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 16, T.TINY_TEXT_DIM)


def test_add_lora_trains_only_adapters_in_fp32() -> None:
    unet = add_lora(T.tiny_unet().to(torch.bfloat16), rank=4)
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert all(p.dtype == torch.float32 for _, p in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if "lora_" not in n)


def test_zero_init_is_identity_and_toggle_restores_base() -> None:
    x, t, h = _inputs()
    base = T.tiny_unet()(x, t, h).sample
    unet = add_lora(T.tiny_unet(), rank=4)
    torch.testing.assert_close(unet(x, t, h).sample, base, rtol=0, atol=0)
    random = add_lora(T.tiny_unet(), rank=4, init_lora_weights=False)
    adapted = random(x, t, h).sample
    assert not torch.allclose(adapted, base)
    with adapters_disabled(random):
        torch.testing.assert_close(random(x, t, h).sample, base, rtol=0, atol=0)
    torch.testing.assert_close(
        random(x, t, h).sample, adapted, rtol=0, atol=0
    )  # re-enabled on exit


def test_save_load_round_trip_in_diffusers_layout(tmp_path) -> None:
    x, t, h = _inputs()
    source = add_lora(T.tiny_unet(), rank=4, init_lora_weights=False)
    path = save_lora(source, tmp_path)
    assert path.name == LORA_WEIGHT_NAME
    keys = list(load_file(str(path)))
    assert keys and all(
        k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys
    )
    target = add_lora(T.tiny_unet(), rank=4)
    load_lora(target, tmp_path)
    torch.testing.assert_close(target(x, t, h).sample, source(x, t, h).sample, rtol=0, atol=0)


def test_load_lora_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=LORA_WEIGHT_NAME):
        load_lora(add_lora(T.tiny_unet(), rank=4), tmp_path)
    save_lora(add_lora(T.tiny_unet(), rank=4, target_modules=["to_q"]), tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        load_lora(add_lora(T.tiny_unet(), rank=4, target_modules=["to_k"]), tmp_path)


def test_bad_lora_arguments() -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(T.tiny_unet(), rank=0)
    with pytest.raises(ValueError, match="not_a_layer"):
        add_lora(T.tiny_unet(), target_modules=["not_a_layer"])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(T.tiny_unet(), "unused")
    assert not has_lora(T.tiny_unet())


def test_pixel_unet_without_peft_mixin_gets_lora() -> None:
    unet = add_lora(T.tiny_pixel_unet(), rank=2, init_lora_weights=False)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with adapters_disabled(unet):
        base = unet(x, t).sample
    assert has_lora(unet) and not torch.allclose(unet(x, t).sample, base)


def test_toggle_keeps_the_users_frozen_adapter_weights_frozen() -> None:
    unet = add_lora(T.tiny_unet(), rank=4)
    frozen = [p for n, p in unet.named_parameters() if "lora_A" in n]
    for param in frozen:
        param.requires_grad_(False)  # e.g. train only the B matrices
    with adapters_disabled(unet):
        pass
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_B" in n)
