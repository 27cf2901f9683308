"""Whether a latent cache fits the model it is about to train: its VAE, its latent shape and,
for a cache with prompt embeddings, its text encoders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from acpo_lightning.data.latent_cache_format import rerun_hint
from acpo_lightning.models.fingerprint import fingerprint_differences, vae_fingerprint

if TYPE_CHECKING:
    from acpo_lightning.denoisers import Denoiser

#: Values per weight tensor that enter a text encoder's digest (see :func:`text_encoder_fingerprint`).
DIGEST_VALUES = 4096
#: Texts a tokenizer's digest tokenizes: case, punctuation, digits, accents, other scripts, runs
#: of spaces and an empty prompt, padded (the pad token and side) to :data:`PROBE_LENGTH`.
PROBE_TEXTS = (
    "a photo of a cat",
    "A Photo, OF: a CAT!! (4k) [best] {quality}",
    "café naïve façade 東京 ☃ 1024x768 3.5",
    "  two  spaces\tand\na newline ",
    "",
)
PROBE_LENGTH = 48
#: Config entries that say where or how an encoder was loaded, not what it computes.
_VOLATILE_CONFIG = ("transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path")


def check_latent_moments_shape(
    vae: nn.Module | None,
    expected: tuple[int, int, int],
    shape: Sequence[int] | None,
    where: str = "the batch",
) -> None:
    """Refuse cached moments that this model cannot sample from.

    Args:
        vae: the model's VAE (``None`` for a pixel-space model).
        expected: ``(2C, h, w)`` of one item's moments for the model's denoiser.
        shape: one item's moments shape; ``None`` checks only for a VAE.
        where: what holds them, for the message.

    Raises:
        ValueError: no VAE (a pixel-space model), or ``shape`` is not ``expected``.
    """
    if vae is None:
        raise ValueError(
            f"{where} holds cached VAE latents (latent_moments), but this model has no vae (a "
            "pixel-space UNet). Fix: train it on images (e.g. PromptImageDataModule), or "
            "configure model.vae."
        )
    if shape is not None and tuple(shape) != tuple(expected):
        channels, side = expected[0] // 2, expected[1]
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        raise ValueError(
            f"{where} holds latent moments of shape {list(shape)}, but this UNet needs "
            f"{list(expected)} (2 x {channels} latent channels, latent side {side} = resolution "
            f"{side * scale} / {scale}). Fix: re-run `acpo cache-latents` with the config you "
            "train with (its data.init_args.resolution and model.vae)."
        )


def check_latent_cache(
    datamodule: Any,
    vae: nn.Module | None,
    expected: tuple[int, int, int],
    denoiser: Denoiser | None = None,
) -> None:
    """Refuse a latent cache (``CachedLatentsDataModule``) encoded by another VAE.

    Compares the cache's ``latent_cache_fingerprint`` with :func:`models.vae_fingerprint` of
    ``vae``, and the cached moments' shape with ``expected`` (``(2C, h, w)``). With ``denoiser``,
    a cache that holds prompt embeddings is checked by :func:`check_prompt_cache`, which installs
    its empty-prompt conditioning in ``denoiser``. Any other DataModule passes.

    Raises:
        ValueError: no VAE, another VAE (the differing values named), a moments shape the
            model cannot use, no image geometry for SDXL, or prompt embeddings of other text
            encoders.
    """
    cached = getattr(datamodule, "latent_cache_fingerprint", None)
    if cached is None:
        return
    where = f"the latent cache {getattr(datamodule, 'path', '')}".rstrip()
    shape = getattr(datamodule, "latent_moments_shape", None)
    check_latent_moments_shape(vae, expected, shape, where)
    differences = fingerprint_differences(cached, vae_fingerprint(vae))
    if differences:
        raise ValueError(
            f"{where} was encoded by another VAE than this model's: "
            f"{'; '.join(differences)}. Fix: re-run `acpo cache-latents` with the config(s) "
            "you train with (the same model.vae), or set model.vae to the VAE that encoded "
            "the cache."
        )
    if denoiser is not None:
        check_image_geometry(datamodule, denoiser)
        check_prompt_cache(datamodule, denoiser)


def check_image_geometry(datamodule: Any, denoiser: Denoiser) -> None:
    """Refuse a latent cache without per-image sizes and crops for a denoiser that needs them.

    SDXL conditions on each image's original size and crop offset (``time_ids``); a cache written
    before they were stored would train every image as an uncropped square at the target size.

    Raises:
        ValueError: ``denoiser.uses_image_geometry`` and the cache's rows carry no geometry.
    """
    if not getattr(denoiser, "uses_image_geometry", False):
        return
    if getattr(datamodule, "image_geometry", True):
        return
    where = f"the latent cache {getattr(datamodule, 'path', '')}".rstrip()
    raise ValueError(
        f"{where} holds no per-image original sizes and crop offsets (written by an earlier "
        f"acpo-lightning), which {type(denoiser).__name__}'s time_ids need. "
        f"{rerun_hint(getattr(datamodule, 'path', '<cache folder>'))}"
    )


def text_encoders(denoiser: Denoiser) -> dict[str, nn.Module]:
    """The denoiser's text encoders: its networks named ``text_encoder``, ``text_encoder_2``, ..."""
    networks = denoiser.networks().items()
    return {name: net for name, net in networks if name.startswith("text_encoder") and net}


