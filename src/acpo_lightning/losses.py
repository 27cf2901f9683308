"""The ACPO objective as pure tensor functions (no Lightning, no diffusers).

Notation, for a noise schedule with cumulative products ``alpha_bar_t``::

    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps
    L = w_diff * L_diff + w_anchor * L_anchor + w_perc * L_perc

- ``L_diff``: mean squared error of the model output against the target of its prediction type
  (``epsilon`` -> eps, ``v_prediction`` -> v, ``sample`` -> x0);
- ``L_anchor``: mean squared distance between the policy output and the frozen anchor's output,
  in the model's own output space;
- ``L_perc``: minus the normalized quality score of the decoded x0 estimate, averaged over the
  *gated* samples only (those with ``t <= tau``); in the data objective their sum is divided by the
  expected scored count ``share * B`` (:func:`scored_count`), so the term is unbiased for any batch.

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


def perceptual_loss(
    normalized_scores: Tensor, mask: Tensor, expected_count: float | None = None
) -> Tensor:
    """Minus the normalized score of the gated samples, averaged (0 when none is gated).

    Without ``expected_count`` the average is over the gated samples. With it, their sum is divided
    by ``expected_count``, the number of scored samples a step draws on average
    (:func:`scored_count`): a step that scores ``n`` samples then contributes ``n / expected_count``
    times their mean, so the term's expectation over steps is minus the mean score even when ``n``
    varies from step to step (at batch 1 and share 0.25, one step in four scores, four times over).
    When every step scores ``expected_count`` samples the two are the same number.

    Args:
        normalized_scores: ``[B]`` scores from :func:`normalize_score` (or ``[G]`` for pre-gated).
        mask: boolean mask of the same shape; samples outside it get no gradient at all.
        expected_count: the mean number of scored samples per step, or ``None``.
    """
    gated = torch.where(mask, normalized_scores, torch.zeros_like(normalized_scores))
    if expected_count is not None and expected_count > 0:
        return -gated.sum() / expected_count
    return -gated.sum() / mask.sum().clamp(min=1)


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
    expected_count: float | None = None,
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
        expected_count: the mean number of scored samples per step (:func:`perceptual_loss`);
            ``None`` averages over the gated samples.

    Returns:
        :class:`ACPOTerms` with the total and each (unweighted) term.
    """
    diff_mean, anchor_mean = diff.mean(), anchor.mean()
    perc = perceptual_loss(normalized_scores, gate, expected_count)
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


def _mixed_seed(seed: int) -> int:
    """A 63-bit seed of its own mixed from ``seed`` (SplitMix64's finaliser)."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def check_share(share: float) -> None:
    """Raise a ``ValueError`` naming ``share`` unless it is in ``[0, 1]``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"perceptual share must be in [0, 1], got {share}")


def expected_count(share: float, size: int) -> float:
    """``share * size``, snapped to the nearest whole number within float rounding
    (``0.3 * 10`` is ``3.0000000000000004``).

    Raises:
        ValueError: ``share`` is outside ``[0, 1]``.
    """
    check_share(share)
    expected = share * size
    nearest = round(expected)
    return float(nearest) if abs(expected - nearest) <= 1e-9 * max(1.0, expected) else expected


def scored_count(
    share: float, size: int, generator: torch.Generator, count_seed: int | None = None
) -> tuple[int, float]:
    """How many of ``size`` samples a step scores: unbiased, ``E[count] = share * size``.

    ``floor(share * size)``, plus one with probability ``frac(share * size)`` (stochastic rounding):
    at batch 1 and share 0.25 one step in four scores a sample, at batch 6 half of the steps score
    two and half one. ``round(share * size)`` was 0 for every step there, and biased at other batch
    sizes. When ``share * size`` is whole (within float rounding) nothing is drawn.

    The draw comes from a CPU generator seeded from ``generator``'s seed (mixed, so it is not the
    step generator's own first number): a function of the step's seed, so that resumes replay it,
    which neither shifts the step generator's stream nor waits for a GPU generator.
    ``count_seed``, when given, replaces that seed: a rank-free one makes every process of a DDP
    run score the same count on a step (they log the same values, and no rank waits on another's
    decode), while their noise stays apart.

    Returns:
        ``(count, expected)``: the scored count of this step and its expectation ``share * size``
        (the divisor of :func:`perceptual_loss` that makes the perceptual term unbiased).

    Raises:
        ValueError: ``share`` is outside ``[0, 1]``.
    """
    expected = expected_count(share, size)
    if expected == int(expected):
        return int(expected), expected
    whole = math.floor(expected)
    seed = generator.initial_seed() if count_seed is None else count_seed
    draw = torch.Generator().manual_seed(_mixed_seed(seed))
    extra = float(torch.rand((), generator=draw)) < expected - whole
    return whole + int(extra), expected


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    tau: int,
    t_min: int,
    share: float,
    generator: torch.Generator,
    count_seed: int | None = None,
) -> tuple[Tensor, int]:
    """Draw training timesteps; the first :func:`scored_count` are perceptual samples in ``[t_min, tau]``.

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
    n_perc, _ = scored_count(share, batch_size, generator, count_seed)
    device = generator.device
    late = torch.randint(t_min, tau + 1, (n_perc,), generator=generator, device=device)
    rest = torch.randint(
        0, num_train_timesteps, (batch_size - n_perc,), generator=generator, device=device
    )
    return torch.cat([late, rest]), n_perc
