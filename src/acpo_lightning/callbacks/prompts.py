"""Fixed prompt sets for evaluation: the lists shipped with the package, or a file of your own."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

#: Prompt lists shipped as package data (``callbacks/prompt_lists``; sources and licences in its README).
SHIPPED_PROMPT_LISTS = {"acpo_eval": "acpo_eval.txt"}
#: Benchmarks users ask for by name that are not bundled, and where their file comes from.
NOT_BUNDLED = {
    "drawbench": "DrawBench (Saharia et al., 2022): the CSV export of the list published with Imagen",
    "partiprompts": "PartiPrompts (Yu et al., 2022): PartiPrompts.tsv from the google-research/parti "
    "repository (Apache-2.0)",
}
#: Columns read from ``.csv``/``.tsv`` files, in order of preference.
PROMPT_COLUMNS = ("Prompt", "Prompts", "prompt", "prompts", "text", "caption")


def load_prompts(source: str | Path, max_prompts: int | None = None) -> list[str]:
    """Read a prompt list: a shipped name (``acpo_eval``) or a ``.txt``/``.csv``/``.tsv`` file.

    ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
    ``.csv``/``.tsv``: the first of the columns :data:`PROMPT_COLUMNS` present (PartiPrompts.tsv
    has ``Prompt``, DrawBench's CSV ``Prompts``).

    Args:
        source: a name of :data:`SHIPPED_PROMPT_LISTS` or a file path.
        max_prompts: keep only the first ``max_prompts`` prompts (``None``: all).

    Returns:
        The prompts, in file order.

    Raises:
        FileNotFoundError: an unknown name, a benchmark that is not bundled, or a missing file.
        ValueError: no prompt column, an empty list, or ``max_prompts < 1``.

    Example:
        >>> len(load_prompts("acpo_eval"))
        32
    """
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts={max_prompts} must be >= 1, or None for the whole list.")
    key = str(source).strip().lower().replace("-", "").replace("_", "")
    if str(source) in SHIPPED_PROMPT_LISTS:
        text = (
            resources.files("acpo_lightning.callbacks")
            .joinpath("prompt_lists", SHIPPED_PROMPT_LISTS[str(source)])
            .read_text(encoding="utf-8")
        )
        prompts = _text_prompts(text)
    elif key in NOT_BUNDLED and not Path(source).exists():
        raise FileNotFoundError(
            f"prompts={source!r}: {NOT_BUNDLED[key]} is not bundled with acpo-lightning (no copy "
            "with a clear source was available when it was built). Download that file and pass "
            f"its path as prompts, or use a shipped list: {sorted(SHIPPED_PROMPT_LISTS)}."
        )
    else:
        prompts = _file_prompts(Path(source))
    if not prompts:
        raise ValueError(f"prompt list {source!r} holds no prompt.")
    return prompts[:max_prompts] if max_prompts else prompts


def _file_prompts(path: Path) -> list[str]:
    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompts={str(path)!r} is neither a shipped list {sorted(SHIPPED_PROMPT_LISTS)} nor an "
            "existing file; pass a .txt (one prompt per line) or a .csv/.tsv with a Prompt column."
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() not in (".csv", ".tsv"):
        return _text_prompts(text)
    reader = csv.DictReader(
        text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ","
    )
    column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
    if column is None:
        raise ValueError(
            f"{path} has columns {reader.fieldnames}; none of {list(PROMPT_COLUMNS)} holds the prompts. "
            "Rename the prompt column, or save the prompts as a .txt file, one per line."
        )
    return [row[column].strip() for row in reader if (row.get(column) or "").strip()]


def _text_prompts(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
