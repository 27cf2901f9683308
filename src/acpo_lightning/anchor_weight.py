"""The anchor weight: fixed (penalty mode) or adapted by dual ascent (constraint mode)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from acpo_lightning import losses


class AnchorWeight(nn.Module):
    """``w_anchor`` and, in constraint mode, the running drift that dual ascent steers it by.

    The drift is one quantity whatever the objective: the mean squared difference per element
    between the policy's and the anchor's raw outputs, averaged over every sample of an optimizer
    step (data and rollout samples alike, over its micro-batches). In constraint mode the weight
    takes one dual-ascent step per taken optimizer step so that the drift's running mean tracks
    ``delta``; its state (``w_anchor_state``, ``drift_ema``, ``drift_ema_steps``) trains and is
    checkpointed.

    Args:
        w_anchor: the weight (the initial value in constraint mode); >= 0.
        mode: ``penalty`` (fixed) or ``constraint`` (dual ascent).
        delta: allowed drift in constraint mode; > 0.
        dual_lr: dual-ascent step size.
        ema: smoothing of the running mean drift.
        measure_drift: in penalty mode at weight 0, still run the anchor (without gradient) so
            that ``train/loss_anchor`` is the measured drift: one more forward pass of the network
            per step. ``False`` skips it, and no drift is logged.

    Example:
        >>> weight = AnchorWeight(1.0, "constraint", delta=0.01, dual_lr=10.0)
        >>> weight.add_drift(torch.tensor(0.11), samples=4)
        >>> weight.finish_step(stepped=True)
        >>> round(float(weight.value), 6)  # 1 + 10 * (0.11 - 0.01)
        2.0
    """

    def __init__(
        self,
        w_anchor: float = 1.0,
        mode: Literal["penalty", "constraint"] = "penalty",
        delta: float = 1e-3,
        dual_lr: float = 10.0,
        ema: float = 0.9,
        measure_drift: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("penalty", "constraint"):
            raise ValueError(f"anchor_mode={mode!r} must be 'penalty' or 'constraint'.")
        if w_anchor < 0:
            raise ValueError(f"w_anchor={w_anchor} must be >= 0 (e.g. 1.0).")
        if mode == "constraint" and delta <= 0:
            raise ValueError(
                f"anchor_delta={delta} must be > 0 in constraint mode (allowed mean drift)."
            )
        self.mode, self.delta, self.dual_lr, self.ema = mode, delta, dual_lr, ema
        #: whether the anchor term trains (penalty mode with weight 0 only measures the drift)
        self.active = mode == "constraint" or w_anchor > 0
        #: whether the drift is measured (without gradient) when the term is not active
        self.measure_drift = measure_drift
        self.register_buffer("w_anchor_state", torch.tensor(float(w_anchor)))
        self.register_buffer("drift_ema", torch.tensor(0.0))
        self.register_buffer("drift_ema_steps", torch.tensor(0, dtype=torch.long))
        self._drift_sum: Tensor | None = None
        self._drift_samples = 0

    def measures_drift(self, has_anchor: bool) -> bool:
        """Whether a step runs the anchor: its term trains, or (weight 0 in penalty mode) the
        drift is measured without gradient, given an anchor to measure it against."""
        return self.active or (self.measure_drift and has_anchor)

    @property
    def value(self) -> Tensor:
        """The current weight (a buffer: adapted in place in constraint mode)."""
        return self.w_anchor_state

    def current(self) -> Tensor:
        """A detached copy: constraint mode updates the weight in place before backward runs."""
        return self.w_anchor_state.detach().clone()

    def add_drift(self, drift: Tensor, samples: int) -> None:
        """Add a micro-batch's mean drift over ``samples`` samples (constraint mode only)."""
        if self.mode != "constraint":
            return
        total = drift.detach().float() * samples
        self._drift_sum = total if self._drift_sum is None else self._drift_sum + total
        self._drift_samples += samples

    def finish_step(
        self, stepped: bool, reduce_mean: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        """Once per optimizer step: one dual-ascent step if it was taken, then a fresh drift sum.

        Args:
            stepped: whether the optimizer step was taken (a skipped step leaves the state).
            reduce_mean: averages the drift over processes (distributed training), or ``None``.
        """
        drift, samples = self._drift_sum, self._drift_samples
        self._drift_sum, self._drift_samples = None, 0
        if not stepped or drift is None or samples == 0:
            return
        self.update(drift / samples, reduce_mean)

    def update(self, drift: Tensor, reduce_mean: Callable[[Tensor], Tensor] | None = None) -> None:
        """Dual ascent on the weight against the running mean of ``drift`` (no host sync)."""
        drift = drift.detach()
        if reduce_mean is not None:
            drift = reduce_mean(drift)
        # the first update takes the drift as it is; a non-finite drift leaves the state as it is
        finite = torch.isfinite(drift)
        beta = (self.drift_ema_steps > 0).to(drift.dtype) * self.ema
        ema = beta * self.drift_ema + (1 - beta) * torch.where(finite, drift, 0.0)
        self.drift_ema.copy_(torch.where(finite, ema, self.drift_ema))
        self.drift_ema_steps += finite.long()
        updated = losses.dual_ascent_step(
            self.w_anchor_state, self.drift_ema, self.delta, self.dual_lr
        )
        self.w_anchor_state.copy_(torch.where(finite, updated, self.w_anchor_state))
