"""Distances from generated to real images in a feature space, with bootstrap intervals.

FID and KID are usually reported as one number, or KID as the mean and spread over random subsets.
Neither says how far the value would move with another draw of the same number of images, which is
what decides whether two models differ. :func:`feature_distances` resamples the images with
replacement and reports, for every model, the statistic with a 95 % normal bootstrap interval
(value ± 1.96 bootstrap standard deviations), and, when the generated sets are paired (image ``i``
of every set from the same prompt and initial noise), the paired difference to a reference model
with its own interval: every round draws one set of indices for all models and one for the real
images, so what the models share cancels.

The features come from any extractor (Inception for photos; the demo uses its Fashion-MNIST
classifier's penultimate layer). Both statistics are computed in float64 on features ``[N, D]``:

* :func:`frechet_distance`: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the FID formula
  (torchmetrics' ``FrechetInceptionDistance`` gives the same value on the same features);
* :func:`kernel_distance`: the unbiased MMD^2 with KID's cubic kernel ``(x.y / D + 1)^3`` over all
  pairs (KID without its random subsets). In a bootstrap round, pairs of two draws of the same
  image are left out of the within-set means as the diagonal is, so the rounds stay unbiased.

FID is biased upwards by an amount that shrinks with the number of images: compare models at equal
counts, as :func:`feature_distances` requires for paired sets.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

_Z975 = 1.959964


def _check(a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"feature sets must be [N, D] with the same D and N >= 2 each; got {tuple(a.shape)} "
            f"and {tuple(b.shape)}. Pass the extractor's features, one row per image."
        )


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _frechet(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> Tensor:
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross


def frechet_distance(a: Tensor, b: Tensor) -> Tensor:
    """FID's Fréchet distance between Gaussians fitted to features ``a`` and ``b`` (float64 scalar).

    ``tr((S_a S_b)^(1/2))`` is computed as ``tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))``, a symmetric
    matrix's square root (the same eigenvalues, without a non-symmetric ``sqrtm``).

    Example:
        >>> x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
        >>> float(frechet_distance(x, x)) < 1e-9
        True
    """
    _check(a, b)
    a, b = a.double(), b.double()
    return _frechet(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T / a.shape[1] + 1).pow(3)


def _within(kernel: Tensor, counts: Tensor) -> Tensor:
    """Mean of ``kernel`` over pairs of draws that are not two draws of one image.

    ``counts[i]`` is how often image ``i`` was drawn: the sum over such pairs is
    ``sum_{i != j} c_i c_j K_ij = c.K.c - sum_i c_i^2 K_ii``, one pass over ``kernel``.
    """
    pairs = counts.sum() ** 2 - counts.pow(2).sum()
    return (counts @ kernel @ counts - (counts.pow(2) * kernel.diagonal()).sum()) / pairs


def kernel_distance(a: Tensor, b: Tensor) -> Tensor:
    """KID's unbiased MMD^2 between features ``a`` and ``b``, over all pairs (float64 scalar).

    Kernel ``k(x, y) = (x.y / D + 1)^3``; the diagonals of the within-set sums are left out, so
    the expectation is 0 when both sets come from one distribution.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
        >>> abs(float(kernel_distance(a, b))) < 0.05
        True
    """
    _check(a, b)
    a, b = a.double(), b.double()
    ones_a, ones_b = a.new_ones(len(a)), b.new_ones(len(b))
    return (
        _within(_kernel(a, a), ones_a) + _within(_kernel(b, b), ones_b) - 2 * _kernel(a, b).mean()
    )


def feature_distances(
    generated: Mapping[str, Tensor],
    real: Tensor,
    reference: str | None = None,
    rounds: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """FID and KID of every generated set to ``real``, with bootstrap intervals.

    Args:
        generated: features ``[N, D]`` per model name. With ``reference``, all sets must have the
            same ``N`` and be paired: row ``i`` of every set from the same prompt and noise.
        real: features ``[M, D]`` of real images.
        reference: a key of ``generated``; adds the paired differences to it.
        rounds: bootstrap rounds.
        seed: seed of the resampling (the same seed gives every model the same draws).

    Returns:
        Per name: ``fid``, ``fid_ci``, ``kid``, ``kid_ci`` (value and half-width of the 95 % normal
        bootstrap interval); with ``reference`` also ``d_fid``, ``d_fid_ci``, ``d_kid``,
        ``d_kid_ci`` (the set's value minus the reference's, paired).

    Raises:
        ValueError: bad shapes, ``rounds < 20``, an unknown ``reference``, or unpaired sizes.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> real = torch.randn(300, 4, generator=g)
        >>> sets = {"a": torch.randn(300, 4, generator=g), "b": torch.randn(300, 4, generator=g) + 1}
        >>> out = feature_distances(sets, real, reference="a", rounds=50)
        >>> out["b"]["d_fid"] - out["b"]["d_fid_ci"] > 0
        True
    """
    if rounds < 20:
        raise ValueError(f"rounds={rounds}: a bootstrap interval needs at least 20 rounds.")
    if reference is not None and reference not in generated:
        raise ValueError(f"reference {reference!r} is not one of the sets {sorted(generated)}.")
    for features in generated.values():
        _check(features, real)
    counts = {len(f) for f in generated.values()}
    if reference is not None and len(counts) != 1:
        raise ValueError(
            f"paired differences need sets of one size; got sizes {sorted(counts)}. Generate the "
            "same prompts and seeds for every model, or pass reference=None."
        )
    names = list(generated)
    sets = [generated[name].double().cpu() for name in names]
    real = real.double().cpu()
    k_rr = _kernel(real, real)
    k_gg = [_kernel(g, g) for g in sets]
    k_gr = [_kernel(g, real) for g in sets]

    def counts(pick: Tensor, size: int) -> Tensor:
        return torch.bincount(pick, minlength=size).double()

    def stats(picks: list[Tensor], pick_r: Tensor) -> Tensor:
        r, c_r = real[pick_r], counts(pick_r, len(real))
        mu_r, cov_r, within_r = r.mean(0), torch.cov(r.T), _within(k_rr, c_r)
        rows = []
        for g, kgg, kgr, pick in zip(sets, k_gg, k_gr, picks, strict=True):
            x, c_g = g[pick], counts(pick, len(g))
            fid = _frechet(x.mean(0), torch.cov(x.T), mu_r, cov_r)
            cross = c_g @ kgr @ c_r / (len(pick) * len(pick_r))
            kid = _within(kgg, c_g) + within_r - 2 * cross
            rows.append(torch.stack([fid, kid]))
        return torch.stack(rows)  # [models, 2]

    full = stats([torch.arange(len(g)) for g in sets], torch.arange(len(real)))
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(rounds):
        shared = torch.randint(0, len(sets[0]), (len(sets[0]),), generator=generator)
        picks = [
            shared
            if len(g) == len(sets[0])
            else torch.randint(0, len(g), (len(g),), generator=generator)
            for g in sets
        ]
        draws.append(stats(picks, torch.randint(0, len(real), (len(real),), generator=generator)))
    spread = torch.stack(draws)  # [rounds, models, 2]
    out: dict[str, dict[str, float]] = {}
    for m, name in enumerate(names):
        sd = spread[:, m].std(0)
        out[name] = {
            "fid": float(full[m, 0]), "fid_ci": float(_Z975 * sd[0]),
            "kid": float(full[m, 1]), "kid_ci": float(_Z975 * sd[1]),
        }  # fmt: skip
        if reference is not None:
            r = names.index(reference)
            diff_sd = (spread[:, m] - spread[:, r]).std(0)
            out[name].update({
                "d_fid": float(full[m, 0] - full[r, 0]), "d_fid_ci": float(_Z975 * diff_sd[0]),
                "d_kid": float(full[m, 1] - full[r, 1]), "d_kid_ci": float(_Z975 * diff_sd[1]),
            })  # fmt: skip
    return out
