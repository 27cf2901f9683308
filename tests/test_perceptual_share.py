"""The perceptual share is what it says for any batch: its scored count, its weight, its timesteps."""

from __future__ import annotations

import math

import pytest
import torch

from acpo_lightning import losses
from acpo_lightning import testing as T
from acpo_lightning.processes import FlowProcess, VPProcess
from acpo_lightning.tiny import sd3 as tiny_sd3

STEPS = 4000


def _processes() -> dict[str, object]:
    return {
        "vp": VPProcess(T.tiny_scheduler(), tau=400),
        "flow": FlowProcess(tiny_sd3.tiny_sd3_scheduler(), sigma_max=0.4),
    }


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("batch", [1, 2, 3, 6, 10])
def test_the_scored_count_is_unbiased_for_any_batch(kind: str, batch: int) -> None:
    """share 0.25: round() gave 0 at batches 1 and 2, 1/3 at 3 and 6 and 0.2 at 10.

    Each step scores floor(share x B) or one more, the extra one a Bernoulli(frac) draw, so the
    realised share over STEPS steps is share within 5 binomial standard deviations."""
    process, share = _processes()[kind], 0.25
    counts = [
        process.sample_times(batch, share, torch.Generator().manual_seed(seed))[1]
        for seed in range(STEPS)
    ]
    expected = share * batch
    assert set(counts) <= {math.floor(expected), math.floor(expected) + 1}
    frac = expected - math.floor(expected)
    bound = 5 * math.sqrt(frac * (1 - frac) / STEPS) / batch
    assert abs(sum(counts) / (STEPS * batch) - share) <= bound


def test_an_integer_expected_count_draws_nothing_more() -> None:
    """share x B whole (0.25 x 16, 0.3 x 10 despite 3.0000000000000004): the count is fixed and the
    timesteps are the draws an integer count always gave (the demo's 0.25 x 16 is unchanged)."""
    process = _processes()["vp"]
    for batch, share, count in ((16, 0.25, 4), (10, 0.3, 3), (4, 0.0, 0), (4, 1.0, 4)):
        for seed in range(20):
            times, n = process.sample_times(batch, share, torch.Generator().manual_seed(seed))
            reference = torch.Generator().manual_seed(seed)
            late = torch.randint(0, 401, (count,), generator=reference)
            rest = torch.randint(0, 1000, (batch - count,), generator=reference)
            assert n == count and torch.equal(times, torch.cat([late, rest]))


def test_the_count_draw_leaves_the_step_generator_alone() -> None:
    """The extra sample's draw comes from a generator of its own (no device sync on a GPU): the
    step generator's stream after the timesteps is the same whether the extra one was drawn."""
    process = _processes()["vp"]
    seen = set()
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        _, n = process.sample_times(2, 0.25, generator)
        seen.add(n)
        reference = torch.Generator().manual_seed(seed)
        torch.randint(0, 401, (n,), generator=reference)
        torch.randint(0, 1000, (2 - n,), generator=reference)
        assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=reference))
    assert seen == {0, 1}


def test_the_perceptual_term_is_unbiased_when_its_count_varies() -> None:
    """Divided by the expected count share x B, the term's mean over steps is minus the mean
    score; the mean over scored samples would be P(count > 0) times it (0.25 at batch 1)."""
    share, batch, score = 0.25, 1, 0.8
    terms = []
    for seed in range(STEPS):
        count, expected = losses.scored_count(share, batch, torch.Generator().manual_seed(seed))
        scores = torch.full((count,), score)
        gate = torch.ones(count, dtype=torch.bool)
        terms.append(losses.perceptual_loss(scores, gate, expected).item())
    hits = sum(t != 0.0 for t in terms)
    assert all(t in (0.0, pytest.approx(-score / share)) for t in terms)
    # mean of (score / share) x Bernoulli(share): within 5 standard deviations of -score
    bound = 5 * (score / share) * math.sqrt(share * (1 - share) / STEPS)
    assert abs(sum(terms) / STEPS + score) <= bound and 0 < hits < STEPS
    # a whole expected count: the same number as the mean over the scored samples
    scores = torch.tensor([0.3, 0.5, 0.9, 0.1])
    gate = torch.ones(4, dtype=torch.bool)
    assert torch.equal(
        losses.perceptual_loss(scores, gate, 4.0), losses.perceptual_loss(scores, gate)
    )


