"""ACPOModule in a user's own Lightning pipeline: their Trainer, DataLoader, checkpoints (issue 24, 20)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from acpo_lightning import ACPOModule
from conftest import make_module, quiet_trainer, shapes_batch

# these fits train without a validation loader on purpose, as a user's first run may
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a red circle", "a blue square"]


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, **{"max_steps": 2, **kwargs})


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
    module = make_module(tokenizer_dir, perceptual_share=0.5)  # a scored sample per batch of 2
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
    from acpo_lightning.in_trainer import step_result

    module = make_module(tokenizer_dir, lora_init=False, perceptual_share=0.5)
    batch = shapes_batch(2)
    module.train()
    outside = step_result(module, batch, 0, 0).terms.loss.detach()
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


def test_the_step_seeds_are_computed_eagerly_inside_a_compiled_training_step() -> None:
    """``Trainer.fit(torch.compile(module))`` compiles ``training_step``, which mixes its seeds
    with numpy's uint64 arithmetic (dynamo's fake tensors have no uint64 shift)."""
    from acpo_lightning import seeding

    def step(x: torch.Tensor) -> torch.Tensor:
        seed = seeding.step_seed(3, "train", 5, 0, 0) ^ seeding.host_seed(3, "train", 5, 0)
        return x + seed % 1000

    compiled = torch.compile(step, backend="eager")
    expected = step(torch.zeros(()))
    torch.testing.assert_close(compiled(torch.zeros(())), expected, rtol=0, atol=0)


def _networks(tokenizer_dir) -> dict:
    """Fresh networks equal to ``make_module``'s (same seeds): what a user passes to a reload."""
    from acpo_lightning import testing as T
    from acpo_lightning.models import add_lora

    torch.manual_seed(0)
    return {
        "unet": add_lora(T.tiny_unet(sample_size=16), rank=4),
        "quality_head": T.TinyQualityHead(),
        "noise_scheduler": T.tiny_scheduler(),
        "vae": T.tiny_vae(),
        "text_encoder": T.tiny_text_encoder(),
        "tokenizer": T.tiny_tokenizer(str(tokenizer_dir)),
    }


@pytest.mark.parametrize("crop", [16, "PerceptualCrop(16, count=2, margin=1)"])
def test_a_reloaded_module_keeps_its_perceptual_crop(tokenizer_dir, tmp_path, crop) -> None:
    from acpo_lightning.crops import PerceptualCrop

    given = crop if isinstance(crop, int) else PerceptualCrop(16, count=2, margin=1)
    module = make_module(tokenizer_dir, perceptual_crop=given, perceptual_share=0.5)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, DataLoader([shapes_batch(2)], batch_size=None))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded = ACPOModule.load_from_checkpoint(tmp_path / "run.ckpt", **_networks(tokenizer_dir))
    assert repr(loaded.perceptual_crop) == repr(module.perceptual_crop)


def test_a_bare_reload_says_that_checkpoints_hold_no_networks(tokenizer_dir, tmp_path) -> None:
    module = make_module(tokenizer_dir, perceptual_share=0.5)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, DataLoader([shapes_batch(2)], batch_size=None))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(ValueError, match=r"got no unet and no quality_head: .*never the networks"):
        ACPOModule.load_from_checkpoint(tmp_path / "run.ckpt")


@pytest.mark.filterwarnings("ignore:The number of training batches")  # one batch an epoch
def test_reduce_lr_on_plateau_steps_per_epoch_on_its_monitor(tokenizer_dir, tmp_path) -> None:
    from lightning.pytorch.cli import ReduceLROnPlateau

    def factory(optimizer):
        return ReduceLROnPlateau(optimizer, monitor="val/loss", patience=0, threshold=1e9)

    module = make_module(tokenizer_dir, lr_scheduler=factory, perceptual_share=0.5)
    loader = DataLoader([shapes_batch(2)], batch_size=None)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, loader, loader)
    (config,) = trainer.lr_scheduler_configs
    assert (config.monitor, config.interval) == ("val/loss", "epoch")
    # an improvement threshold no loss meets: every epoch is a plateau, so the LR drops by the
    # default factor 0.1 at the end of each of the 2 one-step epochs
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4 * 0.1**2)


