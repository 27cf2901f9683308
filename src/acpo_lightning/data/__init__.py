"""Prompt/image datasets and DataModules.

Batches are dicts: ``prompts`` (list of str) always; ``pixel_values`` (``[B, 3, H, W]`` in
``[-1, 1]``) for image/prompt pairs; ``input_ids`` / ``attention_mask`` when a tokenizer is given.
"""

from acpo_lightning.data.synthetic import ShapesDataModule, ShapesDataset, collate_prompt_images

__all__ = ["ShapesDataModule", "ShapesDataset", "collate_prompt_images"]
