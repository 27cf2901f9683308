"""The demo's independent evaluator: its distortion families, their severities, the shipped weights."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from acpo_demo import fashion
from acpo_demo.evaluator import (
    EVAL_DISTORTIONS,
    EVAL_TRAIN_START,
    SEVERITY_KNOTS,
    SOFTNESS,
    STRUCTURAL,
    PatchQualityNet,
    ladders,
    severity_parameter,
    structural_distort,
)

WEIGHTS = fashion.Path(__file__).resolve().parents[1] / "src/acpo_demo/weights"
STRENGTHS = (0.25, 0.5, 0.75, 1.0)


def _garments(count: int = 16, seed: int = 0) -> torch.Tensor:
    """Fashion-MNIST-like images ``[N, 3, 32, 32]``: a textured grey blob on a black background."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centre = 16 + 4 * (torch.rand(count, 2, 1, 1, generator=gen) - 0.5)
    radius = 7 + 4 * torch.rand(count, 1, 1, generator=gen)
    inside = ((xs - centre[:, 0]) ** 2 + (ys - centre[:, 1]) ** 2).sqrt() < radius
    stripes = 0.5 + 0.3 * torch.sin(xs * 1.7 + 6 * torch.rand(count, 1, 1, generator=gen))
    texture = stripes + 0.1 * torch.rand(count, 32, 32, generator=gen)
    grey = torch.where(inside, texture, torch.zeros(()))
    return (grey.clamp(0, 1) * 255).round().div(255)[:, None].expand(-1, 3, -1, -1).contiguous()


def _sharpness(x: torch.Tensor) -> float:
    """Mean squared horizontal and vertical differences: detail a blur removes."""
    return float(x.diff(dim=2).pow(2).mean() + x.diff(dim=3).pow(2).mean())


def test_families_split_into_softness_and_structure() -> None:
    assert set(SOFTNESS) | set(STRUCTURAL) == set(EVAL_DISTORTIONS) == set(SEVERITY_KNOTS)
    # independence from the guidance head: none of its distortion names, its images left alone
    from acpo_lightning.quality.distortions import DISTORTIONS

    assert not set(DISTORTIONS) & set(EVAL_DISTORTIONS)
    assert EVAL_TRAIN_START >= 3000


@pytest.mark.parametrize("kind", EVAL_DISTORTIONS)
def test_strength_zero_leaves_the_image_as_is(kind: str) -> None:
    x = _garments()
    out = structural_distort(x, kind, torch.zeros(len(x)), torch.Generator().manual_seed(1))
    assert torch.equal(out, x)
    # and the first knot is the parameter that does nothing
    assert severity_parameter(kind, torch.zeros(1)).item() == SEVERITY_KNOTS[kind][0]


@pytest.mark.parametrize("kind", EVAL_DISTORTIONS)
def test_harm_grows_with_strength(kind: str) -> None:
    x = _garments()
    harm = []
    for s in (0.0, *STRENGTHS):
        gen = torch.Generator().manual_seed(1)  # the same draws at every strength
        out = structural_distort(x, kind, torch.full((len(x),), s), gen)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        harm.append(float((out - x).abs().mean()))
    assert harm[0] == 0 and all(a < b for a, b in itertools.pairwise(harm)), harm


@pytest.mark.parametrize("kind", SOFTNESS)
def test_softness_removes_more_detail_with_strength(kind: str) -> None:
    x = _garments()
    sharpness = [_sharpness(x)]
    for s in STRENGTHS:
        gen = torch.Generator().manual_seed(1)
        sharpness.append(_sharpness(structural_distort(x, kind, torch.full((len(x),), s), gen)))
    assert all(a > b for a, b in itertools.pairwise(sharpness)), sharpness


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"gaussian_blur.*defocus"):
        structural_distort(_garments(2), "gaussian_blur", torch.ones(2), torch.Generator())


def test_ladders_of_one_kind_start_clean_and_fall_in_target() -> None:
    x = _garments(4)
    stacks, target = ladders(x, 4, torch.Generator().manual_seed(0), kinds=("motion",))
    assert stacks.shape == (4, 5, 3, 32, 32) and target.shape == (4, 5)
    assert torch.equal(stacks[:, 0], x)
    assert torch.equal(target[0], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert _sharpness(stacks[:, 4]) < _sharpness(stacks[:, 1]) < _sharpness(x)


def test_save_and_load_keep_the_width(tmp_path) -> None:
    net = PatchQualityNet(width=8)
    net.save_pretrained(tmp_path, metadata={"note": 1})
    loaded = PatchQualityNet.from_pretrained(tmp_path)
    assert loaded.width == 8 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _garments(2)
    assert torch.allclose(loaded(x), net.eval()(x), atol=1e-6)


# ------------------------------------------------------------------------------ shipped weights
def _entry() -> dict:
    path = WEIGHTS / "manifest.json"
    if not path.exists() or "eval_iqa" not in json.loads(path.read_text()):
        pytest.skip("demo weights not built (make pretrain-demo)")
    return json.loads(path.read_text())["eval_iqa"]


def _test_images(count: int) -> torch.Tensor:
    try:
        test, _ = fashion.load_fashion_mnist("test")
    except fashion.FashionMNISTNotFoundError as error:
        pytest.skip(str(error))
    return (test[:count] + 1) / 2


def test_shipped_manifest_records_a_good_independent_evaluator() -> None:
    entry = _entry()
    assert entry["test_ladder_srocc"] >= 0.85
    assert set(entry["test_ladder_srocc_per_kind"]) == set(EVAL_DISTORTIONS)
    assert 0.5 < entry["real_vs_base_auc"] <= 1.0
    assert f"{EVAL_TRAIN_START}-" in entry["data"] and "no generated images" in entry["data"]


def test_shipped_evaluator_ranks_real_ladders_on_average() -> None:
    _entry()
    from acpo_demo import load_demo_evaluator

    net = load_demo_evaluator()
    # test images past the 400 of the manifest's figure, and a ladder seed of their own
    stacks, _ = ladders(_test_images(460)[400:], 4, torch.Generator().manual_seed(2024))
    with torch.no_grad():
        scores = net(stacks.flatten(0, 1)).view(stacks.shape[:2])
    means = scores.mean(0).tolist()
    # the margins between levels are ~0.2 in score; rounding across CPUs moves them by ~1e-6
    assert all(a > b + 0.02 for a, b in itertools.pairwise(means)), means


def test_the_evaluator_meets_the_quality_head_contract_of_the_training_curves() -> None:
    """demo.yaml's QualityHeadCallback scores with it as with any head: images and prompts in,
    one score per image out, prompts ignored."""
    from acpo_lightning.quality import check_quality_head

    net = PatchQualityNet(width=8).requires_grad_(False).eval()
    check_quality_head(net, (32, 32), torch.device("cpu"))
    images = torch.rand(3, 3, 32, 32)
    assert torch.equal(net(images, ["a", "b", "c"]), net(images))
