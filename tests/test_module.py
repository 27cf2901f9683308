"""ACPOModule behaviour on tiny real models."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from acpo_lightning import ACPOModule, losses
from acpo_lightning import testing as T
from acpo_lightning.data import ShapesDataModule
from acpo_lightning.models import add_lora
from acpo_lightning.quality import QualityHead
from conftest import make_module, quiet_trainer, shapes_batch


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"max_steps": 3, "limit_val_batches": 1, **kwargs})


def _step(module: ACPOModule, batch: dict, seed: int = 0) -> losses.ACPOTerms:
    module.train()
    terms, _ = module.compute_terms(batch, torch.Generator().manual_seed(seed))
    return terms


def test_lora_at_init_matches_anchor_then_drifts(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, w_perc=1.0, perceptual_share=0.5)
    batch = shapes_batch()
    terms = _step(module, batch)
    assert terms.anchor.item() == 0.0  # zero-init LoRA: policy == anchor exactly
    x = torch.randn(2, 4, 16, 16)
    t, cond = torch.tensor([5, 600]), module.encode_prompts(["a red square", "a blue circle"])
    torch.testing.assert_close(
        module.denoiser.policy(x, t, cond),
        module.denoiser.anchor(x, t, cond),
        rtol=0,
        atol=0,
    )
    optimizer = torch.optim.Adam(module.trainable_parameters(), lr=1e-2)
    terms.loss.backward()
    optimizer.step()
    assert _step(module, batch, seed=1).anchor.item() > 0
    assert not torch.allclose(
        module.denoiser.policy(x, t, cond), module.denoiser.anchor(x, t, cond)
    )


def test_gradients_reach_only_trainable_parameters(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5)
    _step(module, shapes_batch()).loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trainable)
    assert all(grads[n] is None for n in grads if n not in trainable)


def test_only_late_scored_samples_get_perceptual_gradient(tokenizer_dir) -> None:
    """Through compute_terms: the scored share is drawn in [t_min, tau]; the rest gets none."""
    module = make_module(
        tokenizer_dir, tau=300, t_min=100, perceptual_share=0.5, w_perc=1.0, lora_init=False
    )
    seen = {}
    original = module.denoiser.policy

    def keep(x, t, c):
        out = original(x, t, c)
        if out.requires_grad:
            out.retain_grad()
            seen.update(t=t, out=out)
        return out

    module.denoiser.policy = keep
    terms = _step(module, shapes_batch(size=8))
    terms.perc.backward()
    late = seen["t"][:4]
    assert ((late >= 100) & (late <= 300)).all()
    per_sample = seen["out"].grad.flatten(1).abs().sum(dim=1)
    assert (per_sample[:4] > 0).all() and (per_sample[4:] == 0).all()


def test_a_rollout_scored_above_tau_gets_no_perceptual_gradient(tokenizer_dir) -> None:
    """The gate matters in rollouts: the scored step is one of the last k_late, maybe above tau."""
    from conftest import rollout_terms

    # 4 DDIM steps from 1000 (tiny schedule, steps_offset 0): 750, 500, 250, 0; k_late 2 scores 250 or 0
    module = make_module(
        tokenizer_dir, objective="rollout", rollout_steps=4, k_late=2, tau=100, lora_init=False
    )
    seen = set()
    for seed in range(6):
        module.zero_grad(set_to_none=True)
        terms = rollout_terms(module, ["a red square"], 1, torch.Generator().manual_seed(seed))
        terms.perc.backward()
        moved = any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        timestep = int(terms.timestep)
        seen.add(timestep)
        assert moved == (timestep <= 100), timestep
        assert (terms.perc.item() == 0.0) == (timestep > 100)
    assert seen == {250, 0}  # both cases were exercised


def test_only_the_perceptual_share_is_decoded(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, perceptual_share=0.25, w_perc=1.0)
    seen = []
    module.vae.decoder.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    _step(module, shapes_batch(size=8))
    assert seen == [2]
    module.objectives.w_perc = 0.0
    seen.clear()
    _step(module, shapes_batch(size=8))
    assert seen == []  # nothing decoded when the perceptual term is off


def test_constraint_mode_moves_weight_towards_budget(tokenizer_dir) -> None:
    module = make_module(
        tokenizer_dir, anchor_mode="constraint", anchor_delta=0.5, w_anchor=1.0, dual_lr=1.0
    )
    module.anchor_weight.update(torch.tensor(2.0))  # drift above budget
    assert module.w_anchor.item() == pytest.approx(2.5)
    module = make_module(
        tokenizer_dir, anchor_mode="constraint", anchor_delta=0.5, w_anchor=1.0, dual_lr=1.0
    )
    module.anchor_weight.update(torch.tensor(0.0))  # drift below budget
    assert module.w_anchor.item() == pytest.approx(0.5)


def test_constraint_mode_in_fit_raises_weight_when_drifting(tokenizer_dir, tmp_path) -> None:
    module = make_module(
        tokenizer_dir, lora_init=False, anchor_mode="constraint", anchor_delta=1e-6
    )
    _trainer(tmp_path).fit(module, ShapesDataModule(train_size=12, batch_size=4))
    assert module.w_anchor.item() > 1.0
    assert module.anchor_weight.drift_ema.item() > 0


class _ModeProbe(pl.Callback):
    def __init__(self) -> None:
        self.modes: list[tuple[bool, ...]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.modes.append((module.unet.training, *(m.training for m in module.frozen_modules())))


def test_frozen_parts_stay_eval_and_out_of_checkpoint(tokenizer_dir, tmp_path) -> None:
    module = make_module(tokenizer_dir)
    probe = _ModeProbe()
    trainer = _trainer(tmp_path, callbacks=[probe], enable_checkpointing=True, max_steps=2)
    trainer.fit(module, ShapesDataModule(train_size=8, batch_size=4))
    assert probe.modes and all(m == (True, False, False, False) for m in probe.modes)
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert set(state) == module.trained_state_keys()
    assert not any(k.startswith(("vae.", "text_encoder.", "quality_head.")) for k in state)
    fresh = make_module(tokenizer_dir)
    fresh.on_load_checkpoint({"state_dict": state})
    fresh.load_state_dict(state, strict=False)
    for name, param in module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(dict(fresh.named_parameters())[name], param, rtol=0, atol=0)


# the second adapter is the point of the test: peft's notice that the model now has two is expected
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_checkpoint_from_another_adapter_is_refused(tokenizer_dir) -> None:
    state = {
        k: v for k, v in make_module(tokenizer_dir, rank=4).state_dict().items() if "lora" in k
    }
    other = make_module(tokenizer_dir, rank=2)
    other.unet.requires_grad_(False)
    add_lora(other.unet, rank=2, target_modules=["to_q"], adapter_name="extra")
    with pytest.raises(ValueError, match=r"lacks .* trainable weights"):
        other.on_load_checkpoint({"state_dict": state})


@pytest.mark.parametrize(("latent", "conditional"), [(True, True), (False, False), (False, True)])
def test_pixel_latent_conditional_unconditional_paths_train_and_generate(
    tokenizer_dir, tmp_path, latent, conditional
) -> None:
    module = make_module(
        tokenizer_dir,
        latent=latent,
        conditional=conditional,
        w_perc=1.0,
        perceptual_share=0.5,
        num_inference_steps=2,
    )
    image_size = 32 if latent else 16
    assert module.image_size == (image_size, image_size)
    before = {n: p.clone() for n, p in module.named_parameters() if p.requires_grad}
    _trainer(tmp_path, max_steps=2).fit(
        module, ShapesDataModule(train_size=8, batch_size=4, image_size=image_size)
    )
    assert any(
        not torch.equal(before[n], p) for n, p in module.named_parameters() if p.requires_grad
    )
    prompts = ["a red square", "a green circle"] if conditional else 2
    images = module.generate(prompts, seed=3)
    assert images.shape == (2, 3, image_size, image_size)
    # the trained adapter is what generates: the base model's images differ
    assert not torch.allclose(images, module.generate(prompts, seed=3, use_anchor=True))
    assert module.training  # generate restores the mode


def test_generate_is_seeded_per_image_and_anchor_matches_at_init(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, num_inference_steps=3, guidance_scale=3.0)
    pair = module.generate(["a red square", "a blue circle"], seed=7)
    torch.testing.assert_close(
        module.generate(["a red square", "a blue circle"], seed=7), pair, rtol=0, atol=0
    )
    # A batch of one against a batch of two changes only the summation order inside the
    # GEMMs and convolutions (the kernels block differently), never the numbers summed.
    # Each output then moves by a few float32 roundings (2**-24 relative) per layer, which
    # three CFG steps of the tiny UNet amplify: 9e-7 measured on Intel Xeon, on images in
    # [0, 1]. 1e-5 (84 ulps at 1.0) bounds any x86-64 kernel's order with 10x headroom,
    # while a wrong seed moves pixels by 0.8 (the seed=9 check below).
    batching = 1e-5
    torch.testing.assert_close(
        module.generate(["a blue circle"], seed=8)[0], pair[1], rtol=0, atol=batching
    )
    assert not torch.allclose(module.generate(["a red square"], seed=9)[0], pair[0])
    single = module.generate(["a red square"], seed=7)
    torch.testing.assert_close(single[0], pair[0], rtol=0, atol=batching)
    torch.testing.assert_close(
        module.generate(["a red square"], seed=7, use_anchor=True), single, rtol=0, atol=0
    )


def test_generate_with_anchor_differs_after_training(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, lora_init=False, num_inference_steps=2)
    tuned = module.generate(["a red square"], seed=0)
    base = module.generate(["a red square"], seed=0, use_anchor=True)
    assert not torch.allclose(tuned, base)


def test_separate_anchor_unet_for_full_fine_tuning(tokenizer_dir) -> None:
    parts = dict(
        quality_head=T.TinyQualityHead(),
        noise_scheduler=T.tiny_scheduler(),
        vae=T.tiny_vae(),
        text_encoder=T.tiny_text_encoder(),
        tokenizer=T.tiny_tokenizer(str(tokenizer_dir)),
    )
    with pytest.raises(ValueError, match="anchor_unet"):
        ACPOModule(unet=T.tiny_unet(), **parts)
    module = ACPOModule(unet=T.tiny_unet(), anchor_unet=T.tiny_unet(), **parts)
    assert all(p.requires_grad for p in module.unet.parameters())
    assert not any(p.requires_grad for p in module.anchor_unet.parameters())
    assert _step(module, shapes_batch()).anchor.item() == 0.0  # same init seed: identical nets
    assert "anchor_unet.conv_in.weight" not in module.trained_state_keys()


class _WrongShapeHead(QualityHead):
    def __init__(self) -> None:
        super().__init__()
        self.freeze()

    def score(self, images, prompts=None):
        return images.mean(dim=(2, 3))  # [B, 3] instead of [B]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 1000}, r"tau=1000.*num_train_timesteps \(1000"),
        ({"t_min": 500, "tau": 400}, r"t_min=500"),
        ({"perceptual_share": 1.5}, r"perceptual_share=1.5"),
        ({"anchor_mode": "soft"}, r"anchor_mode='soft'"),
        ({"w_perc": -1.0}, r"w_perc=-1.0"),
        ({"noise_scheduler": T.tiny_scheduler(prediction_type="flow")}, r"prediction_type 'flow'"),
    ],
)
def test_bad_arguments_are_named(tokenizer_dir, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_module(tokenizer_dir, **kwargs)


def test_conditional_unet_without_text_encoder_is_refused() -> None:
    with pytest.raises(ValueError, match="text_encoder/tokenizer is missing"):
        ACPOModule(
            unet=add_lora(T.tiny_unet(), rank=2),
            quality_head=T.TinyQualityHead(),
            noise_scheduler=T.tiny_scheduler(),
            vae=T.tiny_vae(),
        )


def test_wrong_head_output_shape_fails_before_training(tokenizer_dir, tmp_path) -> None:
    module = make_module(tokenizer_dir, quality_head=_WrongShapeHead())
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"returned \(2, 3\).*shape \[B\]"):
        trainer.fit(module, ShapesDataModule(train_size=8, batch_size=4))
    assert trainer.global_step == 0


def test_logged_terms(tokenizer_dir, tmp_path) -> None:
    module = make_module(tokenizer_dir, w_perc=1.0)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, ShapesDataModule(train_size=8, batch_size=4))
    keys = set(trainer.callback_metrics)
    for name in ("loss", "loss_diff", "loss_anchor", "loss_perc", "iqa", "w_anchor", "perc_share"):
        assert f"train/{name}" in keys and f"val/{name}" in keys
    assert trainer.callback_metrics["train/perc_share"].item() == 0.25


def _forward_counts(module: ACPOModule) -> dict[str, int]:
    """Count calls of a UNet resnet and of the VAE decoder's mid block, the units diffusers
    checkpoints (recomputation calls them again in the backward pass; pre-hooks, because a
    recomputation stops early once it has what backward needs)."""
    counts = {"unet": 0, "vae": 0}

    def count(name):
        def hook(*_):
            counts[name] += 1

        return hook

    module.unet.mid_block.resnets[1].register_forward_pre_hook(count("unet"))  # after LoRA layers
    module.vae.decoder.mid_block.register_forward_pre_hook(count("vae"))
    return counts


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer_dir) -> None:
    grads, counts = [], []
    for checkpointing in (False, True):
        module = make_module(tokenizer_dir, lora_init=False, w_perc=1.0, perceptual_share=0.5)
        if checkpointing:
            module.enable_gradient_checkpointing()
        calls = _forward_counts(module)
        terms = _step(module, shapes_batch())
        forward = dict(calls)
        terms.loss.backward()
        counts.append({name: calls[name] - forward[name] for name in calls})
        grads.append(torch.cat([p.grad.flatten() for p in module.trainable_parameters()]))
    assert counts[0] == {"unet": 0, "vae": 0}  # nothing runs again in a plain backward
    assert counts[1] == {"unet": 1, "vae": 1}  # the policy UNet and the scored decode recompute
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_a_perceptual_share_below_one_sample_scores_some_steps_without_a_warning(
    tokenizer_dir,
) -> None:
    """0.1 x batch 4 = 0.4 samples: round() scored none (and warned); now 40 % of steps score one."""
    module = make_module(tokenizer_dir, w_perc=1.0, perceptual_share=0.1)
    module.train()
    shares = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(10):
            _, stats = module.compute_terms(shapes_batch(), torch.Generator().manual_seed(seed))
            shares.append(stats["perc_share"])
    assert set(shares) == {0.0, 0.25}


def test_generate_in_bf16_after_an_fp32_empty_prompt_cache(tokenizer_dir) -> None:
    """CUDA autocast leaves the cached empty-prompt embedding in fp32; bf16 weights must still run."""
    from conftest import rollout_terms

    module = make_module(
        tokenizer_dir, num_inference_steps=2, guidance_scale=3.0, rollout_steps=2, k_late=1
    )
    module.denoiser._null = module.encode_prompts([""]).float()  # as cached under autocast
    for part in (module.unet, module.vae, module.text_encoder):  # bf16 weights, fp32 head
        part.to(torch.bfloat16)
    images = module.generate(["a red square"], seed=0)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    roll = rollout_terms(module, ["a red square"], 1, torch.Generator().manual_seed(0))
    assert torch.isfinite(roll.perc)


def _offset_policy_module(tokenizer_dir, **kwargs) -> ACPOModule:
    """Full fine-tuning whose policy is the anchor plus a constant output offset of 0.1.

    Every sample, data or rollout, either CFG branch, drifts by exactly 0.1**2 per element.
    """
    parts = dict(
        quality_head=T.TinyQualityHead(),
        noise_scheduler=T.tiny_scheduler(),
        vae=T.tiny_vae(),
        text_encoder=T.tiny_text_encoder(),
        tokenizer=T.tiny_tokenizer(str(tokenizer_dir)),
    )
    unet, anchor = T.tiny_unet(sample_size=16), T.tiny_unet(sample_size=16)  # same seed
    with torch.no_grad():
        unet.conv_out.bias += 0.1
    return ACPOModule(
        unet=unet,
        anchor_unet=anchor,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.0),  # the policy stays put
        **parts,
        **kwargs,
    )


@pytest.mark.slow
def test_constraint_mode_constrains_one_drift_whatever_the_rollout_ratio(
    tokenizer_dir, tmp_path
) -> None:
    weights = {}
    for ratio in (0.0, 0.5, 1.0):
        module = _offset_policy_module(
            tokenizer_dir,
            anchor_mode="constraint",
            anchor_delta=0.004,
            dual_lr=10.0,
            objective="both",
            rollout_ratio=ratio,
            rollout_steps=3,
            k_late=2,
            guidance_scale=5.0,
        )
        _trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(
            module, ShapesDataModule(train_size=16, batch_size=4)
        )
        torch.testing.assert_close(
            module.anchor_weight.drift_ema, torch.tensor(0.01), rtol=1e-4, atol=0
        )
        weights[ratio] = module.w_anchor.item()
    # four dual steps of 10 * (0.01 - 0.004) from 1.0, whatever the share of rollout steps
    assert weights[0.0] == pytest.approx(1.24, rel=1e-3)
    assert weights[0.5] == pytest.approx(weights[0.0], rel=1e-4)
    assert weights[1.0] == pytest.approx(weights[0.0], rel=1e-4)


def test_dual_ascent_steps_once_per_optimizer_step(tokenizer_dir, tmp_path) -> None:
    module = _offset_policy_module(
        tokenizer_dir, anchor_mode="constraint", anchor_delta=0.004, dual_lr=10.0
    )
    _trainer(tmp_path, max_steps=2, limit_val_batches=0, accumulate_grad_batches=2).fit(
        module, ShapesDataModule(train_size=16, batch_size=4)
    )
    assert int(module.anchor_weight.drift_ema_steps) == 2  # 4 micro-batches, 2 optimizer steps
    assert module.w_anchor.item() == pytest.approx(1.0 + 2 * 10.0 * (0.01 - 0.004), rel=1e-3)


def test_a_stochastic_sampler_draws_each_images_noise_from_its_own_seed(tokenizer_dir) -> None:
    from diffusers import DDPMScheduler

    module = make_module(
        tokenizer_dir,
        num_inference_steps=3,
        guidance_scale=1.0,
        sample_scheduler=DDPMScheduler.from_config(T.tiny_scheduler().config),
    )
    pair = module.generate(["a red square", "a blue circle"], seed=7)
    alone = module.generate(["a blue circle"], seed=8)  # image 1 of the pair, seed 7 + 1
    torch.testing.assert_close(alone[0], pair[1], rtol=0, atol=1e-5)  # batching only rounds


def test_default_sampler_follows_the_scheduler_config_it_is_given(tokenizer_dir) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler

    old = DDPMScheduler.from_config({**T.tiny_scheduler().config, "steps_offset": 0})
    old.register_to_config(clip_sample=True)
    module = make_module(tokenizer_dir, noise_scheduler=old)
    # what the README's recipe makes of the pipeline's scheduler: nothing overridden
    expected = DDIMScheduler.from_config(old.config)
    assert module.sample_scheduler.config.steps_offset == 0
    assert module.sample_scheduler.config.clip_sample is True
    expected.set_timesteps(4)
    module.sample_scheduler.set_timesteps(4)
    assert (
        module.sample_scheduler.timesteps.tolist()
        == expected.timesteps.tolist()
        == [750, 500, 250, 0]
    )


def _alone(module: ACPOModule, prompt: str, index: int) -> torch.Tensor:
    return module.generate([prompt], seed=module.seed + index)[0]


def test_prediction_seeds_each_prompt_by_its_index_in_the_whole_set(
    tokenizer_dir, tmp_path
) -> None:
    module = make_module(tokenizer_dir, num_inference_steps=2, seed=11)
    data = ShapesDataModule(val_size=5, batch_size=2)  # batches of 2, 2 and 1
    outputs = _trainer(tmp_path).predict(module, data)
    seeds = [seed for out in outputs for seed in out["seeds"]]
    assert seeds == [11 + i for i in range(5)]  # the short last batch reuses no seed
    prompts = [p for out in outputs for p in out["prompts"]]
    images = torch.cat([out["images"] for out in outputs])
    for index in (0, 4):
        torch.testing.assert_close(
            images[index], _alone(module, prompts[index], index), rtol=0, atol=1e-5
        )


def test_two_prediction_ranks_draw_from_disjoint_seeds(tokenizer_dir) -> None:
    """Each rank gets an interleaved share; its images are seeded by their global index."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    module = make_module(tokenizer_dir, num_inference_steps=2)
    data = ShapesDataModule(val_size=5, batch_size=2)
    by_index = {}
    for rank in (0, 1):
        loader = data.predict_dataloader()
        sampler = _get_distributed_sampler(
            loader, False, 0, RunningStage.PREDICTING, num_replicas=2, rank=rank
        )
        loader = _update_dataloader(loader, sampler, mode=RunningStage.PREDICTING)
        for batch_idx, batch in enumerate(loader):
            out = module.predict_step(batch, batch_idx)
            for index, prompt, image, seed in zip(
                batch["indices"].tolist(), out["prompts"], out["images"], out["seeds"], strict=True
            ):
                assert index not in by_index and seed == index
                by_index[index] = (prompt, image)
    assert sorted(by_index) == list(range(5))
    for index, (prompt, image) in by_index.items():
        torch.testing.assert_close(image, _alone(module, prompt, index), rtol=0, atol=1e-5)
