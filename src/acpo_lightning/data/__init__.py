"""Prompt/image datasets and DataModules.

Batches are dicts: ``prompts`` (list of str) always; ``pixel_values`` (``[B, 3, H, W]`` in
``[-1, 1]``) for image/prompt pairs, or ``latent_moments`` (``[B, 2C, h, w]``, cached VAE
posteriors) instead; ``input_ids`` / ``attention_mask`` when a tokenizer is given.

``PromptImageDataModule`` reads real data (an image folder, a manifest, a Hugging Face dataset
or a prompts file); ``CachedLatentsDataModule`` reads the latents ``acpo cache-latents`` encoded
from it; ``ShapesDataModule`` generates coloured shapes and needs no files.
"""

from acpo_lightning.data.collate import IndexedDataset, collate_prompt_images, tokenize_prompts
from acpo_lightning.data.datamodule import PromptImageDataModule
from acpo_lightning.data.dataset import PromptImageDataset, scan_records, split_rows
from acpo_lightning.data.hf_sources import read_hf
from acpo_lightning.data.images import BadSampleError, SampleProblem, load_image, open_image, to_rgb
from acpo_lightning.data.latent_cache import (
    CachedLatentsDataModule,
    CachedLatentsDataset,
    LatentCacheError,
    read_latent_cache,
)
from acpo_lightning.data.sources import (
    RecordTable,
    read_imagefolder,
    read_manifest,
    read_prompts,
)
from acpo_lightning.data.synthetic import ShapesDataModule, ShapesDataset
from acpo_lightning.data.transforms import ImageTransform

__all__ = [
    "BadSampleError",
    "CachedLatentsDataModule",
    "CachedLatentsDataset",
    "ImageTransform",
    "IndexedDataset",
    "LatentCacheError",
    "PromptImageDataModule",
    "PromptImageDataset",
    "RecordTable",
    "SampleProblem",
    "ShapesDataModule",
    "ShapesDataset",
    "collate_prompt_images",
    "load_image",
    "open_image",
    "read_hf",
    "read_imagefolder",
    "read_latent_cache",
    "read_manifest",
    "read_prompts",
    "scan_records",
    "split_rows",
    "to_rgb",
    "tokenize_prompts",
]
