"""The denoiser-call interface: how the policy, the anchor and their conditioning are invoked."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn


class Denoiser(ABC):
    """The networks that predict the process's target, with their conditioning.

    A denoiser holds references to networks; the module registers them (:meth:`networks`) under
    their names, so parameter names, checkpoints and LoRA exports do not depend on this class.
    Conditioning is whatever the network takes besides sample and time (text states for SD-1.x;
    the next backbones add pooled embeddings and micro-conditioning); ``None`` when unconditional.
    """

    #: whether the networks take a prompt
    is_conditional: bool

    @abstractmethod
    def networks(self) -> dict[str, nn.Module | None]:
        """Every network by the attribute name the module registers it under."""

    @abstractmethod
    def frozen(self) -> list[nn.Module]:
        """The networks that never train (text encoders, a separate anchor)."""

    @abstractmethod
    def check_anchor(self) -> None:
        """Raise a ``ValueError`` with the fix when no anchor can be evaluated."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one sample in the network's input space."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Conditioning for ``prompts`` (frozen, no grad)."""

    @abstractmethod
    def null_condition(self, like: Tensor | None = None) -> Tensor:
        """Conditioning of the empty prompt (CFG's unconditional branch), in ``like``'s dtype."""

    @abstractmethod
    def policy(self, sample: Tensor, times: Tensor, cond: Tensor | None) -> Tensor:
        """The trained network's output (with gradient when enabled)."""

    @abstractmethod
    def anchor(self, sample: Tensor, times: Tensor, cond: Tensor | None) -> Tensor:
        """The frozen anchor's output, without gradient."""

    @abstractmethod
    def sampling_anchor(self) -> AbstractContextManager:
        """A context in which :meth:`policy` runs the anchor (for ``generate(use_anchor=True)``)."""

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
    ) -> Tensor | None:
        """Conditioning for a batch of ``size``; each prompt is dropped with probability ``dropout``.

        Raises:
            ValueError: a conditional denoiser without one prompt per sample.
        """
        if not self.is_conditional:
            return None
        if prompts is None or len(prompts) != size:
            count = 0 if prompts is None else len(prompts)
            raise ValueError(
                f"the denoiser is text-conditional but the batch has {count} prompts for {size} "
                "images; the DataModule must yield a 'prompts' list per batch."
            )
        cond = self.encode_prompts(prompts)
        if dropout > 0:
            drop = torch.rand(size, generator=generator, device=cond.device) < dropout
            cond = torch.where(drop.view(-1, 1, 1), self.null_condition(cond), cond)
        return cond
