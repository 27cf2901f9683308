"""Evaluation metrics on tiny real CLIP models written to temp dirs: formulas, inputs, preprocessing, sync."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torchmetrics import Metric

from acpo_lightning import testing as T
from acpo_lightning.metrics import MANIQA, CLIPImagePreprocess, CLIPScore, PickScore
from acpo_lightning.metrics import functional as MF
from acpo_lightning.metrics.preprocess import resized_shape
from acpo_lightning.models import ModelNotFoundError
from acpo_lightning.quality import QualityHead

PROMPTS = [
    "a red square",
    "a blue circle on grass",
    "two green triangles",
    "a cat",
    "x",
    "a dark room",
]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    # seed 4: the cosines of PROMPTS with _images() have both signs, so max(cos, 0) is exercised
    return T.write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=4)


def _images(count: int = 6, size: tuple[int, int] = (40, 56), seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(seed))


def _hand_cosine(metric, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosines through CLIPModel.forward (towers, projections, logits) and a dot product by hand."""
    model = metric.model
    pixels = metric.preprocess(images)
    tokens = metric.tokenizer(
        prompts, padding=True, truncation=True, max_length=T.TINY_MAX_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=pixels,
        )
    a, b = out.image_embeds, out.text_embeds  # already L2-normalized by CLIPModel.forward
    cos = torch.stack([torch.dot(a[i], b[i]) / (a[i].norm() * b[i].norm()) for i in range(len(a))])
    torch.testing.assert_close(out.logits_per_image.diagonal(), model.logit_scale.exp() * cos)
    return cos


def test_pickscore_and_clipscore_equal_their_formulas_on_a_hand_computed_cosine(clip_dir) -> None:
    images = _images()
    pick, clip = PickScore(str(clip_dir), str(clip_dir)), CLIPScore(str(clip_dir))
    cos = _hand_cosine(pick, images, PROMPTS)
    assert (cos > 0).any() and (cos < 0).any(), "the check needs both signs to cover max(cos, 0)"
    scale = pick.model.logit_scale.exp()
    torch.testing.assert_close(pick.score(images, PROMPTS), scale * cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        clip.score(images, PROMPTS), 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5
    )
    pick.update(images[:4], PROMPTS[:4])
    pick.update(images[4:], PROMPTS[4:])
    torch.testing.assert_close(pick.compute(), (scale * cos).mean(), atol=1e-5, rtol=1e-5)
    assert pick.higher_is_better and not pick.is_differentiable and not pick.full_state_update
    assert {"backbone", "formula", "range"} <= set(pick.info) and "logit_scale" in pick.info[
        "formula"
    ]


def test_bf16_pickscore_keeps_its_logit_scale_in_fp32(clip_dir) -> None:
    """bf16 stores ln 100 as 4.59375, whose exp is 98.86: scores 1.14 % low if the scale is cast.

    The towers' own bf16 rounding moves this tiny random CLIP's cosines by a few percent, so the
    score is compared with the fp32 scale times the bf16 model's own cosine (within 0.1 %).
    """
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(clip_dir)
    model = T.tiny_clip_model(seed=4)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # PickScore_v1's scale
    fp32 = PickScore(model=copy.deepcopy(model), processor=processor)
    bf16 = PickScore(model=copy.deepcopy(model), processor=processor, torch_dtype="bfloat16")
    assert bf16.model.text_projection.weight.dtype == torch.bfloat16  # the towers are bf16
    images = _images()
    for metric in (fp32, bf16):
        cosine = metric.cosine(images, PROMPTS)
        assert cosine.dtype == torch.float32
        torch.testing.assert_close(metric.score(images, PROMPTS), 100.0 * cosine, rtol=1e-3, atol=0)
    with pytest.warns(RuntimeWarning, match=r"logit_scale is stored in torch.bfloat16.*float32"):
        PickScore(model=copy.deepcopy(model).to(torch.bfloat16), processor=processor)


def test_uint8_and_unit_float_images_score_the_same(clip_dir) -> None:
    metric = CLIPScore(str(clip_dir))
    as_uint8 = (_images() * 255).round().to(torch.uint8)
    torch.testing.assert_close(
        metric.cosine(as_uint8, PROMPTS), metric.cosine(as_uint8.float() / 255, PROMPTS)
    )
    mixed = [as_uint8[0], as_uint8[1, :, :32, :48]]  # a list of images of different sizes
    assert metric.cosine(mixed, PROMPTS[:2]).shape == (2,)
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        metric.update(as_uint8.float() / 127.5 - 1, PROMPTS)
    with pytest.raises(ValueError, match="6 prompts for 2 images"):
        metric.update(as_uint8[:2], PROMPTS)
    assert metric.n_samples == 0


