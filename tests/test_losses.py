"""The ACPO terms against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from acpo_lightning import losses

# alpha_bar = [0.64, 0.36] -> (alpha, sigma) = (0.8, 0.6) at t=0 and (0.6, 0.8) at t=1.
ALPHAS_CUMPROD = torch.tensor([0.64, 0.36])


def test_x0_recovery_by_hand() -> None:
    x_t, out = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5)
    t0, t1 = torch.tensor([0]), torch.tensor([1])
    assert losses.predicted_original(
        x_t, out, ALPHAS_CUMPROD, t0, "epsilon"
    ).item() == pytest.approx(0.875)
    assert losses.predicted_original(
        x_t, out, ALPHAS_CUMPROD, t1, "v_prediction"
    ).item() == pytest.approx(0.2)
    assert losses.predicted_original(x_t, out, ALPHAS_CUMPROD, t1, "sample").item() == 0.5


def test_targets_by_hand() -> None:
    x0, eps, t0 = torch.ones(1, 1), torch.full((1, 1), 0.5), torch.tensor([0])
    assert losses.diffusion_target(x0, eps, ALPHAS_CUMPROD, t0, "epsilon").item() == 0.5
    assert losses.diffusion_target(
        x0, eps, ALPHAS_CUMPROD, t0, "v_prediction"
    ).item() == pytest.approx(-0.2)
    assert losses.diffusion_target(x0, eps, ALPHAS_CUMPROD, t0, "sample").item() == 1.0


@pytest.mark.parametrize("prediction_type", losses.PREDICTION_TYPES)
def test_perfect_prediction_recovers_x0(prediction_type: str) -> None:
    torch.manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 50)
    x0, eps = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    t = torch.tensor([0, 5, 17, 30, 42, 49])
    a, s = losses.schedule_coefficients(alphas, t, x0)
    x_t = a * x0 + s * eps
    target = losses.diffusion_target(x0, eps, alphas, t, prediction_type)
    torch.testing.assert_close(
        losses.predicted_original(x_t, target, alphas, t, prediction_type), x0
    )


def test_unknown_prediction_type_names_value_and_fix() -> None:
    with pytest.raises(ValueError, match=r"'flow'.*epsilon.*prediction_type"):
        losses.predicted_original(
            torch.ones(1, 1), torch.ones(1, 1), ALPHAS_CUMPROD, torch.tensor([0]), "flow"
        )


def test_mse_terms_are_per_sample_and_anchor_detached() -> None:
    pred = torch.tensor([[1.0, 3.0], [0.0, 0.0]], requires_grad=True)
    anchor = torch.tensor([[0.0, 1.0], [0.0, 2.0]], requires_grad=True)
    torch.testing.assert_close(
        losses.diffusion_loss(pred, torch.zeros(2, 2)), torch.tensor([5.0, 0.0])
    )
    penalty = losses.anchor_penalty(pred, anchor)
    torch.testing.assert_close(penalty, torch.tensor([2.5, 2.0]))
    penalty.sum().backward()
    assert anchor.grad is None and pred.grad is not None


def test_normalize_score_direction_and_range() -> None:
    assert losses.normalize_score(torch.tensor([1.0]), True, (0.0, 2.0)).item() == 0.5
    assert losses.normalize_score(torch.tensor([25.0]), False, (0.0, 100.0)).item() == 0.75
    with pytest.raises(ValueError, match=r"high > low"):
        losses.normalize_score(torch.tensor([1.0]), True, (1.0, 1.0))


def test_perceptual_loss_gates_samples() -> None:
    scores = torch.tensor([0.2, 0.8, 0.5], requires_grad=True)
    gate = losses.late_mask(torch.tensor([100, 900, 400]), tau=400)
    assert gate.tolist() == [True, False, True]
    loss = losses.perceptual_loss(scores, gate)
    assert loss.item() == pytest.approx(-0.35)
    loss.backward()
    torch.testing.assert_close(scores.grad, torch.tensor([-0.5, 0.0, -0.5]))
    assert losses.perceptual_loss(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).item() == 0.0


def test_objective_combines_weighted_terms() -> None:
    terms = losses.acpo_objective(
        diff=torch.tensor([1.0, 3.0]),
        anchor=torch.tensor([0.5, 1.5]),
        normalized_scores=torch.tensor([0.4]),
        gate=torch.tensor([True]),
        w_diff=1.0,
        w_anchor=2.0,
        w_perc=0.5,
    )
    assert terms.loss.item() == pytest.approx(2.0 + 2.0 - 0.2)
    assert (terms.diff.item(), terms.anchor.item(), terms.iqa.item()) == pytest.approx(
        (2.0, 1.0, 0.4)
    )
    assert terms.perc.item() == pytest.approx(-0.4)


def test_dual_ascent_moves_weight_towards_budget() -> None:
    w = torch.tensor(1.0)
    assert losses.dual_ascent_step(
        w, torch.tensor(0.3), delta=0.1, lr=10.0
    ).item() == pytest.approx(3.0)
    assert losses.dual_ascent_step(
        w, torch.tensor(0.05), delta=0.1, lr=10.0
    ).item() == pytest.approx(0.5)
    assert (
        losses.dual_ascent_step(w, torch.tensor(0.0), delta=0.5, lr=10.0).item() == 0.0
    )  # projected


def test_sample_timesteps_share_and_range() -> None:
    gen = torch.Generator().manual_seed(0)
    t, n = losses.sample_timesteps(8, 1000, tau=300, t_min=50, share=0.25, generator=gen)
    assert n == 2 and t.shape == (8,)
    assert ((t[:2] >= 50) & (t[:2] <= 300)).all()
    t_again, _ = losses.sample_timesteps(8, 1000, 300, 50, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(t, t_again)
    with pytest.raises(ValueError, match="tau=1000"):
        losses.sample_timesteps(8, 1000, tau=1000, t_min=0, share=0.25, generator=gen)
    with pytest.raises(ValueError, match="share"):
        losses.sample_timesteps(8, 1000, tau=10, t_min=0, share=1.5, generator=gen)
