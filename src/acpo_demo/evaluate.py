"""Offline evaluation of the demo: base model vs ACPO vs the ``w_perc: 0`` control.

For every model it samples the same held-out prompts (wordings never used in training) with the
same seeds and reports

* guidance IQA: the TwoStream head ACPO optimized (mean, 95% CI over seeds);
* evaluation IQA: the independent :class:`~acpo_demo.evaluator.PatchQualityNet`;
* prompt consistency: share of images the classifier puts in the prompted class, and the mean
  probability it gives that class;
* KID to real test images on the classifier's penultimate features (torchmetrics'
  ``KernelInceptionDistance`` with the classifier as feature extractor; lower is better);
* diversity: mean pairwise feature distance between the seeds of one prompt.

Usage::

    python -m acpo_demo.evaluate --run ACPO=outputs/demo/lora/last \\
        --run control=outputs/demo_control/lora/last --out outputs/demo

writes ``results.md``, ``results.json`` and one PNG grid per model (rows: prompts, columns: seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from acpo_demo.assets import (
    load_demo_classifier,
    load_demo_evaluator,
    load_demo_guidance_head,
    load_demo_sampler,
    load_demo_scheduler,
    load_demo_unet,
    load_demo_vae,
)
from acpo_demo.classifier import ClassifierFeatures
from acpo_demo.fashion import CLASS_NAMES, caption, load_fashion_mnist
from acpo_demo.text import load_minilm, load_minilm_tokenizer

#: Sampling settings of the evaluation (and of demo.yaml's generate defaults).
EVAL_STEPS = 10
EVAL_GUIDANCE = 3.0
#: Evaluation seeds start here (far from the seeds training and pretraining use).
SEED_BASE = 10_000
# two-sided 97.5% Student-t quantiles by degrees of freedom (1..30); beyond, the normal's
_T975 = (
    [12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    + [2.2] * 10
    + [2.09] * 10
)


def heldout_prompts(per_class: int = 2) -> tuple[list[str], list[int]]:
    """``per_class`` held-out captions per class (distinct templates) and their labels."""
    prompts, labels = [], []
    for label in range(len(CLASS_NAMES)):
        for k in range(per_class):
            prompts.append(caption(label, template=k, synonym=k + label, wording="heldout"))
            labels.append(label)
    return prompts, labels


def demo_module(unet_path: str | None = None, lora: str | Path | None = None, head=None):
    """An :class:`ACPOModule` on the shipped demo parts (the policy with a LoRA when ``lora`` is given)."""
    from acpo_lightning.models import add_lora, load_lora
    from acpo_lightning.module import ACPOModule

    unet = load_demo_unet(unet_path)
    if lora is not None:
        rank, targets = lora_layout(lora)
        load_lora(add_lora(unet, rank=rank, alpha=rank, target_modules=targets), lora)
    return ACPOModule(
        unet=unet,
        quality_head=head if head is not None else load_demo_guidance_head(),
        noise_scheduler=load_demo_scheduler(),
        sample_scheduler=load_demo_sampler(),
        vae=load_demo_vae(),
        text_encoder=load_minilm(),
        tokenizer=load_minilm_tokenizer(),
        w_anchor=0.0 if lora is None else 1.0,
        num_inference_steps=EVAL_STEPS,
        guidance_scale=EVAL_GUIDANCE,
    )


def lora_layout(lora: str | Path) -> tuple[int, list[str]]:
    """Rank and adapted module names of a LoRA export, read from its keys (``...to_q.lora_A.weight``).

    The demo's LoRA uses ``alpha == rank`` (scale 1), which this assumes.
    """
    from safetensors import safe_open

    from acpo_lightning.models import LORA_WEIGHT_NAME

    path = Path(lora)
    path = path / LORA_WEIGHT_NAME if path.is_dir() else path
    targets, rank = set(), 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            marker = next((m for m in (".lora_A.", ".lora.down.") if m in key), None)
            if marker:  # diffusers writes attention LoRA as lora.down/up, convs as lora_A/B
                module = key.split(marker)[0].split(".")
                targets.add(".".join(module[-2:]) if module[-1].isdigit() else module[-1])
                rank = f.get_slice(key).get_shape()[0]
    return rank, sorted(targets)


@torch.no_grad()
def sample(
    module,
    prompts: list[str],
    seeds: list[int],
    batch: int = 200,
    guidance_scale: float | None = None,
) -> Tensor:
    """Images ``[S, P, 3, H, W]``: every prompt under every seed.

    Image ``(s, p)`` is image ``i = s * P + p`` of the flattened list and uses the generator seeded
    ``SEED_BASE + i`` (``generate`` seeds image ``i`` of a call with ``seed + i``), so a sample
    does not depend on how the calls are batched.
    """
    flat = [prompt for _ in seeds for prompt in prompts]
    base = SEED_BASE + seeds[0] * len(prompts)
    out = [
        module.generate(flat[i : i + batch], seed=base + i, guidance_scale=guidance_scale)
        for i in range(0, len(flat), batch)
    ]
    return torch.cat(out).view(len(seeds), len(prompts), *out[0].shape[1:])


def mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of its 95% Student-t confidence interval."""
    n = len(values)
    if n < 2:
        return float(values.mean()), float("nan")
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return float(values.mean()), float(t * values.std(unbiased=True) / math.sqrt(n))