def tokenizers(denoiser: Denoiser) -> dict[str, Any]:
    """The tokenizers of the denoiser's text encoders (``tokenizer`` of ``text_encoder``,
    ``tokenizer_2`` of ``text_encoder_2``, ...); one whose encoder is absent is not used."""
    encoders = text_encoders(denoiser)
    found = {}
    for name, value in vars(denoiser).items():
        encoder = "text_encoder" + name.removeprefix("tokenizer")
        if name.startswith("tokenizer") and value is not None and encoder in encoders:
            found[name] = value
    return found


def tokenizer_digest(tokenizer: Any) -> str:
    """A SHA-256 of what a tokenizer makes of text: its vocabulary and the ids it gives
    :data:`PROBE_TEXTS` padded to :data:`PROBE_LENGTH` (merges, normalization, special tokens,
    the pad token and side), so a slow and a fast tokenizer of the same files agree."""
    ids = tokenizer(
        list(PROBE_TEXTS), padding="max_length", max_length=PROBE_LENGTH, truncation=True
    )["input_ids"]
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps({"vocab": vocab, "probe": [list(map(int, row)) for row in ids]})
    return hashlib.sha256(text.encode()).hexdigest()


def text_encoder_fingerprint(denoiser: Denoiser) -> dict[str, Any]:
    """What identifies the prompt embeddings a denoiser makes, without running its encoders.

    Per text encoder: its class, a SHA-256 of its config (without the entries that only say how
    it was loaded) and a digest of its weights: every tensor's name and shape and its first
    :data:`DIGEST_VALUES` values rounded to bfloat16, so the same weights in float32 or bfloat16
    agree, a fine-tuned encoder (whose every matrix moves) differs, and the cost does not grow
    with the encoder (T5-XXL included). ``dtype`` is reported, not compared. Per tokenizer:
    :func:`tokenizer_digest`. And the denoiser's ``prompt_settings()``: the token length of each
    tokenizer and the form of the empty prompt (SDXL's ``force_zeros_for_empty_prompt``).

    Args:
        denoiser: a text-conditional denoiser.

    Returns:
        A JSON-serializable dict: ``denoiser`` (the class name), ``text_encoders``
        (``{name: {class, config_digest, weights_digest, dtype}}``), ``tokenizers``
        (``{name: digest}``) and ``settings``.

    Example:
        >>> from acpo_lightning import testing as T
        >>> from acpo_lightning.denoisers import UNetDenoiser
        >>> denoiser = UNetDenoiser(T.tiny_unet(), T.tiny_text_encoder(), T.tiny_tokenizer())
        >>> sorted(text_encoder_fingerprint(denoiser)["text_encoders"]["text_encoder"])
        ['class', 'config_digest', 'dtype', 'weights_digest']
    """
    encoders = {}
    for name, encoder in text_encoders(denoiser).items():
        encoders[name] = {
            "class": type(encoder).__name__,
            "config_digest": _config_digest(encoder),
            "weights_digest": _weights_digest(encoder),
            "dtype": str(next(encoder.parameters()).dtype).removeprefix("torch."),
        }
    return {
        "denoiser": type(denoiser).__name__,
        "text_encoders": encoders,
        "tokenizers": {name: tokenizer_digest(t) for name, t in tokenizers(denoiser).items()},
        "settings": denoiser.prompt_settings(),
    }


