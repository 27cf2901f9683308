"""Readers of prompt/image pairs and prompt lists into one shape, :class:`RecordTable`.

Four sources, each validated when read (file exists, columns present, at least one row), so a
wrong path or column name fails before any model is loaded:

* :func:`read_imagefolder`: a folder of images with ``metadata.jsonl`` (or ``.csv``/``.parquet``)
  holding ``file_name`` and ``text`` columns (diffusers' and Hugging Face ``imagefolder``'s
  convention), else every image with a sibling ``.txt`` caption;
* :func:`read_manifest`: a CSV/TSV, JSONL, JSON or Parquet table of image paths (relative to the
  manifest) and prompts;
* :func:`read_hf`: a Hugging Face ``datasets`` dataset, saved with ``save_to_disk`` or loadable
  with ``load_dataset`` (hub name or local folder);
* :func:`read_prompts`: prompts alone, one a line or a column, for validation and rollouts.

Rows are only *read* here; whether each one is usable (caption a non-empty string, image
decodable and large enough) is checked by :func:`acpo_lightning.data.dataset.scan_records`.
"""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from acpo_lightning.data.images import ImageRef

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
EXTRA_HINT = "pip install 'acpo-lightning[data]'"


@dataclass(frozen=True)
class MissingCaption:
    """Stands for a caption that could not be read (e.g. no sibling ``.txt``); ``reason`` says why."""

    reason: str


