"""Built-in quality heads: TwoStream (model, data, training, export) and the composite head."""

from __future__ import annotations

import csv
import functools
import json
import math
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn

from acpo_lightning.quality import (
    CompositeQualityHead,
    QualityHead,
    SharpnessHead,
    TwoStreamIQA,
    TwoStreamNet,
    check_quality_head,
    normalize_quality,
)
from acpo_lightning.quality.base import resize_to_native
from acpo_lightning.quality.distortions import DISTORTIONS, distort
from acpo_lightning.quality.iqa_data import (
    IQADataModule,
    MOSManifestDataset,
    SyntheticDistortionDataset,
)
from acpo_lightning.quality.training import IQATrainingModule, pairwise_ranking_loss, plcc_loss
from conftest import quiet_trainer


def procedural_images(count: int, size: int = 32, seed: int = 0) -> Tensor:
    """Photo-like test images: a colour ramp, a sinusoidal texture and a few hard-edged shapes."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(count):
        angle = float(rand(1)) * math.pi
        ramp = (xx * math.cos(angle) + yy * math.sin(angle)).clamp(0, 1)
        image = rand(3, 1, 1) * (1 - ramp) + rand(3, 1, 1) * ramp
        axis = xx if float(rand(1)) < 0.5 else yy
        image = image + 0.15 * torch.sin(2 * math.pi * (4 + 8 * float(rand(1))) * axis)
        for _ in range(3):
            cy, cx, r = float(rand(1)), float(rand(1)), 0.1 + 0.3 * float(rand(1))
            if float(rand(1)) < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            image = torch.where(mask, rand(3, 1, 1).expand(3, size, size), image)
        images.append(image.clamp(0, 1))
    return torch.stack(images)


def tiny_net(seed: int = 0) -> TwoStreamNet:
    torch.manual_seed(seed)
    return TwoStreamNet(channels=(8, 16), hidden=16, native_size=32)


class MeanBrightness(QualityHead):
    """Mean pixel value with a configurable direction and range: a head whose math is checkable by hand."""

    def __init__(self, higher_is_better: bool, score_range: tuple[float, float]) -> None:
        super().__init__()
        self.higher_is_better, self.score_range = higher_is_better, score_range
        self.freeze()

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return images.mean(dim=(1, 2, 3))


def _heads() -> dict[str, QualityHead]:
    return {
        "two_stream": TwoStreamIQA(net=tiny_net()),
        "composite": CompositeQualityHead(
            [TwoStreamIQA(net=tiny_net()), SharpnessHead()], [1.0, 0.5]
        ),
    }


# ---------------------------------------------------------------- the head contract


@pytest.mark.parametrize("name", ["two_stream", "composite"])
def test_gradient_reaches_input_not_weights(name: str) -> None:
    head = _heads()[name]
    images = procedural_images(2, size=48).requires_grad_(True)
    head(images).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in head.parameters())
    assert sum(p.numel() for p in head.parameters()) > 0


@pytest.mark.parametrize("path", ["head", "net"])
def test_resize_to_native_size_spreads_the_gradient_over_every_pixel(path: str) -> None:
    """256 px down to the native 32: an aliased bilinear resize reads 2x2 of every 8x8 pixels, so
    the reward's gradient reaches 1/16 of them (6.25 %), a grid that invites high-frequency reward
    hacking; the antialiased (triangle filter) resize reaches every pixel."""
    net = tiny_net()
    score = TwoStreamIQA(net=net) if path == "head" else net  # QualityHead.forward / net.logits
    images = procedural_images(1, size=256).requires_grad_(True)
    score(images).sum().backward()
    reached = (images.grad.abs().sum(dim=1) > 0).float().mean().item()
    assert reached > 0.99, f"the gradient reaches {reached:.2%} of the pixels"
    expected = torch.nn.functional.interpolate(
        images.detach(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False
    )
    torch.testing.assert_close(score(images.detach()), score(expected), rtol=0, atol=0)
    half = images.detach().bfloat16()  # torch has no bf16 antialias kernel on the CPU
    expected = torch.nn.functional.interpolate(
        half.float(), size=(32, 32), mode="bilinear", antialias=True
    )
    assert torch.equal(resize_to_native(half, 32), expected.bfloat16())


@pytest.mark.parametrize("name", ["two_stream", "composite"])
@pytest.mark.parametrize("fill", [0.0, 0.5, 1.0], ids=["black", "flat", "white"])
def test_flat_images_give_finite_scores_and_gradients(name: str, fill: float) -> None:
    head = _heads()[name]
    images = torch.full((2, 3, 32, 32), fill, requires_grad=True)
    scores = head(images)
    scores.sum().backward()
    assert torch.isfinite(scores).all()
    assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("name", ["two_stream", "composite"])
def test_eval_mode_survives_parent_train(name: str) -> None:
    head = _heads()[name]
    parent = nn.ModuleDict({"head": head, "trainable": nn.Linear(2, 2)})
    parent.train()
    assert parent["trainable"].training
    assert not any(module.training for module in head.modules())
    check_quality_head(head, (32, 32), torch.device("cpu"))


def test_sobel_stream_sees_a_vertical_edge_by_hand() -> None:
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 1.0  # luma of white is 0.299 + 0.587 + 0.114 = 1
    maps = TwoStreamNet(channels=(4,), hidden=4, native_size=8).gradient_maps(image)
    gx, gy, magnitude = maps[0]
    expected_gx = torch.zeros(8, 8)
    expected_gx[:, 3:5] = 1.0  # (1 + 2 + 1) / 4 on both sides of the edge
    torch.testing.assert_close(gx, expected_gx)
    torch.testing.assert_close(gy, torch.zeros(8, 8))
    torch.testing.assert_close(magnitude, torch.sqrt(expected_gx**2 + 1e-6))


def test_pyiqa_head_without_the_extra_says_how_to_install(monkeypatch) -> None:
    from acpo_lightning.quality.pyiqa_head import PyiqaQualityHead

    monkeypatch.setitem(sys.modules, "pyiqa", None)  # what Python does when pyiqa is absent
    with pytest.raises(ImportError, match=r"acpo-lightning\[iqa\]"):
        PyiqaQualityHead("niqe")


@pytest.mark.slow
def test_quality_package_imports_neither_pyiqa_nor_lightning_training() -> None:
    code = (
        "import sys, acpo_lightning.quality as q; "
        "assert 'pyiqa' not in sys.modules and 'acpo_lightning.quality.training' not in sys.modules; "
        "q.PyiqaQualityHead; assert 'pyiqa' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---------------------------------------------------------------- export / import


def test_from_pretrained_round_trip_is_exact(tmp_path) -> None:
    net = tiny_net(seed=3)
    folder = net.save_pretrained(tmp_path / "iqa", metadata={"data": "procedural"})
    head = TwoStreamIQA.from_pretrained(folder)
    loaded = head.net.state_dict()
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    images = procedural_images(3, size=32)
    assert torch.equal(head(images), net(images).detach())
    assert head.metadata == {"data": "procedural"}
    config = json.loads((folder / "config.json").read_text())
    assert config["channels"] == [8, 16] and config["native_size"] == 32
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        assert set(weights.keys()) == set(loaded)  # Sobel/luma buffers are not stored
    assert torch.equal(
        TwoStreamIQA.from_pretrained(folder / "model.safetensors")(images), head(images)
    )


def test_from_pretrained_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        TwoStreamIQA.from_pretrained(tmp_path)
    folder = tiny_net().save_pretrained(tmp_path / "iqa")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "channels": [8, 32]}))
    with pytest.raises(ValueError, match="does not match"):
        TwoStreamIQA.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "MANIQA"}))
    with pytest.raises(ValueError, match="'MANIQA'"):
        TwoStreamIQA.from_pretrained(folder)


# ---------------------------------------------------------------- distortions and data


@pytest.mark.parametrize("kind", sorted(DISTORTIONS))
def test_distortions_grow_with_strength(kind: str) -> None:
    image = procedural_images(1, size=32, seed=1)[0]
    pristine = distort(image, kind, 0.0)
    assert torch.equal(pristine, (image * 255).round() / 255)
    errors = []
    for strength in (0.25, 0.5, 0.75, 1.0):
        out = distort(image, kind, strength, torch.Generator().manual_seed(0))
        assert out.shape == image.shape and torch.equal(out, (out * 255).round() / 255)
        errors.append(float((out - pristine).pow(2).mean()))
    assert errors == sorted(errors) and errors[0] > 0, errors


def test_distort_rejects_bad_arguments() -> None:
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="'sharpen'"):
        distort(image, "sharpen", 0.5)
    with pytest.raises(ValueError, match=r"1\.5"):
        distort(image, "blur", 1.5)


def test_synthetic_dataset_is_a_deterministic_ladder() -> None:
    data = SyntheticDistortionDataset(procedural_images(3, size=16), size=16, levels=2)
    assert len(data) == 3 * len(DISTORTIONS)
    item = data[1]
    assert item["images"].shape == (3, 3, 16, 16)
    assert item["target"].tolist() == [1.0, 0.5, 0.0]
    assert torch.equal(item["images"], data[1]["images"])


def _grid_distance(images: Tensor) -> float:
    """The largest distance of a pixel to the 8-bit grid, in levels (0 on the grid, 0.5 at most)."""
    levels = images.double() * 255
    return float((levels - levels.round()).abs().max())


# k / 255 in float32 is within half an ulp (2**-24 relative) of k / 255: times 255, under 255 * eps
ON_GRID = 255 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("kind", sorted(DISTORTIONS))
def test_ladders_at_small_sizes_are_distinct_monotone_and_on_the_8_bit_grid(kind: str) -> None:
    """At 16 px with 8 levels every step is a different image, farther from the pristine one
    (mean squared error) than the step below: downscale gave one size at two levels (6 px at
    levels 4 and 5), JPEG could come closer at a lower quality."""
    data = SyntheticDistortionDataset(
        procedural_images(20, size=16, seed=2), size=16, levels=8, distortions=[kind]
    )
    flat, backwards = [], []
    for i in range(len(data)):
        ladder = data[i]["images"]
        assert _grid_distance(ladder) <= ON_GRID
        errors = [float((rung - ladder[0]).double().pow(2).mean()) for rung in ladder]
        flat += [
            (i, level) for level in range(1, 9) if torch.equal(ladder[level], ladder[level - 1])
        ]
        backwards += [(i, level) for level in range(1, 9) if errors[level] <= errors[level - 1]]
    assert flat == [] and backwards == [], (len(flat), len(backwards))


def test_ladder_settings_with_too_few_distinct_steps_are_refused() -> None:
    with pytest.raises(ValueError, match=r"levels=8 .* downscale has for 4x4 px.*levels <= 3"):
        SyntheticDistortionDataset(torch.rand(2, 3, 4, 4), size=4, levels=8)
    with pytest.raises(ValueError, match=r"levels=100 .*94 distinct settings jpeg.*levels <= 94"):
        SyntheticDistortionDataset(torch.rand(2, 3, 8, 8), size=8, levels=100, distortions=["jpeg"])
    SyntheticDistortionDataset(torch.rand(2, 3, 4, 4), size=4, levels=3)  # enough room


def test_from_manifest_splits_by_source_image_not_by_row(tmp_path) -> None:
    """A manifest that lists each image twice (two raters' rows) keeps both rows in one split."""
    _write_manifest(tmp_path, [1.0, 3.0, 2.0, 5.0, 4.0, 2.5])
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    (tmp_path / "scores.csv").write_text("\n".join([*rows, *rows[1:]]) + "\n")  # 12 rows
    data = IQADataModule.from_manifest(tmp_path / "scores.csv", val_fraction=0.5, size=16)
    train, val = set(data.train_dataset.names), set(data.val_dataset.names)
    assert train & val == set() and len(train | val) == 6
    assert len(data.train_dataset) + len(data.val_dataset) == 12
    assert len(data.train_dataset) == 2 * len(train) and len(data.val_dataset) == 2 * len(val)


def _write_manifest(folder, scores: list[float]) -> None:
    images = procedural_images(len(scores), size=24)
    with (folder / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "c1", "MOS"])
        for i, score in enumerate(scores):
            array = (images[i].permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(array).save(folder / f"img{i}.png")
            writer.writerow([f"img{i}.png", 0, score])


def test_mos_manifest_koniq_layout(tmp_path) -> None:
    _write_manifest(tmp_path, [1.0, 2.0, 4.0, 5.0])
    data = MOSManifestDataset(tmp_path / "scores.csv", size=16)
    assert data.mos_range == (1.0, 5.0)
    assert [float(data[i]["target"]) for i in range(4)] == [0.0, 0.25, 0.75, 1.0]
    assert data[0]["images"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"\['score'\]"):
        MOSManifestDataset(tmp_path / "scores.csv", score_column="score")


# ---------------------------------------------------------------- training


def test_ranking_and_plcc_losses_by_hand() -> None:
    logits, target = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    same = pairwise_ranking_loss(logits, target, torch.tensor([0, 0]))
    assert same.item() == pytest.approx(math.log1p(math.exp(-2.0)))
    apart = pairwise_ranking_loss(logits.requires_grad_(True), target, torch.tensor([0, 1]))
    assert apart.item() == 0.0 and apart.requires_grad
    assert plcc_loss(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])
    ).item() == pytest.approx(0.0)
    assert plcc_loss(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(0.5)


def _trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**kwargs)


