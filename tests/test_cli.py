"""The command line end to end: every shipped config parses; the tiny overlays train."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from acpo_lightning.cli import build_cli, main
from conftest import CONFIGS

#: Standalone configs, and each overlay with the config it is layered on.
STANDALONE = ["acpo.yaml", "ddpm_church.yaml", "demo.yaml"]
OVERLAYS = {"tiny.yaml": "acpo.yaml", "tiny_pixel.yaml": "ddpm_church.yaml"}
#: The big backbones (a denoiser injected; their tiny overlays train in tests/test_backbone_*.py).
BACKBONES = ["sdxl.yaml", "sd35.yaml", "flux.yaml"]
BACKBONE_OVERLAYS = {
    "tiny_sdxl.yaml": "sdxl.yaml",
    "tiny_sd3.yaml": "sd35.yaml",
    "tiny_flux.yaml": "flux.yaml",
}
#: Overlays of the embedded demo (trained in tests/test_demo.py, parsed here).
DEMO_OVERLAYS = {"demo_control.yaml": "demo.yaml", "demo_no_anchor.yaml": "demo.yaml"}
#: Speed overlays (trained on local tiny weights in test_acpo_yaml_real_loaders_bf16...).
SPEED_OVERLAYS = {"lean.yaml": "acpo.yaml"}
#: Multi-process strategy overlays (DDP trained with 2 CPU processes in tests/test_ddp.py, parsed here).
STRATEGY_OVERLAYS = {
    "ddp.yaml": "acpo.yaml",
    "fsdp.yaml": "acpo.yaml",
    "deepspeed.yaml": "acpo.yaml",
}


def _config_args(name: str) -> list[str]:
    base = {
        **OVERLAYS, **DEMO_OVERLAYS, **SPEED_OVERLAYS, **STRATEGY_OVERLAYS, **BACKBONE_OVERLAYS
    }.get(name)  # fmt: skip
    files = [base, name] if base else [name]
    return [arg for f in files for arg in ("--config", str(CONFIGS / f))]


def test_every_config_is_covered_here() -> None:
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    overlays = {**OVERLAYS, **DEMO_OVERLAYS, **SPEED_OVERLAYS, **STRATEGY_OVERLAYS}
    overlays |= BACKBONE_OVERLAYS
    assert shipped == set(STANDALONE) | set(BACKBONES) | set(overlays)


@pytest.mark.parametrize(
    "name",
    STANDALONE
    + list(OVERLAYS)
    + list(DEMO_OVERLAYS)
    + list(SPEED_OVERLAYS)
    + list(STRATEGY_OVERLAYS)
    + BACKBONES
    + list(BACKBONE_OVERLAYS),
)
def test_config_parses(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_config_args(name), "--print_config"])
    assert exit_info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    if model.get("denoiser"):  # SDXL, SD3, FLUX: the LoRA network sits in the denoiser
        args = model["denoiser"]["init_args"]
        network = args.get("unet") or args.get("transformer")
    else:
        network = model["unet"]
    assert network["class_path"] == "acpo_lightning.models.add_lora"
    process = model.get("process")
    if process and process["class_path"].endswith("FlowProcess"):
        assert 0 < process["init_args"]["sigma_max"] <= 1
    else:
        assert 0 <= model["tau"] < 1000


def test_acpo_yaml_documents_every_knob() -> None:
    text = (CONFIGS / "acpo.yaml").read_text()
    for knob in (
        "w_diff",
        "w_anchor",
        "w_perc",
        "tau",
        "t_min",
        "perceptual_share",
        "anchor_mode",
        "anchor_delta",
        "prompt_dropout",
    ):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{knob}:"))
        assert "#" in line, f"{knob} has no comment in acpo.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OVERLAYS))
def test_tiny_overlays_fit_then_validate_test_predict(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", *_config_args(name), "--trainer.max_steps", "4"])
    out = tmp_path / "outputs" / Path(name).stem
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    dual_and_guard_state = {
        "anchor_weight.w_anchor_state",
        "anchor_weight.drift_ema",
        "anchor_weight.drift_ema_steps",
        "guard.skipped_steps",
        "guard.overflow_steps",
    }
    assert state and all("lora_" in k or k in dual_and_guard_state for k in state)
    assert dual_and_guard_state <= set(state)
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    for command in ("validate", "test", "predict"):
        main([command, *_config_args(name), "--ckpt_path", str(last), "--trainer.logger", "false"])


@pytest.mark.slow
def test_lightning_console_script_runs_the_user_command(tmp_path) -> None:
    script = Path(sys.executable).parent / "lightning"
    assert script.exists(), "the `lightning` console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(script), "fit", *_config_args("tiny.yaml"), "--trainer.max_steps", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "outputs" / "tiny" / "checkpoints" / "last.ckpt").exists()
    module_help = subprocess.run(
        [sys.executable, "-m", "acpo_lightning", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert module_help.returncode == 0 and "fit" in module_help.stdout


def test_build_cli_without_running_gives_the_parts_to_use_from_python(
    tmp_path, monkeypatch
) -> None:
    """``build_cli(configs, run=False)`` (no subcommand, as tests/test_ddp.py's replay uses it)
    builds the module and data; the ``--ckpt_path`` check must not look for a subcommand."""
    monkeypatch.chdir(tmp_path)
    cli = build_cli([*_config_args("tiny.yaml"), "--trainer.logger", "false"], run=False)
    assert cli.model.unet is not None and cli.datamodule is not None


def test_out_of_range_tau_stops_before_training_with_one_clear_line(
    tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_config_args("tiny.yaml"), "--model.tau", "5000"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "acpo: error: tau=5000" in err and "num_train_timesteps" in err
    assert not (tmp_path / "outputs" / "tiny" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["rollout", "both"])
def test_tiny_config_trains_in_rollout_modes(objective: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [
        "--trainer.max_steps",
        "3",
        "--model.objective",
        objective,
        "--model.rollout_steps",
        "4",
        "--model.k_late",
        "2",
        "--model.w_perc",
        "1.0",
        "--model.rollout_ratio",
        "1.0",  # with the data terms at every step in `both` mode
    ]
    cli = build_cli(["fit", *_config_args("tiny.yaml"), *args])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(next((tmp_path / "outputs" / "tiny").rglob("events.out.tfevents.*")))
    )
    events.Reload()
    scalars = {
        tag: [e.value for e in events.Scalars(tag)]
        for tag in ("train/rollout_t", "train/rollout_iqa", "train/loss_anchor_rollout")
    }
    assert all(scalars.values()), "no rollout step was logged"
    assert all(math.isfinite(v) for values in scalars.values() for v in values)
    assert all(v != 0.0 for v in scalars["train/rollout_iqa"])
    # zero-init LoRA: no drift at the first step; the policy has moved by the last rollout step
    assert scalars["train/loss_anchor_rollout"][-1] > 0.0
    module = cli.model
    assert int(module.guard.skipped_steps) == 0 and cli.trainer.global_step == 3
    lora_b = [p for n, p in module.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # zero at init: the weights moved


@pytest.mark.slow
@pytest.mark.parametrize("lean", [False, True], ids=["acpo.yaml", "acpo.yaml+lean.yaml"])
def test_acpo_yaml_real_loaders_bf16_on_a_local_repository(lean, tmp_path, monkeypatch) -> None:
    """acpo.yaml as shipped (bf16 base weights, bf16-mixed, real factories) on a local SD-shaped
    folder; with lean.yaml layered on, the TAESD perceptual decoder loads from a local folder too."""
    from diffusers import AutoencoderTiny

    from acpo_lightning import testing as T

    repo = tmp_path / "tiny-sd"
    T.tiny_unet().save_pretrained(repo / "unet")
    T.tiny_vae().save_pretrained(repo / "vae")
    T.tiny_text_encoder().save_pretrained(repo / "text_encoder")
    T.tiny_tokenizer().save_pretrained(repo / "tokenizer")
    T.tiny_scheduler().save_pretrained(repo / "scheduler")
    overlay = tmp_path / "local.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "max_steps": 2,
                    "val_check_interval": None,
                    "check_val_every_n_epoch": 1,
                    "limit_val_batches": 1,
                    "default_root_dir": str(tmp_path),
                    # acpo.yaml's evaluation callbacks load PickScore/CLIP/MANIQA from the hub
                    # (tested offline in test_callbacks.py); this test is about the model loaders
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": "outputs/acpo/checkpoints", "save_last": True},
                        }
                    ],
                },
                "model": {
                    "unet": {
                        "init_args": {
                            "unet": {"init_args": {"pretrained_model_name_or_path": str(repo)}},
                            "rank": 4,
                        }
                    },
                    "vae": {"init_args": {"pretrained_model_name_or_path": str(repo)}},
                    "text_encoder": {"init_args": {"pretrained_model_name_or_path": str(repo)}},
                    "tokenizer": {"init_args": {"pretrained_model_name_or_path": str(repo)}},
                    "noise_scheduler": {"init_args": {"pretrained_model_name_or_path": str(repo)}},
                    "quality_head": {"class_path": "acpo_lightning.testing.TinyQualityHead"},
                    "perceptual_crop": 16,  # acpo.yaml's 224 px, on the tiny 32-px images
                    "num_inference_steps": 2,
                },
                "data": {
                    "class_path": "acpo_lightning.data.ShapesDataModule",
                    "init_args": {"train_size": 8, "batch_size": 4},
                },
            }
        )
    )
    configs = ["--config", str(CONFIGS / "acpo.yaml")]
    if lean:
        T.tiny_taesd().save_pretrained(tmp_path / "tiny-taesd")
        configs += ["--config", str(CONFIGS / "lean.yaml"), "--config", str(overlay)]
        configs += [
            "--model.perceptual_decoder.init_args.pretrained_model_name_or_path",
            str(tmp_path / "tiny-taesd"),
        ]
    else:
        configs += ["--config", str(overlay)]
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *configs])
    module = cli.model
    if lean:
        assert isinstance(module.perceptual_decoder, AutoencoderTiny)
        assert module.perceptual_decoder.dtype == torch.bfloat16
        assert not any(p.requires_grad for p in module.perceptual_decoder.parameters())
    else:
        assert module.perceptual_decoder is None
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 2
    assert int(module.guard.skipped_steps) == 0  # both steps trained (a skipped step counts too)
    lora = [p for n, p in module.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert module.unet.conv_in.weight.dtype == torch.bfloat16 and module.vae.dtype == torch.bfloat16
    state = torch.load(
        tmp_path / "outputs" / "acpo" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert all("lora_" in k or k in module.trained_state_keys() for k in state["state_dict"])
    assert not any(k.startswith("perceptual_decoder") for k in state["state_dict"])


def test_perceptual_crop_in_its_class_form_trains(tmp_path, monkeypatch) -> None:
    """``perceptual_crop`` as ``class_path: acpo_lightning.crops.PerceptualCrop`` (several crops per
    image, another margin) reaches the module; an int stays a 1-crop ``PerceptualCrop``."""
    monkeypatch.chdir(tmp_path)
    overlay = tmp_path / "crops.yaml"
    crop = {"class_path": "acpo_lightning.crops.PerceptualCrop"}
    crop["init_args"] = {"size": 8, "count": 3, "margin": 1}
    overlay.write_text(yaml.safe_dump({"model": {"perceptual_crop": crop}}))
    cli = build_cli(
        ["fit", *_config_args("tiny.yaml"), "--config", str(overlay), "--trainer.max_steps", "1"]
    )
    spec = cli.model.perceptual_crop
    assert (spec.size, spec.count, spec.margin) == (8, 3, 1) and cli.trainer.global_step == 1
    (tmp_path / "int").mkdir()
    monkeypatch.chdir(tmp_path / "int")  # a fresh outputs/: the first run's checkpoints stay apart
    cli = build_cli(["fit", *_config_args("tiny.yaml"), "--trainer.max_steps", "1"])
    spec = cli.model.perceptual_crop
    assert (spec.size, spec.count, spec.margin) == (16, 1, 4)  # configs/tiny.yaml: 16
