"""Shared fixtures: tiny real models (seeded, CPU, offline) and a module factory."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping

# Before anything imports huggingface_hub (which reads these once): tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.models import add_lora

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch a hub: any accidental download fails fast instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def quiet_single_thread():
    """One intra-op thread (tiny convs gain nothing from two busy cores) and no Lightning banners."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)
    logger.setLevel(level)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return T.write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def make_module(
    tokenizer_dir: Path | None = None,
    *,
    latent: bool = True,
    conditional: bool = True,
    lora_init: bool | str = True,
    rank: int = 4,
    **kwargs,
) -> ACPOModule:
    """An ACPOModule on tiny real parts; ``kwargs`` go to ``ACPOModule``."""
    torch.manual_seed(0)
    if conditional:
        unet = T.tiny_unet(in_channels=4 if latent else 3, sample_size=16)
    else:
        unet = T.tiny_pixel_unet(sample_size=16) if not latent else None
    parts = {
        "unet": add_lora(unet, rank=rank, init_lora_weights=lora_init),
        "quality_head": kwargs.pop("quality_head", T.TinyQualityHead()),
        "noise_scheduler": kwargs.pop("noise_scheduler", T.tiny_scheduler()),
        "vae": T.tiny_vae() if latent else None,
    }
    if conditional:
        parts["text_encoder"] = T.tiny_text_encoder()
        parts["tokenizer"] = T.tiny_tokenizer(str(tokenizer_dir) if tokenizer_dir else None)
    return ACPOModule(**parts, **kwargs)


def quiet_trainer(tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary; ``kwargs`` override."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def loss_and_gradients(module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One data step's loss on ``batch`` (step generator seeded 7) and its trainable gradients."""
    module.train()
    module.zero_grad(set_to_none=True)
    terms, _ = module.compute_terms(batch, torch.Generator().manual_seed(7))
    terms.loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return terms.loss.detach(), grads


def shapes_batch(size: int = 4, image_size: int = 32) -> dict:
    from acpo_lightning.data import ShapesDataset, collate_prompt_images

    dataset = ShapesDataset(length=size, size=image_size)
    return collate_prompt_images([dataset[i] for i in range(size)])


def run_acpo(
    args: list[str],
    cwd: Path,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = 300,
    base_env: Mapping[str, str] | None = None,
    **env: str,
) -> subprocess.CompletedProcess:
    """``python -m acpo_lightning ARGS`` in ``cwd``: offline, no ``ACPO_DEBUG``, output captured.

    ``base_env`` replaces ``os.environ`` as the environment the child starts from; ``env`` adds to it.
    """
    environment = {**(os.environ if base_env is None else base_env), "HF_HUB_OFFLINE": "1", **env}
    environment.pop("ACPO_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "acpo_lightning", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def rollout_terms(module, prompts, count, generator, host_generator=None):
    """One rollout of ``module``'s rollout objective, as a training step would run it."""
    return module.objectives.rollout.terms(
        module.context(), prompts, count, generator, host_generator
    )
