"""The denoiser-call interface: how the policy, the anchor and their conditioning are invoked."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from acpo_lightning import conditioning as C
from acpo_lightning.conditioning import Conditioning
from acpo_lightning.models.lora import adapters_disabled, has_lora


class Denoiser(ABC):
    """The networks that predict the process's target, with their conditioning.

    A denoiser holds references to networks; the module registers them (:meth:`networks`) under
    their names, so parameter names, checkpoints and LoRA exports do not depend on this class.
    Conditioning is whatever the network takes besides sample and time, a tensor or a dict of
    tensors with the batch first (:mod:`acpo_lightning.conditioning`): text states for SD-1.x,
    plus pooled embeddings and micro-conditioning for SDXL, SD3 and FLUX; ``None`` when
    unconditional.
    """

    #: whether the networks take a prompt
    is_conditional: bool
    #: whether training batches must carry each image's ``original_sizes`` and
    #: ``crop_top_lefts`` (SDXL's ``time_ids``): a latent cache without them is refused
    uses_image_geometry: bool = False
    #: the diffusion process the networks were trained with: ``vp`` (SD-1.x and SDXL UNets,
    #: DDPM/DDIM) or ``flow`` (SD3 and FLUX transformers, flow matching)
    process_kind: str = "vp"
    #: attribute name of the trained network (``unet`` or ``transformer``): the prefix of its
    #: LoRA keys in the files diffusers' ``load_lora_weights`` reads
    trained_name: str = "unet"
    #: attribute name of the separate frozen anchor network (``None`` there: the adapter toggle)
    anchor_name: str = "anchor_unet"
    #: what the trained network is called in error messages
    network_label: str = "UNet"

    @property
    def trained(self) -> nn.Module:
        """The trained network (the one LoRA adapters are added to and exported from)."""
        return self.networks()[self.trained_name]

    @abstractmethod
    def networks(self) -> dict[str, nn.Module | None]:
        """Every network by the attribute name the module registers it under."""

    @abstractmethod
    def frozen(self) -> list[nn.Module]:
        """The networks that never train (text encoders, a separate anchor)."""

    @property
    def separate_anchor(self) -> nn.Module | None:
        """The separate frozen anchor network, or ``None`` (the policy with its adapters off)."""
        return getattr(self, self.anchor_name)

    def has_anchor(self) -> bool:
        """Whether an anchor can be evaluated: a separate one, or LoRA adapters to switch off."""
        return self.separate_anchor is not None or has_lora(self.trained)

    def check_anchor(self) -> None:
        """Raise a ``ValueError`` with the fix when no anchor can be evaluated."""
        if not self.has_anchor():
            raise ValueError(
                f"the {self.network_label} has no LoRA adapter (full fine-tuning), so the "
                f"adapter-toggle anchor does not exist: pass {self.anchor_name} (a frozen copy of "
                "the base), add LoRA with models.add_lora, or set w_anchor: 0."
            )

    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one sample in the network's input space."""

    def latent_side_multiple(self) -> tuple[int, str]:
        """The latent sides the network takes are multiples of this (1: any size), and why,
        in words for an error message (transformers that cut latent patches)."""
        return 1, ""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning for ``prompts`` (frozen, no grad)."""

    def prompt_lengths(self) -> dict[str, int]:
        """The token length each tokenizer pads and truncates prompts to, by attribute name
        (resolved: a ``None`` setting is the length it stands for); none by default."""
        return {}

    def prompt_settings(self) -> dict[str, Any]:
        """What decides :meth:`encode_prompts` and :meth:`empty_prompt_condition` besides the
        text encoders' weights and the tokenizers: JSON values, held by a prompt cache's
        fingerprint so that a cache made with other settings is refused."""
        return {"prompt_lengths": self.prompt_lengths()}

    #: the empty prompt's conditioning, encoded once (on the text encoders' device)
    _null: Conditioning | None = None

    def null_condition(self, like: Conditioning | None = None) -> Conditioning:
        """One-sample conditioning of the empty prompt (CFG's unconditional branch), in the
        dtype of ``like``'s text states: :meth:`preset_null_condition` when a prompt cache
        installed one (no text encoder runs), else :meth:`empty_prompt_condition`, cached.

        The cache keeps the dtype it was computed in (fp32 under CUDA autocast, where LayerNorm
        runs in fp32), which need not be the conditioning's dtype later (bf16 weights outside
        autocast): ``like`` gives the dtype to return.
        """
        preset = self.preset_null_condition(like)
        if preset is not None:
            return preset
        device = next(
            next(m.parameters()).device
            for name, m in self.networks().items()
            if name.startswith("text_encoder") and m is not None
        )
        if self._null is None or C.first(self._null).device != device:
            self._null = self.empty_prompt_condition()
        if like is None:
            return self._null
        return C.to(self._null, device, C.first(like).dtype)

    def empty_prompt_condition(self) -> Conditioning:
        """The empty prompt's conditioning as the pipeline builds it: the encoding of ``""``."""
        return self.encode_prompts([""])

    #: the empty prompt's conditioning given to :meth:`set_null_condition`, else ``None``
    _preset_null: Conditioning | None = None

    def set_null_condition(self, cond: Conditioning | None) -> None:
        """Use ``cond`` (one sample) as the empty prompt's conditioning, so that prompt dropout
        runs no text encoder; ``None`` encodes the empty prompt again.

        A latent cache with prompt embeddings (``acpo cache-latents --prompt-embeds``) installs
        the empty prompt's conditioning it stored, at ``fit`` set-up.
        """
        self._preset_null = cond

    def preset_null_condition(self, like: Conditioning | None = None) -> Conditioning | None:
        """The conditioning given to :meth:`set_null_condition` on the trained network's device
        (floating tensors in the dtype of ``like``'s text states when given), or ``None``."""
        if self._preset_null is None:
            return None
        device = next(self.trained.parameters()).device
        if C.first(self._preset_null).device != device:
            self._preset_null = C.to(self._preset_null, device)
        if like is None:
            return self._preset_null
        return C.to(self._preset_null, device, C.first(like).dtype)

    @abstractmethod
    def _call(
        self, network: nn.Module, sample: Tensor, times: Tensor, cond: Conditioning | None
    ) -> Tensor:
        """``network``'s output (the trained network or the anchor) on the denoiser's input."""

    def policy(self, sample: Tensor, times: Tensor, cond: Conditioning | None) -> Tensor:
        """The trained network's output (with gradient when enabled)."""
        return self._call(self.trained, sample, times, cond)

    def anchor(self, sample: Tensor, times: Tensor, cond: Conditioning | None) -> Tensor:
        """The frozen anchor's output, without gradient."""
        with torch.no_grad():
            if self.separate_anchor is not None:
                return self._call(self.separate_anchor, sample, times, cond)
            with adapters_disabled(self.trained):
                return self._call(self.trained, sample, times, cond)

    def sampling_anchor(self) -> AbstractContextManager:
        """A context in which :meth:`policy` runs the anchor (for ``generate(use_anchor=True)``)."""
        if self.separate_anchor is None:
            return adapters_disabled(self.trained)
        return self._swapped()

    @contextmanager
    def _swapped(self) -> Iterator[None]:
        """The separate anchor in the trained network's place."""
        policy = self.trained
        setattr(self, self.trained_name, self.separate_anchor)
        try:
            yield
        finally:
            setattr(self, self.trained_name, policy)

    @abstractmethod
    def configure(self, channels_last: bool = False, compile_backend: str | None = None) -> None:
        """Once, after the module froze its frozen parts: make a policy without adapters fully
        trainable, store weights NHWC, and ``torch.compile`` the policy in place if asked."""

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Recompute the trained network's activations in the backward pass."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The policy's parameter dtype (rollout noise is drawn in it)."""

    def conditioning(
        self,
        prompts: Sequence[str] | None,
        size: int,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
        batch: dict | None = None,
    ) -> Conditioning | None:
        """Conditioning for a training batch of ``size``; each prompt is dropped (replaced by the
        empty prompt's) with probability ``dropout``.

        A batch that carries ``prompt_embeds`` (written by ``acpo cache-latents``) is used as it is:
        the text encoders do not run. ``batch`` also gives per-sample micro-conditioning to the
        denoisers that take it (SDXL's original sizes and crop offsets).

        Raises:
            ValueError: a conditional denoiser without one prompt (or cached embedding) per sample.
        """
        if not self.is_conditional:
            return None
        cached = (batch or {}).get("prompt_embeds")
        if cached is not None:
            cond = self.check_cached(cached, size)
        else:
            if prompts is None or len(prompts) != size:
                count = 0 if prompts is None else len(prompts)
                raise ValueError(
                    f"the denoiser is text-conditional but the batch has {count} prompts for "
                    f"{size} images; the DataModule must yield a 'prompts' list per batch."
                )
            cond = self.encode_prompts(prompts)
        cond = self.add_batch_conditioning(cond, batch or {}, size)
        return self.drop_prompts(cond, size, dropout, generator)[0]

    def drop_prompts(
        self,
        cond: Conditioning | None,
        size: int,
        dropout: float,
        generator: torch.Generator | None = None,
    ) -> tuple[Conditioning | None, Tensor | None]:
        """Replace each sample's conditioning by the empty prompt's with probability ``dropout``.

        Returns:
            ``(cond, dropped)``: ``dropped`` is the boolean ``[size]`` mask of the replaced
            samples (on the conditioning's device), ``None`` when nothing was drawn (no dropout,
            or an unconditional denoiser); the data objective leaves them out of the perceptual
            term.
        """
        if cond is None or dropout <= 0:
            return cond, None
        device = C.first(cond).device
        drop = torch.rand(size, generator=generator, device=device) < dropout
        return C.where(drop, self.null_condition(cond), cond), drop

    def check_cached(self, cached: Conditioning, size: int) -> Conditioning:
        """Cached prompt embeddings, checked against what :meth:`encode_prompts` returns.

        The reference is :meth:`null_condition`. After a prompt cache installed its empty prompt,
        that is the cache's own, so this check only keeps each batch consistent with it: what
        ties the cache to this model is the set-up check (``cache_checks.check_prompt_cache``),
        which compares the text encoders, the tokenizers and :meth:`prompt_settings` (the token
        lengths) before installing it. Without one, the empty prompt is encoded (once).

        Raises:
            ValueError: the cache was written for another text encoder (other names or shapes).
        """
        probe = self.null_condition()
        expected, found = C.describe(probe), C.describe(cached)
        if expected != found:
            raise ValueError(
                f"the batch's cached prompt_embeds {found} do not fit this denoiser's "
                f"conditioning {expected}: the cache was written with other text encoders. "
                "Re-run `acpo cache-latents` with this model's config."
            )
        if C.batch_size(cached) != size:
            raise ValueError(
                f"the batch has {C.batch_size(cached)} cached prompt embeddings for {size} images."
            )
        return C.to(cached, C.first(probe).device, C.first(probe).dtype)

    def add_batch_conditioning(self, cond: Conditioning, batch: dict, size: int) -> Conditioning:
        """Add per-sample conditioning taken from the batch (none by default)."""
        return cond

    def guidance_conditions(
        self, prompts: Sequence[str], guidance_scale: float
    ) -> tuple[Conditioning, Conditioning | None]:
        """``(cond, uncond)`` for sampling: ``uncond`` is the empty prompt's, expanded, when
        classifier-free guidance applies (``g > 1``), else ``None``. Guidance-distilled models
        (FLUX.1-dev) put ``g`` into ``cond`` and return no ``uncond``."""
        cond = self.encode_prompts(list(prompts))
        if guidance_scale <= 1.0:
            return cond, None
        return cond, C.expand(self.null_condition(cond), C.batch_size(cond))

    def sampler_kwargs(self, scheduler: object, num_inference_steps: int) -> dict:
        """Extra arguments of the sampler's ``set_timesteps`` that the backbone's pipeline passes
        (FLUX: its sigmas and resolution shift ``mu``); none by default."""
        return {}