def test_a_plateau_scheduler_without_a_monitor_is_refused_with_the_fix(tokenizer_dir) -> None:
    module = make_module(
        tokenizer_dir, lr_scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o)
    )
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau without the metric.*monitor="):
        module.configure_optimizers()


def _readme_block(after: str) -> str:
    """The first ```python block of the README after the line that starts with ``after``."""
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start : text.index("```\n", start)]


def _write_tiny_pipeline(directory) -> str:
    """A local model folder in the hub's layout, with the tiny models ``configs/tiny.yaml`` builds."""
    from acpo_lightning import testing as T

    T.tiny_unet().save_pretrained(directory / "unet")
    T.tiny_vae().save_pretrained(directory / "vae")
    T.tiny_text_encoder().save_pretrained(directory / "text_encoder")
    T.tiny_tokenizer().save_pretrained(directory / "tokenizer")
    T.tiny_scheduler().save_pretrained(directory / "scheduler")
    return str(directory)


@pytest.mark.slow
def test_the_readmes_load_from_checkpoint_block_reloads_a_fit_checkpoint(
    tmp_path, monkeypatch
) -> None:
    """The README's block, run as written, on a checkpoint of ``acpo fit`` (tiny overlay, LoRA
    rank 16 as in the block); the names it takes from the "From Python" block above it are bound
    to their tiny equivalents (``sd`` a local model folder, the head a tiny one)."""
    import shutil
    import warnings

    from acpo_lightning import models
    from acpo_lightning import testing as T
    from acpo_lightning.cli import main
    from conftest import CONFIGS

    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
    lora = ["--model.unet.init_args.rank", "16", "--model.unet.init_args.alpha", "16"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *configs, *lora, "--trainer.max_steps", "2", "--trainer.logger", "false"])
    # the config saved for `acpo export` is written after ModelCheckpoint checked its folder
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert (tmp_path / "outputs/tiny/checkpoints/config.yaml").is_file()
    checkpoint = tmp_path / "outputs/acpo/checkpoints/last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "outputs/tiny/checkpoints/last.ckpt", checkpoint)

    names = {name: getattr(models, name) for name in ("add_lora", "load_unet", "load_scheduler",
             "load_vae", "load_text_encoder", "load_tokenizer")}  # fmt: skip
    namespace = {**names, "ACPOModule": ACPOModule, "sd": _write_tiny_pipeline(tmp_path / "sd")}
    namespace["PyiqaQualityHead"] = lambda name: T.TinyQualityHead()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(_readme_block("A checkpoint holds the trained LoRA"), namespace)
    assert not [w for w in caught if "instantiate_classes" in str(w.message)]
    module = namespace["module"]
    assert repr(module.perceptual_crop) == "PerceptualCrop(size=16, count=1, margin=4)"
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    lora_weights = {k: v for k, v in module.state_dict().items() if "lora_" in k}
    assert lora_weights and all(torch.equal(saved[k], v) for k, v in lora_weights.items())
    assert namespace["images"].shape == (1, 3, 32, 32)


def test_every_folder_of_the_library_is_a_listed_package() -> None:
    """setuptools warns at ``pip install`` ("importable package ... absent from `packages`") for
    a folder Python can import but the configuration leaves out: ``callbacks/prompt_lists``, which
    holds the shipped prompt lists and no ``__init__.py``."""
    from setuptools.config.setupcfg import read_configuration

    from conftest import REPO

    packages = set(read_configuration(REPO / "setup.cfg")["options"]["packages"])
    src = REPO / "src"
    folders = {
        ".".join(path.relative_to(src).parts)
        for path in (src / "acpo_lightning").rglob("*")
        if path.is_dir() and "__pycache__" not in path.parts
    } | {"acpo_lightning"}
    assert folders == packages


@pytest.mark.parametrize("subcommand", ["export", "cache-latents", "fit"])
def test_help_names_every_type_readably(subcommand: str, capsys) -> None:
    """``--help`` prints each option's type; a function object's repr is no type to a reader."""
    from acpo_lightning.cli import main

    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    text = capsys.readouterr().out
    assert "--format" in text or subcommand != "export"
    assert "<function" not in text and " at 0x" not in text
