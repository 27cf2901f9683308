"""Evaluation callbacks on a tiny model: one shared generation pass, logged values, grid, train mode."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from acpo_lightning import testing as T
from acpo_lightning.callbacks import (
    CLIPScoreCallback,
    MANIQACallback,
    PickScoreCallback,
    QualityHeadCallback,
    load_prompts,
)
from acpo_lightning.callbacks.generation import evaluation_mode
from acpo_lightning.callbacks.grid import caption_grid
from acpo_lightning.data import ShapesDataModule
from acpo_lightning.metrics import PickScore, shard_bounds
from acpo_lightning.models import ModelNotFoundError
from conftest import make_module

PROMPTS = ["a red square", "a blue circle", "two green triangles"]
STEPS = 2


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return T.write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# three prompts\n" + "\n".join(PROMPTS) + "\n\n")
    return path


class ModeRecorder(pl.Callback):
    """Placed after the evaluation callbacks: what state do they leave the module in?"""

    def __init__(self) -> None:
        self.records: list[tuple[str, bool, bool, bool]] = []

    def _record(self, hook: str, module) -> None:
        frozen_training = any(m.training for m in module.frozen_modules())
        self.records.append((hook, module.training, frozen_training, torch.is_grad_enabled()))

    def on_train_epoch_end(self, trainer, module) -> None:
        self._record("epoch_end", module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._record("batch_start", module)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
    )
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def _data() -> ShapesDataModule:
    return ShapesDataModule(train_size=8, val_size=4, image_size=32, batch_size=4)


def _scalars(log_dir) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()


def test_tiny_fit_logs_val_metrics_base_delta_and_a_grid_from_one_shared_pass(
    tokenizer_dir, clip_dir, prompt_file, tmp_path
) -> None:
    module = make_module(
        tokenizer_dir, lora_init=False, num_inference_steps=STEPS, guidance_scale=2.0
    )
    common = dict(prompts=str(prompt_file), batch_size=2, every_n_epochs=1)
    pick = PickScoreCallback(
        pretrained_model_name_or_path=str(clip_dir),
        processor_name_or_path=str(clip_dir),
        log_images=2,
        **common,
    )
    clip = CLIPScoreCallback(pretrained_model_name_or_path=str(clip_dir), log_images=0, **common)
    maniqa = MANIQACallback(head=T.TinyQualityHead(), resize_to=32, log_images=0, **common)
    recorder = ModeRecorder()
    trainer = _trainer(tmp_path, [pick, clip, maniqa, recorder])
    trainer.fit(module, datamodule=_data())

    shared = pick.evaluation_pass
    assert shared is clip.evaluation_pass is maniqa.evaluation_pass
    # 3 prompts: the base once, then the policy at each of the 2 epoch ends; nothing generated twice
    assert shared.stats["evaluations"] == 2 and shared.stats["images"] == 3 * (1 + 2)
    assert all(training and not frozen and grad for _, training, frozen, grad in recorder.records)
    assert [r[0] for r in recorder.records].count("epoch_end") == 2

    scalars, tags = _scalars(trainer.logger.log_dir)
    for name in ("pickscore", "clipscore", "maniqa"):
        assert {f"val/{name}", f"val/{name}_base", f"val/{name}_delta"} <= set(scalars)
        assert len(scalars[f"val/{name}"]) == 2
        last, base = scalars[f"val/{name}"][-1], scalars[f"val/{name}_base"][-1]
        assert scalars[f"val/{name}_delta"][-1] == pytest.approx(last - base, abs=1e-5)
    assert "val/samples" in tags["images"] and any("samples_prompts" in t for t in tags["tensors"])
    assert trainer.logger.hparams["eval/pickscore/formula"].startswith("exp(logit_scale)")

    # the logged values are the metric of generate() for the same seeds, policy and base
    metric = PickScore(str(clip_dir), str(clip_dir))
    tuned = module.generate(PROMPTS, seed=0, num_inference_steps=STEPS)
    base = module.generate(PROMPTS, seed=0, num_inference_steps=STEPS, use_anchor=True)
    assert not torch.allclose(tuned, base, atol=1e-3)
    assert scalars["val/pickscore"][-1] == pytest.approx(
        metric.score(tuned, PROMPTS).mean().item(), abs=1e-4
    )
    assert scalars["val/pickscore_base"][-1] == pytest.approx(
        metric.score(base, PROMPTS).mean().item(), abs=1e-4
    )

    # `validate` evaluates once, reusing the cached base values (3 more images, not 6)
    validator = _trainer(tmp_path, [pick, clip, maniqa], limit_val_batches=1, logger=False)
    validator.validate(module, datamodule=_data(), verbose=False)
    assert shared.stats["images"] == 3 * 4
    assert validator.callback_metrics["val/pickscore"].item() == pytest.approx(
        scalars["val/pickscore"][-1], abs=1e-4
    )


def test_missing_metric_weights_fail_at_setup_before_any_step(
    tokenizer_dir, prompt_file, tmp_path
) -> None:
    module = make_module(tokenizer_dir)
    absent = tmp_path / "PickScore_v1"
    recorder = ModeRecorder()
    callback = PickScoreCallback(
        pretrained_model_name_or_path=str(absent), prompts=str(prompt_file)
    )
    trainer = _trainer(tmp_path, [callback, recorder], logger=False)
    with pytest.raises(ModelNotFoundError, match=r"PickScore model.*PickScore_v1.*Fix:"):
        trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 0 and recorder.records == []


def test_acpo_fit_with_missing_metric_weights_ends_in_one_clear_line(
    tmp_path, monkeypatch, capsys
) -> None:
    from acpo_lightning.cli import main
    from conftest import CONFIGS

    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
    extra = [
        "--trainer.callbacks+=acpo_lightning.callbacks.PickScoreCallback",
        "--trainer.callbacks.pretrained_model_name_or_path",
        str(tmp_path / "PickScore_v1"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "acpo: error: could not load the PickScore model" in err
    assert "Fix:" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_missing_maniqa_weights_fail_at_setup(tokenizer_dir, prompt_file, tmp_path) -> None:
    pytest.importorskip("pyiqa")
    from acpo_lightning.quality import PyiqaWeightsError

    module = make_module(tokenizer_dir)
    trainer = _trainer(tmp_path, [MANIQACallback(prompts=str(prompt_file))], logger=False)
    with pytest.raises(PyiqaWeightsError, match=r"'maniqa'.*TORCH_HOME"):
        trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 0


@pytest.mark.slow
def test_two_ddp_processes_shard_the_prompts_and_sync_to_the_one_process_values(
    tokenizer_dir, clip_dir, tmp_path
) -> None:
    prompts = [*PROMPTS, "a cat", "a dog"]  # 5 prompts: shards of 2 and 3
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    module = make_module(
        tokenizer_dir, lora_init=False, num_inference_steps=STEPS, guidance_scale=2.0
    )
    callback = PickScoreCallback(
        pretrained_model_name_or_path=str(clip_dir),
        processor_name_or_path=str(clip_dir),
        prompts=str(tmp_path / "p.txt"),
        batch_size=2,
        log_images=0,
    )
    trainer = _trainer(
        tmp_path,
        [callback],
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
    )
    trainer.fit(module, datamodule=_data())  # ddp_spawn copies rank 0's weights back here
    metric = PickScore(str(clip_dir), str(clip_dir))
    for name, use_anchor in (("val/pickscore", False), ("val/pickscore_base", True)):
        images = module.generate(prompts, seed=0, num_inference_steps=STEPS, use_anchor=use_anchor)
        expected = metric.score(images, prompts).mean().item()
        assert trainer.callback_metrics[name].item() == pytest.approx(expected, abs=1e-4)


def test_a_shard_of_prompts_generates_the_images_of_the_full_list(tokenizer_dir) -> None:
    """Rank r generates prompts[begin:end] with seed + begin: the same images as one process."""
    module = make_module(tokenizer_dir, lora_init=False, num_inference_steps=STEPS)
    prompts = [*PROMPTS, "a yellow star"]
    whole = module.generate(prompts, seed=5)
    bounds = [shard_bounds(len(prompts), rank, 3) for rank in range(3)]
    assert bounds == [(0, 1), (1, 2), (2, 4)]
    shards = [module.generate(prompts[b:e], seed=5 + b) for b, e in bounds]
    torch.testing.assert_close(torch.cat(shards), whole, atol=1e-5, rtol=1e-4)


def test_evaluation_mode_restores_train_mode_and_the_global_rng(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir).train()
    state = torch.get_rng_state()
    with evaluation_mode(module):
        assert not module.training and not torch.is_grad_enabled()
        torch.rand(3)
    assert module.training and torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), state)


def test_caption_grid_puts_base_and_tuned_side_by_side_with_captions() -> None:
    base, tuned = torch.zeros(3, 3, 32, 32), torch.ones(3, 3, 32, 32)
    grid = caption_grid([base, tuned], PROMPTS, ["base", "step 4"])
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    assert grid.shape[2] > 2 * 128 and grid.shape[1] > 3 * 128  # 32 px images enlarged to 128
    dark = (grid.float().mean(0) < 128).nonzero()
    assert len(dark) > 3 * 128 * 128  # three black base images
    with pytest.raises(ValueError, match="one caption per row"):
        caption_grid([base, tuned], PROMPTS[:2], ["base", "tuned"])


def test_prompt_lists_shipped_files_and_benchmarks(tmp_path) -> None:
    shipped = load_prompts("acpo_eval")
    assert (
        len(shipped) == 32
        and len(set(shipped)) == 32
        and load_prompts("acpo_eval", 5) == shipped[:5]
    )
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\nan owl\tAnimals\tBasic\t\n"
    )
    assert load_prompts(parti) == ["bond", "an owl"]
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text('Prompts,Category\n"A red colored car.",Colors\n')
    assert load_prompts(drawbench) == ["A red colored car."]
    drawbench_shipped = load_prompts("DrawBench")
    assert len(drawbench_shipped) == 200 and drawbench_shipped[0] == "A red colored car."
    assert "A storefront with 'Google Research Pizza Cafe' written on it." in drawbench_shipped
    assert len(load_prompts("drawbench", category="Counting")) == 19
    assert load_prompts("drawbench", category="gary marcus et al.")[0].startswith("Paying for")
    parti_shipped = load_prompts("partiprompts")
    assert len(parti_shipped) == 1632 and parti_shipped[:2] == ["bond", "element"]
    assert "a shiba inu wearing a beret and black turtleneck" in parti_shipped
    # a .tsv prompt that starts with a double quote is kept whole (no CSV quote handling)
    assert any(p.startswith('"G I G G L E" painted') for p in parti_shipped)
    assert len(load_prompts("PartiPrompts", category="Abstract")) == 51
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts("drawbench", category="No Such Category")
    with pytest.raises(ValueError, match="plain prompt list"):
        load_prompts("acpo_eval", category="Colors")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,words\n1,hello\n")
    with pytest.raises(ValueError, match=r"none of .*Prompt"):
        load_prompts(bad)
    with pytest.raises(FileNotFoundError, match="neither a shipped list"):
        load_prompts(tmp_path / "absent.txt")


def test_the_module_says_whether_it_is_text_conditional(tokenizer_dir) -> None:
    assert make_module(tokenizer_dir).is_conditional is True
    assert make_module(latent=False, conditional=False).is_conditional is False


@pytest.mark.parametrize("callback_class", [PickScoreCallback, CLIPScoreCallback])
def test_prompt_metrics_are_refused_on_an_unconditional_model_at_setup(
    callback_class, clip_dir, prompt_file, tmp_path
) -> None:
    module = make_module(latent=False, conditional=False, num_inference_steps=STEPS)
    tiny = {"pretrained_model_name_or_path": str(clip_dir), "processor_name_or_path": str(clip_dir)}
    callback = callback_class(**tiny, prompts=str(prompt_file), log_images=0)
    trainer = _trainer(tmp_path, [callback], logger=False)
    with pytest.raises(ValueError, match="is unconditional; use MANIQACallback"):
        trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 0


def test_the_grid_of_an_unconditional_model_is_captioned_with_seeds(prompt_file, tmp_path) -> None:
    """The prompt list only sets the number of images: the captions name each image's seed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = make_module(latent=False, conditional=False, num_inference_steps=STEPS)
    heldout = QualityHeadCallback(
        head=T.TinyQualityHead(), prompts=str(prompt_file), seed=4, batch_size=2,
        every_n_epochs=1, log_images=2,
    )  # fmt: skip
    trainer = _trainer(tmp_path, [heldout], max_epochs=1, limit_train_batches=1)
    trainer.fit(module, datamodule=_data())
    events = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"tensors": 0})
    events.Reload()
    tag = next(t for t in events.Tags()["tensors"] if "samples_prompts" in t)
    text = events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    assert text == "0. seed 4\n1. seed 5"
    expected = module.generate(3, seed=4, num_inference_steps=STEPS)
    score = T.TinyQualityHead()(expected).mean().item()
    assert trainer.callback_metrics["val/heldout_iqa"].item() == pytest.approx(score, abs=1e-5)


