"""Over-optimization, visible and controllable: the proxy and a held-out head scored on the same
generated images, and the LoRA kept at the best held-out value (with early stopping)."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from acpo_lightning import testing as T
from acpo_lightning.callbacks import BestLoRACallback, QualityHeadCallback
from acpo_lightning.data import ShapesDataModule
from conftest import make_module


class Scripted(Callback):
    """Log ``val/heldout_iqa`` from a script at each step (a new tensor each time, as an
    evaluation pass does) and export the LoRA of every step, to compare with the kept one."""

    def __init__(self, values: list[float], folder) -> None:
        self.values, self.folder = values, folder

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        step = trainer.global_step
        trainer.callback_metrics["val/heldout_iqa"] = torch.tensor(self.values[step - 1])
        pl_module.save_lora(self.folder / f"step-{step}")


def _fit(tmp_path, tokenizer_dir, values, callback, steps=None, order=1) -> pl.Trainer:
    module = make_module(tokenizer_dir, num_inference_steps=2)
    trainer = pl.Trainer(
        max_steps=steps or len(values), accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=[Scripted(values, tmp_path / "steps"), callback][::order],
    )  # fmt: skip
    trainer.fit(module, ShapesDataModule(train_size=32, image_size=32, batch_size=2))
    return trainer


def _same_file(a, b) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(
    ("mode", "best", "order"), [("max", 2, 1), ("min", 4, 1), ("max", 2, -1)],
    ids=["max", "min", "listed-before-the-evaluation"],
)  # fmt: skip
def test_the_lora_of_the_best_evaluation_is_kept(tmp_path, tokenizer_dir, mode, best, order):
    values = [0.3, 0.5, 0.4, 0.1, 0.45]
    callback = BestLoRACallback(mode=mode, dirpath=tmp_path / "lora")
    trainer = _fit(tmp_path, tokenizer_dir, values, callback, order=order)
    assert trainer.global_step == 5 and callback.best_step == best
    kept = tmp_path / "lora" / "best" / "pytorch_lora_weights.safetensors"
    assert _same_file(kept, tmp_path / "steps" / f"step-{best}" / kept.name)
    assert not _same_file(kept, tmp_path / "steps" / "step-5" / kept.name)  # the LoRA moved on
    record = json.loads((kept.parent / "best.json").read_text())
    assert record["step"] == best and record["value"] == pytest.approx(values[best - 1])


def test_patience_stops_training_after_that_many_evaluations_without_improvement(
    tmp_path, tokenizer_dir
) -> None:
    values = [0.3, 0.5, 0.4, 0.45, 0.9, 1.0]
    callback = BestLoRACallback(dirpath=tmp_path / "lora", patience=2)
    trainer = _fit(tmp_path, tokenizer_dir, values, callback)
    assert trainer.global_step == 4 and callback.best_step == 2 and callback.stale == 2
    assert callback.state_dict() == {"best_value": 0.5, "best_step": 2, "stale": 2}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="patience=0 must be >= 1"):
        BestLoRACallback(patience=0)
    with pytest.raises(ValueError, match="mode='up' must be 'max' or 'min'"):
        BestLoRACallback(mode="up")


def test_proxy_and_heldout_heads_score_the_same_generated_images(tmp_path, tokenizer_dir) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    options = dict(prompts=prompts, every_n_steps=2, every_n_epochs=None, batch_size=2,
                   compare_base=False, log_images=0)  # fmt: skip
    heldout = T.TinyQualityHead(seed=7)
    proxy, gold = QualityHeadCallback(**options), QualityHeadCallback(head=heldout, **options)
    module = make_module(tokenizer_dir, num_inference_steps=2)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=[proxy, gold],
    )  # fmt: skip
    trainer.fit(module, ShapesDataModule(train_size=8, image_size=32, batch_size=2))
    assert proxy.evaluation_pass is gold.evaluation_pass  # one generation pass for both
    assert proxy.evaluation_pass.stats["images"] == 2
    images = module.generate(["a red square", "a blue circle"], seed=0, num_inference_steps=2)
    metrics = trainer.callback_metrics
    expected = {"val/guidance_iqa": module.quality_head(images), "val/heldout_iqa": heldout(images)}
    for name, scores in expected.items():
        assert float(metrics[name]) == pytest.approx(scores.mean().item(), abs=1e-5)
    assert float(metrics["val/guidance_iqa"]) != float(metrics["val/heldout_iqa"])


def test_the_readme_callbacks_run_from_yaml(tmp_path, monkeypatch) -> None:
    """The README's YAML (a tiny head as the held-out one): proxy and held-out curves are logged
    and the best LoRA is exported with its record."""
    import yaml

    from acpo_lightning.cli import build_cli
    from conftest import CONFIGS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    every = {"prompts": "prompts.txt", "every_n_steps": 1, "every_n_epochs": None,
             "batch_size": 2, "log_images": 0}  # fmt: skip
    heldout = {"class_path": "acpo_lightning.testing.TinyQualityHead", "init_args": {"seed": 3}}
    callbacks = [
        {"class_path": "acpo_lightning.callbacks.QualityHeadCallback", "init_args": every},
        {"class_path": "acpo_lightning.callbacks.QualityHeadCallback",
         "init_args": {**every, "head": heldout}},
        {"class_path": "acpo_lightning.callbacks.BestLoRACallback",
         "init_args": {"monitor": "val/heldout_iqa", "patience": 4, "dirpath": "lora"}},
    ]  # fmt: skip
    (tmp_path / "cb.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    configs = [a for f in ("acpo.yaml", "tiny.yaml") for a in ("--config", str(CONFIGS / f))]
    cli = build_cli(
        ["fit", *configs, "--config", "cb.yaml", "--trainer.max_steps", "2",
         "--trainer.limit_val_batches", "0"]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert {"val/guidance_iqa", "val/heldout_iqa"} <= set(metrics)
    record = json.loads((tmp_path / "lora" / "best" / "best.json").read_text())
    assert record["monitor"] == "val/heldout_iqa" and record["step"] in (1, 2)
    assert set(record["logged"]) >= {"val/guidance_iqa", "val/heldout_iqa"}


class ScriptedEpochs(Callback):
    """Log ``val/heldout_iqa`` from a script at each epoch end (as an evaluation with
    ``every_n_epochs=1`` does, before ``ModelCheckpoint`` saves) and export that epoch's LoRA."""

    def __init__(self, values: list[float], folder) -> None:
        self.values, self.folder = values, folder

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        value = self.values[trainer.current_epoch]
        trainer.callback_metrics["val/heldout_iqa"] = torch.tensor(value)
        pl_module.save_lora(self.folder / f"step-{trainer.global_step}")