def _config_digest(encoder: nn.Module) -> str:
    config = getattr(encoder, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    kept = {
        key: value
        for key, value in values.items()
        if not key.startswith("_") and key not in _VOLATILE_CONFIG
    }
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_digest(encoder: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if not tensor.is_floating_point():
            continue  # index buffers (position ids) say nothing about the weights
        head = tensor.detach().reshape(-1)[:DIGEST_VALUES].to("cpu", torch.bfloat16)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(head.contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def prompt_fingerprint_differences(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Where two :func:`text_encoder_fingerprint` results differ, in words (empty: they agree)."""
    if "settings" not in cached or "tokenizers" not in cached:
        return [
            "the cache records neither its tokenizers nor its prompt lengths (written by an "
            "earlier acpo-lightning), so they cannot be checked"
        ]
    differences = []
    if cached.get("denoiser") != current.get("denoiser"):
        differences.append(
            f"denoiser {cached.get('denoiser')} (cache) vs {current.get('denoiser')} (model)"
        )
    cached_encoders, encoders = cached.get("text_encoders", {}), current.get("text_encoders", {})
    for name in sorted(set(cached_encoders) | set(encoders)):
        left, right = cached_encoders.get(name), encoders.get(name)
        if left is None or right is None:
            where = "the model" if right is None else "the cache"
            differences.append(f"{name} is missing from {where}")
            continue
        for key in ("class", "config_digest", "weights_digest"):
            if left.get(key) != right.get(key):
                a, b = (str(v)[:12] for v in (left.get(key), right.get(key)))
                differences.append(f"{name} {key} {a} (cache) vs {b} (model)")
    cached_tokenizers, tokenizers_ = cached["tokenizers"], current.get("tokenizers", {})
    for name in sorted(set(cached_tokenizers) | set(tokenizers_)):
        left, right = cached_tokenizers.get(name), tokenizers_.get(name)
        if left != right:
            a, b = (str(v)[:12] if v else "none" for v in (left, right))
            differences.append(f"{name} digest {a} (cache) vs {b} (model)")
    settings = current.get("settings", {})
    for key in sorted(set(cached["settings"]) | set(settings)):
        left, right = cached["settings"].get(key), settings.get(key)
        if left != right:
            differences.append(f"{key.replace('_', ' ')} {left} (cache) vs {right} (model)")
    return differences


def check_prompt_cache(datamodule: Any, denoiser: Denoiser) -> None:
    """Refuse prompt embeddings made by other text encoders, tokenizers or settings; else
    install the cached empty prompt.

    A DataModule without ``prompt_cache_fingerprint`` (or with ``None``: a cache without prompt
    embeddings) passes untouched. Otherwise the cache's fingerprint must equal
    :func:`text_encoder_fingerprint` of ``denoiser``; then the cache's empty-prompt conditioning
    becomes ``denoiser``'s (:meth:`Denoiser.set_null_condition`), so that neither the batches
    nor prompt dropout run a text encoder.

    Raises:
        ValueError: the cache's text encoders (or denoiser) differ from the model's, naming
            what differs and the fix.
    """
    cached = getattr(datamodule, "prompt_cache_fingerprint", None)
    if cached is None:
        return
    where = f"the latent cache {getattr(datamodule, 'path', '')}".rstrip()
    if not getattr(denoiser, "is_conditional", False):
        raise ValueError(
            f"{where} holds prompt embeddings, but this model takes no prompt. Fix: train it on "
            "a cache made without --prompt-embeds, or configure a text-conditional model."
        )
    differences = prompt_fingerprint_differences(cached, text_encoder_fingerprint(denoiser))
    if differences:
        raise ValueError(
            f"{where} holds prompt embeddings made by other text encoders, tokenizers or prompt "
            f"settings than this model's: {'; '.join(differences)}. Fix: re-run `acpo "
            "cache-latents --prompt-embeds` with the config(s) you train with (the same text "
            "encoders, tokenizers and max_prompt_length / max_sequence_length), or use a cache "
            "made without --prompt-embeds (the text encoders then run each step)."
        )
    denoiser.set_null_condition(datamodule.null_condition())
