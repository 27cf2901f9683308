"""Tiny real SDXL parts: the sizes of diffusers' ``StableDiffusionXLPipelineFastTests``.

``get_dummy_components`` there builds a two-level ``text_time`` UNet (``block_out_channels (2,
4)``), a two-level VAE and two 32-wide, 5-layer CLIP text encoders (the second with a 32-dim
projection); the same classes and widths are built here, offline, on the character tokenizer of
:func:`acpo_lightning.testing.tiny_tokenizer` (its vocabulary and special ids), and with a
configurable latent grid (``sample_size`` 16 gives 32-pixel images).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from acpo_lightning.quiet_imports import quiet_imports
from acpo_lightning.testing import TINY_MAX_LENGTH, _vocab_size

with quiet_imports():  # diffusers' models import peft, then bitsandbytes: see quiet_imports
    from diffusers import AutoencoderKL, UNet2DConditionModel

#: the width of each tiny text encoder; the UNet attends to both, concatenated
TEXT_DIM = 32
#: the second encoder's pooled projection (``text_embeds``)
PROJECTION_DIM = 32
#: width of each micro-conditioning id's sinusoidal embedding
TIME_EMBED_DIM = 8


def tiny_sdxl_unet(
    seed: int = 0, sample_size: int = 16, in_channels: int = 4
) -> UNet2DConditionModel:
    """The pipeline tests' SDXL UNet: ``text_time`` added conditioning over six size/crop ids
    (``6 * 8 + 32`` projection inputs), cross-attention on ``2 * 32``-wide text states."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
        cross_attention_dim=2 * TEXT_DIM,
        norm_num_groups=1,
    )


def tiny_sdxl_vae(seed: int = 0, latent_channels: int = 4) -> AutoencoderKL:
    """The pipeline tests' VAE (``block_out_channels [32, 64]``): image side = 2 x latent side."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        sample_size=128,
    )


def _text_config() -> CLIPTextConfig:
    vocab = _vocab_size()
    return CLIPTextConfig(
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab,
        max_position_embeddings=TINY_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=PROJECTION_DIM,
    )


def tiny_sdxl_text_encoder(seed: int = 0) -> CLIPTextModel:
    """SDXL's first encoder at test size (``CLIPTextModel``, hidden states only)."""
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config()).eval()


def tiny_sdxl_text_encoder_2(seed: int = 1) -> CLIPTextModelWithProjection:
    """SDXL's second encoder at test size (``CLIPTextModelWithProjection``: pooled projection)."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config()).eval()
