"""LoRA export: callback and `acpo export` write what diffusers' StableDiffusionPipeline loads, exactly."""

from __future__ import annotations

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, DDPMScheduler
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.callbacks import LoRAExportCallback
from acpo_lightning.cli import main
from acpo_lightning.data import ShapesDataModule
from acpo_lightning.models import LORA_WEIGHT_NAME, add_lora, lora_state_dict
from conftest import CONFIGS

RANK, ALPHA = 4, 8  # alpha != rank: the exported file must carry the LoRA scale 2
PROMPTS = ["a red square", "a blue circle"]
STEPS, GUIDANCE, SEED = 3, 3.0, 11


def _noise_scheduler() -> DDPMScheduler:
    # steps_offset=1 as in Stable Diffusion's scheduler config; StableDiffusionPipeline rewrites a
    # scheduler with steps_offset=0 to 1 in place, which would change the sampler it is compared with
    return DDPMScheduler.from_config(T.tiny_scheduler().config, steps_offset=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ACPOModule trained 2 steps, with a checkpoint, its config and the callback's export."""
    root = tmp_path_factory.mktemp("export")
    module = ACPOModule(
        unet=add_lora(T.tiny_unet(), rank=RANK, alpha=ALPHA, init_lora_weights=False),
        quality_head=T.TinyQualityHead(),
        noise_scheduler=_noise_scheduler(),
        vae=T.tiny_vae(),
        text_encoder=T.tiny_text_encoder(),
        tokenizer=T.tiny_tokenizer(str(root / "tokenizer")),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),  # large steps: LoRA visibly moves
    )
    before = {k: v.clone() for k, v in lora_state_dict(module.unet).items()}
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    export = LoRAExportCallback(dirpath=root / "lora", every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, export],
    )
    trainer.fit(module, datamodule=ShapesDataModule(train_size=8, batch_size=4, image_size=32))
    config = {
        "model": {
            "unet": {
                "class_path": "acpo_lightning.models.add_lora",
                "init_args": {
                    "unet": {"class_path": "acpo_lightning.testing.tiny_unet"},
                    "rank": RANK,
                    "alpha": ALPHA,
                },
            }
        }
    }
    (root / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(config))
    return {
        "module": module,
        "root": root,
        "ckpt": root / "checkpoints" / "last.ckpt",
        "export": export,
        "before": before,
    }


def test_callback_and_acpo_export_write_the_trained_lora_with_its_alpha(trained) -> None:
    root, module = trained["root"], trained["module"]
    names = sorted(p.parent.name for p in trained["export"].written)
    assert names == ["last", "step-000001", "step-000002"]
    main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(root / "exported")])
    exported = load_file(str(root / "exported" / LORA_WEIGHT_NAME))
    from_callback = load_file(str(root / "lora" / "last" / LORA_WEIGHT_NAME))
    live = lora_state_dict(module.unet)
    assert exported.keys() == from_callback.keys() == live.keys()
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in exported)
    for key in live:
        assert torch.equal(exported[key], live[key]) and torch.equal(from_callback[key], live[key])
    assert any(not torch.equal(live[k], trained["before"][k]) for k in live), (
        "training moved no weight"
    )
    for path in (root / "exported", root / "lora" / "last"):
        with safe_open(str(path / LORA_WEIGHT_NAME), "pt") as handle:
            meta = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA
        assert set(meta["unet.target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}


def test_stable_diffusion_pipeline_with_the_exported_lora_reproduces_generate(trained) -> None:
    from diffusers import StableDiffusionPipeline

    module = trained["module"]
    root = trained["root"]
    if not (root / "exported" / LORA_WEIGHT_NAME).exists():
        main(["export", "--ckpt", str(trained["ckpt"]), "--out", str(root / "exported")])
    pipe = StableDiffusionPipeline(
        unet=T.tiny_unet(),
        vae=T.tiny_vae(),
        text_encoder=T.tiny_text_encoder(),
        tokenizer=module.tokenizer,
        scheduler=DDIMScheduler.from_config(module.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run_pipeline() -> torch.Tensor:
        generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
        return pipe(
            PROMPTS,
            generator=generators,
            guidance_scale=GUIDANCE,
            num_inference_steps=STEPS,
            output_type="pt",
        ).images

    base = run_pipeline()
    pipe.load_lora_weights(str(root / "exported"))
    tuned = run_pipeline()
    ours = module.generate(PROMPTS, seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    anchor = module.generate(
        PROMPTS, seed=SEED, num_inference_steps=STEPS, guidance_scale=GUIDANCE, use_anchor=True
    )
    torch.testing.assert_close(base, anchor, atol=1e-5, rtol=0)
    torch.testing.assert_close(tuned, ours, atol=1e-5, rtol=0)
    assert (tuned - base).abs().max() > 0.05, (
        "the LoRA barely changes the images: the check is void"
    )


def test_export_errors_name_the_problem_and_the_fix(trained, tmp_path, capsys) -> None:
    lonely = tmp_path / "lonely.ckpt"
    shutil.copy(trained["ckpt"], lonely)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(lonely), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--config" in capsys.readouterr().err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        "model:\n  unet:\n    class_path: acpo_lightning.models.add_lora\n    init_args:\n      rank: 8\n"
    )
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--ckpt",
                str(lonely),
                "--out",
                str(tmp_path / "out"),
                "--config",
                str(wrong),
            ]
        )
    assert "rank is [4] but the config" in capsys.readouterr().err
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"unet.conv_in.weight": torch.zeros(1)}}, full)
    with pytest.raises(SystemExit):
        main(
            ["export", "--ckpt", str(full), "--out", str(tmp_path / "out"), "--config", str(wrong)]
        )
    assert "no LoRA weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_acpo_fit_saves_the_config_where_acpo_export_finds_it(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
    main(["fit", *configs, "--trainer.max_steps", "2"])
    checkpoints = tmp_path / "outputs" / "tiny" / "checkpoints"
    assert (checkpoints / "config.yaml").is_file()
    main(["export", "--ckpt", str(checkpoints / "last.ckpt"), "--out", str(tmp_path / "lora")])
    with safe_open(str(tmp_path / "lora" / LORA_WEIGHT_NAME), "pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (
        meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4
    )  # configs/tiny.yaml: rank 4, alpha 4
