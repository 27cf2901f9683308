"""What reaches a user's terminal in normal use: no import-time noise, no page-long warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning
import pytest
import torch

from acpo_lightning import ACPOModule
from acpo_lightning.quiet_imports import quiet_imports
from conftest import REPO, make_module

#: What bitsandbytes logs when peft (which diffusers' model classes import) imports it on a CPU
#: with AVX512-BF16 and without the ``kernels`` package.
KERNELS_NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ..."


def test_quiet_imports_drops_only_that_message_and_only_inside() -> None:
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        with quiet_imports():
            logger.warning(KERNELS_NOISE, "inside")
            logger.warning("another bitsandbytes warning")
        logger.warning(KERNELS_NOISE, "after")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another bitsandbytes warning", KERNELS_NOISE % "after"]
    assert logger.filters == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["-m", "acpo_lightning", "--help"],  # peft first imported by models/lora.py
        ["-c", "import acpo_lightning.testing"],  # by diffusers' UNet2DConditionModel
        ["-c", "import acpo_demo.assets"],  # the same, for the demo
    ],
    ids=["acpo-help", "testing", "demo"],
)
def test_a_fresh_process_prints_no_bitsandbytes_kernel_warning(
    args: list[str], tmp_path: Path
) -> None:
    """Each first importer of peft in a new process (~6 s each: torch, diffusers, peft).

    On a CPU without AVX512-BF16 bitsandbytes logs nothing and this test cannot fail there.
    """
    # acpo_demo is not installed with the library: the child imports it from the checkout's src/
    path = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "gemm_4bit_forward" not in output and "kernels-community" not in output, output[:500]


# ------------------------------------------------------------------ load_from_checkpoint
PARTS = ("unet", "quality_head", "noise_scheduler", "vae", "text_encoder", "tokenizer")


def lora_checkpoint(tokenizer_dir: Path, path: Path, drop: int = 0, **extra: torch.Tensor) -> dict:
    """A checkpoint as ``fit`` writes it (LoRA weights only), LoRA moved off its initial values;
    the first ``drop`` LoRA weights left out, ``extra`` added."""
    module = make_module(tokenizer_dir)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    checkpoint = {
        "state_dict": module.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    for key in sorted(k for k in checkpoint["state_dict"] if "lora_" in k)[:drop]:
        del checkpoint["state_dict"][key]
    checkpoint["state_dict"].update(extra)
    torch.save(checkpoint, path)
    return checkpoint["state_dict"]


def load_recording_warnings(tokenizer_dir: Path, path: Path) -> tuple[ACPOModule, list[str]]:
    fresh = make_module(tokenizer_dir)  # the frozen parts, passed as the docs say
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = ACPOModule.load_from_checkpoint(
            path, **{name: getattr(fresh, name) for name in PARTS}
        )
    return loaded, [str(w.message) for w in caught]


def test_load_from_checkpoint_does_not_list_the_frozen_weights(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Lightning warned with every frozen key (about 19,600 characters at SD 1.5 size)."""
    saved = lora_checkpoint(tokenizer_dir, tmp_path / "lora.ckpt")
    loaded, messages = load_recording_warnings(tokenizer_dir, tmp_path / "lora.ckpt")
    assert not [m[:300] for m in messages if "not in the checkpoint" in m or len(m) > 500]
    state = loaded.state_dict()
    assert any("lora_" in key for key in saved)
    assert all(torch.equal(state[key], value) for key, value in saved.items())


def test_load_from_checkpoint_still_warns_of_keys_the_module_lacks(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    lora_checkpoint(tokenizer_dir, tmp_path / "extra.ckpt", **{"unet.extra.weight": torch.ones(2)})
    _, messages = load_recording_warnings(tokenizer_dir, tmp_path / "extra.ckpt")
    assert [m for m in messages if "not in the model state dict" in m and "unet.extra" in m]


def test_a_missing_trainable_weight_is_still_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    """What makes hiding the missing-keys warning safe: no trainable weight can be missing."""
    lora_checkpoint(tokenizer_dir, tmp_path / "short.ckpt", drop=1)
    with pytest.raises(ValueError, match="checkpoint lacks 1 trainable weights"):
        load_recording_warnings(tokenizer_dir, tmp_path / "short.ckpt")
