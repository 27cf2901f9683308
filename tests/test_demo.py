"""The embedded demo: Fashion-MNIST loading, captions, shipped weights and a smoke fit of demo.yaml."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from acpo_demo import fashion
from acpo_demo.fashion import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    VAL_TEMPLATES,
    FashionMNISTDataModule,
    FashionMNISTNotFoundError,
    all_captions,
    caption,
    find_fashion_mnist,
    load_fashion_mnist,
)
from conftest import CONFIGS

WEIGHTS = fashion.Path(__file__).resolve().parents[1] / "src/acpo_demo/weights"


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    """A fake Fashion-MNIST folder (IDX files of random images) selected through the env var."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("t10k", 20)):
        _write_idx(
            tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28))
        )
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path))
    return tmp_path


def test_missing_fashion_mnist_names_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(fashion.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FashionMNISTNotFoundError) as info:
        find_fashion_mnist(tmp_path / "empty")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "torchvision" in message and fashion.ENV_VAR in message
    with pytest.raises(FashionMNISTNotFoundError):
        FashionMNISTDataModule(root=str(tmp_path / "empty"))


def test_idx_images_are_padded_to_32_in_minus_one_one(tiny_fashion) -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (20, 3, 32, 32) and labels.tolist() == [i % 10 for i in range(20)]
    assert images.min() >= -1 and images.max() <= 1
    assert torch.all(images[:, :, :2] == -1) and torch.all(images[:, :, :, -2:] == -1)
    assert torch.equal(images[:, 0], images[:, 2])  # grayscale in three channels
    with gzip.open(tiny_fashion / "t10k-images-idx3-ubyte.gz") as handle:
        raw = handle.read()[16:]
    assert images[0, 0, 2, 2].item() == pytest.approx(raw[0] / 127.5 - 1)


def test_captions_use_the_class_and_three_disjoint_wording_sets() -> None:
    assert caption(9, template=1, synonym=0) == "a product shot of an ankle boot"
    sets = {w: {c for _, c in all_captions(w)} for w in ("train", "val", "heldout")}
    assert not sets["train"] & sets["heldout"] and not sets["train"] & sets["val"]
    assert not sets["val"] & sets["heldout"]
    templates = (TRAIN_TEMPLATES, VAL_TEMPLATES, HELDOUT_TEMPLATES)
    assert len({t for group in templates for t in group}) == sum(map(len, templates))
    assert len(sets["train"]) == 10 * len(TRAIN_TEMPLATES) * 3
    with pytest.raises(ValueError, match=r"wording='test'.*heldout"):
        caption(0, wording="test")


def test_datamodule_batches_prompts_images_and_labels(tiny_fashion) -> None:
    data = FashionMNISTDataModule(batch_size=8, val_size=4)
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and len(batch["prompts"]) == 8
    for prompt, label in zip(batch["prompts"], batch["labels"].tolist(), strict=True):
        assert prompt in {c for lab, c in all_captions("train") if lab == label}
    val = next(iter(data.val_dataloader()))
    assert all(p in {c for _, c in all_captions("val")} for p in val["prompts"])


