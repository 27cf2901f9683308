"""Tiny SD3 / SD3.5 parts at the sizes of diffusers' ``tests/pipelines/stable_diffusion_3``.

``get_dummy_components`` there builds a one-layer ``SD3Transformer2DModel`` (4 heads of 8), two
``CLIPTextModelWithProjection`` encoders, a tiny T5, a one-block VAE with SD3's ``shift_factor``
and ``scaling_factor``, and a default ``FlowMatchEulerDiscreteScheduler``. The same classes are
built here, offline and seeded, with three changes that make the tests see more:

- two transformer blocks, the first an MMDiT-X block with a second image self-attention
  (``dual_attention_layers=(0,)``) and RMS query/key norms, as SD3.5 medium has;
- 8-wide CLIP encoders (16 concatenated), so the pipeline's zero padding of the CLIP states up to
  the T5 width (32) is exercised rather than a no-op or a crop;
- a 16 x 16 latent grid, the ``ShapesDataModule`` size of ``configs/tiny_sd3.yaml``.

The CLIP tokenizer is :func:`acpo_lightning.testing.tiny_tokenizer`; the T5 encoder and tokenizer
are :mod:`acpo_lightning.tiny.flux`'s (32-dim states, a character vocabulary built in code).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from acpo_lightning.quiet_imports import quiet_imports
from acpo_lightning.testing import TINY_MAX_LENGTH, TINY_TEXT_DIM, _vocab_size

with quiet_imports():  # diffusers' models import peft, then bitsandbytes: see quiet_imports
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

#: hidden width of each tiny CLIP encoder (the pipeline concatenates both, then pads to T5's)
CLIP_DIM = 8
#: each CLIP encoder's projection (``text_embeds``); the pooled projection is both, concatenated
PROJECTION_DIM = 16
#: latent channels of the tiny VAE and transformer (SD3's are 16)
LATENT_CHANNELS = 4


def tiny_sd3_transformer(
    seed: int = 0, sample_size: int = 16, num_layers: int = 2, dual_attention: bool = True
) -> SD3Transformer2DModel:
    """A two-block SD3 transformer on 4-channel latents, 2x2 patches, T5-wide (32) text states.

    Args:
        seed: torch seed of the initial weights.
        sample_size: latent side (the pipeline's default image side is this times the VAE's factor).
        num_layers: joint transformer blocks (the last one is context-pre-only, as in SD3).
        dual_attention: make the first block an MMDiT-X block with RMS q/k norms (SD3.5 medium);
            ``False`` gives an SD3-medium-like transformer.
    """
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=TINY_TEXT_DIM,
        pooled_projection_dim=2 * PROJECTION_DIM,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=sample_size,
        dual_attention_layers=(0,) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None,
    )


def tiny_sd3_clip_encoder(seed: int = 0) -> CLIPTextModelWithProjection:
    """A five-layer, 8-wide CLIP text encoder with a 16-dim projection over the tiny CLIP tokenizer.

    SD3 takes its penultimate hidden states and its projected ``text_embeds``; build the second
    encoder with another seed (:func:`tiny_sd3_clip_encoder_2`).
    """
    torch.manual_seed(seed)
    vocab = _vocab_size()
    config = CLIPTextConfig(
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_size=CLIP_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=5,
        vocab_size=vocab,
        max_position_embeddings=TINY_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=PROJECTION_DIM,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_clip_encoder_2(seed: int = 1) -> CLIPTextModelWithProjection:
    """The second CLIP encoder (SD3's OpenCLIP bigG), the same architecture with other weights."""
    return tiny_sd3_clip_encoder(seed)


def tiny_sd3_vae(seed: int = 0) -> AutoencoderKL:
    """The pipeline tests' one-block VAE (scale factor 1) with SD3's latent ``shift_factor`` and
    ``scaling_factor``, on :data:`LATENT_CHANNELS` channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_sd3_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """SD3 / SD3.5 medium's scheduler configuration: a fixed ``shift`` of 3, no dynamic shifting."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