@dataclass
class RecordTable:
    """Rows of one source: a raw prompt each and, for pairs, an image reference each.

    Args:
        origin: the source in words, used in every message (``"manifest /data/train.csv"``).
        prompts: one raw caption per row (not yet checked: may be empty, ``None``, a number...).
        images: one image reference per row, or ``None`` for a prompt-only source.
        captioned: ``False`` for unconditional data (no caption column): every prompt is ``""``
            and none is checked.

    Example:
        >>> table = RecordTable("prompts list", ["a cat", " a dog "], None)
        >>> len(table), table.has_images, table.prompt(1)
        (2, False, 'a dog')
    """

    origin: str
    prompts: Sequence[Any]
    images: Sequence[ImageRef | None] | None
    captioned: bool = True

    def __post_init__(self) -> None:
        if len(self.prompts) == 0:
            raise ValueError(f"{self.origin} has no rows; give a source with at least one row")
        if self.images is not None and len(self.images) != len(self.prompts):
            raise ValueError(
                f"{self.origin}: {len(self.images)} images but {len(self.prompts)} prompts"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_images(self) -> bool:
        """Whether rows are prompt/image pairs (else prompts only)."""
        return self.images is not None

    def prompt(self, row: int) -> str:
        """The checked caption of ``row`` (``""`` for uncaptioned tables).

        Raises:
            ValueError: the caption is unusable (see :func:`check_prompt`).
        """
        return check_prompt(self.prompts[row]) if self.captioned else ""


def check_prompt(value: Any) -> str:
    """Return ``value`` stripped if it is a usable caption.

    Args:
        value: the raw caption of a row.

    Returns:
        The caption without surrounding whitespace.

    Raises:
        ValueError: the caption is missing, not a string, or blank (the message says which).
    """
    if isinstance(value, MissingCaption):
        raise ValueError(value.reason)
    if not isinstance(value, str):
        raise ValueError(
            f"caption must be a non-empty string, got {type(value).__name__} {value!r}"
        )
    if not value.strip():
        raise ValueError(f"caption is empty ({value!r})")
    return value.strip()


def import_optional(name: str, purpose: str) -> ModuleType:
    """Import the optional package ``name``, or say how to install it.

    Raises:
        ImportError: ``name`` is not installed; the message gives the pip command.
    """
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{purpose} needs the optional package {name!r}: {EXTRA_HINT}") from error


def read_table(path: str | Path, columns: Sequence[str]) -> dict[str, list[Any]]:
    """Read ``columns`` of a CSV/TSV, JSONL, JSON (list of objects) or Parquet file.

    Args:
        path: the table file; its suffix picks the format.
        columns: the columns to return; each must exist.

    Returns:
        One list per column, all of the same length (``None`` where a JSON row lacks the key).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, unparseable content, a missing column (the message lists
            the columns there are), or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"table {path} does not exist; check the path (relative paths are "
            f"relative to the working directory {Path.cwd()})"
        )
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unknown table format {suffix!r}; use one of {TABLE_SUFFIXES}")
    if suffix == ".parquet":
        names, rows = _read_parquet(path, columns)
    elif suffix in (".csv", ".tsv"):
        names, rows = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        names, rows = _read_json_rows(path, lines=suffix == ".jsonl")
    if not rows:
        header = f" (only a header: {sorted(names)})" if names else ""
        raise ValueError(f"{path} has zero rows{header}; give a file with at least one row")
    missing = [column for column in columns if column not in names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; its columns are {sorted(names)}. Set the "
            "column arguments (`image_column`, `caption_column`) to the names the file uses."
        )
    return {column: [row.get(column) for row in rows] for column in columns}


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_json_rows(path: Path, lines: bool) -> tuple[set[str], list[dict]]:
    text = path.read_text(encoding="utf-8-sig")
    if lines:
        rows = []
        for number, line in enumerate(json_lines(text), start=1):
            if line.strip():
                rows.append(_parse_json(line, f"{path}, line {number}"))
    else:
        rows = _parse_json(text, str(path))
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: expected one JSON object per row (a list of objects for .json)")
    return {key for row in rows for key in row}, rows


def json_lines(text: str) -> list[str]:
    r"""The lines of a JSON Lines or ``.txt`` file: split at ``\n`` only (a ``\r`` before it dropped).

    ``str.splitlines`` also splits at U+2028, U+2029, ``\x1c``... which a JSON string may hold
    unescaped (and a caption may contain): such a row would be cut in two.

    Example:
        >>> json_lines('{"text": "a\u2028b"}\r\n{}')
        ['{"text": "a\u2028b"}', '{}']
    """
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error}); fix or remove it") from None


def _read_parquet(path: Path, columns: Sequence[str]) -> tuple[list[str], list[dict]]:
    parquet = import_optional("pyarrow.parquet", f"reading the Parquet file {path}")
    names = list(parquet.read_schema(path).names)
    present = [column for column in columns if column in names]
    return names, parquet.read_table(path, columns=present).to_pylist()


def _resolve(value: Any, base: Path) -> Any:
    """A string image value as a path relative to ``base``; other values unchanged."""
    if isinstance(value, str) and value:
        return base / value
    return value


def read_manifest(
    path: str | Path, image_column: str = "image", caption_column: str | None = "text"
) -> RecordTable:
    """Read a manifest of image paths (relative to the manifest's folder) and prompts.

    Args:
        path: a ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` or ``.parquet`` file.
        image_column: the column of image paths (Parquet may also hold Hugging Face image
            structs ``{"bytes", "path"}`` or raw encoded bytes).
        caption_column: the column of prompts; ``None`` for unconditional images (prompts ``""``).

    Returns:
        The rows, images as absolute paths (or bytes).

    Raises:
        FileNotFoundError: no manifest at ``path``.
        ValueError: unknown format, missing columns, or zero rows (see :func:`read_table`).

    Example:
        >>> table = read_manifest("train.csv", image_column="file", caption_column="prompt")  # doctest: +SKIP
    """
    path = Path(path).expanduser().resolve()
    table = read_table(path, _columns(image_column, caption_column))
    images = [_resolve(value, path.parent) for value in table[image_column]]
    return _pairs(f"manifest {path}", table, images, caption_column)


def _columns(image_column: str, caption_column: str | None) -> list[str]:
    return [image_column] if caption_column is None else [image_column, caption_column]


def _pairs(
    origin: str, table: dict[str, list], images: Sequence, caption_column: str | None
) -> RecordTable:
    if caption_column is None:
        return RecordTable(origin, [""] * len(images), images, captioned=False)
    return RecordTable(origin, table[caption_column], images)


def read_imagefolder(
    folder: str | Path, image_column: str = "file_name", caption_column: str | None = "text"
) -> RecordTable:
    """Read an image folder: ``metadata.jsonl``/``.csv``/``.parquet`` if present, else ``.txt`` captions.

    With a metadata file, ``image_column`` holds file names relative to the folder (Hugging
    Face ``imagefolder`` and diffusers' scripts use ``file_name`` and ``text``). Without one,
    every image under the folder (recursively, sorted by path) is a row and its caption is
    the sibling file with the same stem and ``.txt`` suffix. With ``caption_column=None`` the
    images are unconditional: no caption is read and every prompt is ``""``.

    Args:
        folder: the image folder.
        image_column: the metadata column of file names.
        caption_column: the metadata column of prompts, or ``None`` for no captions.

    Returns:
        The rows.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: more than one metadata file, a bad metadata file, or no images at all.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    metadata = [folder / name for name in METADATA_NAMES if (folder / name).is_file()]
    if len(metadata) > 1:
        raise ValueError(
            f"{folder} has several metadata files {[m.name for m in metadata]}; keep one"
        )
    if metadata:
        table = read_table(metadata[0], _columns(image_column, caption_column))
        images = [_resolve(value, folder) for value in table[image_column]]
        return _pairs(f"imagefolder {metadata[0]}", table, images, caption_column)
    paths = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not paths:
        raise ValueError(
            f"image folder {folder} has no {'/'.join(METADATA_NAMES)} and no images "
            f"({', '.join(IMAGE_SUFFIXES)}); put images with captions there"
        )
    if caption_column is None:
        return _pairs(f"imagefolder {folder}", {}, paths, None)
    return RecordTable(
        f"imagefolder {folder} (.txt captions)", [_read_caption(p) for p in paths], paths
    )


def _read_caption(image_path: Path) -> str | MissingCaption:
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return MissingCaption(
            f"no caption: no metadata.jsonl in the folder and no {caption_path.name}"
        )
    try:
        return caption_path.read_text(encoding="utf-8-sig")  # a BOM is not part of the caption
    except (OSError, UnicodeDecodeError) as error:
        return MissingCaption(f"cannot read caption file {caption_path} ({error})")


def read_prompts(path: str | Path, column: str | None = "text") -> RecordTable:
    """Read prompts alone: a ``.txt`` file (one a line; blank lines are not prompts) or a table column.

    Args:
        path: a ``.txt`` file, or a table (see :func:`read_table`).
        column: the prompt column of a table (ignored for ``.txt``).

    Returns:
        Prompt-only rows.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: no prompts, a bad table, or no ``column`` for a table.
    """
    path = Path(path).expanduser().resolve()
    if path.suffix.lower() != ".txt" and column is None:
        raise ValueError(
            f"prompts file {path} is a table: name its prompt column (`val_prompts_column` or `caption_column`)"
        )
    if path.suffix.lower() != ".txt":
        return RecordTable(f"prompts file {path}", read_table(path, [column])[column], None)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist; check the path")
    text = path.read_text(encoding="utf-8-sig")
    prompts = [line for line in json_lines(text) if line.strip()]
    return RecordTable(f"prompts file {path}", prompts, None)
