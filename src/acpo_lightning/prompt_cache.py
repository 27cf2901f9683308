"""Prompt embeddings for ``acpo cache-latents --prompt-embeds``: the run's denoiser, built from
its config, encodes every cached row's prompt and the empty prompt once (format:
:mod:`acpo_lightning.data.latent_cache`; fit-time check: :mod:`acpo_lightning.data.cache_checks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from acpo_lightning import conditioning as C
from acpo_lightning.data.cache_checks import text_encoder_fingerprint
from acpo_lightning.data.latent_cache import EMBEDS_PREFIX, NULL_FILE, LatentCacheWriter

if TYPE_CHECKING:
    from acpo_lightning.denoisers import Denoiser

#: What ``--prompt-embeds`` saves, for ``acpo cache-latents --help``.
PROMPT_EMBEDS_HELP = (
    "also cache each row's prompt conditioning from the model's denoiser (model.denoiser, or "
    "the flat unet/text_encoder/tokenizer; its text encoders run on --device, the trained "
    "network is loaded on the CPU), and the empty prompt's. Training on the cache then runs no "
    "text encoder in data-objective steps (prompt dropout included): their forward pass and "
    "activations are saved each step. The encoders are still loaded and moved with the model: "
    "rollout steps, validation and generation encode their prompts. A cache made with other "
    "text encoders, tokenizers or prompt lengths is refused at fit set-up."
)


def encode_embeds(denoiser: Denoiser, prompts: list[str]) -> dict[str, Tensor]:
    """``denoiser``'s conditioning of ``prompts`` by entry name, on the CPU (a one-tensor
    conditioning is named ``encoder_hidden_states``, as :func:`conditioning.describe` names it)."""
    with torch.no_grad():
        cond = C.to(denoiser.encode_prompts(prompts), "cpu")
    return _named(cond)


def _named(cond: C.Conditioning) -> dict[str, Tensor]:
    return {"encoder_hidden_states": cond} if isinstance(cond, Tensor) else dict(cond)


def write_null(writer: LatentCacheWriter, denoiser: Denoiser) -> dict[str, Any]:
    """Write the empty prompt's conditioning into the cache folder of ``writer``: the
    denoiser's :meth:`~acpo_lightning.denoisers.Denoiser.empty_prompt_condition`, what the
    pipeline uses (SDXL with ``force_zeros_for_empty_prompt``: zeros, not the encoded ``""``).

    Returns:
        The manifest's ``prompt_embeds`` entry (entries, ``tensor``, ``null_file``, fingerprint).
    """
    with torch.no_grad():
        null = C.to(denoiser.empty_prompt_condition(), "cpu")
    named = _named(null)
    writer.write_file(NULL_FILE, {EMBEDS_PREFIX + name: value for name, value in named.items()})
    return {
        "entries": [
            [name, list(value.shape[1:]), str(value.dtype).removeprefix("torch.")]
            for name, value in named.items()
        ],
        "tensor": isinstance(null, Tensor),
        "null_file": NULL_FILE,
        "fingerprint": text_encoder_fingerprint(denoiser),
    }


def check_denoiser(denoiser: Denoiser | None) -> None:
    """Refuse a denoiser that takes no prompt (``None``: no prompt embeddings asked, passes)."""
    if denoiser is not None and not denoiser.is_conditional:
        raise ValueError(
            f"--prompt-embeds: the model's {type(denoiser.trained).__name__} takes no prompt, so "
            "there is no prompt conditioning to cache. Fix: drop --prompt-embeds."
        )


def load_denoiser(run_config: Any) -> Denoiser:
    """Build the denoiser of a parsed run config, for ``--prompt-embeds``.

    ``model.denoiser`` when the config injects one (its ``anchor_*`` networks are not built: no
    prompt needs them), else a ``UNetDenoiser`` from the flat ``model.unet``, ``text_encoder``,
    ``tokenizer`` and ``max_prompt_length``, as ``ACPOModule`` builds it.

    Args:
        run_config: the jsonargparse ``Namespace`` of ``acpo cache-latents``.

    Returns:
        The denoiser, its networks where their loaders put them (the CPU).
    """
    from jsonargparse import ArgumentParser, Namespace
    from transformers import PreTrainedTokenizerBase

    from acpo_lightning.denoisers import Denoiser, UNetDenoiser

    def plain(value: Any) -> Any:
        return value.as_dict() if isinstance(value, Namespace) else value

    model = run_config.model
    parser = ArgumentParser(prog="acpo cache-latents --prompt-embeds")
    injected = plain(model.get("denoiser"))
    if injected is not None:
        parser.add_argument("--denoiser", type=Denoiser)
        init_args = {
            name: value
            for name, value in (injected.get("init_args") or {}).items()
            if not name.startswith("anchor_")
        }
        parts = parser.parse_object({"denoiser": {**injected, "init_args": init_args}})
        return parser.instantiate_classes(parts).denoiser
    parser.add_argument("--unet", type=nn.Module | None)
    parser.add_argument("--text_encoder", type=nn.Module | None)
    parser.add_argument("--tokenizer", type=PreTrainedTokenizerBase | None)
    names = ("unet", "text_encoder", "tokenizer")
    parts = parser.parse_object({name: plain(model.get(name)) for name in names})
    built = parser.instantiate_classes(parts)
    if built.unet is None:
        raise ValueError("--prompt-embeds: the config has neither model.denoiser nor model.unet.")
    return UNetDenoiser(
        built.unet, built.text_encoder, built.tokenizer,
        max_prompt_length=model.get("max_prompt_length"),
    )  # fmt: skip
