"""Hugging Face datasets as prompt/image sources: a ``save_to_disk`` folder, a local dataset or a hub name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acpo_lightning.data.images import ImageRef
from acpo_lightning.data.sources import (
    RecordTable,
    _columns,
    _pairs,
    _resolve,
    import_optional,
)


def load_hf_dataset(path: str, split: str = "train") -> Any:
    """Load one split of a Hugging Face dataset: a ``save_to_disk`` folder, else ``load_dataset``.

    Args:
        path: a folder written by ``save_to_disk``, a local dataset folder, or a hub name.
        split: the split to use (for ``save_to_disk`` folders of a ``DatasetDict`` too).

    Returns:
        A ``datasets.Dataset`` (map-style, so that a distributed sampler can shard it).

    Raises:
        ImportError: ``datasets`` is not installed.
        ValueError: the dataset can't be loaded (the message says why and what to check),
            the split does not exist, or the dataset is streaming-only.
    """
    datasets = import_optional("datasets", f"the Hugging Face dataset {path!r}")
    local = Path(path).expanduser()
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(local))
    else:
        try:
            loaded = datasets.load_dataset(path, split=split)
        except Exception as error:  # any loader failure becomes one actionable message
            raise ValueError(
                f"could not load the Hugging Face dataset {path!r} (split {split!r}): "
                f"{type(error).__name__}: {error}. For a hub name, check the name and the "
                "network (HF_DATASETS_OFFLINE=1 needs it in the local cache); for a folder "
                "saved with save_to_disk, give that folder's path."
            ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"Hugging Face dataset {path!r} has no split {split!r}; "
                f"its splits are {sorted(loaded)}. Set `split`."
            )
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise ValueError(
            f"Hugging Face dataset {path!r} loaded as {type(loaded).__name__}; "
            "only map-style datasets are supported (don't stream)"
        )
    return loaded


def read_hf(
    path: str,
    image_column: str = "image",
    caption_column: str | None = "text",
    split: str = "train",
) -> RecordTable:
    """Read a Hugging Face dataset's image and caption columns (images stay encoded until used).

    Args:
        path: see :func:`load_hf_dataset`.
        image_column: an ``Image`` feature column, or a column of file paths (relative to
            ``path`` when it is a local folder).
        caption_column: the prompt column, or ``None`` for unconditional images.
        split: the split to use.

    Returns:
        The rows; images are fetched one at a time from the (memory-mapped) dataset.

    Raises:
        ValueError: see :func:`load_hf_dataset`; missing columns; zero rows.
    """
    dataset = load_hf_dataset(path, split)
    origin = f"Hugging Face dataset {path} (split {split})"
    missing = [c for c in _columns(image_column, caption_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{origin}: missing column(s) {missing}; its columns are "
            f"{dataset.column_names}. Set `image_column` / `caption_column`."
        )
    if len(dataset) == 0:
        raise ValueError(f"{origin} has zero rows")
    images = HFImageColumn(dataset, image_column, Path(path).expanduser())
    if caption_column is None:
        return _pairs(origin, {}, images, None)
    return RecordTable(
        origin, list(dataset.select_columns([caption_column])[caption_column]), images
    )


class HFImageColumn(Sequence):
    """The image column of a ``datasets.Dataset``, read one encoded image at a time.

    Args:
        dataset: the dataset.
        column: an ``Image`` feature (read undecoded, as ``{"bytes", "path"}``) or a path column.
        base: folder that relative path strings are relative to.
    """

    def __init__(self, dataset: Any, column: str, base: Path) -> None:
        datasets = import_optional("datasets", "a Hugging Face image column")
        dataset = dataset.select_columns([column])
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset, self.column, self.base = dataset, column, base

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ImageRef | None:  # type: ignore[override]
        value = self.dataset[int(index)][self.column]
        return _resolve(value, self.base) if isinstance(value, str) else value
