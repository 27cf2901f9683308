"""A procedurally generated prompt/image dataset: coloured shapes with their captions.

It needs no files at all, which makes it the data of ``configs/tiny.yaml`` and of quick
experiments; every image is a deterministic function of its index and the seed.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from acpo_lightning.data.collate import (
    IndexedDataset,
    SeededLoaders,
    check_loader_numbers,
    record_data_seed,
    resolve_data_seed,
)

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("square", "circle", "stripe")


def draw_shape(
    shape: str, color: tuple[float, float, float], size: int, generator: torch.Generator
) -> Tensor:
    """Draw one ``shape`` of ``color`` on a dark noisy background; returns ``[3, size, size]`` in [0, 1]."""
    image = 0.15 + 0.05 * torch.rand(3, size, size, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.randint(size // 4, 3 * size // 4 + 1, (2,), generator=generator)).tolist()
    radius = size // 5 + int(torch.randint(0, max(1, size // 8), (1,), generator=generator))
    if shape == "square":
        mask = ((yy - cy).abs() <= radius) & ((xx - cx).abs() <= radius)
    elif shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    elif shape == "stripe":
        mask = (xx - cx).abs() <= max(1, radius // 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return torch.where(mask, torch.tensor(color).view(3, 1, 1), image)


class ShapesDataset(Dataset):
    """``length`` captioned images of coloured shapes, deterministic in ``(seed, index)``.

    Items are dicts with ``pixel_values`` (``[3, size, size]`` in ``[-1, 1]``) and ``prompt``.

    Example:
        >>> item = ShapesDataset(length=4, size=16)[0]
        >>> item["pixel_values"].shape, item["prompt"].startswith("a ")
        (torch.Size([3, 16, 16]), True)
    """

    def __init__(self, length: int = 64, size: int = 32, seed: int = 0) -> None:
        if length < 1:
            raise ValueError(f"ShapesDataset length must be >= 1, got {length}")
        self.length, self.size, self.seed = length, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        color = list(COLORS)[index % len(COLORS)]
        shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
        image = draw_shape(shape, COLORS[color], self.size, generator)
        return {"pixel_values": image * 2 - 1, "prompt": f"a {color} {shape}"}


class ShapesDataModule(SeededLoaders, pl.LightningDataModule):
    """Train/val/test/predict loaders over :class:`ShapesDataset` (no files, no download).

    Args:
        train_size: number of training images.
        val_size: number of validation (and test) images, drawn with another seed.
        image_size: side length in pixels.
        batch_size: images per batch.
        data_seed: seed of the generated images and of the training shuffle (also under DDP).
        num_workers: DataLoader worker processes.
        seed: deprecated name of ``data_seed``.

    Raises:
        ValueError: a size or ``batch_size`` below 1, a negative ``num_workers`` or seed.

    Example:
        >>> dm = ShapesDataModule(train_size=8, batch_size=4, image_size=16)
        >>> next(iter(dm.train_dataloader()))["pixel_values"].shape
        torch.Size([4, 3, 16, 16])
    """

    def __init__(
        self,
        train_size: int = 256,
        val_size: int = 16,
        image_size: int = 32,
        batch_size: int = 8,
        data_seed: int = 0,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        data_seed = resolve_data_seed(data_seed, seed, type(self).__name__)
        super().__init__()
        self.save_hyperparameters(ignore=["seed"])
        record_data_seed(self, data_seed)
        check_loader_numbers(type(self).__name__, batch_size, num_workers)
        if image_size < 1:
            raise ValueError(f"ShapesDataModule: image_size must be >= 1 pixel, got {image_size}")
        self.train_set = ShapesDataset(train_size, image_size, data_seed)
        self.val_set = ShapesDataset(val_size, image_size, data_seed + 1)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(IndexedDataset(self.val_set), shuffle=False)