def _fit_heads(tmp_path, module, callbacks) -> pl.Trainer:
    trainer = _trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=1, logger=False)
    trainer.fit(module, datamodule=_data())
    return trainer


def _head_options(prompt_file, **kwargs) -> dict:
    return dict(prompts=str(prompt_file), batch_size=3, every_n_epochs=1, log_images=0, **kwargs)


def test_a_second_fit_with_another_head_of_the_same_class_scores_its_own_base(
    tokenizer_dir, prompt_file, tmp_path
) -> None:
    """Base values are kept for the head they were computed with, not for its class name."""
    module = make_module(tokenizer_dir, num_inference_steps=STEPS)
    base = module.generate(PROMPTS, seed=0, num_inference_steps=STEPS, use_anchor=True)
    for seed in (1, 2):
        head = T.TinyQualityHead(seed=seed)
        callback = QualityHeadCallback(head=head, **_head_options(prompt_file))
        trainer = _fit_heads(tmp_path, module, [callback])
        logged = trainer.callback_metrics["val/heldout_iqa_base"].item()
        assert logged == pytest.approx(head(base).mean().item(), abs=1e-5), f"head seed {seed}"


def test_a_reused_proxy_callback_scores_with_the_head_of_the_module_it_runs_on(
    tokenizer_dir, prompt_file, tmp_path
) -> None:
    callback = QualityHeadCallback(**_head_options(prompt_file, compare_base=False))
    for seed in (1, 2):
        head = T.TinyQualityHead(seed=seed)
        module = make_module(tokenizer_dir, num_inference_steps=STEPS, quality_head=head)
        trainer = _fit_heads(tmp_path, module, [callback])
        images = module.generate(PROMPTS, seed=0, num_inference_steps=STEPS)
        logged = trainer.callback_metrics["val/guidance_iqa"].item()
        assert logged == pytest.approx(head(images).mean().item(), abs=1e-5), f"head seed {seed}"