# ---------------------------------------------------------------- through the module
class PromptLengthHead(T.TinyQualityHead):
    """A prompt-aware head: the tiny head's score times a factor of the caption (its length), and a
    record of the captions it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def score(self, images, prompts=None):
        self.seen.append(list(prompts))
        factor = torch.tensor([1.0 + len(p) for p in prompts], device=images.device)
        return super().score(images) * factor / 40.0


def test_a_dropped_prompts_sample_is_left_out_of_the_perceptual_term(tokenizer_dir) -> None:
    """prompt_dropout 0.5, share 1: the term is minus the kept samples' scores over the expected
    kept count B (1 - p); before, the dropped (unconditional) samples were scored against their
    captions and the term was the mean over all four."""
    from conftest import make_module, shapes_batch

    head = PromptLengthHead()
    module = make_module(
        tokenizer_dir, quality_head=head, perceptual_share=1.0, prompt_dropout=0.5, w_perc=1.0,
        w_anchor=0.0, lora_init=False,
    )  # fmt: skip
    module.train()
    masks = []
    drop_prompts = module.denoiser.drop_prompts

    def record(*args):
        cond, dropped = drop_prompts(*args)
        masks.append(dropped)
        return cond, dropped

    module.denoiser.drop_prompts = record
    outputs = []
    head.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    terms, _ = module.compute_terms(shapes_batch(size=4), torch.Generator().manual_seed(1))
    (dropped,) = [mask for mask in masks if mask is not None]
    assert 0 < int(dropped.sum()) < 4  # both kinds in the batch
    (raw,) = outputs
    normalized = losses.normalize_score(raw, head.higher_is_better, head.score_range)
    expected = -normalized[~dropped].sum() / (4 * (1 - 0.5))
    torch.testing.assert_close(terms.perc, expected, rtol=1e-6, atol=0)
    # the dropped samples' x0 estimates get no perceptual gradient
    module.zero_grad()
    terms.perc.backward()
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_val_loss_is_the_weighted_sum_of_its_logged_parts(tokenizer_dir, tmp_path) -> None:
    """10 images at batch 4, share 0.25: 1 + 1 + 0.5 expected scored samples. Before, the batch
    that scored none logged no loss_perc, so the epoch means disagreed (val/loss 0.533 against
    0.366 from its parts, issue 24)."""
    import lightning.pytorch as pl

    from acpo_lightning.data import ShapesDataModule
    from conftest import make_module

    module = make_module(tokenizer_dir, w_perc=1.0, w_anchor=2.0, lora_init=False)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.validate(module, ShapesDataModule(train_size=4, val_size=10, batch_size=4))
    m = {k: v.item() for k, v in trainer.callback_metrics.items()}
    parts = m["val/loss_diff"] + 2.0 * m["val/loss_anchor"] + 1.0 * m["val/loss_perc"]
    # three float32 epoch means of terms of magnitude < 2: a few ulps of 2
    assert m["val/loss"] == pytest.approx(parts, rel=0, abs=16 * 2 * 1.2e-7)


def test_rollout_steps_draw_the_data_timesteps_as_plain_training(tokenizer_dir) -> None:
    """On a rollout step the data samples are not scored, so perceptual_share must not pull
    their timesteps into [t_min, tau]: before, share 1 never trained t > tau there."""
    from conftest import make_module, shapes_batch

    module = make_module(
        tokenizer_dir, objective="rollout", perceptual_share=1.0, tau=400, rollout_steps=2,
        k_late=1,
    )  # fmt: skip
    module.train()
    seen = []
    add_noise = module.process.add_noise
    module.process.add_noise = lambda x0, noise, times: (
        seen.append(times) or add_noise(x0, noise, times)
    )
    for seed in range(3):
        module.objectives.training_step(
            module.context(), shapes_batch(size=8), torch.Generator().manual_seed(seed), True
        )
    times = torch.cat(seen)
    assert times.numel() == 24 and int((times > 400).sum()) > 0


# ---------------------------------------------------------------- every shipped config
#: each tiny overlay with the shipped config it shrinks
SHIPPED = {
    "tiny.yaml": "acpo.yaml",
    "tiny_pixel.yaml": "ddpm_church.yaml",
    "tiny_sdxl.yaml": "sdxl.yaml",
    "tiny_sd3.yaml": "sd35.yaml",
    "tiny_flux.yaml": "flux.yaml",
}


@pytest.mark.slow
@pytest.mark.parametrize("overlay", list(SHIPPED))
def test_every_shipped_config_scores_at_its_shipped_share_and_batch(
    overlay: str, tmp_path, monkeypatch
) -> None:
    """Before: sdxl.yaml (0.25 x 2), sd35.yaml and flux.yaml (0.25 x 1) scored no sample on any
    step (train/perc_share 0, no train/iqa); the tiny overlays' share 0.5 hid it."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from acpo_lightning.cli import main
    from conftest import CONFIGS

    base = yaml.safe_load((CONFIGS / SHIPPED[overlay]).read_text())
    tiny = yaml.safe_load((CONFIGS / overlay).read_text())
    assert "perceptual_share" not in tiny["model"], "a tiny overlay shrinks sizes, not behaviour"
    share, batch = base["model"]["perceptual_share"], base["data"]["init_args"]["batch_size"]
    assert share > 0 and base["model"].get("w_perc", 0.1) > 0
    monkeypatch.chdir(tmp_path)
    configs = [a for f in (SHIPPED[overlay], overlay) for a in ("--config", str(CONFIGS / f))]
    main(["fit", *configs, "--trainer.max_steps", "8", "--data.init_args.batch_size", str(batch)])
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*"))))
    events.Reload()
    shares = [e.value for e in events.Scalars("train/perc_share")]
    assert len(shares) == 8 and max(shares) > 0
    assert "train/iqa" in events.Tags()["scalars"]
    assert any(e.value != 0 for e in events.Scalars("train/loss_perc"))


