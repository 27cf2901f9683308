"""Tiny FLUX.1 parts at the sizes of diffusers' ``tests/pipelines/flux/test_pipeline_flux.py``.

The transformer (one double- and one single-stream block, 2 heads of 16), the one-block VAE with a
single latent channel and FLUX's ``shift_factor``, and a T5 encoder with 32-dim states are the real
classes, seeded. The CLIP side is :mod:`acpo_lightning.testing`'s tiny CLIP text model and tokenizer
(32-dim pooled output). The T5 tokenizer is a character-level sentencepiece-style vocabulary built in
code (diffusers' tests download ``hf-internal-testing/tiny-random-t5``). Used by
``configs/tiny_flux.yaml`` and ``tests/test_backbone_flux.py``.
"""

from __future__ import annotations

import string

import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from acpo_lightning.quiet_imports import quiet_imports
from acpo_lightning.testing import TINY_MAX_LENGTH, TINY_TEXT_DIM

with quiet_imports():  # diffusers' models import peft, then bitsandbytes: see quiet_imports
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel


def tiny_flux_transformer(
    seed: int = 0, guidance_embeds: bool = True, num_layers: int = 1, num_single_layers: int = 1
) -> FluxTransformer2DModel:
    """A FLUX transformer on 1-channel latents (4 channels per packed 2x2 patch).

    ``guidance_embeds`` (FLUX.1-dev's distilled guidance) is on by default, unlike diffusers'
    dummy components, so that the guidance path is exercised; ``False`` gives a schnell-like model.
    """
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_DIM,
        pooled_projection_dim=TINY_TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    )


def tiny_flux_vae(seed: int = 0) -> AutoencoderKL:
    """A one-block KL autoencoder (scale factor 1) with one latent channel and FLUX-style
    ``scaling_factor``/``shift_factor``."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _t5_vocab() -> list[tuple[str, float]]:
    """Special tokens, then every printable character alone and as a word start (``▁c``)."""
    chars = [c for c in string.printable[:95] if c != " "]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    return pieces + [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in chars]


def tiny_t5_tokenizer(model_max_length: int = TINY_MAX_LENGTH) -> T5Tokenizer:
    """A character-level T5 tokenizer (pad 0, eos 1, unk 2), built in code."""
    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(seed: int = 0) -> T5EncoderModel:
    """A two-layer T5 encoder with 32-dim states over :func:`tiny_t5_tokenizer`'s vocabulary."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(_t5_vocab()),
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler configuration (resolution-shifted sigmas, ``use_dynamic_shifting``)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
