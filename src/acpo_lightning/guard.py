"""The non-finite guard: skip an optimizer step whose loss or gradient is not finite."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


class NonFiniteGuard(nn.Module):
    """Run forward and backward, then step only if the loss and every gradient are finite.

    A skipped step changes no weight and no optimizer state (the step counter and the LR schedule
    still advance, so per-step randomness and resumes stay aligned); it is counted in
    ``skipped_steps`` and logged with the offending term. Under fp16 mixed precision the loss
    scaler judges the gradients: an overflowing step is its to skip, and it backs the scale off
    (counted in ``overflow_steps``); the guard checks the loss, and counts a scaler skip as a
    non-finite gradient only once the loss scale is down to 1 or less, where no overflow is left
    to explain it. Costs one host sync per step.

    Args:
        enabled: ``False`` steps unconditionally (the scaler still skips fp16 overflows).
        max_consecutive_skips: stop with :class:`NonFiniteTrainingError` after this many
            consecutive skipped steps.
    """

    def __init__(self, enabled: bool = True, max_consecutive_skips: int = 10) -> None:
        super().__init__()
        if max_consecutive_skips < 1:
            raise ValueError(
                f"max_consecutive_skips={max_consecutive_skips} must be >= 1 (e.g. 10); set "
                "skip_nonfinite: false to turn the non-finite guard off."
            )
        self.enabled, self.max_consecutive_skips = enabled, max_consecutive_skips
        self.register_buffer("skipped_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("overflow_steps", torch.tensor(0, dtype=torch.long))
        self._known_scale: float | None = None  # fp16 loss scale after the last optimizer step
        self._consecutive = 0

    def step(
        self,
        optimizer: Any,
        closure: Callable[[], Any] | None,
        parameters: list[tuple[str, nn.Parameter]],
        terms: Callable[[], dict[str, Tensor]],
        scaler: torch.amp.GradScaler | None = None,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
        step: int = 0,
    ) -> bool:
        """Take (or skip) one optimizer step; returns whether it was taken.

        Args:
            optimizer: the (Lightning-wrapped) optimizer.
            closure: Lightning's closure (forward, backward), or ``None``.
            parameters: the trainable parameters by name.
            terms: returns the step's loss terms by name (after the closure ran), to name a
                non-finite one.
            scaler: the active fp16 loss scaler, or ``None``.
            reduce_sum: sums over processes (one decision for every rank), or ``None``.
            step: the global step, for messages.
        """
        if not self.enabled or closure is None:
            scale = self._scale_before(scaler)
            optimizer.step(closure=closure)
            return self._after(self._stepped(scaler, scale), None, step)
        result = closure()
        reason = self._reason(result, parameters, terms(), scaler is None, reduce_sum)
        if reason is None:
            scale = self._scale_before(scaler)
            optimizer.step(closure=lambda: result)  # the scaler (if any) unscales and may skip
            if self._stepped(scaler, scale):
                return self._after(True, None, step)
            reason = "gradient" if self._known_scale <= 1.0 else None
            if reason is None:  # an fp16 overflow, already skipped and backed off by the scaler
                return self._after(False, None, step)
        optimizer.zero_grad(set_to_none=True)
        return self._after(False, reason, step)

    def _scale_before(self, scaler: torch.amp.GradScaler | None) -> float:
        """The loss scale before a step: the one seen after the last step (no sync), else read."""
        if scaler is None:
            return 1.0
        return self._known_scale if self._known_scale is not None else scaler.get_scale()

    def _stepped(self, scaler: torch.amp.GradScaler | None, scale_before: float) -> bool:
        """Whether the step was taken: a scaler backs its scale off when it skips (one sync)."""
        if scaler is None:
            return True
        self._known_scale = scaler.get_scale()
        return self._known_scale >= scale_before

    def _after(self, stepped: bool, reason: str | None, step: int) -> bool:
        if stepped:
            self._consecutive = 0
            return True
        if reason is None:
            self.overflow_steps += 1
            log.info("step %d: fp16 overflow, skipped by the loss scaler", step)
            return False
        self.skipped_steps += 1
        self._consecutive += 1
        log.warning(
            "step %d skipped: non-finite %s (%d consecutive, %d in all)",
            step,
            reason,
            self._consecutive,
            int(self.skipped_steps),
        )
        if self._consecutive >= self.max_consecutive_skips:
            raise NonFiniteTrainingError(
                f"stopped at step {step}: {self._consecutive} consecutive steps had a "
                f"non-finite {reason}, so no weight was updated. Likely causes: a learning rate too "
                "high (lower optimizer.init_args.lr), fp16 overflow (use precision bf16-mixed or "
                "32-true), or a quality head returning NaN/inf or scores far outside its "
                "score_range (check the head on your images). Resume from the last checkpoint "
                "after the fix; it holds no non-finite weight."
            )
        return False

    def _reason(
        self,
        loss: Tensor | None,
        parameters: list[tuple[str, nn.Parameter]],
        terms: dict[str, Tensor],
        check_gradients: bool,
        reduce_sum: Callable[[Tensor], Tensor] | None,
    ) -> str | None:
        """``None`` when the step is finite, else the name of the offending term (one host sync).

        ``check_gradients=False`` under an fp16 loss scaler: its gradients are still scaled here,
        and the scaler checks them itself after unscaling.
        """
        named = [(n, p.grad) for n, p in parameters if p.grad is not None]
        checks = [torch.isfinite(loss).all()] if loss is not None else []
        if named and check_gradients:
            norms = torch._foreach_norm([g for _, g in named])
            checks.append(torch.isfinite(torch.stack(norms)).all())
        device = parameters[0][1].device if parameters else None
        finite = torch.stack(checks).all() if checks else torch.tensor(True, device=device)
        if reduce_sum is not None:
            # one decision for every rank: a rank that stepped alone would leave the others behind
            finite = reduce_sum((~finite).float()) == 0
        if bool(finite):
            return None
        for name, value in terms.items():  # the slow path: find the culprit
            if name != "loss" and not bool(torch.isfinite(value).all()):
                return f"train/{name}"
        if loss is not None and not bool(torch.isfinite(loss).all()):
            return "train/loss"
        culprit = next((n for n, g in named if not bool(torch.isfinite(g).all())), None)
        return f"gradient of {culprit}" if culprit else "loss on another process"
