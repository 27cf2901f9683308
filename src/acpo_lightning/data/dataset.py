"""The map-style dataset over a :class:`RecordTable`, the up-front scan for bad rows, the split."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

from acpo_lightning.data.images import (
    BadSampleError,
    SampleProblem,
    describe_ref,
    load_image,
    open_image,
)
from acpo_lightning.data.sources import RecordTable
from acpo_lightning.data.transforms import ImageTransform


class PromptImageDataset(Dataset):
    """Rows ``indices`` of ``table`` as items ``{"prompt", "pixel_values"}`` (or ``{"prompt"}``).

    Items with pixels also carry ``original_size`` (``(h, w)`` before resizing) and
    ``crop_top_left`` (``(top, left)``), long ``[2]``: SDXL's micro-conditioning
    (:meth:`ImageTransform.apply`).

    Images are decoded and transformed when an item is read. A row that turns out to be bad at
    that point (e.g. a file changed after the scan) raises :class:`BadSampleError` naming the
    row and file, whatever ``on_bad_sample`` says: skipping is decided once, by
    :func:`scan_records`, so that every process and worker agrees on the rows.

    Args:
        table: the source's rows.
        indices: which rows of ``table`` this dataset holds, in order.
        transform: turns an RGB image into ``pixel_values``; ``None`` gives prompt-only items
            even when the table has images.

    Example:
        >>> table = RecordTable("prompts list", ["a cat", "a dog"], None)
        >>> PromptImageDataset(table, [1], transform=None)[0]
        {'prompt': 'a dog'}
    """

    def __init__(
        self, table: RecordTable, indices: Sequence[int], transform: ImageTransform | None
    ) -> None:
        self.table, self.indices, self.transform = table, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        row = self.indices[index]
        ref = self.table.images[row] if self.table.images is not None else None
        try:
            prompt = self.table.prompt(row)
        except ValueError as error:
            path = describe_ref(ref) if self.table.images is not None else None
            raise BadSampleError.for_problems(
                self.table.origin, [SampleProblem(row, path, str(error))]
            ) from None
        if self.transform is None or self.table.images is None:
            return {"prompt": prompt}
        image = load_image(ref, self.table.origin, row)
        try:
            out = self.transform.apply(image)
        except ValueError as error:
            problem = SampleProblem(row, describe_ref(ref), str(error))
            raise BadSampleError.for_problems(self.table.origin, [problem]) from None
        return {
            "prompt": prompt,
            "pixel_values": out.pixel_values,
            "original_size": torch.tensor(out.original_size, dtype=torch.long),
            "crop_top_left": torch.tensor(out.crop_top_left, dtype=torch.long),
        }


def check_row(
    table: RecordTable, row: int, transform: ImageTransform | None
) -> SampleProblem | None:
    """What is wrong with ``row`` of ``table``, or ``None`` if it is usable.

    Checks the caption, then (for pairs, when ``transform`` is given) decodes the image fully
    and checks it is large enough for the crop.

    Args:
        table: the source's rows.
        row: the row to check.
        transform: the training transform (its size rule); ``None`` checks captions only.

    Returns:
        The problem, or ``None``.
    """
    ref = table.images[row] if table.images is not None else None
    path = describe_ref(ref) if table.images is not None else None
    try:
        table.prompt(row)
        if transform is None or table.images is None:
            return None
        reason = transform.problem(open_image(ref))
    except ValueError as error:
        reason = str(error)
    return None if reason is None else SampleProblem(row, path, reason)


def scan_records(
    table: RecordTable, transform: ImageTransform | None, threads: int = 1
) -> tuple[list[int], list[SampleProblem]]:
    """Check every row of ``table`` (see :func:`check_row`): the usable rows and the problems.

    This decodes each image once; Pillow releases the GIL while decoding, so ``threads`` > 1
    speeds it up on several cores.

    Args:
        table: the source's rows.
        transform: the training transform, or ``None`` to check captions only.
        threads: decoding threads.

    Returns:
        The usable row indices (ascending) and the problems of the others (ascending rows).
    """
    rows = range(len(table))
    if threads > 1 and transform is not None and table.has_images:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(lambda row: check_row(table, row, transform), rows))
    else:
        results = [check_row(table, row, transform) for row in rows]
    kept = [row for row, problem in zip(rows, results, strict=True) if problem is None]
    return kept, [problem for problem in results if problem is not None]


def split_rows(num_rows: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(num_rows)`` into train and validation rows, deterministically in ``seed``.

    The split is a seeded permutation of *all* rows of the source, taken before bad rows are
    dropped, so a row's side does not change when another row is fixed or skipped. The
    validation side has ``round(val_fraction * num_rows)`` rows, at least one when
    ``val_fraction > 0``.

    Args:
        num_rows: rows in the source.
        val_fraction: share of rows for validation, in ``[0, 1)``.
        seed: the split's seed.

    Returns:
        Train rows and validation rows, each ascending.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)`` or leaving no training row.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = max(1, round(val_fraction * num_rows)) if val_fraction > 0 else 0
    if num_val >= num_rows:
        raise ValueError(
            f"val_fraction {val_fraction} of {num_rows} rows leaves no training rows; "
            "lower val_fraction or add rows"
        )
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])