@torch.no_grad()
def image_metrics(images: Tensor, labels: list[int], parts: dict, real: Tensor) -> dict[str, float]:
    """All table columns for images ``[S, P, 3, H, W]`` of prompts with class ``labels``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    seeds = images.shape[0]
    prompts = images.shape[1]
    flat = images.flatten(0, 1)
    guide = parts["guidance"](flat).view(seeds, prompts)
    evaluation = parts["evaluator"](flat).view(seeds, prompts)
    classifier = parts["classifier"]
    probs = classifier(flat).softmax(-1).view(seeds, prompts, -1)
    target = torch.tensor(labels).expand(seeds, -1)
    hit = (probs.argmax(-1) == target).float()
    p_true = probs.gather(-1, target[..., None]).squeeze(-1)
    extractor = ClassifierFeatures(classifier)
    feats = extractor(flat).view(seeds, prompts, -1)
    pair = torch.cdist(feats.transpose(0, 1), feats.transpose(0, 1))  # [P, S, S]
    diversity = pair.sum((1, 2)) / (seeds * (seeds - 1))
    kid = KernelInceptionDistance(feature=extractor, subset_size=min(100, len(flat)), subsets=50)
    kid.update(real, real=True)
    kid.update(flat, real=False)
    torch.manual_seed(0)  # KID's random subsets: the same draw for every model
    kid_mean, kid_std = kid.compute()
    g_mean, g_ci = mean_ci(guide.mean(1))
    e_mean, e_ci = mean_ci(evaluation.mean(1))
    return {
        "per_image": {"guidance": guide, "eval": evaluation, "hit": hit},
        "guidance_iqa": g_mean, "guidance_iqa_ci": g_ci,
        "eval_iqa": e_mean, "eval_iqa_ci": e_ci,
        "consistency": float(hit.mean()), "consistency_prob": float(p_true.mean()),
        "kid": float(kid_mean), "kid_std": float(kid_std),
        "diversity": float(diversity.mean()),
    }  # fmt: skip


def paired_deltas(per_image: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, float]:
    """Per-seed paired differences of one model's per-image scores to the base's.

    Both come from :func:`image_metrics` on the same prompts, seeds and initial noise. Returns
    ``d_guidance``, ``d_eval`` and ``d_consistency`` (mean difference of the guidance score, the
    evaluator's score and the classifier hit rate) and their 95% CIs over seeds (``..._ci``).
    """
    deltas = {}
    for key, name in (("guidance", "d_guidance"), ("eval", "d_eval"), ("hit", "d_consistency")):
        deltas[name], deltas[name + "_ci"] = mean_ci((per_image[key] - base[key]).mean(1))
    return deltas


def add_paired_deltas(rows: dict[str, dict]) -> None:
    """Per-seed paired differences to the base row (same prompts, seeds and initial noise).

    Adds :func:`paired_deltas` to every row, then drops the per-image scores.
    """
    base = rows["base"]["per_image"]
    for row in rows.values():
        row.update(paired_deltas(row["per_image"], base))
    for row in rows.values():
        row.pop("per_image")


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """The markdown table of :func:`image_metrics` rows (after :func:`add_paired_deltas`)."""
    lines = [
        "| model | guidance IQA | Δ vs base (paired) | eval IQA | Δ vs base (paired) "
        "| consistency | p(class) | KID ×1e3 | diversity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['guidance_iqa']:.3f} ± {m['guidance_iqa_ci']:.3f} "
            f"| {m['d_guidance']:+.3f} ± {m['d_guidance_ci']:.3f} "
            f"| {m['eval_iqa']:.3f} ± {m['eval_iqa_ci']:.3f} "
            f"| {m['d_eval']:+.3f} ± {m['d_eval_ci']:.3f} | {100 * m['consistency']:.1f}% "
            f"| {m['consistency_prob']:.3f} | {1e3 * m['kid']:.2f} ± {1e3 * m['kid_std']:.2f} "
            f"| {m['diversity']:.3f} |"
        )
    return "\n".join(lines)


def save_grid(images: Tensor, path: Path) -> None:
    """PNG grid: one row per prompt, one column per seed (images ``[S, P, 3, H, W]``)."""
    from torchvision.utils import save_image

    seeds = images.shape[0]
    save_image(images.transpose(0, 1).flatten(0, 1), path, nrow=seeds, padding=1)


def load_parts(guidance_head: str | None = None) -> dict:
    """The frozen evaluators (and the guidance head, from ``guidance_head`` if given)."""
    return {
        "guidance": load_demo_guidance_head(guidance_head),
        "evaluator": load_demo_evaluator(),
        "classifier": load_demo_classifier(),
    }


def real_reference(count: int = 1000) -> Tensor:
    """The first ``count`` Fashion-MNIST test images in ``[0, 1]`` (KID reference)."""
    test, _ = load_fashion_mnist("test")
    return (test[:count] + 1) / 2


def main(argv: list[str] | None = None) -> dict:
    """Entry point: evaluate the base and every ``--run NAME=LORA_DIR``; write the table and grids."""
    parser = argparse.ArgumentParser(prog="python -m acpo_demo.evaluate", description=__doc__)
    parser.add_argument("--run", action="append", default=[], help="NAME=LORA_DIR (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--per-class", type=int, default=2, help="held-out prompts per class")
    parser.add_argument("--unet", default=None, help="base UNet folder (default: shipped)")
    parser.add_argument(
        "--guidance-head", default=None, help="guidance head folder (default: shipped)"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts, labels = heldout_prompts(args.per_class)
    seeds = list(range(args.seeds))
    parts, real = load_parts(args.guidance_head), real_reference()
    rows: dict[str, dict[str, float]] = {}
    for spec in ["base=", *args.run]:
        name, _, lora = spec.rpartition("=")
        start = time.time()
        module = demo_module(args.unet, lora or None, head=parts["guidance"])
        images = sample(module, prompts, seeds)
        rows[name] = image_metrics(images, labels, parts, real)
        save_grid(images, args.out / f"samples_{name}.png")
        shown = {k: round(v, 4) for k, v in rows[name].items() if k != "per_image"}
        print(f"[evaluate] {name}: {time.time() - start:.0f}s {shown}", flush=True)
    add_paired_deltas(rows)
    table = results_table(rows)
    header = (
        f"Held-out prompts: {len(prompts)} ({args.per_class} per class), seeds: {args.seeds}, "
        f"DDIM {EVAL_STEPS} steps, CFG {EVAL_GUIDANCE}; KID on classifier features vs "
        f"{len(real)} real test images. ± is the 95% confidence interval over seeds (Student t); "
        "Δ columns are paired differences to the base (same prompts, seeds and initial noise).\n\n"
    )
    (args.out / "results.md").write_text(header + table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
