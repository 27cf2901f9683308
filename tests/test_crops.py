"""Crops at native resolution: windows on the latent grid, their decode against the full decode,
the scorer and both objectives on crops (VP and flow), bad sizes, and per-ResNet checkpointing."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from torch import Tensor

from acpo_lightning import losses
from acpo_lightning import testing as T
from acpo_lightning.codec import LatentCodec, checkpoint_resnets
from acpo_lightning.crops import PerceptualCrop, conv_reach, window_margin_for
from acpo_lightning.scoring import PerceptualScorer
from conftest import make_module, rollout_terms, shapes_batch

# float32 convolutions of the same values on inputs of another size may sum in another order:
# a few ulps per layer on values of order 1 (eps 1.2e-7), far below 1e-5 over these small nets
TOL = 1e-5


class RecordingHead(T.TinyQualityHead):
    """The tiny head, remembering the size and prompts of every batch it scores."""

    native_size = None

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], list[str] | None]] = []

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        self.seen.append((tuple(images.shape), prompts))
        return super().score(images, prompts)


def _taesd_codec() -> LatentCodec:
    """A local decoder (convolutions only): its crops can equal the full decode exactly."""
    return LatentCodec(T.tiny_vae(), T.tiny_taesd().eval(), (4, 16, 16))


def _latents(batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_windows_hold_their_crop_with_the_margin_or_the_image_border() -> None:
    spec = PerceptualCrop(8, count=5, margin=3)  # 4 latents at scale 2, windows of 10 of 16
    latents = _latents(3)
    crops = spec.windows(latents, 2, torch.Generator().manual_seed(1))
    assert crops.latents.shape == (15, 4, 10, 10)
    assert crops.image.tolist() == [i for i in range(3) for _ in range(5)]
    origin = torch.stack([crops.origin_top, crops.origin_left]) // 2  # latents
    inner = torch.stack([crops.top, crops.left]) // 2
    start = origin - inner  # the window's first latent
    assert ((origin >= 0) & (origin + 4 <= 16)).all()
    # each side keeps >= margin latents, or the window reaches the image border there
    assert ((inner >= 3) | (start == 0)).all()
    assert ((10 - inner - 4 >= 3) | (start + 10 == 16)).all()
    for n in range(15):  # the windows are the latents at those places
        i, r, c = int(crops.image[n]), int(start[0, n]), int(start[1, n])
        assert torch.equal(crops.latents[n], latents[i, :, r : r + 10, c : c + 10])


def test_positions_are_drawn_from_the_generator() -> None:
    spec, latents = PerceptualCrop(8, count=4, margin=1), _latents()

    def origins(seed: int) -> list[int]:
        crops = spec.windows(latents, 2, torch.Generator().manual_seed(seed))
        return torch.cat([crops.origin_top, crops.origin_left]).tolist()

    assert origins(0) == origins(0) and origins(0) != origins(1)
    draws = torch.tensor([origins(s) for s in range(50)])
    # pixels, on the latent grid (x2): every place from 0 to 16 - 4 latents is reachable
    assert draws.min() == 0 and draws.max() == 2 * (16 - 4) and (draws % 2 == 0).all()


def test_a_local_decoder_crop_equals_the_full_decode_once_the_margin_covers_its_reach() -> None:
    codec, latents = _taesd_codec(), _latents()
    decoder = codec.perceptual_decoder
    reach = conv_reach(decoder, latents[:1], decoder.decode)
    assert 2 < reach < 16  # the tiny TAESD: a few 3x3 convolutions at 1x and 2x
    with torch.no_grad():
        whole = codec.decode(latents, perceptual=True)

        def error(margin: int) -> float:
            spec = PerceptualCrop(8, count=3, margin=margin)
            crops = spec.windows(latents, 2, torch.Generator().manual_seed(0))
            got = crops.pixels(codec.decode(crops.latents, perceptual=True))
            return (got - crops.of_whole(whole)).abs().max().item()

        assert error(window_margin_for(reach)) <= TOL
        assert error(0) > 100 * TOL  # without a margin the crop's edges differ


def test_the_crop_gradient_is_the_full_decode_crops_gradient_for_a_local_decoder() -> None:
    codec, latents = _taesd_codec(), _latents()
    head = T.TinyQualityHead()
    margin = window_margin_for(conv_reach(codec.perceptual_decoder, latents[:1]))
    spec = PerceptualCrop(8, count=2, margin=margin)
    scorer = PerceptualScorer(head, codec, crop=spec)
    x = latents.clone().requires_grad_(True)
    scorer(x, None, torch.Generator().manual_seed(3)).sum().backward()
    y = latents.clone().requires_grad_(True)
    crops = spec.windows(y, 2, torch.Generator().manual_seed(3))
    reference = crops.per_image(head(crops.of_whole(codec.decode(y, perceptual=True))))
    losses.normalize_score(reference, head.higher_is_better, head.score_range).sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, y.grad, atol=TOL, rtol=0)


def test_a_crop_as_large_as_the_image_is_the_whole_image_path() -> None:
    codec, latents = LatentCodec(T.tiny_vae(), None, (4, 16, 16)), _latents()
    head = T.TinyQualityHead()
    generator = torch.Generator().manual_seed(0)
    whole = PerceptualScorer(head, codec)(latents, None, generator)
    cropped = PerceptualScorer(head, codec, crop=PerceptualCrop(32))(latents, None, generator)
    assert torch.equal(whole, cropped)


def test_windows_as_large_as_the_image_decode_each_image_once() -> None:
    codec, latents = LatentCodec(T.tiny_vae(), None, (4, 16, 16)), _latents()
    crops = PerceptualCrop(8, count=3, margin=6).windows(latents, 2, torch.Generator())
    assert crops.latents is latents  # 4 + 2 x 6 latents >= 16: no window, the whole latents
    with torch.no_grad():
        whole = codec.decode(latents)
        assert torch.equal(crops.pixels(whole), crops.of_whole(whole))
    assert crops.pixels(whole).shape == (6, 3, 8, 8)


def test_several_crops_per_image_score_the_mean_with_the_prompt_repeated() -> None:
    head = RecordingHead()
    codec, latents = _taesd_codec(), _latents()
    margin = window_margin_for(conv_reach(codec.perceptual_decoder, latents[:1]))
    spec = PerceptualCrop(8, count=3, margin=margin)
    scores = PerceptualScorer(head, codec, crop=spec)(
        latents, ["a", "b"], torch.Generator().manual_seed(0)
    )
    (shape, prompts) = head.seen[-1]
    assert shape == (6, 3, 8, 8) and prompts == ["a"] * 3 + ["b"] * 3
    crops = spec.windows(latents, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        per_crop = head(crops.of_whole(codec.decode(latents, perceptual=True)))
    expected = losses.normalize_score(per_crop.view(2, 3).mean(1), True, head.score_range)
    torch.testing.assert_close(scores, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("size", "message"),
    [(7, "multiple of the VAE's scale factor 2: crops are cut on the latent grid; use size=6"),
     (40, "larger than the images (32x32 px); use size <= 32")],
)  # fmt: skip
def test_a_crop_that_does_not_fit_is_refused_with_the_fix(tokenizer_dir, size, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_module(tokenizer_dir, perceptual_crop=size)
    with pytest.raises(ValueError, match="count >= 1"):
        PerceptualCrop(16, count=0)


def test_the_data_objective_scores_crops_and_trains_the_lora(tokenizer_dir) -> None:
    head = RecordingHead()
    spec = PerceptualCrop(16, count=2, margin=2)
    module = make_module(
        tokenizer_dir, lora_init=False, quality_head=head, perceptual_crop=spec,
        w_perc=1.0, perceptual_share=0.5,
    ).train()  # fmt: skip
    terms, stats = module.compute_terms(shapes_batch(4), torch.Generator().manual_seed(0))
    assert stats["perc_share"] == 0.5 and head.seen[-1][0] == (4, 3, 16, 16)
    assert torch.isfinite(terms.loss) and terms.perc != 0
    terms.perc.backward()
    grads = [p.grad for n, p in module.unet.named_parameters() if "lora_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_rollout_objective_scores_crops(tokenizer_dir) -> None:
    head = RecordingHead()
    module = make_module(
        tokenizer_dir, lora_init=False, quality_head=head, perceptual_crop=16, w_perc=1.0,
        objective="rollout", rollout_steps=3, k_late=2, num_inference_steps=3,
    ).train()  # fmt: skip
    terms = rollout_terms(module, ["a red square", "a blue circle"], 2, torch.Generator())
    assert head.seen[-1][0] == (2, 3, 16, 16) and torch.isfinite(terms.perc)
    terms.perc.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.unet.parameters())


def test_a_flow_model_scores_crops() -> None:
    from test_backbone_sd3 import PROMPTS, SIZE, _module

    head = RecordingHead()
    module = _module(
        lora_init=False, quality_head=head, perceptual_crop=PerceptualCrop(8, margin=1),
        perceptual_share=1.0, w_perc=1.0,
    ).train()  # fmt: skip
    terms, _ = module.compute_terms(shapes_batch(2, SIZE), torch.Generator().manual_seed(0))
    assert head.seen[-1][0] == (2, 3, 8, 8) and torch.isfinite(terms.perc)
    roll = rollout_terms(module, PROMPTS, 2, torch.Generator().manual_seed(0))
    assert head.seen[-1][0] == (2, 3, 8, 8) and torch.isfinite(roll.perc)


def test_the_head_is_probed_at_the_crop_size(tokenizer_dir) -> None:
    head = RecordingHead()
    module = make_module(tokenizer_dir, quality_head=head, perceptual_crop=16)
    module.setup("fit")
    assert head.seen and head.seen[-1][0][-2:] == (16, 16)


def test_the_decoder_is_checkpointed_one_resnet_at_a_time_with_the_same_gradients() -> None:
    """In the backward pass each ResNet block's forward is recomputed just before its own
    backward, instead of a whole up-block's forwards before any of their backwards."""
    latents = _latents(1)

    def run(checkpointing: str | None) -> tuple[Tensor, list[str]]:
        vae = T.tiny_vae().requires_grad_(False)
        if checkpointing == "resnet":
            LatentCodec(vae, None, (4, 16, 16)).enable_gradient_checkpointing()
        elif checkpointing == "block":
            vae.enable_gradient_checkpointing()
        events, backward = [], [False]

        def recomputed(name: str):  # torch stops a recompute early: log its first layer
            return lambda module, args: events.append(f"F {name}" if backward[0] else "")

        def grad_logged(name: str):
            def hook(module, args, output) -> None:
                if output.requires_grad:
                    output.register_hook(lambda grad: events.append(f"B {name}"))

            return hook

        for i, block in enumerate(vae.decoder.up_blocks):
            for j, resnet in enumerate(block.resnets):
                resnet.norm1.register_forward_pre_hook(recomputed(f"{i}.{j}"))
                resnet.register_forward_hook(grad_logged(f"{i}.{j}"))
        x = latents.clone().requires_grad_(True)
        image = vae.decode(x).sample
        backward[0] = True
        image.pow(2).sum().backward()
        return x.grad, [e for e in events if e]

    plain, _ = run(None)
    block_grad, block_events = run("block")
    resnet_grad, resnet_events = run("resnet")
    torch.testing.assert_close(resnet_grad, plain, atol=TOL, rtol=0)
    torch.testing.assert_close(block_grad, plain, atol=TOL, rtol=0)

    def back_to_back_recomputes(events: list[str]) -> int:
        return sum(a[0] == b[0] == "F" for a, b in itertools.pairwise(events))

    assert back_to_back_recomputes(block_events) > 0  # diffusers: a whole up-block at once
    assert back_to_back_recomputes(resnet_events) == 0
    recomputed = [e for e in resnet_events if e.startswith("F")]
    assert len(recomputed) == sum(len(b.resnets) for b in T.tiny_vae().decoder.up_blocks)


def test_other_blocks_are_checkpointed_whole() -> None:
    block = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    checkpoint_resnets(block, x).sum().backward()
    assert math.isfinite(x.grad.sum().item())
