"""ACPOModule in a user's own Lightning pipeline: their Trainer, DataLoader, checkpoints (issue 24, 20)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from acpo_lightning import ACPOModule
from conftest import make_module, shapes_batch

# these fits train without a validation loader on purpose, as a user's first run may
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a red circle", "a blue square"]


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _alone(module: ACPOModule, prompt: str, index: int) -> torch.Tensor:
    return module.generate([prompt], seed=module.seed + index)[0]


@pytest.mark.parametrize("batch_size", [2, 4])
def test_a_users_prediction_loader_without_indices_seeds_each_prompt_by_its_position(
    tokenizer_dir, tmp_path, batch_size: int
) -> None:
    """A plain DataLoader of ``{"prompts": str}`` rows (no ``indices``): a short last batch is
    seeded by its prompts' positions (Lightning's recorded batch indices), not by its length."""
    module = make_module(tokenizer_dir, num_inference_steps=2, seed=7)
    loader = DataLoader([{"prompts": p} for p in PROMPTS], batch_size=batch_size)
    outputs = _trainer(tmp_path).predict(module, loader)
    seeds = [seed for out in outputs for seed in out["seeds"]]
    assert seeds == [7 + i for i in range(len(PROMPTS))]
    last = outputs[-1]
    torch.testing.assert_close(
        last["images"][-1], _alone(module, PROMPTS[-1], len(PROMPTS) - 1), rtol=0, atol=1e-5
    )


@pytest.mark.filterwarnings("ignore:Your `predict_dataloader`'s sampler has shuffling enabled")
def test_a_shuffled_prediction_loader_seeds_each_prompt_by_its_dataset_index(
    tokenizer_dir, tmp_path
) -> None:
    module = make_module(tokenizer_dir, num_inference_steps=2, seed=3)
    rows = [{"prompts": p} for p in PROMPTS]
    loader = DataLoader(
        rows, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    outputs = _trainer(tmp_path).predict(module, loader)
    pairs = {p: s for out in outputs for p, s in zip(out["prompts"], out["seeds"], strict=True)}
    assert pairs == {p: 3 + i for i, p in enumerate(PROMPTS)}


def _images_loader(pixels: torch.Tensor) -> DataLoader:
    rows = [{"pixel_values": p, "prompts": PROMPTS[i % 5]} for i, p in enumerate(pixels)]
    return DataLoader(rows, batch_size=2)


def _bad_pixel_cases() -> dict[str, tuple[torch.Tensor, str]]:
    good = shapes_batch(4)["pixel_values"]  # [-1, 1] float
    uint8 = ((good + 1) * 127.5).round().to(torch.uint8)
    return {
        "uint8": (uint8, r"torch.uint8 \(values \d+ to \d+\).*float images in \[-1, 1\]"),
        "float 0..255": (uint8.float(), r"lie in \[\d+, \d+\].*x / 127.5 - 1"),
        "channels last": (good.permute(0, 2, 3, 1), r"channels last.*permute\(0, 3, 1, 2\)"),
    }


@pytest.mark.parametrize("case", sorted(_bad_pixel_cases()))
def test_a_bad_pixel_batch_is_refused_at_the_first_step_naming_its_format(
    tokenizer_dir, tmp_path, case: str
) -> None:
    pixels, message = _bad_pixel_cases()[case]
    module = make_module(tokenizer_dir)
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, max_steps=1).fit(module, _images_loader(pixels))
    assert module.global_step == 0  # refused before any update


def test_zero_one_images_warn_once_in_one_line(tokenizer_dir, tmp_path) -> None:
    pixels = (shapes_batch(4)["pixel_values"] + 1) / 2
    module = make_module(tokenizer_dir)
    with pytest.warns(UserWarning, match=r"as \[0, 1\] images would.*x \* 2 - 1") as record:
        _trainer(tmp_path, max_steps=2).fit(module, _images_loader(pixels))
    mine = [w for w in record if "pixel_values" in str(w.message)]
    assert len(mine) == 1 and "\n" not in str(mine[0].message)


def test_a_hand_written_loop_is_refused_at_the_first_step(tokenizer_dir) -> None:
    module = make_module(tokenizer_dir, gradient_checkpointing=True)
    module.train()
    with pytest.raises(RuntimeError, match=r"loop without a Trainer.*global_step stays 0.*Fix"):
        module.training_step(shapes_batch(), 0)


def test_lightning_fabric_is_refused_at_the_first_step(tokenizer_dir) -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    module = make_module(tokenizer_dir)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    wrapped, optimizer = fabric.setup(module, optimizer)
    with pytest.raises(RuntimeError, match=r"from Lightning Fabric; it trains under Trainer.fit"):
        wrapped.training_step(shapes_batch(), 0)


def test_step_result_is_the_training_steps_loss_outside_a_trainer(tokenizer_dir, tmp_path) -> None:
    """The documented way out of the refusal computes what ``fit``'s first step computes."""
    module = make_module(tokenizer_dir, lora_init=False, perceptual_share=0.5)
    batch = shapes_batch(2)
    module.train()
    outside = module.step_result(batch, 0, 0).terms.loss.detach()
    seen = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(outputs["loss"].detach())

    loader = DataLoader([batch], batch_size=None)
    _trainer(tmp_path, max_steps=1, callbacks=[Keep()]).fit(module, loader)
    torch.testing.assert_close(seen[0], outside, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("base", "overlay"),
    [
        ("acpo.yaml", "tiny.yaml"),
        ("sdxl.yaml", "tiny_sdxl.yaml"),
        ("sd35.yaml", "tiny_sd3.yaml"),
        ("flux.yaml", "tiny_flux.yaml"),
        ("ddpm_church.yaml", "tiny_pixel.yaml"),
    ],
)
def test_tiny_overlays_load_in_the_main_process(base: str, overlay: str, capsys) -> None:
    """The base configs' 4 image-loading workers only cost start-up time on a few tiny images."""
    import yaml

    from acpo_lightning.cli import main
    from conftest import CONFIGS

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / base), "--config", str(CONFIGS / overlay),
              "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]["num_workers"] == 0
