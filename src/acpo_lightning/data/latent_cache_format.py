"""The latent cache's on-disk format: names, dtypes, and the reader that checks a folder.

The format is described in :mod:`acpo_lightning.data.latent_cache`; this module holds what both the
writer and the readers agree on, and the checks that refuse a folder which does not follow it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT, VERSION = "acpo-latent-cache", 1
SHARD_KEY = "moments"
#: Storage dtypes and their names in a safetensors header.
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_REQUIRED = ("count", "resolution", "latent_shape", "views", "dtype", "prompts", "shards", "vae")
#: Shard-tensor name prefix of the cached prompt conditioning entries.
EMBEDS_PREFIX = "prompt_embeds."
NULL_FILE = "null-prompt.safetensors"
#: Per-row image geometry (SDXL's micro-conditioning) in the shards of a manifest with
#: ``"image_geometry": true``: ``(height, width)`` before resizing, ``[rows, 2]``, and the crop's
#: ``(top, left)`` per view (counted in the flipped image for view 1), ``[rows, views, 2]``.
ORIGINAL_SIZES, CROP_TOP_LEFTS = "original_sizes", "crop_top_lefts"
#: Dtypes a conditioning entry may have (ids and flags besides the floating text states).
ENTRY_DTYPES = {**DTYPES, "int64": "I64", "int32": "I32", "bool": "BOOL"}


class LatentCacheError(ValueError):
    """A latent cache folder that is corrupt, incomplete or of another format."""


def rerun_hint(folder: str | Path) -> str:
    """The fix for a cache that cannot be used: write it again."""
    return (
        f"Fix: re-run `acpo cache-latents --config <your training config(s)> --out {folder} "
        "--overwrite`."
    )


def read_latent_cache(folder: str | Path) -> dict[str, Any]:
    """Read and check a cache folder: its manifest, and every shard's header (not the data).

    Args:
        folder: a folder written by ``acpo cache-latents``.

    Returns:
        The manifest.

    Raises:
        FileNotFoundError: no folder, no manifest, or a shard the manifest lists is missing.
        LatentCacheError: an unreadable manifest or shard, another format, or a shard whose
            shape, dtype or row count disagrees with the manifest.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"latent cache folder {folder} does not exist. Fix: run `acpo cache-latents --config "
            f"<your training config(s)> --out {folder}` first, or set the path to the folder it wrote."
        )
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST_NAME}, so it is not a finished latent cache (a run of "
            f"`acpo cache-latents` that stopped part-way leaves none). {rerun_hint(folder)}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LatentCacheError(f"cannot read {path}: {error}. {rerun_hint(folder)}") from None
    _check_manifest(manifest, path)
    for shard in manifest["shards"]:
        _check_shard(folder, shard, manifest)
    if "prompt_embeds" in manifest:
        null = folder / str(manifest["prompt_embeds"].get("null_file", NULL_FILE))
        expected = {
            EMBEDS_PREFIX + name: (
                [1, *shape],
                ENTRY_DTYPES[dtype],
                f"the empty prompt's {name!r}",
                "",
            )
            for name, shape, dtype in embed_entries(manifest)
        }
        _check_tensors(null, expected)
    return manifest


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LatentCacheError(
            f"{path} is not the manifest of an acpo latent cache (no format {FORMAT!r}). "
            f"{rerun_hint(path.parent)}"
        )
    if manifest.get("version") != VERSION:
        raise LatentCacheError(
            f"{path} is version {manifest.get('version')!r} of the latent cache format; this "
            f"acpo-lightning reads version {VERSION}. {rerun_hint(path.parent)}"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise LatentCacheError(f"{path} lacks {missing}. {rerun_hint(path.parent)}")
    rows = sum(int(shard["rows"]) for shard in manifest["shards"])
    if not manifest["count"] == rows == len(manifest["prompts"]) or rows == 0:
        raise LatentCacheError(
            f"{path} says count {manifest['count']}, but its shards hold {rows} rows and it has "
            f"{len(manifest['prompts'])} prompts. {rerun_hint(path.parent)}"
        )
    if manifest["dtype"] not in DTYPES:
        raise LatentCacheError(
            f"{path}: dtype {manifest['dtype']!r} is not one of {sorted(DTYPES)}. "
            f"{rerun_hint(path.parent)}"
        )
    embeds = manifest.get("prompt_embeds")
    if embeds is not None:
        entries = embeds.get("entries") if isinstance(embeds, dict) else None
        valid = isinstance(entries, list) and entries and "fingerprint" in embeds
        if not valid or any(len(e) != 3 or e[2] not in ENTRY_DTYPES for e in entries):
            raise LatentCacheError(
                f"{path}: its prompt_embeds entry is not [[name, shape, dtype], ...] with a "
                f"fingerprint. {rerun_hint(path.parent)}"
            )


def _check_shard(folder: Path, shard: dict[str, Any], manifest: dict[str, Any]) -> None:
    path = folder / shard["file"]
    rows = int(shard["rows"])
    expected = {
        SHARD_KEY: ([rows, int(manifest["views"]), *map(int, manifest["latent_shape"])],
                    DTYPES[manifest["dtype"]], "moments", " [rows, views, 2C, h, w]"),
    }  # fmt: skip
    if manifest.get("image_geometry"):
        views = int(manifest["views"])
        expected[ORIGINAL_SIZES] = ([rows, 2], "I64", "original sizes", " [rows, 2]")
        expected[CROP_TOP_LEFTS] = ([rows, views, 2], "I64", "crop offsets", " [rows, views, 2]")
    for name, shape, dtype in embed_entries(manifest):
        what = f"prompt embeddings {name!r}"
        expected[EMBEDS_PREFIX + name] = ([rows, *shape], ENTRY_DTYPES[dtype], what, "")
    _check_tensors(path, expected)


def embed_entries(manifest: dict[str, Any]) -> list[tuple[str, list[int], str]]:
    """``(name, per-row shape, dtype)`` of each cached conditioning entry, in order (or none)."""
    embeds = manifest.get("prompt_embeds") or {"entries": []}
    return [
        (str(name), [int(s) for s in shape], str(dtype)) for name, shape, dtype in embeds["entries"]
    ]


def _check_tensors(path: Path, expected: dict[str, tuple[list[int], str, str, str]]) -> None:
    """Every tensor of ``expected`` (``key: (shape, dtype, what, axes)``) is in ``path`` as said."""
    from safetensors import SafetensorError, safe_open

    folder = path.parent
    if not path.is_file():
        raise FileNotFoundError(
            f"latent cache {folder} is incomplete: {path.name}, listed in {MANIFEST_NAME}, "
            f"is missing. {rerun_hint(folder)}"
        )
    found = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            for key in expected.keys() & keys:
                tensor = handle.get_slice(key)
                found[key] = (list(tensor.get_shape()), tensor.get_dtype())
    except (SafetensorError, OSError) as error:
        raise LatentCacheError(
            f"cannot read {path} ({error}): the file is truncated or not a safetensors file. "
            f"{rerun_hint(folder)}"
        ) from None
    for key, (shape, dtype, what, axes) in expected.items():  # in order: the moments first
        if key not in found:
            raise LatentCacheError(f"{path} holds no {key!r} tensor. {rerun_hint(folder)}")
        if found[key] != (shape, dtype):
            raise LatentCacheError(
                f"{path} holds {what} of shape {found[key][0]} ({found[key][1]}), but "
                f"{MANIFEST_NAME} says {shape} ({dtype}){axes}: the folder mixes files of "
                f"different runs. {rerun_hint(folder)}"
            )