def test_a_resumed_run_keeps_the_best_of_the_evaluation_before_the_checkpoint(
    tmp_path, tokenizer_dir
) -> None:
    """An epoch-end evaluation is taken up before ``epoch=0.ckpt`` is written: resuming from it
    keeps the same best step and value, and leaves ``best/`` as the uninterrupted run wrote it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    values = [0.5, 0.3, 0.4]  # the best is the first evaluation, at step 2

    def fit(steps_folder: str, ckpt_path=None) -> BestLoRACallback:
        best = BestLoRACallback(dirpath=tmp_path / "lora")
        checkpoints = ModelCheckpoint(dirpath=tmp_path / f"ckpt-{steps_folder}", save_top_k=-1)
        trainer = pl.Trainer(
            max_epochs=3, limit_train_batches=2, accelerator="cpu", logger=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=[ScriptedEpochs(values, tmp_path / steps_folder), best, checkpoints],
        )  # fmt: skip
        module = make_module(tokenizer_dir, num_inference_steps=2)
        data = ShapesDataModule(train_size=4, image_size=32, batch_size=2)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return best

    whole = fit("steps")
    kept = tmp_path / "lora" / "best" / "pytorch_lora_weights.safetensors"
    assert (whole.best_step, whole.best_value) == (2, 0.5)
    assert _same_file(kept, tmp_path / "steps" / "step-2" / kept.name)
    first = torch.load(tmp_path / "ckpt-steps" / "epoch=0-step=2.ckpt", weights_only=True)
    assert first["callbacks"][whole.state_key]["best_value"] == 0.5

    resumed = fit("resumed", ckpt_path=tmp_path / "ckpt-steps" / "epoch=0-step=2.ckpt")
    assert (resumed.best_step, resumed.best_value) == (2, 0.5)
    assert _same_file(kept, tmp_path / "steps" / "step-2" / kept.name)  # not overwritten
    assert json.loads((kept.parent / "best.json").read_text())["step"] == 2


def test_the_proxy_curve_scores_the_crops_the_policy_is_trained_on(tmp_path, tokenizer_dir):
    """With ``perceptual_crop``, training scores native-resolution crops; so does the proxy
    callback (the same head on whole images resized is another number)."""
    from acpo_lightning.callbacks.quality import crop_seed, crops_at_native_resolution
    from acpo_lightning.crops import PerceptualCrop

    prompts = ["a red square", "a blue circle", "a green star"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    crop = PerceptualCrop(16, count=2)
    module = make_module(tokenizer_dir, num_inference_steps=2, perceptual_crop=crop)
    proxy = QualityHeadCallback(prompts=tmp_path / "prompts.txt", seed=3, batch_size=2,
                                compare_base=False, log_images=0)  # fmt: skip
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=[proxy],
    )  # fmt: skip
    trainer.fit(module, ShapesDataModule(train_size=2, image_size=32, batch_size=2))
    images = module.generate(prompts, seed=3, num_inference_steps=2)
    seeds = [crop_seed(3, i) for i in range(len(prompts))]
    crops = crops_at_native_resolution(images, crop, module.codec.scale_factor, seeds)
    head = module.quality_head
    logged = trainer.callback_metrics["val/guidance_iqa"].item()
    assert logged == pytest.approx(head(crops, None).mean().item(), abs=1e-5)
    assert abs(logged - head(images).mean().item()) > 1e-3  # not the whole images


def test_native_crops_are_windows_of_the_image_on_the_latent_grid_whatever_the_batch() -> None:
    from acpo_lightning.callbacks.quality import crop_seed, crops_at_native_resolution
    from acpo_lightning.crops import PerceptualCrop

    images = torch.rand(3, 3, 32, 48)
    crop, seeds = PerceptualCrop(16, count=4), [crop_seed(0, i) for i in range(3)]
    crops = crops_at_native_resolution(images, crop, 8, seeds)
    assert crops.shape == (12, 3, 16, 16)
    for row, piece in enumerate(crops):
        windows = [images[row // 4, :, top : top + 16, left : left + 16]
                   for top in range(0, 17, 8) for left in range(0, 33, 8)]  # fmt: skip
        assert any(torch.equal(piece, window) for window in windows)
    tail = crops_at_native_resolution(images[1:], crop, 8, seeds[1:])
    assert torch.equal(tail, crops[4:])  # an image's crops do not depend on its batch
    positions = {tuple(c.flatten()[:4].tolist()) for c in crops[:4]}
    assert len(positions) > 1  # several places, not one repeated


class LowerIsBetterHead(T.TinyQualityHead):
    """A held-out head whose lower scores are better (as NIQE and BRISQUE)."""

    higher_is_better = False


class Recorder(Callback):
    """Every value of ``val/heldout_iqa`` the evaluation logged, by step."""

    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.values[trainer.global_step] = float(trainer.callback_metrics["val/heldout_iqa"])


def test_the_best_lora_follows_the_direction_of_the_heldout_head(tmp_path, tokenizer_dir):
    """Without ``mode``, a lower-is-better held-out head keeps the LoRA of its lowest value."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    heldout = QualityHeadCallback(
        head=LowerIsBetterHead(seed=7), prompts=prompts, every_n_steps=1, every_n_epochs=None,
        batch_size=2, compare_base=False, log_images=0,
    )  # fmt: skip
    best, recorder = BestLoRACallback(dirpath=tmp_path / "lora"), Recorder()
    module = make_module(tokenizer_dir, num_inference_steps=2, lora_init=False)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=[heldout, best, recorder],
    )  # fmt: skip
    trainer.fit(module, ShapesDataModule(train_size=8, image_size=32, batch_size=2))
    values = recorder.values
    assert len(values) == 4 and min(values.values()) < max(values.values())
    assert best.mode == "min"
    assert best.best_value == min(values.values())  # the logged tensor itself
    assert best.best_step == min(values, key=values.get)
    record = json.loads((tmp_path / "lora" / "best" / "best.json").read_text())
    assert record["mode"] == "min"


def test_a_mode_against_the_heads_direction_is_refused(tmp_path, tokenizer_dir) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    heldout = QualityHeadCallback(head=LowerIsBetterHead(), prompts=prompts, log_images=0)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[heldout, BestLoRACallback(mode="max", dirpath=tmp_path / "lora")],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"mode='max'.*val/heldout_iqa.*LowerIsBetterHead.*mode: min"
    ):
        trainer.fit(
            make_module(tokenizer_dir), ShapesDataModule(train_size=2, image_size=32, batch_size=2)
        )
    assert trainer.global_step == 0