def _as_rank(module, rank: int):
    """``module`` as process ``rank`` of a DDP run: its ``global_rank`` (the step generator's seed)."""
    cls = type(module)
    module.__class__ = type(f"{cls.__name__}AsRank{rank}", (cls,), {"global_rank": rank})
    return module


def test_every_process_scores_the_same_count_on_a_step(tokenizer_dir) -> None:
    """Under DDP the ranks draw their noise apart but must agree on a step's scored count: a rank
    that scores logs ``train/iqa`` (synced) and one that does not would wait on it forever (the
    2-process resume of tests/test_ddp.py hung at share 0.25 x batch 2), and a step costs the
    slowest rank's decode. Training and validation steps alike; rank 0's count is unchanged."""
    from acpo_lightning.in_trainer import step_result
    from conftest import make_module, shapes_batch

    batch = shapes_batch(2)
    counts = {}
    for rank in (0, 1):
        module = _as_rank(make_module(tokenizer_dir, perceptual_share=0.25), rank)
        module.train()
        train = [step_result(module, batch, 0, step).perc_share for step in range(12)]
        module.eval()
        val = []
        for index in range(12):
            generator, choice = module.step_generators("val", 0, index)
            val.append(module.compute_terms(batch, generator, choice=choice)[1]["perc_share"])
        counts[rank] = (train, val)
    assert counts[0] == counts[1]
    assert {0.0, 0.5} <= set(counts[0][0]) and {0.0, 0.5} <= set(counts[0][1])
