"""What identifies a VAE's encoder: the fingerprint that ties a latent cache to the VAE that made it.

``acpo cache-latents`` writes :func:`vae_fingerprint` of its VAE into the cache's manifest;
``ACPOModule.setup`` compares it with the fingerprint of the VAE it trains with
(:func:`fingerprint_differences`), so latents encoded by one VAE are never decoded by another.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

#: Config keys of the VAE that change what its latents mean.
CONFIG_KEYS = ("latent_channels", "scaling_factor", "shift_factor", "block_out_channels")
#: The parts of an ``AutoencoderKL`` that compute the posterior (``quant_conv`` follows the encoder).
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
#: Fingerprint entries that must agree; ``dtype`` is reported, not compared (see the digest).
COMPARED_KEYS = ("class", *CONFIG_KEYS, "encoder_digest")


def vae_fingerprint(vae: nn.Module) -> dict[str, Any]:
    """The VAE's class, the config keys that matter, and a digest of its encoder's weights.

    The digest is a SHA-256 of the encoder's (and ``quant_conv``'s) parameter names, shapes and
    values rounded to bfloat16, so the same weights loaded in float32 or bfloat16 agree, while the
    same config with other weights differs.

    Args:
        vae: a diffusers autoencoder (``AutoencoderKL``).

    Returns:
        A JSON-serializable dict: ``class``, :data:`CONFIG_KEYS`, ``encoder_digest`` and ``dtype``.

    Example:
        >>> from acpo_lightning import testing as T
        >>> fingerprint = vae_fingerprint(T.tiny_vae())
        >>> fingerprint["class"], fingerprint["latent_channels"], len(fingerprint["encoder_digest"])
        ('AutoencoderKL', 4, 64)
    """
    config = getattr(vae, "config", {})
    fingerprint: dict[str, Any] = {"class": type(vae).__name__}
    for key in CONFIG_KEYS:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        fingerprint[key] = list(value) if isinstance(value, tuple | list) else value
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(ENCODER_PREFIXES):
            continue
        value = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.int16).numpy().tobytes())
    fingerprint["encoder_digest"] = digest.hexdigest()
    fingerprint["dtype"] = str(getattr(vae, "dtype", "unknown")).removeprefix("torch.")
    return fingerprint


def fingerprint_differences(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The entries of :data:`COMPARED_KEYS` where two fingerprints differ, in words.

    Args:
        cached: the fingerprint stored with the latents.
        current: the fingerprint of the VAE at hand.

    Returns:
        One ``"key X (cache) vs Y (model)"`` string per difference; empty when they agree.
    """
    differences = []
    for key in COMPARED_KEYS:
        left, right = cached.get(key), current.get(key)
        if left == right:
            continue
        if key == "encoder_digest":
            left, right = str(left)[:12], str(right)[:12]
            note = " (other encoder weights"
            if cached.get("dtype") != current.get("dtype"):
                note += f"; encoded in {cached.get('dtype')}, this VAE is {current.get('dtype')}"
            differences.append(
                f"encoder weights digest {left}... (cache) vs {right}... (model){note})"
            )
        else:
            differences.append(f"{key} {left!r} (cache) vs {right!r} (model)")
    return differences
