"""The speed/memory switches change nothing in the results."""

from __future__ import annotations

import pytest
import torch

from conftest import make_module, shapes_batch


def _loss_and_grads(module) -> tuple[torch.Tensor, torch.Tensor]:
    module.train()
    terms, _ = module.compute_terms(shapes_batch(), torch.Generator().manual_seed(0))
    terms.loss.backward()
    return terms.loss.detach(), torch.cat([p.grad.flatten() for p in module.trainable_parameters()])


def test_channels_last_gives_the_same_step(tokenizer_dir) -> None:
    reference = _loss_and_grads(
        make_module(tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5)
    )
    module = make_module(
        tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5, channels_last=True
    )
    assert module.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loss, grads = _loss_and_grads(module)
    torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, reference[1], rtol=1e-4, atol=1e-6)


def test_quality_head_is_checkpointed_with_gradient_checkpointing(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5)
    reference = _loss_and_grads(module)
    calls = []
    module.quality_head.register_forward_pre_hook(lambda *args: calls.append(1))
    module.enable_gradient_checkpointing()
    module.zero_grad()
    loss, grads = _loss_and_grads(module)
    assert len(calls) == 2  # forward, then recomputed in backward instead of stored
    torch.testing.assert_close(loss, reference[0])
    torch.testing.assert_close(grads, reference[1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_unet_gives_the_same_step_and_state_names(tokenizer_dir) -> None:
    """Dynamo capture of the LoRA UNet (adapters toggled on and off) with AOT autograd; the
    inductor backend adds code generation only, which takes minutes on two CPU cores."""
    kwargs = dict(lora_init=False, w_perc=1.0, perceptual_share=0.5)
    reference_module = make_module(tokenizer_dir, **kwargs)
    reference = _loss_and_grads(reference_module)
    module = make_module(tokenizer_dir, compile_unet=True, compile_backend="aot_eager", **kwargs)
    loss, grads = _loss_and_grads(module)
    torch.testing.assert_close(loss, reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads, reference[1], rtol=1e-3, atol=1e-5)
    assert module.trained_state_keys() == reference_module.trained_state_keys()


def test_a_perceptual_decoder_decodes_only_the_scored_samples(tokenizer_dir) -> None:
    from acpo_lightning.testing import tiny_taesd

    taesd = tiny_taesd()
    module = make_module(
        tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5, perceptual_decoder=taesd
    )
    assert not any(p.requires_grad for p in taesd.parameters()) and not taesd.training
    calls = {"vae": [], "taesd": []}
    module.vae.decoder.register_forward_pre_hook(lambda m, a: calls["vae"].append(a[0].shape[0]))
    taesd.decoder.register_forward_pre_hook(lambda m, a: calls["taesd"].append(a[0].shape[0]))
    loss, grads = _loss_and_grads(module)
    assert calls == {"vae": [], "taesd": [2]}  # the scored half of the batch, with the tiny decoder
    assert torch.isfinite(loss) and grads.abs().sum() > 0
    reference = _loss_and_grads(
        make_module(tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5)
    )
    assert not torch.allclose(loss, reference[0])  # the perceptual term really came from TAESD
    module.generate(["a red square"], num_inference_steps=2)
    assert calls["vae"] == [1] and calls["taesd"] == [2]  # samples keep the full VAE
    keys = module.trained_state_keys()
    assert not any(k.startswith("perceptual_decoder") for k in keys)


def test_a_perceptual_decoder_needs_a_latent_model() -> None:
    from acpo_lightning.testing import tiny_taesd

    with pytest.raises(ValueError, match="perceptual_decoder was given but the model has no vae"):
        make_module(latent=False, perceptual_decoder=tiny_taesd())
