"""The ACPO objective as pure tensor functions (no Lightning, no diffusers).

Notation, for a noise schedule with cumulative products ``alpha_bar_t``::

    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps
    L = w_diff * L_diff + w_anchor * L_anchor + w_perc * L_perc

- ``L_diff``: mean squared error of the model output against the target of its prediction type
  (``epsilon`` -> eps, ``v_prediction`` -> v, ``sample`` -> x0);
- ``L_anchor``: mean squared distance between the policy output and the frozen anchor's output,
  in the model's own output space;
- ``L_perc``: minus the normalized quality score of the decoded x0 estimate, averaged over the
  *gated* samples only (those with ``t <= tau``).

Every function returns per-sample values or scalars and is tested against hand-computed numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if it is one ACPO knows, else raise a ``ValueError`` naming it."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; ACPO supports {PREDICTION_TYPES}. "
            "Set `prediction_type` in the noise scheduler's config to one of them."
        )
    return prediction_type


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def schedule_coefficients(
    alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor
) -> tuple[Tensor, Tensor]:
    """Return ``(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))`` shaped like ``like``.

    Args:
        alphas_cumprod: ``[T]`` cumulative products of the scheduler.
        timesteps: ``[B]`` integer timesteps.
        like: a ``[B, ...]`` tensor whose shape, dtype and device the result broadcasts to.
    """
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].double()
    return _broadcast(alpha_bar.sqrt(), like), _broadcast((1 - alpha_bar).sqrt(), like)


def predicted_original(
    sample: Tensor,
    model_output: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    prediction_type: str,
) -> Tensor:
    """Recover the x0 estimate from a noisy sample and the model output.

    ``epsilon``: ``x0 = (x_t - sigma * eps) / alpha``; ``v_prediction``: ``x0 = alpha * x_t - sigma * v``;
    ``sample``: the output is x0 already.

    Args:
        sample: noisy input ``x_t``, ``[B, C, H, W]``.
        model_output: the network's prediction for ``sample``.
        alphas_cumprod: ``[T]`` schedule of the noise scheduler.
        timesteps: ``[B]`` timesteps of ``sample``.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.

    Returns:
        The x0 estimate, same shape as ``sample``.

    Raises:
        ValueError: ``prediction_type`` is not one of :data:`PREDICTION_TYPES`.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return model_output
    alpha, sigma = schedule_coefficients(alphas_cumprod, timesteps, sample)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    return alpha * sample - sigma * model_output


def diffusion_target(
    original: Tensor, noise: Tensor, alphas_cumprod: Tensor, timesteps: Tensor, prediction_type: str
) -> Tensor:
    """The regression target for ``prediction_type``: eps, ``v = alpha * eps - sigma * x0``, or x0.

    Raises:
        ValueError: ``prediction_type`` is unknown.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return original
    alpha, sigma = schedule_coefficients(alphas_cumprod, timesteps, original)
    return alpha * noise - sigma * original


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all but the batch dimension, computed in fp32; shape ``[B]``."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample denoising loss ``||pred - target||^2`` (mean over elements), shape ``[B]``."""
    return per_sample_mse(prediction, target)


def anchor_penalty(prediction: Tensor, anchor_prediction: Tensor) -> Tensor:
    """Per-sample drift ``||pred - pred_anchor||^2`` from the frozen anchor, shape ``[B]``.

    The anchor output is treated as a constant (it is detached here, whatever the caller did).
    """
    return per_sample_mse(prediction, anchor_prediction.detach())


def normalize_score(
    scores: Tensor, higher_is_better: bool, score_range: tuple[float, float]
) -> Tensor:
    """Map raw quality scores to "higher is better, 1.0 is the nominal span".

    ``(s - low) / (high - low)`` when higher is better, ``(high - s) / (high - low)`` otherwise.
    Values outside the nominal range are not clipped (clipping would kill the gradient).

    Raises:
        ValueError: ``score_range`` is not ``(low, high)`` with ``high > low``.
    """
    low, high = float(score_range[0]), float(score_range[1])
    if not high > low:
        raise ValueError(f"score_range must be (low, high) with high > low, got {score_range!r}")
    scores = scores.float()
    return (scores - low) / (high - low) if higher_is_better else (high - scores) / (high - low)


def late_mask(timesteps: Tensor, tau: int) -> Tensor:
    """Boolean ``[B]`` mask of the late-denoising samples, ``t <= tau``, that get perceptual gradient."""
    return timesteps <= tau


