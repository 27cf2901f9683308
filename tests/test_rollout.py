"""Rollout objective: exact no-grad prefix, gradient only at the end, bounded memory, CLI modes."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from acpo_lightning.in_trainer import step_result
from acpo_lightning.sampling import denoise
from conftest import make_module, rollout_terms, shapes_batch


def test_no_grad_prefix_reaches_the_chosen_step_exactly(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, objective="rollout").eval()
    cond = module.encode_prompts(["a red square"])
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def fn(x, t, c):
        return module.denoiser.policy(x, t, c)

    with torch.no_grad():
        latents, run = denoise(
            fn, module.sample_scheduler, noise, cond, None, 1.0, 10, stop_after=7
        )
        reference = DDIMScheduler.from_config(module.sample_scheduler.config)
        reference.set_timesteps(10)
        manual = noise.clone()
        for t in reference.timesteps[:7]:
            manual = reference.step(fn(manual, t, cond), t, manual).prev_sample
    torch.testing.assert_close(latents, manual, rtol=0, atol=0)
    assert run.index == 7 and run.timestep == reference.timesteps[7]


def _saved_tensor_count(module, steps: int) -> int:
    module.objectives.rollout.steps = steps
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rollout_terms(
            module, ["a red square", "a blue circle"], 2, torch.Generator().manual_seed(0)
        )
    return count


def test_gradient_flows_only_through_the_last_step_into_lora(tokenizer_dir) -> None:
    module = make_module(
        tokenizer_dir, objective="rollout", rollout_steps=6, k_late=2, lora_init=False
    )
    module.train()
    terms = rollout_terms(
        module, ["a red square", "a blue circle"], 2, torch.Generator().manual_seed(0)
    )
    (terms.perc + terms.anchor).backward()
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert "lora_" in name and param.grad is not None and param.grad.abs().sum() > 0
        else:
            assert param.grad is None
    # memory with K=1 does not grow with the number of sampler steps
    assert _saved_tensor_count(module, 4) == _saved_tensor_count(module, 12)


def test_draft_k_keeps_gradient_through_k_steps(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, objective="rollout", rollout_steps=6, k_late=2, draft_k=3)
    latents_grads = []
    original = module.denoiser._call

    def spy(unet, x, t, c):
        latents_grads.append(torch.is_grad_enabled() and (x.requires_grad or unet is module.unet))
        return original(unet, x, t, c)

    module.denoiser._call = spy
    rollout_terms(module, ["a red square"], 1, torch.Generator().manual_seed(0))
    # 6 steps, last scored step at index 4 or 5: 2-3 no-grad calls, then 3 policy calls with grad (+1 anchor)
    assert sum(latents_grads) == 3


def test_nothing_changes_without_perceptual_and_data_terms(tokenizer_dir) -> None:
    module = make_module(
        tokenizer_dir, objective="rollout", w_perc=0.0, w_diff=0.0, rollout_steps=4, k_late=2
    )
    module.train()
    loss = step_result(module, shapes_batch(), 0, 0).terms.loss
    assert loss.item() == 0.0  # zero-init LoRA: no drift, no reward, no data term
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.trainable_parameters())


def test_rollout_steps_are_logged_and_seeded(tokenizer_dir) -> None:
    module = make_module(
        tokenizer_dir, objective="both", rollout_ratio=1.0, rollout_steps=4, k_late=2
    )
    module.train()
    gen = module.host_generator("train", 5, 0)
    assert module.objectives.is_rollout_step(gen)
    first = rollout_terms(module, ["a red square"], 1, module.step_generator("train", 5, 0))
    again = rollout_terms(module, ["a red square"], 1, module.step_generator("train", 5, 0))
    assert first.timestep == again.timestep and torch.equal(first.perc, again.perc)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_late": 30}, "k_late=30"),
        ({"draft_k": 40}, "draft_k=40"),
        ({"objective": "sideways"}, "objective='sideways'"),
        ({"rollout_ratio": 2.0}, "rollout_ratio=2.0"),
    ],
)
def test_bad_rollout_settings_are_named(tokenizer_dir, kwargs, message) -> None:
    kwargs.setdefault("objective", "rollout")
    with pytest.raises(ValueError, match=message):
        make_module(tokenizer_dir, **kwargs)


def test_sigma_space_sampler_is_refused(tokenizer_dir) -> None:
    from diffusers import EulerDiscreteScheduler

    from acpo_lightning import testing as T

    sampler = EulerDiscreteScheduler.from_config(T.tiny_scheduler().config)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        make_module(tokenizer_dir, objective="rollout", sample_scheduler=sampler)


def test_prompt_only_validation_scores_the_policys_samples(tokenizer_dir, tmp_path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    module = make_module(tokenizer_dir, rollout_steps=3, k_late=1)
    prompts = DataLoader(
        [{"prompt": p} for p in ["a red square", "a blue circle"]],
        batch_size=2,
        collate_fn=lambda items: {"prompts": [i["prompt"] for i in items]},
    )
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    metrics = trainer.validate(module, prompts, verbose=False)[0]
    # the same rollout, from the generator validation batch 0 draws from
    expected = rollout_terms(
        module, ["a red square", "a blue circle"], 2, module.step_generator("val", 0, 0)
    )
    assert metrics["val/rollout_iqa"] == pytest.approx(expected.iqa.item(), rel=1e-5)
    assert metrics["val/loss_anchor_rollout"] == 0.0  # zero-init LoRA: the policy is the base


def _rollout_lora_gradient(module, monkeypatch=None) -> torch.Tensor:
    module.zero_grad(set_to_none=True)
    terms = rollout_terms(
        module, ["a red square", "a blue circle"], 2, torch.Generator().manual_seed(3)
    )
    (terms.perc + terms.anchor).backward()
    return torch.cat([p.grad.flatten() for p in module.trainable_parameters()])


def test_draft_k_gradient_equals_the_uncheckpointed_computation(tokenizer_dir, monkeypatch) -> None:
    """The K-1 checkpointed steps recompute with their own timestep, not the last one."""
    from acpo_lightning.objectives import rollout

    module = make_module(
        tokenizer_dir,
        objective="rollout",
        rollout_steps=6,
        k_late=1,
        draft_k=3,
        lora_init=False,
        w_perc=1.0,
    )
    module.train()
    checkpointed = _rollout_lora_gradient(module)
    monkeypatch.setattr(rollout, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    direct = _rollout_lora_gradient(module)
    assert direct.abs().sum() > 0
    # the same float operations in the same order: recomputation is bitwise the forward pass
    torch.testing.assert_close(checkpointed, direct, rtol=0, atol=0)


def _anchor_batch_sizes(module) -> list[int]:
    sizes = []
    original = module.denoiser.anchor

    def spy(x, t, c):
        sizes.append(x.shape[0])
        return original(x, t, c)

    module.denoiser.anchor = spy
    rollout_terms(module, ["a red square", "a blue circle"], 2, torch.Generator().manual_seed(0))
    return sizes


def test_the_rollout_runs_the_anchor_when_its_term_counts_or_its_drift_is_measured(
    tokenizer_dir,
) -> None:
    settings = dict(objective="rollout", rollout_steps=3, k_late=1, guidance_scale=3.0)
    unmeasured = make_module(tokenizer_dir, w_anchor=0.0, measure_drift=False, **settings)
    assert _anchor_batch_sizes(unmeasured) == []
    # weight 0 in penalty mode: the drift is measured (without gradient) by default
    assert _anchor_batch_sizes(make_module(tokenizer_dir, w_anchor=0.0, **settings)) == [4]
    # both CFG branches of the two samples, once
    assert _anchor_batch_sizes(make_module(tokenizer_dir, w_anchor=1.0, **settings)) == [4]
    constrained = make_module(tokenizer_dir, w_anchor=0.0, anchor_mode="constraint", **settings)
    assert _anchor_batch_sizes(constrained) == [4]  # the drift is measured even at weight 0


def test_rollout_anchor_is_the_mean_drift_of_the_raw_branches(tokenizer_dir) -> None:
    """CFG-combined outputs would amplify the drift by up to (2g - 1)^2."""
    module = make_module(
        tokenizer_dir,
        objective="rollout",
        rollout_steps=3,
        k_late=1,
        guidance_scale=7.0,
        lora_init=False,
    )
    calls = []
    policy = module.denoiser._call

    def record(unet, x, t, c):
        out = policy(unet, x, t, c)
        calls.append(out.detach())
        return out

    module.denoiser._call = record
    terms = rollout_terms(module, ["a red square"], 1, torch.Generator().manual_seed(0))
    raw_policy, raw_anchor = calls[-2:]  # the scored step: policy, then anchor (adapters off)
    assert raw_policy.shape[0] == 2  # [uncond; cond]
    expected = (raw_policy - raw_anchor).pow(2).mean()
    torch.testing.assert_close(terms.anchor, expected, rtol=1e-5, atol=0)