def _pil_processor():
    """The PIL path: ``CLIPImageProcessorPil`` in transformers 5, ``CLIPImageProcessor`` in 4.x."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls()  # CLIP's defaults: shortest edge 224 bicubic, crop 224, OpenAI mean/std


@pytest.mark.parametrize("quantize", [True, False])
def test_torch_preprocessing_matches_the_pil_processor(quantize: bool) -> None:
    """Documented gap to the PIL path (normalized units, one uint8 level = 1/255/std = 0.015):
    quantize=True: max <= one level, mean < 1e-4; quantize=False: max ~0.016, mean ~0.004."""
    from skimage import data

    processor = _pil_processor()
    ours = CLIPImagePreprocess.from_image_processor(processor, quantize=quantize)
    noise = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    gaps = []
    for image in (data.astronaut(), data.coffee(), data.chelsea()[::3, ::2], noise):
        reference = torch.as_tensor(
            np.asarray(processor(images=[image], return_tensors="np")["pixel_values"])
        )
        mine = ours(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
        assert mine.shape == reference.shape == (1, 3, 224, 224)
        gaps.append(((mine - reference).abs().max().item(), (mine - reference).abs().mean().item()))
    # Not float32 noise (~1e-7 here) but PIL's 8-bit rounding after each of its two passes: at
    # most 0.5 level after the first, carried through the second pass's bicubic weights (sum of
    # |w| 1.17 for a = -0.5), plus 0.5 for the second: 1.08 levels at most (measured 1.05 unquantized;
    # exactly 1 level quantized, where the gap is a whole number of levels). 2 levels would fail.
    level = 1 / 255 / min(processor.image_std)
    assert max(g[0] for g in gaps) <= level * 1.1
    assert max(g[1] for g in gaps) < (1e-4 if quantize else 6e-3)


@pytest.mark.parametrize(("height", "width"), [(512, 512), (400, 600), (301, 200), (100, 1000)])
def test_resized_shape_follows_transformers(height: int, width: int) -> None:
    from transformers.image_transforms import get_resize_output_image_size

    image = np.zeros((3, height, width), dtype=np.uint8)
    expected = get_resize_output_image_size(
        image, size=224, default_to_square=False, input_data_format="channels_first"
    )
    assert resized_shape(height, width, 224) == tuple(expected)


def test_ddp_style_state_merge_equals_one_process(clip_dir) -> None:
    images = _images()
    whole, rank0, rank1 = (PickScore(str(clip_dir), str(clip_dir)) for _ in range(3))
    whole.update(images, PROMPTS)
    rank0.update(images[:2], PROMPTS[:2])  # uneven shards, as with 6 prompts on 4 ranks
    rank1.update(images[2:], PROMPTS[2:])
    assert rank0._reductions["score_sum"] is not None and rank0._defaults.keys() == {
        "score_sum",
        "n_samples",
    }
    rank0.merge_state(rank1)
    assert rank0.n_samples == 6
    torch.testing.assert_close(rank0.compute(), whole.compute())


def test_transformers_4_and_5_feature_outputs_are_both_read() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    embeds = torch.randn(2, 16)
    assert MF.embedding(embeds) is embeds  # transformers 4.x returns the tensor
    assert MF.embedding(BaseModelOutputWithPooling(pooler_output=embeds)) is embeds  # 5.x


def test_missing_clip_weights_name_the_model_and_the_fix(tmp_path, clip_dir) -> None:
    absent = tmp_path / "PickScore_v1"
    with pytest.raises(
        ModelNotFoundError,
        match=r"PickScore model.*PickScore_v1.*Fix:.*pretrained_model_name_or_path",
    ):
        PickScore(str(absent))
    with pytest.raises(ModelNotFoundError, match=r"processor.*processor_name_or_path"):
        CLIPScore(str(clip_dir), processor_name_or_path=str(absent))


class _MeanBrightness(QualityHead):
    """Score = mean pixel value; records the size and mode of each batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))  # so the metric can find a device
        self.calls: list[tuple[tuple[int, int], bool]] = []
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        self.calls.append((tuple(images.shape[-2:]), self.training))
        return images.mean(dim=(1, 2, 3)) * self.weight


def test_maniqa_metric_averages_its_head_and_keeps_it_in_eval_mode() -> None:
    """Flat images keep their value through any resize, so the mean is known by hand:
    three float images 0.2, 0.5, 0.9 and two uint8 images 51, 204 (0.2, 0.8): (2.6 / 5) = 0.52."""
    head = _MeanBrightness()
    metric = MANIQA(head=head, resize_to=32)
    metric.train()
    assert not metric.head.training
    values = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1, 1)
    metric.update(values.expand(3, 3, 48, 40).clone())
    metric.update(torch.tensor([51, 204], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 40, 48))
    torch.testing.assert_close(metric.compute(), torch.tensor(0.52), rtol=0, atol=1e-6)
    assert metric.n_samples == 5
    assert head.calls == [((32, 32), False)] * 2  # resized to resize_to, scored in eval mode
    with pytest.raises(ValueError, match="maniqa-kadid"):
        MANIQA(variant="musiq", head=head)
    assert isinstance(metric, Metric) and metric.plot_upper_bound == 1.0
