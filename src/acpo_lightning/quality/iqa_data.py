"""Data for training an NR-IQA head: MOS-labelled manifests and synthetic severity ladders.

Two kinds of item, both dicts with ``images`` and ``target`` (quality in ``[0, 1]``, higher better):

- :class:`MOSManifestDataset`: one image and its normalized mean opinion score (KonIQ-10k's CSV
  layout by default: columns ``image_name`` and ``MOS``).
- :class:`SyntheticDistortionDataset`: one source image under one distortion at every level,
  ``images [L+1, 3, S, S]`` with ``target [L+1] = 1 - level / L``; the training module ranks the
  levels within each such group (the self-supervised "tailored evaluator" of ACPO).

:class:`IQADataModule` splits either kind into train and held-out sets by *source* image, so no
source image is seen in both. Prompt groups for a prompt-aware head live in
:mod:`acpo_lightning.quality.prompt_data`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from acpo_lightning.quality.distortions import DISTORTIONS, check_ladder, severity_ladder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ImageSource = Tensor | str | Path | Sequence[str | Path]


def load_image(path: str | Path, size: int) -> Tensor:
    """Read an image file as RGB ``[3, size, size]`` in ``[0, 1]`` (antialiased resize, aspect not kept)."""
    with Image.open(path) as image:
        tensor = TF.to_tensor(image.convert("RGB"))
    return resize_image(tensor, size)


def resize_image(image: Tensor, size: int) -> Tensor:
    """Resize ``[3, H, W]`` to ``[3, size, size]`` with antialiasing (no-op at the right size)."""
    if image.shape[-2:] == (size, size):
        return image
    resized = F.interpolate(
        image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].clamp(0.0, 1.0)


def image_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files of a folder (sorted), or the given list of paths.

    Raises:
        FileNotFoundError: the folder holds no image, or a listed file does not exist.
    """
    if isinstance(source, str | Path):
        folder = Path(source)
        paths = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if folder.is_dir()
            else []
        )
        if not paths:
            raise FileNotFoundError(
                f"no image ({', '.join(IMAGE_SUFFIXES)}) in folder {str(folder)!r}."
            )
        return paths
    paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image files not found: {missing[:5]}")
    return paths


def load_images(source: ImageSource, size: int) -> Tensor:
    """Source images as one tensor ``[N, 3, size, size]`` in ``[0, 1]``.

    Args:
        source: a tensor ``[N, 3, H, W]`` (or ``[N, 1, H, W]``, repeated to RGB) in ``[0, 1]``, a
            folder of images, or a list of image paths.
        size: side length of the returned images.

    Raises:
        ValueError: a tensor of the wrong shape or outside ``[0, 1]``.
    """
    if isinstance(source, Tensor):
        if source.ndim != 4 or source.shape[1] not in (1, 3) or len(source) == 0:
            raise ValueError(
                f"source images must be [N, 3, H, W] or [N, 1, H, W], got {tuple(source.shape)}."
            )
        if source.min() < 0 or source.max() > 1:
            raise ValueError(
                f"source images must be in [0, 1], got [{source.min():.3f}, {source.max():.3f}]; "
                "map [-1, 1] data with (x + 1) / 2."
            )
        images = source.float().expand(-1, 3, -1, -1)
        return torch.stack([resize_image(image, size) for image in images])
    return torch.stack([load_image(path, size) for path in image_paths(source)])


