"""Load one image, whatever Pillow opens, as an upright 8-bit RGB picture, or say why it can't.

Training code downstream sees only ``RGB`` images: every mode Pillow decodes is converted here,
once, with a rule a person would expect (alpha composited on white, 16-bit scaled to 8-bit,
palette transparency honoured, CMYK converted), after the EXIF orientation has been applied.
A file that cannot be used raises :class:`BadSampleError`, which names the source, the row and
the file, so that a data problem reads as a data problem and not as a stack trace from Pillow.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ImageRef = str | Path | bytes | Image.Image | dict
"""Where one image comes from: a file path, encoded bytes, a decoded PIL image, or a Hugging
Face ``Image`` feature value (``{"bytes": ..., "path": ...}``)."""

WHITE = (255, 255, 255)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
SKIP_HINT = (
    "Fix or remove the row, or set `on_bad_sample: skip` to skip bad rows "
    "(they are counted and reported)."
)


@dataclass(frozen=True)
class SampleProblem:
    """Why one row of a source can't be used.

    Args:
        row: the row's index in its source (0-based, data rows only: no header, no blank lines).
        path: the file (or other image reference) the row points to, for the message;
            ``None`` for prompt-only rows.
        reason: what is wrong, in words.
    """

    row: int
    path: str | None
    reason: str

    def __str__(self) -> str:
        where = f"row {self.row}" if self.path is None else f"row {self.row} ({self.path})"
        return f"{where}: {self.reason}"


class BadSampleError(ValueError):
    """A prompt/image row that can't be used: missing or undecodable file, bad caption, too small.

    The message always names the source, the row and the file. The constructor accepts a bare
    message so that PyTorch can re-raise it, with its type, out of a DataLoader worker.

    Args:
        message: the full, user-facing message.
        problems: the rows concerned (empty when only the message survived a worker).

    Example:
        >>> problem = SampleProblem(row=3, path="cat.png", reason="file not found")
        >>> str(BadSampleError.for_problems("manifest m.csv", [problem]))[:38]
        'manifest m.csv, row 3 (cat.png): file '
    """

    def __init__(self, message: str, problems: list[SampleProblem] | None = None) -> None:
        super().__init__(_without_worker_traceback(message, type(self)))
        self.problems = list(problems or [])

    @classmethod
    def for_problems(cls, origin: str, problems: list[SampleProblem]) -> BadSampleError:
        """Build the error for one or more bad rows of ``origin`` (up to 10 listed).

        Args:
            origin: the source, in words (``"manifest /data/train.csv"``).
            problems: the bad rows, at least one.

        Returns:
            The error, not raised.
        """
        if len(problems) == 1:
            return cls(f"{origin}, {problems[0]}. {SKIP_HINT}", problems)
        listed = "\n".join(f"  {problem}" for problem in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        return cls(f"{origin}: {len(problems)} bad rows:\n{listed}{more}\n{SKIP_HINT}", problems)


def _without_worker_traceback(message: str, error_type: type) -> str:
    """The original message of an error that PyTorch re-raises out of a DataLoader worker.

    PyTorch rebuilds the error in the main process from one string, ``Caught <type> in
    DataLoader worker process N.\nOriginal Traceback (most recent call last): ...`` ending in
    ``<module>.<type>: <message>``; the user is shown the message, as from the main process.
    """
    if (
        not message.startswith(f"Caught {error_type.__name__} ")
        or "Original Traceback" not in message
    ):
        return message
    marker = f"{error_type.__module__}.{error_type.__qualname__}: "
    _, found, original = message.rpartition(marker)
    return original.rstrip("\n") if found else message


def describe_ref(ref: ImageRef | None) -> str:
    """A short, readable name for an image reference, for messages."""
    if isinstance(ref, (str, Path)):
        return str(ref)
    if isinstance(ref, dict):
        return str(ref.get("path") or f"<{len(ref.get('bytes') or b'')} encoded bytes>")
    if isinstance(ref, bytes):
        return f"<{len(ref)} encoded bytes>"
    if isinstance(ref, Image.Image):
        return f"<in-memory {ref.mode} image {ref.width}x{ref.height}>"
    return f"<no image: {ref!r}>"


def open_image(ref: ImageRef | None) -> Image.Image:
    """Decode ``ref`` completely and return it upright, in RGB.

    Args:
        ref: a path, encoded bytes, a PIL image or a Hugging Face ``{"bytes", "path"}`` dict.

    Returns:
        A fully loaded ``RGB`` image, EXIF orientation applied.

    Raises:
        ValueError: (the message is the reason alone, no row) when the file is missing,
            unreadable, not an image, truncated, or in a mode that has no RGB conversion.
            :func:`load_image` turns it into a :class:`BadSampleError` with the row.
    """
    if isinstance(ref, Image.Image):
        return to_rgb(_upright(ref))
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, bytes):
        source: Any = io.BytesIO(ref)
    elif isinstance(ref, (str, Path)) and str(ref):
        source = Path(ref)
        if not source.is_file():
            raise ValueError("file not found" if not source.exists() else "not a regular file")
    else:
        raise ValueError(f"no image given (the image value is {ref!r})")
    try:
        with Image.open(source) as image:
            image.load()
            upright = _upright(image)
    except Image.DecompressionBombError as error:
        raise ValueError(f"image too large to decode safely: {error}") from None
    except _DECODE_ERRORS as error:
        raise ValueError(f"cannot decode image ({type(error).__name__}: {error})") from None
    return to_rgb(upright)


def load_image(ref: ImageRef | None, origin: str, row: int) -> Image.Image:
    """:func:`open_image`, raising a :class:`BadSampleError` that names ``origin`` and ``row``.

    Args:
        ref: the image reference of the row.
        origin: the source, in words, for the message.
        row: the row index, for the message.

    Returns:
        The upright RGB image.

    Raises:
        BadSampleError: the image can't be used; the message names the row and the file.
    """
    try:
        return open_image(ref)
    except ValueError as error:
        problem = SampleProblem(row, describe_ref(ref), str(error))
        raise BadSampleError.for_problems(origin, [problem]) from None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so that the pixels are the way a viewer shows them."""
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any Pillow mode to ``RGB`` the way an image viewer would show it.

    * ``LA``, ``PA``, ``RGBA`` (and premultiplied ``La``/``RGBa``), and palette images with a
      transparent index: alpha-composited over ``background`` (white by default, as viewers and
      browsers show transparency; black would invent dark outlines).
    * ``I;16*``: 16-bit values scaled to 8 bits (``v / 257``).
    * ``I`` (32-bit integer): scaled as 16-bit when any value exceeds 255, else taken as 8-bit.
    * ``F`` (float): taken as ``[0, 1]`` when its maximum is at most 1, else as ``[0, 255]``;
      clipped either way.
    * ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ...: Pillow's own conversion.

    Args:
        image: any loaded PIL image.
        background: the RGB colour transparent pixels are composited on.

    Returns:
        An ``RGB`` image of the same size.

    Raises:
        ValueError: the mode has no conversion to RGB (names the mode).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        # Pillow converts premultiplied "La" only to "LA".
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"image mode {mode!r} has no conversion to RGB ({error})") from None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel integer or float array of ``mode`` to 8 bits."""
    values = values.astype(np.float64)
    if mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    elif mode.startswith("I;16") or (values.size and values.max() > 255):
        scale = 1.0 / 257.0
    else:
        scale = 1.0
    return np.clip(np.nan_to_num(values * scale).round(), 0, 255).astype(np.uint8)