def perceptual_loss(normalized_scores: Tensor, mask: Tensor) -> Tensor:
    """Minus the mean normalized score over the gated samples (0 when none is gated).

    Args:
        normalized_scores: ``[B]`` scores from :func:`normalize_score` (or ``[G]`` for pre-gated).
        mask: boolean mask of the same shape; samples outside it get no gradient at all.
    """
    count = mask.sum()
    gated = torch.where(mask, normalized_scores, torch.zeros_like(normalized_scores))
    return -gated.sum() / count.clamp(min=1)


class ACPOTerms(NamedTuple):
    """Every term of one ACPO step; all are scalars (``iqa`` is the mean normalized score)."""

    loss: Tensor
    diff: Tensor
    anchor: Tensor
    perc: Tensor
    iqa: Tensor


def acpo_objective(
    diff: Tensor,
    anchor: Tensor,
    normalized_scores: Tensor,
    gate: Tensor,
    w_diff: float | Tensor,
    w_anchor: float | Tensor,
    w_perc: float | Tensor,
) -> ACPOTerms:
    """Combine per-sample terms into the ACPO loss.

    Args:
        diff: ``[B]`` per-sample diffusion losses.
        anchor: ``[B]`` per-sample anchor penalties.
        normalized_scores: ``[G]`` normalized quality scores of the scored samples.
        gate: ``[G]`` boolean, which of the scored samples get perceptual gradient (``t <= tau``).
        w_diff: weight of the diffusion term.
        w_anchor: weight of the anchor term (a tensor in constraint mode).
        w_perc: weight of the perceptual term.

    Returns:
        :class:`ACPOTerms` with the total and each (unweighted) term.
    """
    diff_mean, anchor_mean = diff.mean(), anchor.mean()
    perc = perceptual_loss(normalized_scores, gate)
    iqa = (
        normalized_scores.detach().mean()
        if normalized_scores.numel()
        else diff_mean.detach().new_tensor(math.nan)
    )
    loss = weighted_objective(diff_mean, anchor_mean, perc, w_diff, w_anchor, w_perc)
    return ACPOTerms(loss=loss, diff=diff_mean, anchor=anchor_mean, perc=perc, iqa=iqa)


def weighted_objective(
    diff: Tensor,
    anchor: Tensor,
    perc: Tensor,
    w_diff: float | Tensor,
    w_anchor: float | Tensor,
    w_perc: float | Tensor,
) -> Tensor:
    """The ACPO loss from its scalar terms: ``w_diff * diff + w_anchor * anchor + w_perc * perc``."""
    return w_diff * diff + w_anchor * anchor + w_perc * perc


def dual_ascent_step(
    w_anchor: Tensor, penalty: Tensor, delta: float, lr: float, w_max: float = 1e4
) -> Tensor:
    """One projected dual-ascent step on the anchor weight for ``E[penalty] <= delta``.

    ``w <- clip(w + lr * (penalty - delta), 0, w_max)``: the weight grows while the drift exceeds its
    budget and shrinks (down to 0) while it is under it.
    """
    return (w_anchor + lr * (penalty.detach().to(w_anchor) - delta)).clamp(0.0, w_max)


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    tau: int,
    t_min: int,
    share: float,
    generator: torch.Generator,
) -> tuple[Tensor, int]:
    """Draw training timesteps; the first ``round(share * B)`` are perceptual samples in ``[t_min, tau]``.

    The rest are uniform over ``[0, T)`` as in plain diffusion training. Returns ``(timesteps, n_perc)``;
    ``timesteps`` lives on the generator's device (CPU for a CPU generator).

    Raises:
        ValueError: ``t_min > tau``, ``tau >= T``, or ``share`` outside ``[0, 1]``.
    """
    if not 0 <= t_min <= tau < num_train_timesteps:
        raise ValueError(
            f"need 0 <= t_min <= tau < num_train_timesteps, got t_min={t_min}, tau={tau}, "
            f"num_train_timesteps={num_train_timesteps}"
        )
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"perceptual share must be in [0, 1], got {share}")
    n_perc = round(share * batch_size)
    device = generator.device
    late = torch.randint(t_min, tau + 1, (n_perc,), generator=generator, device=device)
    rest = torch.randint(
        0, num_train_timesteps, (batch_size - n_perc,), generator=generator, device=device
    )
    return torch.cat([late, rest]), n_perc