@pytest.mark.slow
def test_self_supervised_training_improves_srocc_and_exports(tmp_path, quiet_single_thread) -> None:
    pl.seed_everything(0, verbose=False)
    data = IQADataModule.from_images(
        procedural_images(64), val_fraction=0.25, size=32, batch_size=8
    )
    module = IQATrainingModule(tiny_net(), optimizer=functools.partial(torch.optim.AdamW, lr=5e-3))
    trainer = _trainer(max_epochs=5)
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    assert after["val/srocc"] > before["val/srocc"] + 0.3, (before, after)
    assert after["val/srocc"] > 0.5 and after["val/plcc"] > 0.4, after  # measured: 0.66, 0.57

    head = TwoStreamIQA.from_pretrained(
        module.export(tmp_path / "iqa", metadata={"data": "procedural"})
    )
    images = procedural_images(4, seed=9)
    assert torch.equal(head(images), module.net(images).detach())
    assert head.metadata["val/srocc"] == pytest.approx(after["val/srocc"])
    assert head.metadata["data"] == "procedural"


def test_mos_training_step_runs_on_a_manifest(tmp_path, quiet_single_thread) -> None:
    _write_manifest(tmp_path, [1.0, 3.0, 2.0, 5.0, 4.0, 2.5, 3.5, 1.5])
    data = IQADataModule.from_manifest(
        tmp_path / "scores.csv", val_fraction=0.25, size=32, batch_size=4
    )
    assert len(data.train_dataset) == 6 and data.val_dataset.mos_range == (1.0, 5.0)
    module = IQATrainingModule(tiny_net(), plcc_weight=0.5)
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    _trainer(fast_dev_run=True).fit(module, data)
    assert any(not torch.equal(start[k], v) for k, v in module.net.state_dict().items())
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])


