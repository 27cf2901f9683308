"""FID and KID on feature sets, with bootstrap intervals (acpo_lightning.metrics.distance)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from acpo_lightning.metrics.distance import feature_distances, frechet_distance, kernel_distance


class _Features(nn.Module):
    """torchmetrics' extractor contract on features given as ``[N, D, 1, 1]`` images."""

    num_features = 6

    def forward(self, x):
        return x.flatten(1).double()


def _sets(seed: int = 0, n: int = 300):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g) * 1.2 + 0.3


def test_frechet_and_kernel_distance_equal_torchmetrics_fid_and_kid_on_the_same_features() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = _sets()
    fid = FrechetInceptionDistance(feature=_Features(), normalize=True)
    # one subset of every image: KID's statistic on the full sets
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(
            feature=_Features(), subsets=1, subset_size=300, normalize=True
        )
    for metric in (fid, kid):
        metric.update(real.view(300, 6, 1, 1), real=True)
        metric.update(fake.view(300, 6, 1, 1), real=False)
    # both compute in float64 from the same features: equal up to summation order
    assert float(frechet_distance(fake, real)) == pytest.approx(float(fid.compute()), rel=1e-9)
    assert float(kernel_distance(fake, real)) == pytest.approx(float(kid.compute()[0]), rel=1e-9)


def test_distances_are_zero_for_one_distribution_and_grow_with_a_shift() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
    # KID is unbiased: |KID| under one distribution is within a few of its standard errors
    # (measured: the interval below); FID has a positive bias of about D(D+1)/(2N) per set
    same = feature_distances({"same": a}, b, rounds=50)["same"]
    assert abs(same["kid"]) < same["kid_ci"]
    assert 0 < same["fid"] < 0.05
    shifted = feature_distances({"shifted": a + 0.5}, b, rounds=50)["shifted"]
    assert shifted["fid"] == pytest.approx(4 * 0.25, abs=0.1)  # |mu_a - mu_b|^2 = 4 * 0.5^2
    assert shifted["kid"] - shifted["kid_ci"] > same["kid"] + same["kid_ci"]


def test_bootstrap_intervals_cover_the_expected_value_at_their_level() -> None:
    """Over 30 independent draws, the 95 % interval covers the statistic's mean over the draws.

    Binomial(30, 0.95) gives fewer than 24 covers with probability < 1e-3. Measured: 29 (FID) and
    28 (KID) covers; intervals half as wide cover 19 and fail.
    """
    values, intervals = [], []
    for seed in range(30):
        fake, real = _sets(seed, n=150)
        out = feature_distances({"m": fake}, real, rounds=40, seed=seed)["m"]
        values.append((out["fid"], out["kid"]))
        intervals.append((out["fid_ci"], out["kid_ci"]))
    v, ci = torch.tensor(values), torch.tensor(intervals)
    covered = ((v - v.mean(0)).abs() <= ci).sum(0)
    assert covered.min() >= 24, covered.tolist()


def test_paired_differences_cancel_what_two_models_share() -> None:
    g = torch.Generator().manual_seed(2)
    real = torch.randn(500, 6, generator=g)
    control = torch.randn(500, 6, generator=g) * 1.1
    tuned = control + 0.02 * torch.randn(500, 6, generator=g) + 0.05  # same noise, a small shift
    out = feature_distances(
        {"control": control, "tuned": tuned}, real, reference="control", rounds=60
    )
    assert out["control"]["d_fid"] == 0 and out["control"]["d_fid_ci"] == 0
    assert out["tuned"]["d_fid"] == pytest.approx(out["tuned"]["fid"] - out["control"]["fid"])
    # pairing: the difference's interval is well below the one of two independent draws,
    # sqrt(ci_tuned^2 + ci_control^2) (measured: 0.30x for FID, 0.42x for KID)
    for key in ("fid", "kid"):
        unpaired = (out["tuned"][key + "_ci"] ** 2 + out["control"][key + "_ci"] ** 2) ** 0.5
        assert out["tuned"][f"d_{key}_ci"] < 0.6 * unpaired, key


def test_bad_feature_sets_and_settings_are_refused_with_the_fix() -> None:
    a, b = _sets()
    with pytest.raises(ValueError, match=r"same D.*one row per image"):
        frechet_distance(a, b[:, :4])
    with pytest.raises(ValueError, match="rounds=5"):
        feature_distances({"a": a}, b, rounds=5)
    with pytest.raises(ValueError, match="reference 'c' is not one of"):
        feature_distances({"a": a}, b, reference="c")
    with pytest.raises(ValueError, match="same prompts and seeds"):
        feature_distances({"a": a, "b": b[:100]}, b, reference="a")