def test_minilm_loads_offline_with_the_demo_prompt_length() -> None:
    from acpo_demo import load_minilm, load_minilm_tokenizer

    tokenizer, encoder = load_minilm_tokenizer(), load_minilm()
    longest = max(
        len(tokenizer(c).input_ids) for _, c in all_captions("train") + all_captions("heldout")
    )
    assert longest <= tokenizer.model_max_length == 16
    ids = tokenizer(
        ["a sneaker"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    assert encoder(ids)[0].shape == (1, 16, 384)


# ------------------------------------------------------------------------------ shipped weights
def _manifest() -> dict:
    path = WEIGHTS / "manifest.json"
    if not path.exists():
        pytest.skip("demo weights not built (make pretrain-demo)")
    return json.loads(path.read_text())


def test_manifest_records_how_each_shipped_model_was_made() -> None:
    manifest = _manifest()
    for part in ("vae", "unet", "classifier", "guidance_iqa", "eval_iqa"):
        assert part in manifest and "command" in manifest[part], part
        assert (WEIGHTS / part).is_dir(), part
    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size < 40e6


# ------------------------------------------------------------------ where retraining writes
def test_pretrain_defaults_to_the_checkouts_weights_folder() -> None:
    from acpo_demo.pretrain import default_out

    # these tests run from a source checkout, where the shipped weights are rebuilt in place
    assert default_out() == WEIGHTS.resolve()


def test_pretrain_never_writes_into_an_installed_package_by_default(
    tmp_path, monkeypatch, capsys
) -> None:
    from acpo_demo import pretrain

    installed = tmp_path / "lib" / "python3.11" / "site-packages" / "acpo_demo"
    installed.mkdir(parents=True)
    monkeypatch.setattr(pretrain, "PACKAGE_DIR", installed)
    with pytest.raises(SystemExit) as info:  # before any data is read or folder made
        pretrain.main(["vae", "--data", str(tmp_path / "no-data"), "--max-steps", "0"])
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert str(installed / "weights") in message and "installed package" in message
    assert "--out <folder>" in message
    assert list(installed.iterdir()) == []
    with pytest.raises(ValueError, match="installed package"):
        pretrain.default_out(installed)


def test_pretrain_writes_where_out_says(tmp_path, monkeypatch) -> None:
    from acpo_demo import pretrain

    installed = tmp_path / "site-packages" / "acpo_demo"
    installed.mkdir(parents=True)
    monkeypatch.setattr(pretrain, "PACKAGE_DIR", installed)
    seen = []  # the training itself is not under test here: only the folder it is given
    monkeypatch.setattr(pretrain, "train_vae", lambda args: seen.append(args.out))
    pretrain.main(["vae", "--out", str(tmp_path / "mine")])
    assert seen == [tmp_path / "mine"] and (tmp_path / "mine").is_dir()
    assert list(installed.iterdir()) == []


# The figures below are measured on the manifest's own images, with its own seeds, so the only
# legitimate difference is float32 rounding, which moves them by 1e-8 relative here (1 or 2
# threads, batch sizes 100 to 500; the manifest's figures are reproduced bit for bit). Each
# tolerance is derived from a generous bound on that rounding (~1e-5 relative on a network's
# outputs: float32 eps x sqrt(fan-in) over its layers) and says what change it still catches.
@pytest.mark.slow
def test_shipped_vae_and_classifier_reproduce_their_figures() -> None:
    from acpo_demo import load_demo_classifier, load_demo_vae
    from acpo_demo.pretrain import classifier_accuracy, vae_recon_mse

    manifest = _manifest()
    test, labels = load_fashion_mnist("test")
    vae = manifest["vae"]
    mse = vae_recon_mse(load_demo_vae(), test[: vae["test_recon_mse_images"]])
    # 1e-5 relative on reconstructions with errors of rms 0.07 moves the MSE by < 3e-5 relative;
    # catches a 1e-4 change (the first 200 images alone, compared before, differ by 6 %)
    assert mse == pytest.approx(vae["test_recon_mse"], rel=1e-4)
    count = manifest["classifier"]["test_images"]
    accuracy = classifier_accuracy(load_demo_classifier(), test[:count], labels[:count])
    # a verdict can flip only where the top two logits (|logit| <= 8) are within rounding; two of
    # the 10,000 images have them within 1e-3, so 2 flips at most: catches 3 changed verdicts
    assert accuracy == pytest.approx(manifest["classifier"]["test_accuracy"], abs=2.5e-4)


@pytest.mark.slow
def test_shipped_quality_models_reproduce_their_srocc() -> None:
    from acpo_demo import load_demo_evaluator, load_demo_guidance_head
    from acpo_demo.evaluator import ladders
    from acpo_demo.pretrain import ladder_srocc, srocc
    from acpo_lightning.quality.iqa_data import SyntheticDistortionDataset

    manifest = _manifest()
    test, _ = load_fashion_mnist("test")
    # pretrain.train_evaluator: the first test_ladders test images, ladder seed 123; an SROCC moves
    # only when two of its scores swap ranks, which rounding (~1e-5 relative) does not do to
    # scores this far apart (equal across thread counts here): 1e-4 catches any real change
    # (the 60-ladder subset compared before differed by 0.03)
    evaluator = manifest["eval_iqa"]
    real = (test[: evaluator["test_ladders"]] + 1) / 2
    value = ladder_srocc(load_demo_evaluator(), real, lambda x, g: ladders(x, 4, g))
    assert value == pytest.approx(evaluator["test_ladder_srocc"], abs=1e-4)
    # pretrain.train_guidance: test[: real // 5] with real = 3000 (600 held-out images),
    # distortion seed = seed + 2; same tolerance and reasoning (measured 1.2e-7)
    guidance = manifest["guidance_iqa"]
    held_out = (test[:600] + 1) / 2
    synthetic = SyntheticDistortionDataset(held_out, size=32, levels=4, seed=guidance["seed"] + 2)
    stacks = torch.stack([synthetic[i]["images"] for i in range(len(synthetic))])
    targets = torch.stack([synthetic[i]["target"] for i in range(len(synthetic))])
    with torch.no_grad():
        value = srocc(load_demo_guidance_head()(stacks.flatten(0, 1)), targets.flatten())
    assert value == pytest.approx(guidance["test_ladder_srocc"], abs=1e-4)


# --------------------------------------------------------------------------------- smoke run
@pytest.mark.slow
def test_demo_config_fits_a_few_rollout_steps_and_exports_the_lora(tiny_fashion, tmp_path) -> None:
    """demo.yaml through the study's overlay (its callbacks, moved into the run folder): it trains,
    logs the proxy and the independent evaluator on the same validation images, keeps the best
    LoRA and exports the last."""
    _manifest()
    from acpo_demo.ablations.runs import fit_overlay, read_curves
    from acpo_demo.evaluate import lora_layout
    from acpo_demo.study import study_overlay

    out = tmp_path / "run"
    tree = study_overlay({}, 0, out, max_steps=2, batch_size=4)
    tree["model"].update({"rollout_steps": 4, "k_late": 2})
    for callback in tree["trainer"]["callbacks"]:
        if "every_n_steps" in callback["init_args"]:
            callback["init_args"].update(every_n_steps=2, prompts=str(
                CONFIGS.parent / callback["init_args"]["prompts"]))  # fmt: skip
    fit_overlay(tree, out)
    rank, targets = lora_layout(out / "lora" / "last")
    assert rank == 8 and {"to_q", "conv1"} <= set(targets)
    curves = read_curves(out, ("val/",))
    assert {"val/guidance_iqa", "val/eval_iqa", "val/eval_iqa_base"} <= set(curves)
    assert [s for s, _ in curves["val/eval_iqa"]] == [2]
    best = json.loads((out / "lora" / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["value"] == pytest.approx(curves["val/eval_iqa"][0][1])
    assert lora_layout(out / "lora" / "best") == (rank, targets)


def test_the_demos_head_sized_crop_is_its_whole_image_path() -> None:
    """The demo's images are 32 px and its guidance head takes 32 px: its head-sized crop is the
    whole image, and the data and rollout terms with ``perceptual_crop: 32`` equal those without,
    bit for bit. A smaller crop would be upsampled into the head's blur range (another signal)."""
    import acpo_demo as demo
    from acpo_lightning import ACPOModule
    from acpo_lightning.models import add_lora

    def module(crop):
        torch.manual_seed(0)
        unet = add_lora(demo.load_demo_unet(), rank=8, init_lora_weights=False)
        return ACPOModule(
            unet=unet, quality_head=demo.load_demo_guidance_head(),
            noise_scheduler=demo.load_demo_scheduler(), sample_scheduler=demo.load_demo_sampler(),
            vae=demo.load_demo_vae(), text_encoder=demo.load_minilm(),
            tokenizer=demo.load_minilm_tokenizer(), max_prompt_length=16, w_perc=1.0,
            perceptual_share=0.5, rollout_steps=3, k_late=2, perceptual_crop=crop,
        ).train()  # fmt: skip

    prompts = [caption(label) for label in range(4)]
    batch = {"pixel_values": torch.rand(4, 3, 32, 32) * 2 - 1, "prompts": prompts}
    results = []
    for crop in (None, 32, 16):
        m = module(crop)
        terms, _ = m.compute_terms(batch, torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        roll = m.objectives.rollout.terms(m.context(), prompts[:2], 2, generator)
        results.append((terms.perc, roll.perc))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))
    assert not torch.equal(results[2][0], results[0][0])  # a 16-px crop is scored differently


# ---------------------------------------------------------------------------------- evaluation
def test_heldout_evaluation_prompts_cover_every_class_with_unseen_wordings() -> None:
    from acpo_demo.evaluate import heldout_prompts

    prompts, labels = heldout_prompts(per_class=2)
    assert sorted(set(labels)) == list(range(10)) and len(prompts) == 20
    assert not set(prompts) & {c for _, c in all_captions("train")}


def test_mean_ci_is_the_student_t_interval() -> None:
    from acpo_demo.evaluate import mean_ci

    mean, half = mean_ci(torch.tensor([1.0, 2.0, 3.0]))
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.303 / 3**0.5, rel=1e-3)


def test_classifier_features_feed_torchmetrics_kid() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    from acpo_demo.classifier import ClassifierFeatures, FashionClassifier

    torch.manual_seed(0)
    net = FashionClassifier(width=8, feature_dim=16).requires_grad_(False).eval()
    extractor = ClassifierFeatures(net)
    features = extractor(torch.rand(4, 3, 32, 32))
    assert features.norm(dim=1).tolist() == pytest.approx([4.0] * 4, rel=1e-4)
    kid = KernelInceptionDistance(feature=extractor, subset_size=8, subsets=4)
    same = torch.rand(16, 3, 32, 32)
    kid.update(same, real=True)
    kid.update(same, real=False)
    # identical sets: an unbiased estimate of 0 whose subset noise is -4e-4 with this seed (not
    # rounding); a set at half the brightness scores 0.029
    assert abs(float(kid.compute()[0])) < 1e-3


@pytest.mark.slow
def test_shipped_base_model_follows_held_out_prompts() -> None:
    from acpo_demo.pretrain import base_consistency

    recorded = _manifest()["base_checks"]["base_cfg3"]
    # the manifest's 80 images: 4 seeds x 20 held-out prompts (2 per class)
    measured = base_consistency(None, seeds=recorded["images"] // 20, guidance_scale=3.0)
    # the nearest classifier verdict is 0.054 in probability from flipping, rounding moves the
    # probabilities by ~1e-7 here: every verdict must match (catches one changed verdict, 1/80)
    assert measured["consistency"] == pytest.approx(recorded["consistency"], abs=1e-6)
    # mean probability of the prompted class; catches a 1e-4 shift (measured 1.2e-7)
    assert measured["consistency_prob"] == pytest.approx(recorded["consistency_prob"], abs=1e-4)


def test_real_and_generated_rows_of_the_guidance_data_are_both_on_the_8_bit_grid() -> None:
    """The real images are 8-bit; the base model's samples must be too, or the head can learn
    'off the grid means generated' instead of what the samples get wrong."""
    from acpo_demo.pretrain import RealVsGeneratedDataset

    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (3, 3, 32, 32), generator=generator) / 255
    generated = torch.rand(5, 3, 32, 32, generator=generator)  # a sampler's continuous output
    data = RealVsGeneratedDataset(real, generated, k=4)
    for i in range(len(data)):
        item = data[i]
        levels = item["images"].double() * 255
        distance = (levels - levels.round()).abs().amax(dim=(1, 2, 3))
        # k / 255 in float32: within 255 * eps of k after scaling back
        assert distance.max() <= 255 * torch.finfo(torch.float32).eps, distance.tolist()
        assert item["target"].tolist() == [1.0, 0.5, 0.5, 0.5, 0.5]