class SyntheticDistortionDataset(Dataset):
    """Severity ladders of synthetic distortions applied to the user's own images.

    Item ``i`` is source image ``i // D`` under distortion ``i % D`` (``D`` distortions) at levels
    ``0..levels`` (:func:`~acpo_lightning.quality.distortions.severity_ladder`: every level a
    different image, farther from the pristine one than the level below); it is deterministic in
    ``(seed, i)``.

    Args:
        images: source images (see :func:`load_images`).
        size: side length of every image.
        levels: number of distortion levels above the pristine one.
        distortions: names from :data:`~acpo_lightning.quality.distortions.DISTORTIONS`.
        seed: seed of the noise distortion.

    Raises:
        ValueError: unknown distortions, or more levels than a distortion has distinct settings
            at ``size`` (:func:`~acpo_lightning.quality.distortions.check_ladder`).

    Example:
        >>> data = SyntheticDistortionDataset(torch.rand(2, 3, 16, 16), size=16, levels=3)
        >>> item = data[0]
        >>> len(data), item["images"].shape, [round(t, 3) for t in item["target"].tolist()]
        (10, torch.Size([4, 3, 16, 16]), [1.0, 0.667, 0.333, 0.0])
    """

    def __init__(
        self,
        images: ImageSource,
        size: int = 32,
        levels: int = 4,
        distortions: Sequence[str] = tuple(DISTORTIONS),
        seed: int = 0,
    ) -> None:
        unknown = [d for d in distortions if d not in DISTORTIONS]
        if levels < 1 or not distortions or unknown:
            raise ValueError(
                f"need levels >= 1 and distortions from {sorted(DISTORTIONS)}; got levels={levels}, "
                f"distortions={list(distortions)}."
            )
        check_ladder(distortions, size, size, levels)
        self.sources = load_images(images, size)
        self.levels, self.distortions, self.seed = levels, tuple(distortions), seed

    def __len__(self) -> int:
        return len(self.sources) * len(self.distortions)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        source = self.sources[index // len(self.distortions)]
        kind = self.distortions[index % len(self.distortions)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ladder = severity_ladder(source, kind, self.levels, generator)
        target = 1.0 - torch.arange(self.levels + 1, dtype=torch.float32) / self.levels
        return {"images": ladder, "target": target}


class MOSManifestDataset(Dataset):
    """Images with mean opinion scores from a CSV manifest, scores mapped to ``[0, 1]``.

    Args:
        manifest: CSV file with a header row.
        image_dir: folder the image names are relative to (default: the manifest's folder).
        size: side length of the returned images.
        image_column: column holding the image file name.
        score_column: column holding the MOS.
        mos_range: ``(low, high)`` of the MOS scale; default: the manifest's min and max.
        rows: keep only these row indices (how :class:`IQADataModule` splits).

    Raises:
        ValueError: a column is missing or a score is not a number.

    Example:
        >>> data = MOSManifestDataset("koniq10k_scores.csv", image_dir="1024x768")  # doctest: +SKIP
        >>> data[0]["images"].shape, data.mos_range  # doctest: +SKIP
        (torch.Size([3, 32, 32]), (1.096, 4.31))
    """

    def __init__(
        self,
        manifest: str | Path,
        image_dir: str | Path | None = None,
        size: int = 32,
        image_column: str = "image_name",
        score_column: str = "MOS",
        mos_range: tuple[float, float] | None = None,
        rows: Sequence[int] | None = None,
    ) -> None:
        manifest = Path(manifest)
        self.image_dir = Path(image_dir) if image_dir is not None else manifest.parent
        self.size = size
        names, scores = read_manifest(manifest, image_column, score_column)
        self.mos_range = tuple(mos_range) if mos_range is not None else (min(scores), max(scores))
        if not self.mos_range[1] > self.mos_range[0]:
            raise ValueError(
                f"MOS range must have high > low, got {self.mos_range} from {manifest}."
            )
        keep = range(len(names)) if rows is None else rows
        self.names = [names[i] for i in keep]
        self.scores = [scores[i] for i in keep]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        low, high = self.mos_range
        target = torch.tensor((self.scores[index] - low) / (high - low), dtype=torch.float32)
        return {
            "images": load_image(self.image_dir / self.names[index], self.size),
            "target": target,
        }


def read_manifest(
    manifest: Path, image_column: str, score_column: str
) -> tuple[list[str], list[float]]:
    """Image names and scores of a CSV manifest.

    Raises:
        ValueError: a column is missing, the manifest is empty, or a score is not a number.
    """
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {image_column, score_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{manifest} lacks column(s) {sorted(missing)} (has {reader.fieldnames}); pass "
                "image_column= and score_column= to name yours."
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{manifest} has no data rows.")
    try:
        scores = [float(row[score_column]) for row in rows]
    except ValueError as err:
        raise ValueError(f"{manifest}: column {score_column!r} must hold numbers ({err}).") from err
    return [row[image_column] for row in rows], scores


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(count)`` into train and validation indices (both non-empty).

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)`` or fewer than 2 items.
    """
    if not 0.0 < val_fraction < 1.0 or count < 2:
        raise ValueError(
            f"need 0 < val_fraction < 1 and at least 2 items; got {val_fraction} and {count}."
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(count - 1, max(1, round(count * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_rows_by_image(
    names: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Train and validation row indices with every row of one image name in the same split.

    The distinct names (in order of first appearance) are split as :func:`split_indices` splits
    items, so a manifest with one row per image splits exactly as before.

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)`` or fewer than 2 distinct images.
    """
    images = list(dict.fromkeys(names))
    _, val = split_indices(len(images), val_fraction, seed)
    held_out = {images[i] for i in val}
    rows = range(len(names))
    return [r for r in rows if names[r] not in held_out], [r for r in rows if names[r] in held_out]


class IQADataModule(pl.LightningDataModule):
    """Train and held-out loaders for :class:`~acpo_lightning.quality.training.IQATrainingModule`.

    Args:
        train_dataset: training items (synthetic ladders or MOS images).
        val_dataset: held-out items of the same kind.
        batch_size: items per batch (a ladder counts as one item).
        num_workers: DataLoader worker processes.

    Example:
        >>> dm = IQADataModule.from_images(torch.rand(8, 3, 16, 16), size=16, batch_size=4)
        >>> len(dm.train_dataset), len(dm.val_dataset)
        (30, 10)
    """

    def __init__(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.batch_size, self.num_workers = batch_size, num_workers

    @classmethod
    def from_images(
        cls,
        images: ImageSource,
        val_fraction: float = 0.25,
        size: int = 32,
        levels: int = 4,
        distortions: Sequence[str] = tuple(DISTORTIONS),
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> IQADataModule:
        """Self-supervised data: synthetic ladders of ``images``, split by source image."""
        sources = load_images(images, size)
        train, val = split_indices(len(sources), val_fraction, seed)
        make = lambda idx, s: SyntheticDistortionDataset(sources[idx], size, levels, distortions, s)  # noqa: E731
        return cls(make(train, seed), make(val, seed + 1), batch_size, num_workers)

    @classmethod
    def from_manifest(
        cls,
        manifest: str | Path,
        image_dir: str | Path | None = None,
        val_fraction: float = 0.2,
        size: int = 32,
        image_column: str = "image_name",
        score_column: str = "MOS",
        mos_range: tuple[float, float] | None = None,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> IQADataModule:
        """MOS-labelled data from a CSV manifest, split by source image (every row of an image
        that the manifest lists more than once lands in the same split); both splits share one
        MOS range.

        Raises:
            ValueError: as :class:`MOSManifestDataset`, or fewer than two distinct images.
        """
        full = MOSManifestDataset(manifest, image_dir, size, image_column, score_column, mos_range)
        train, val = split_rows_by_image(full.names, val_fraction, seed)
        make = lambda rows: MOSManifestDataset(  # noqa: E731
            manifest, image_dir, size, image_column, score_column, full.mos_range, rows
        )
        return cls(make(train), make(val), batch_size, num_workers)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset, self.batch_size, shuffle=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_dataset, self.batch_size, shuffle=False, num_workers=self.num_workers
        )
