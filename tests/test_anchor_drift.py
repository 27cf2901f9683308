"""The logged drift is a measurement: at w_anchor 0 too, where it trains nothing."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from acpo_lightning.data import ShapesDataModule
from conftest import make_module, shapes_batch


def _terms(module, seed: int = 0):
    module.train()
    return module.compute_terms(shapes_batch(), torch.Generator().manual_seed(seed))[0]


def test_weight_zero_measures_the_drift_without_training_on_it(tokenizer_dir) -> None:
    """Before: loss_anchor 0 at w_anchor 0 whatever the drift. Now the same drift as at weight 1
    (the same draws), and the loss and its gradient are those of a run without the anchor."""
    settings = dict(lora_init=False, w_perc=1.0, perceptual_share=0.5)
    weighted = _terms(make_module(tokenizer_dir, w_anchor=1.0, **settings))
    free = make_module(tokenizer_dir, w_anchor=0.0, **settings)
    measured = _terms(free)
    assert weighted.anchor.item() > 0
    # the same drift: one forward of the same networks on the same inputs
    torch.testing.assert_close(measured.anchor, weighted.anchor, rtol=0, atol=0)
    assert not measured.anchor.requires_grad
    torch.testing.assert_close(measured.loss, measured.diff + measured.perc, rtol=0, atol=0)
    unmeasured = _terms(make_module(tokenizer_dir, w_anchor=0.0, measure_drift=False, **settings))
    torch.testing.assert_close(unmeasured.loss, measured.loss, rtol=0, atol=0)
    grads = []
    module = make_module(tokenizer_dir, w_anchor=0.0, **settings)
    _terms(module).loss.backward()
    grads.append([p.grad.clone() for p in module.trainable_parameters()])
    module = make_module(tokenizer_dir, w_anchor=0.0, measure_drift=False, **settings)
    _terms(module).loss.backward()
    grads.append([p.grad.clone() for p in module.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def _fit_metrics(module, tmp_path) -> dict[str, float]:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, ShapesDataModule(train_size=8, batch_size=4))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("objective", ["data", "rollout"])
def test_weight_zero_logs_the_measured_drift(objective: str, tokenizer_dir, tmp_path) -> None:
    settings = dict(lora_init=False, w_anchor=0.0, objective=objective, rollout_steps=3, k_late=1)
    metrics = _fit_metrics(make_module(tokenizer_dir, **settings), tmp_path)
    assert metrics["train/loss_anchor"] > 0 and metrics["val/loss_anchor"] > 0
    if objective == "rollout":
        assert metrics["train/loss_anchor_rollout"] > 0
    # measure_drift off: no anchor pass, and no drift logged (a 0 would read as a measurement)
    metrics = _fit_metrics(make_module(tokenizer_dir, measure_drift=False, **settings), tmp_path)
    assert not any("loss_anchor" in name for name in metrics)
