"""Tiny real models for tests, the tiny config and quick experiments.

Everything here builds the *real* classes (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``,
transformers ``CLIPTextModel`` / ``CLIPTokenizer``) at toy sizes, seeded, on the CPU, with no
download. They are usable as YAML ``class_path`` targets, which is how ``configs/tiny.yaml`` swaps
every model of ``configs/acpo.yaml`` for an offline one. ``KillAtStep`` and ``InjectNonFinite``
are fault-injection callbacks for the reliability tests.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from acpo_lightning.quality.base import QualityHead
from acpo_lightning.quiet_imports import quiet_imports

with quiet_imports():  # diffusers' models import peft, then bitsandbytes: see quiet_imports
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

TINY_TEXT_DIM = 32
TINY_MAX_LENGTH = 16


def tiny_unet(seed: int = 0, sample_size: int = 16, in_channels: int = 4) -> UNet2DConditionModel:
    """A two-level text-conditional UNet (about 0.5M parameters) on ``in_channels`` latents."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_pixel_unet(seed: int = 0, sample_size: int = 16) -> UNet2DModel:
    """A two-level unconditional pixel-space UNet on RGB images (the DDPM setting)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A KL autoencoder that maps ``3x32x32`` images to ``4x16x16`` latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A two-layer CLIP text transformer with 32-dim hidden states."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=_vocab_size(),
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=_vocab_size() - 2,
        eos_token_id=_vocab_size() - 1,
        pad_token_id=_vocab_size() - 1,
    )
    return CLIPTextModel(config).eval()


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-unicode table (the base alphabet of byte-level BPE)."""
    codes = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    codes += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    for b in range(256):
        if b not in codes:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _vocab_size() -> int:
    return 2 * 256 + 2


def write_tiny_tokenizer(directory: str | Path) -> Path:
    """Write a character-level CLIP tokenizer (``vocab.json`` + ``merges.txt``) to ``directory``.

    Every byte is a token, with and without the end-of-word marker, so any text round-trips.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


def tiny_tokenizer(directory: str | None = None) -> CLIPTokenizer:
    """Load the tiny CLIP tokenizer, writing it first (to a temporary folder if none is given)."""
    directory = write_tiny_tokenizer(directory or tempfile.mkdtemp(prefix="acpo-tiny-tokenizer-"))
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=TINY_MAX_LENGTH)


def tiny_clip_model(seed: int = 0, image_size: int = 32) -> CLIPModel:
    """A two-layer CLIP (text and vision towers, 16-dim joint space) on the tiny tokenizer's vocabulary.

    The PickScore and CLIPScore metrics run on it exactly as on ``openai/clip-vit-large-patch14``.
    """
    torch.manual_seed(seed)
    vocab = _vocab_size()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_MAX_LENGTH,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def write_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny CLIP model and its processor (resize/crop to ``image_size``) to ``directory``.

    The folder loads with ``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained``, so it
    stands in for a hub id such as ``yuvalkirstain/PickScore_v1`` in offline tests and configs.
    """
    from transformers import CLIPImageProcessor, CLIPProcessor

    directory = Path(directory)
    tiny_clip_model(seed, image_size).save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    tokenizer = tiny_tokenizer(tempfile.mkdtemp(prefix="acpo-tiny-tokenizer-"))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def tiny_scheduler(
    prediction_type: str = "epsilon", num_train_timesteps: int = 1000
) -> DDPMScheduler:
    """Stable Diffusion's training noise schedule (scaled linear betas)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
    )


class TinyQualityHead(QualityHead):
    """A small random-weight convolutional IQA head: contrast-sensitive, differentiable, frozen.

    Its score is a seeded random function of the image, which is all tests need: it is smooth,
    depends on every pixel, and has gradients with respect to the input.

    Example:
        >>> TinyQualityHead()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    higher_is_better = True
    score_range = (-1.0, 1.0)
    native_size = 32

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
        )
        self.fc = nn.Linear(8, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.3
        self.freeze()

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        features = self.features(images * 2 - 1).mean(dim=(2, 3))
        return torch.tanh(self.fc(features)).squeeze(1)


class KillAtStep(Callback):
    """Fault injection: ``SIGKILL`` this process at the end of global step ``step``.

    Lightning runs checkpoint callbacks last, so a checkpoint due at ``step`` is not written: the
    run dies as a pre-empted job does, with only the earlier checkpoints on disk.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class InjectNonFinite(Callback):
    """Fault injection: make the quality head return NaN (or inf) at the given global steps."""

    def __init__(self, steps: list[int], value: float = float("nan")) -> None:
        self.steps, self.value = set(steps), value
        self._handle: Any = None

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step in self.steps and self._handle is None:
            value = self.value
            self._handle = pl_module.quality_head.register_forward_hook(
                lambda module, args, output: output + value
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def tiny_taesd(seed: int = 0) -> nn.Module:
    """A diffusers ``AutoencoderTiny`` (TAESD layout) with :func:`tiny_vae`'s 2x latent grid."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
