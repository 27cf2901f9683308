"""Real-width layouts of the backbones the cost benchmarks count: SD-1.5, SDXL, SD3.5-Medium, FLUX.1-dev.

Every network is the real diffusers class built from a config written here (the hub's
``config.json`` files cannot be downloaded where these benchmarks run), so it can be built on the
meta device for FLOP counts (``component_flops.py``) or with random weights, at a fraction
``scale`` of its width, for CPU timings (``step_cost.py --backbone``). Where each value comes from
is cited next to it; ``tests/test_benchmarks.py`` checks the SDXL UNet against diffusers' own
mapping of Stability's original config.

Width scaling (``scale < 1``) multiplies channel counts (UNets) or the number of attention heads
at the real head size (transformers); depths, token and text lengths and the conditioning inputs'
sizes (what the text encoders emit) stay real. ``scale=1.0`` is the real model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Attention projections of diffusers' UNets (as ``acpo_lightning.models.ATTENTION_PROJECTIONS``).
UNET_LORA = ("to_q", "to_k", "to_v", "to_out.0")
#: Joint-attention projections of SD3/FLUX, both streams (``JOINT_ATTENTION_PROJECTIONS``).
JOINT_LORA = (*UNET_LORA, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _width(channels: int, scale: float, multiple: int = 32) -> int:
    """``channels x scale`` rounded down to a multiple of ``multiple`` (GroupNorm's 32), at least it."""
    return max(multiple, int(channels * scale) // multiple * multiple)


def _heads(heads: int, scale: float) -> int:
    return max(1, round(heads * scale))


# --- SD-1.5 ---------------------------------------------------------------------------------


def sd15_unet(scale: float = 1.0, sample_size: int = 64) -> nn.Module:
    """Stable Diffusion 1.5's UNet layout; ``scale`` multiplies every width (1.0 = the real model)."""
    from diffusers import UNet2DConditionModel

    widths = tuple(_width(c, scale) for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=widths,
        layers_per_block=2,
        cross_attention_dim=max(32, int(768 * scale) // 8 * 8),
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def kl_vae(scale: float = 1.0, latent_channels: int = 4, quant_convs: bool = True) -> nn.Module:
    """The SD/SDXL/SD3/FLUX KL autoencoder (8x): 128/256/512/512 channels, 2 resnets per block.

    Sources: ``ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2`` in Stability's
    ``generative-models/configs/inference/sd_xl_base.yaml`` (``first_stage_config``, z 4) and in
    ``black-forest-labs/flux src/flux/util.py`` (``configs["flux-dev"].ae_params``, z 16, no
    quant convs in its ``AutoEncoder``); SD3's: diffusers ``scripts/convert_sd3_to_diffusers.py``
    builds it from the SDXL VAE config with ``latent_channels=16, use_quant_conv=False,
    use_post_quant_conv=False``.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=tuple(_width(c, scale) for c in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=2,
        norm_num_groups=32,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def tiny_vae(scale: float = 1.0, latent_channels: int = 4) -> nn.Module:
    """TAESD's layout (diffusers ``AutoencoderTiny``, 8x, 64 channels) for 4 or 16 latent channels.

    ``madebyollin/taesd`` and ``taesdxl`` are ``AutoencoderTiny()``'s defaults (4 channels);
    ``taesd3`` and ``taef1`` differ only in ``latent_channels: 16`` (their ``config.json``, e.g.
    as copied in ``mann-e/mann-e_pix/vae/config.json`` from ``madebyollin/taef1``).
    """
    from diffusers import AutoencoderTiny

    width = max(16, int(64 * scale) // 8 * 8)
    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * 4,
        decoder_block_out_channels=(width,) * 4,
        latent_channels=latent_channels,
    )


def _sd15_inputs(batch: int, latent: int, text_tokens: int, unet: nn.Module) -> dict:
    dim = unet.config.cross_attention_dim
    return {
        "sample": torch.randn(batch, 4, latent, latent),
        "timestep": torch.randint(0, 1000, (batch,)),
        "encoder_hidden_states": torch.randn(batch, text_tokens, dim),
    }


# --- SDXL base 1.0 --------------------------------------------------------------------------


def sdxl_unet(scale: float = 1.0, sample_size: int = 128) -> nn.Module:
    """SDXL base 1.0's UNet (2.6 B parameters at ``scale=1``).

    Source: Stability's ``generative-models/configs/inference/sd_xl_base.yaml``
    ``network_config``: ``model_channels 320, channel_mult [1, 2, 4], num_res_blocks 2,
    attention_resolutions [4, 2], transformer_depth [1, 2, 10], num_head_channels 64,
    context_dim 2048, adm_in_channels 2816, use_linear_in_transformer``, mapped to diffusers'
    names as diffusers' ``create_unet_diffusers_config_from_ldm``
    (``diffusers/loaders/single_file_utils.py``) does: block types from the attention
    resolutions, ``attention_head_dim`` = heads per block = 320 // 64 x mult = [5, 10, 20],
    ``addition_embed_type "text_time"`` with ``addition_time_embed_dim 256`` (SDXL's six
    size/crop numbers, 256 features each: 1280 pooled + 6 x 256 = 2816).
    """
    from diffusers import UNet2DConditionModel

    widths = tuple(_width(c, scale, 64) for c in (320, 640, 1280))
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=widths,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=tuple(w // 64 for w in widths),  # heads of 64 channels
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _sdxl_inputs(batch: int, latent: int, text_tokens: int, unet: nn.Module) -> dict:
    return {
        "sample": torch.randn(batch, 4, latent, latent),
        "timestep": torch.randint(0, 1000, (batch,)),
        # CLIP-L (768) and OpenCLIP-bigG (1280) penultimate states side by side
        "encoder_hidden_states": torch.randn(batch, text_tokens, 2048),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 1280),  # bigG's pooled projection
            "time_ids": torch.randn(batch, 6),  # original size, crop corner, target size
        },
    }


# --- SD3.5 Medium ---------------------------------------------------------------------------


def sd35m_transformer(scale: float = 1.0, sample_size: int = 128) -> nn.Module:
    """SD3.5-Medium's MMDiT-X (2.24 B parameters at ``scale=1``).

    Sources: diffusers ``scripts/convert_sd3_to_diffusers.py`` builds ``SD3Transformer2DModel``
    with ``sample_size=128, patch_size=2, in_channels=16, joint_attention_dim=4096,
    num_attention_heads=num_layers`` (24: the 2B checkpoint's 24 ``joint_blocks``), and says
    "(0, 1, ..., 12) for sd3.5" attn2 (dual-attention) layers, "sd3.5 2b use
    pos_embed_max_size=384", qk norm ``rms_norm``; diffusers' ``single_file_utils.py`` detects
    ``sd35_medium`` by a ``pos_embed`` of 147456 = 384^2 positions and a context adaLN of
    9216 = 6 x 1536 features (``caption_projection_dim`` = 24 heads x 64); pooled 2048 (CLIP-L
    768 + bigG 1280) is the class default.
    """
    from diffusers import SD3Transformer2DModel

    heads = _heads(24, scale)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=heads,
        joint_attention_dim=4096,
        caption_projection_dim=heads * 64,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )


def _sd3_inputs(batch: int, latent: int, text_tokens: int, model: nn.Module) -> dict:
    return {
        "hidden_states": torch.randn(batch, 16, latent, latent),
        # 77 CLIP tokens (L and bigG, padded to 4096) + 256 T5-XXL tokens = 333 at full size
        "encoder_hidden_states": torch.randn(batch, text_tokens, 4096),
        "pooled_projections": torch.randn(batch, 2048),
        "timestep": torch.rand(batch) * 1000,
    }


# --- FLUX.1-dev -----------------------------------------------------------------------------


def flux_dev_transformer(scale: float = 1.0) -> nn.Module:
    """FLUX.1-dev's transformer (11.9 B parameters at ``scale=1``).

    Source: ``black-forest-labs/flux src/flux/util.py``, ``configs["flux-dev"].params``:
    ``in_channels 64`` (16 latent channels x 2x2 patches), ``vec_in_dim 768`` (CLIP-L pooled),
    ``context_in_dim 4096`` (T5-XXL), ``hidden_size 3072, num_heads 24`` (24 x 128),
    ``depth 19, depth_single_blocks 38, axes_dim [16, 56, 56], guidance_embed True``; diffusers
    ``scripts/convert_flux_to_diffusers.py`` loads them into ``FluxTransformer2DModel()``'s
    defaults (19/38 blocks, inner dim 3072), whose ``guidance_embeds`` is True for dev.
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,  # = sum(axes_dims_rope)
        num_attention_heads=_heads(24, scale),
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def flux_image_ids(side: int) -> Tensor:
    """``[side * side, 3]`` position ids of the packed image tokens (0, row, column)."""
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> FLUX's ``[B, H/2 * W/2, 4C]`` 2x2 patches (as its pipeline packs them)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, side: int) -> Tensor:
    """Inverse of :func:`pack_latents` for a square latent of ``side``."""
    b, _, c4 = packed.shape
    x = packed.view(b, side // 2, side // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, side, side)


def _flux_inputs(batch: int, latent: int, text_tokens: int, model: nn.Module) -> dict:
    side = latent // 2
    return {
        "hidden_states": torch.randn(batch, side * side, 64),
        "encoder_hidden_states": torch.randn(batch, text_tokens, 4096),  # T5-XXL, 512 for dev
        "pooled_projections": torch.randn(batch, 768),
        "timestep": torch.rand(batch),
        "img_ids": flux_image_ids(side),
        "txt_ids": torch.zeros(text_tokens, 3),
        "guidance": torch.full((batch,), 3.5),
    }


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """One backbone's networks, native size and conditioning, for the cost benchmarks.

    Example:
        >>> spec = BACKBONES["flux"]
        >>> spec.image_size, spec.latent_channels, spec.text_tokens
        (1024, 16, 512)
    """

    name: str
    title: str
    image_size: int  #: native image side, px (the VAE is 8x)
    latent_channels: int
    text_tokens: int  #: conditioning sequence length at the native size
    lora_targets: tuple[str, ...]
    taesd: str  #: the tiny decoder for this latent space
    make_denoiser: Callable[[float, int], nn.Module]  #: (scale, latent side) -> network
    make_vae: Callable[[float], nn.Module]
    make_inputs: Callable[[int, int, int, nn.Module], dict]  #: (batch, latent, tokens, net)
    #: whether the text length follows the image-token count at reduced resolution (joint
    #: attention: text and image tokens share every block); UNets' cross-attention keeps 77
    joint_attention: bool = False
    packed: bool = False  #: FLUX: the network takes 2x2-packed latents

    def latent_side(self, image_size: int | None = None) -> int:
        return (image_size or self.image_size) // 8

    def tokens_at(self, latent: int) -> int:
        """Text tokens at latent side ``latent``: real, or in the native text/image proportion."""
        if not self.joint_attention:
            return self.text_tokens
        native = self.latent_side()
        return max(16, round(self.text_tokens * (latent / native) ** 2))

    def make_tiny_vae(self, scale: float = 1.0) -> nn.Module:
        return tiny_vae(scale, self.latent_channels)

    def prediction_latents(self, pred: Tensor, latent: int) -> Tensor:
        """The network's output as ``[B, C, H, W]`` latents (FLUX unpacks its 2x2 patches)."""
        return unpack_latents(pred, latent) if self.packed else pred


BACKBONES: dict[str, Backbone] = {
    "sd15": Backbone(
        "sd15", "Stable Diffusion 1.5", 512, 4, 77, UNET_LORA, "taesd",
        lambda s, latent: sd15_unet(s, latent), lambda s: kl_vae(s, 4), _sd15_inputs,
    ),
    "sdxl": Backbone(
        "sdxl", "SDXL base 1.0", 1024, 4, 77, UNET_LORA, "taesdxl",
        lambda s, latent: sdxl_unet(s, latent), lambda s: kl_vae(s, 4), _sdxl_inputs,
    ),
    "sd35m": Backbone(
        "sd35m", "Stable Diffusion 3.5 Medium", 1024, 16, 333, JOINT_LORA, "taesd3",
        lambda s, latent: sd35m_transformer(s), lambda s: kl_vae(s, 16, quant_convs=False),
        _sd3_inputs, joint_attention=True,
    ),
    "flux": Backbone(
        "flux", "FLUX.1-dev", 1024, 16, 512, JOINT_LORA, "taef1",
        lambda s, latent: flux_dev_transformer(s), lambda s: kl_vae(s, 16, quant_convs=False),
        _flux_inputs, joint_attention=True, packed=True,
    ),
}  # fmt: skip
