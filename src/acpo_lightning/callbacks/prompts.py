"""Fixed prompt sets for evaluation: the lists shipped with the package, or a file of your own."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

#: Prompt lists shipped as package data (``callbacks/prompt_lists``; sources and licences in its README).
SHIPPED_PROMPT_LISTS = {
    "acpo_eval": "acpo_eval.txt",
    "drawbench": "drawbench.csv",
    "partiprompts": "partiprompts.tsv",
}
#: Columns read from ``.csv``/``.tsv`` files, in order of preference.
PROMPT_COLUMNS = ("Prompt", "Prompts", "prompt", "prompts", "text", "caption")
#: Column that ``category`` filters on.
CATEGORY_COLUMN = "Category"


def load_prompts(
    source: str | Path, max_prompts: int | None = None, category: str | None = None
) -> list[str]:
    """Read a prompt list: a shipped name or a ``.txt``/``.csv``/``.tsv`` file.

    Shipped names (:data:`SHIPPED_PROMPT_LISTS`; case, ``-`` and ``_`` ignored): ``acpo_eval``
    (32 prompts), ``drawbench`` (DrawBench, 200 prompts, 11 categories) and ``partiprompts``
    (PartiPrompts, 1,632 prompts, 12 categories).

    ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
    ``.csv``/``.tsv``: the first of the columns :data:`PROMPT_COLUMNS` present (PartiPrompts.tsv
    has ``Prompt``, DrawBench's CSV ``Prompts``). ``.tsv`` files are read without quote handling,
    as PartiPrompts.tsv has prompts that begin with ``"``.

    Args:
        source: a name of :data:`SHIPPED_PROMPT_LISTS` or a file path.
        max_prompts: keep only the first ``max_prompts`` prompts (``None``: all).
        category: keep only the rows whose ``Category`` column equals this (case-insensitive),
            e.g. ``"Counting"`` for DrawBench or ``"Animals"`` for PartiPrompts; ``None``: all.

    Returns:
        The prompts, in file order.

    Raises:
        FileNotFoundError: an unknown name or a missing file.
        ValueError: no prompt column, no ``Category`` column when ``category`` is set, an empty
            list (or a category with no prompt), or ``max_prompts < 1``.

    Example:
        >>> len(load_prompts("acpo_eval")), len(load_prompts("drawbench", category="Counting"))
        (32, 19)
    """
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts={max_prompts} must be >= 1, or None for the whole list.")
    key = _shipped_key(source)
    if key is not None and not Path(source).is_file():
        name = SHIPPED_PROMPT_LISTS[key]
        text = (
            resources.files("acpo_lightning.callbacks")
            .joinpath("prompt_lists", name)
            .read_text(encoding="utf-8")
        )
        prompts = _parse(text, Path(name).suffix, key, category)
    else:
        prompts = _file_prompts(Path(source), category)
    if not prompts:
        which = f" category {category!r}" if category else ""
        raise ValueError(f"prompt list {source!r}{which} holds no prompt.")
    return prompts[:max_prompts] if max_prompts else prompts


def _shipped_key(source: str | Path) -> str | None:
    """The :data:`SHIPPED_PROMPT_LISTS` key ``source`` names, ignoring case, ``-`` and ``_``."""
    wanted = str(source).strip().lower().replace("-", "").replace("_", "")
    return next((k for k in SHIPPED_PROMPT_LISTS if k.replace("_", "") == wanted), None)


def _file_prompts(path: Path, category: str | None) -> list[str]:
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts={str(path)!r} is neither a shipped list {sorted(SHIPPED_PROMPT_LISTS)} nor an "
            "existing file; pass a .txt (one prompt per line) or a .csv/.tsv with a Prompt column."
        )
    return _parse(path.read_text(encoding="utf-8"), path.suffix, str(path), category)


def _parse(text: str, suffix: str, name: str, category: str | None) -> list[str]:
    suffix = suffix.lower()
    if suffix not in (".csv", ".tsv"):
        if category is not None:
            raise ValueError(
                f"{name} is a plain prompt list; category={category!r} needs a "
                f".csv/.tsv with a {CATEGORY_COLUMN} column."
            )
        return _text_prompts(text)
    if suffix == ".tsv":
        reader = csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(text.splitlines())
    fields = reader.fieldnames or []
    column = next((c for c in PROMPT_COLUMNS if c in fields), None)
    if column is None:
        raise ValueError(
            f"{name} has columns {reader.fieldnames}; none of {list(PROMPT_COLUMNS)} holds the prompts. "
            "Rename the prompt column, or save the prompts as a .txt file, one per line."
        )
    if category is not None and CATEGORY_COLUMN not in fields:
        raise ValueError(f"{name} has no {CATEGORY_COLUMN} column to filter category={category!r}.")
    wanted = category.strip().lower() if category is not None else None
    return [
        row[column].strip()
        for row in reader
        if (row.get(column) or "").strip()
        and (wanted is None or (row.get(CATEGORY_COLUMN) or "").strip().lower() == wanted)
    ]


def _text_prompts(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