# ---------------------------------------------------------------- composite


def test_composite_math_by_hand() -> None:
    lower = MeanBrightness(higher_is_better=False, score_range=(0.0, 2.0))
    higher = MeanBrightness(higher_is_better=True, score_range=(-1.0, 1.0))
    head = CompositeQualityHead([lower, higher], weights=[2.0, 0.5], names=["dark", "bright"])
    images = torch.full((2, 3, 4, 4), 0.25)
    # lower: (2 - 0.25) / 2 = 0.875; higher: (0.25 + 1) / 2 = 0.625; 2 * 0.875 + 0.5 * 0.625 = 2.0625
    assert head(images).tolist() == pytest.approx([2.0625, 2.0625])
    assert head.higher_is_better is True and head.score_range == (0.0, 2.5)
    parts = head.component_scores(images)
    assert parts["dark"].tolist() == pytest.approx([0.875] * 2)
    assert parts["bright"].tolist() == pytest.approx([0.625] * 2)
    assert normalize_quality(torch.tensor(3.0), False, (0.0, 2.0)).item() == -0.5  # not clamped


def test_composite_rejects_bad_configuration() -> None:
    head = MeanBrightness(True, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"\[1.0, -1.0\]"):
        CompositeQualityHead([head, head], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="2 heads"):
        CompositeQualityHead([head, head], weights=[1.0])
    with pytest.raises(ValueError, match="distinct"):
        CompositeQualityHead([head, head], names=["a", "a"])
    broken = MeanBrightness(True, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(1.0, 1.0\)"):
        CompositeQualityHead([broken])
    assert CompositeQualityHead([head, head]).names == ["MeanBrightness", "MeanBrightness_2"]
