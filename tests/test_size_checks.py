"""Image sizes a model cannot take: a clear ``ValueError`` where a DataModule the set-up check
cannot read (``data.size_checks``; the CLI cases are in ``test_cli_errors.py``) gives them."""

from __future__ import annotations

import pytest
import torch

from acpo_lightning.crops import PerceptualCrop
from acpo_lightning.denoisers.flux import pack_latents
from test_backbone_sd3 import _denoiser as sd3_denoiser


def test_a_crop_larger_than_the_latents_is_named_instead_of_an_empty_random_range() -> None:
    latents = torch.zeros(2, 4, 4, 4)  # 8-px images at scale 2
    with pytest.raises(ValueError, match=r"perceptual_crop size=16 is larger .*\(8x8 px\)"):
        PerceptualCrop(16).windows(latents, 2, torch.Generator().manual_seed(0))


def test_odd_latents_are_refused_by_flux_packing_and_by_the_sd3_transformer() -> None:
    with pytest.raises(
        ValueError, match=r"FLUX packs 2x2 latent patches, but the latents are 15x15"
    ):
        pack_latents(torch.zeros(1, 4, 15, 15))
    denoiser = sd3_denoiser()
    cond = denoiser.encode_prompts(["a cat"])
    with pytest.raises(ValueError, match=r"2x2 latent patches, but the latents are 15x15"):
        denoiser.policy(torch.zeros(1, 16, 15, 15), torch.tensor([500.0]), cond)
    with pytest.raises(ValueError, match=r"sample_size=15 latents.*use sample_size=14"):
        sd3_denoiser(sample_size=15)
