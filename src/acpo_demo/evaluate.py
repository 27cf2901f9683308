"""Offline evaluation of the demo: base model vs ACPO vs the ``w_perc: 0`` control.

For every model it samples the same prompts with the same seeds (the held-out wordings and seeds
by default; ``--split val`` gives the validation wordings and seeds that settings are chosen on)
and reports

* guidance IQA: the head ACPO optimized (mean, 95% CI over seeds);
* evaluation IQA: the independent :class:`~acpo_demo.evaluator.PatchQualityNet`;
* prompt consistency: share of images the classifier puts in the prompted class, and the mean
  probability it gives that class;
* FID and KID to real test images on the classifier's penultimate features, with 95 % bootstrap
  intervals over the images (:func:`acpo_lightning.metrics.distance.feature_distances`);
* diversity: mean pairwise feature distance between the seeds of one prompt.

Per-image scores are paired (same prompt, seed and initial noise for every model): the ``Δ``
columns are paired differences to the base and, when a run is named ``control``, to the control.

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
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from acpo_demo.assets import (
    load_demo_classifier,
    load_demo_evaluator,
    load_demo_guidance,
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
#: The two evaluation splits: wording set and first seed. Settings are chosen on ``val``; the
#: README's figures are measured once on ``test`` (held-out wordings, other seeds).
SPLITS = {"test": ("heldout", SEED_BASE), "val": ("val", 2 * SEED_BASE)}
# two-sided 97.5% Student-t quantiles for 1..10 degrees of freedom (beyond: Cornish-Fisher)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(dof: int) -> float:
    """The 97.5 % quantile of Student's t with ``dof`` degrees of freedom (within 3e-3 beyond 10).

    Example:
        >>> round(t975(11), 2), round(t975(49), 2)
        (2.2, 2.01)
    """
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def heldout_prompts(per_class: int = 2, split: str = "test") -> tuple[list[str], list[int]]:
    """``per_class`` captions per class (distinct templates) of a split's wordings, and their labels.

    Raises:
        ValueError: an unknown ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {sorted(SPLITS)}.")
    prompts, labels = [], []
    for label in range(len(CLASS_NAMES)):
        for k in range(per_class):
            prompts.append(caption(label, template=k, synonym=k + label, wording=SPLITS[split][0]))
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
        quality_head=head if head is not None else load_demo_guidance(),
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
            if marker:  # our UNet files: lora.down/up; peft's layout and older exports: lora_A/B
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
    seed_base: int = SEED_BASE,
) -> Tensor:
    """Images ``[S, P, 3, H, W]``: every prompt under every seed.

    Image ``(s, p)`` is image ``i = s * P + p`` of the flattened list and uses the generator seeded
    ``seed_base + i`` (``generate`` seeds image ``i`` of a call with ``seed + i``), so a sample
    does not depend on how the calls are batched.
    """
    flat = [prompt for _ in seeds for prompt in prompts]
    base = seed_base + seeds[0] * len(prompts)
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
    return float(values.mean()), float(t975(n - 1) * values.std(unbiased=True) / math.sqrt(n))


@torch.no_grad()
def image_metrics(
    images: Tensor,
    labels: list[int],
    parts: dict,
    real_features: Tensor,
    prompts: list[str] | None = None,
) -> dict[str, float]:
    """All table columns for images ``[S, P, 3, H, W]`` of prompts with class ``labels``.

    Args:
        images: ``S`` seeds of ``P`` prompts, in ``[0, 1]``.
        labels: the prompts' classes.
        parts: :func:`load_parts`.
        real_features: :func:`classifier_features` of the real images, the FID/KID reference.
        prompts: the ``P`` prompts (passed to the guidance head; a prompt-aware head needs them).

    Returns:
        The columns, the FID/KID of :func:`~acpo_lightning.metrics.distance.feature_distances`,
        and ``per_image`` (scores, hits and classifier features, kept for paired differences).
    """
    from acpo_lightning.metrics.distance import feature_distances

    seeds, count = images.shape[:2]
    flat = images.flatten(0, 1)
    flat_prompts = None if prompts is None else [p for _ in range(seeds) for p in prompts]
    guide = _batched(lambda x, p: parts["guidance"](x, p), flat, flat_prompts).view(seeds, count)
    evaluation = _batched(lambda x, _: parts["evaluator"](x), flat).view(seeds, count)
    classifier = parts["classifier"]
    probs = _batched(lambda x, _: classifier(x), flat).softmax(-1).view(seeds, count, -1)
    target = torch.tensor(labels).expand(seeds, -1)
    hit = (probs.argmax(-1) == target).float()
    p_true = probs.gather(-1, target[..., None]).squeeze(-1)
    feats = classifier_features(parts, flat)
    by_prompt = feats.view(seeds, count, -1).transpose(0, 1)
    diversity = torch.cdist(by_prompt, by_prompt).sum((1, 2)) / (seeds * (seeds - 1))
    distance = feature_distances({"model": feats}, real_features)
    g_mean, g_ci = mean_ci(guide.mean(1))
    e_mean, e_ci = mean_ci(evaluation.mean(1))
    return {
        "per_image": {"guidance": guide, "eval": evaluation, "hit": hit, "features": feats},
        "guidance_iqa": g_mean, "guidance_iqa_ci": g_ci,
        "eval_iqa": e_mean, "eval_iqa_ci": e_ci,
        "consistency": float(hit.mean()), "consistency_prob": float(p_true.mean()),
        **distance["model"],
        "diversity": float(diversity.mean()),
    }  # fmt: skip


def _batched(fn, images: Tensor, prompts: list[str] | None = None, size: int = 500) -> Tensor:
    """``fn(images, prompts)`` in chunks of ``size`` images (bounded memory for 2,000+ images)."""
    return torch.cat([
        fn(images[i : i + size], None if prompts is None else prompts[i : i + size])
        for i in range(0, len(images), size)
    ])  # fmt: skip


@torch.no_grad()
def classifier_features(parts: dict, images: Tensor) -> Tensor:
    """The classifier's penultimate features of ``images`` (FID/KID and diversity space)."""
    extractor = ClassifierFeatures(parts["classifier"])
    return _batched(lambda x, _: extractor(x), images)


#: Per-image scores whose paired differences the table reports: (key, delta name).
PAIRED = (("guidance", "guidance"), ("eval", "eval"), ("hit", "consistency"))


def paired_deltas(
    per_image: dict[str, Tensor], base: dict[str, Tensor], prefix: str = "d_"
) -> dict[str, float]:
    """Per-seed paired differences of one model's per-image scores to another's (``base``).

    Both come from :func:`image_metrics` on the same prompts, seeds and initial noise. Returns
    ``d_guidance``, ``d_eval`` and ``d_consistency`` (mean difference of the guidance score, the
    evaluator's score and the classifier hit rate) and their 95% CIs over seeds (``..._ci``);
    ``prefix`` replaces ``d_``.
    """
    deltas = {}
    for key, name in PAIRED:
        name = prefix + name
        deltas[name], deltas[name + "_ci"] = mean_ci((per_image[key] - base[key]).mean(1))
    return deltas


def add_paired_deltas(rows: dict[str, dict], real_features: Tensor | None = None) -> None:
    """Paired differences to the base row, and to the ``control`` row when there is one.

    Adds :func:`paired_deltas` to every row (``d_...`` to the base, ``c_...`` to the control) and,
    given the real images' features, the paired FID/KID differences to the control (``c_fid``,
    ``c_kid`` and their intervals; the same bootstrap draws for both), then drops the per-image
    scores.
    """
    from acpo_lightning.metrics.distance import feature_distances

    base = rows["base"]["per_image"]
    control = rows.get("control", {}).get("per_image")
    for row in rows.values():
        row.update(paired_deltas(row["per_image"], base))
        if control is not None:
            row.update(paired_deltas(row["per_image"], control, prefix="c_"))
    if control is not None and real_features is not None:
        features = {name: row["per_image"]["features"] for name, row in rows.items()}
        distances = feature_distances(features, real_features, reference="control")
        for name, row in rows.items():
            row.update({"c_" + k[2:]: v for k, v in distances[name].items() if k.startswith("d_")})
    for row in rows.values():
        row.pop("per_image")


def _pm(value: float, ci: float, digits: int = 3, sign: bool = False) -> str:
    return f"{value:{'+' if sign else ''}.{digits}f} ± {ci:.{digits}f}"


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """The markdown table of :func:`image_metrics` rows (after :func:`add_paired_deltas`)."""
    control = any("c_eval" in m for m in rows.values())
    head = (
        "| model | guidance IQA | Δ vs base | eval IQA | Δ vs base "
        + ("| Δ vs control " if control else "")
        + "| consistency | Δ vs base (points) "
        + ("| Δ vs control (points) " if control else "")
        + "| p(class) | FID | KID ×1e3 "
        + ("| ΔFID vs control " if control else "")
        + "| diversity |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows.items():
        cells = [
            name,
            _pm(m["guidance_iqa"], m["guidance_iqa_ci"]),
            _pm(m["d_guidance"], m["d_guidance_ci"], sign=True),
            _pm(m["eval_iqa"], m["eval_iqa_ci"]),
            _pm(m["d_eval"], m["d_eval_ci"], sign=True),
            *([_pm(m["c_eval"], m["c_eval_ci"], sign=True)] if control else []),
            f"{100 * m['consistency']:.1f}%",
            _pm(100 * m["d_consistency"], 100 * m["d_consistency_ci"], 1, sign=True),
            *(
                [_pm(100 * m["c_consistency"], 100 * m["c_consistency_ci"], 1, True)]
                if control
                else []
            ),
            f"{m['consistency_prob']:.3f}",
            _pm(m["fid"], m["fid_ci"], 2),
            _pm(1e3 * m["kid"], 1e3 * m["kid_ci"], 2),
            *([_pm(m["c_fid"], m["c_fid_ci"], 2, sign=True)] if control else []),
            f"{m['diversity']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_grid(images: Tensor, path: Path) -> None:
    """PNG grid: one row per prompt, one column per seed (images ``[S, P, 3, H, W]``)."""
    from torchvision.utils import save_image

    seeds = images.shape[0]
    save_image(images.transpose(0, 1).flatten(0, 1), path, nrow=seeds, padding=1)


def load_parts(guidance_head: str | None = None) -> dict:
    """The frozen evaluators and the demo's guidance (its image-quality head from
    ``guidance_head`` if given; see :func:`~acpo_demo.assets.load_demo_guidance`)."""
    return {
        "guidance": load_demo_guidance(guidance_head),
        "evaluator": load_demo_evaluator(),
        "classifier": load_demo_classifier(),
    }


def real_reference(count: int = 2000, start: int = 0) -> Tensor:
    """Fashion-MNIST test images ``start .. start + count`` in ``[0, 1]`` (the FID/KID reference)."""
    test, _ = load_fashion_mnist("test")
    if start + count > len(test):
        raise ValueError(
            f"real images {start}..{start + count} asked, the test split has {len(test)}; "
            "lower --real-count."
        )
    return (test[start : start + count] + 1) / 2


class Scorer:
    """Samples and scores models on one split; the base is scored once and every delta is paired.

    Args:
        split: ``test`` (held-out wordings and seeds) or ``val``.
        per_class: prompts per class.
        seeds: seeds per prompt (``per_class * 10 * seeds`` images per model).
        real_count: real test images of the FID/KID reference (their features computed once).
        parts: :func:`load_parts` (default: the shipped ones).
        unet: the base UNet folder (default: shipped).

    Example:
        >>> scorer = Scorer("val", seeds=50)  # doctest: +SKIP
        >>> rows = scorer.compare({"ACPO": scorer.score("ACPO", "lora/last"),
        ...                        "control": scorer.score("control", "control/lora/last")})  # doctest: +SKIP
    """

    def __init__(
        self,
        split: str = "test",
        per_class: int = 2,
        seeds: int = 50,
        real_count: int = 2000,
        parts: dict | None = None,
        unet: str | None = None,
    ) -> None:
        self.split, self.seeds, self.unet = split, seeds, unet
        self.prompts, self.labels = heldout_prompts(per_class, split)
        self.parts = parts if parts is not None else load_parts()
        self.real_features = classifier_features(self.parts, real_reference(real_count))
        self.base, self.base_images = self.score("base", None)

    def score(self, name: str, lora: str | Path | None) -> tuple[dict, Tensor]:
        """The row (:func:`image_metrics`) and images ``[S, P, 3, H, W]`` of a LoRA (or the base)."""
        start = time.time()
        module = demo_module(self.unet, lora, head=self.parts["guidance"])
        seed_base = SPLITS[self.split][1]
        images = sample(module, self.prompts, list(range(self.seeds)), seed_base=seed_base)
        row = image_metrics(images, self.labels, self.parts, self.real_features, self.prompts)
        shown = {k: round(v, 4) for k, v in row.items() if k != "per_image"}
        print(f"[evaluate] {name}: {time.time() - start:.0f}s {shown}", flush=True)
        return row, images

    def compare(self, models: Mapping[str, tuple[dict, Tensor]]) -> dict[str, dict]:
        """Rows of the base and ``models`` with paired deltas (:func:`add_paired_deltas`) and each
        model's RMS pixel distance to the base's images (``pixel_drift``)."""
        rows = {"base": dict(self.base), **{name: dict(row) for name, (row, _) in models.items()}}
        rows["base"]["pixel_drift"] = 0.0
        for name, (_, images) in models.items():
            rows[name]["pixel_drift"] = float((images - self.base_images).pow(2).mean().sqrt())
        add_paired_deltas(rows, self.real_features)
        return rows


def evaluate_runs(
    runs: dict[str, str | Path],
    split: str = "test",
    per_class: int = 2,
    seeds: int = 50,
    real_count: int = 2000,
    parts: dict | None = None,
    out: Path | None = None,
    unet: str | None = None,
) -> dict[str, dict[str, float]]:
    """Sample and score the base and every run on one split; paired deltas included.

    Args:
        runs: name to LoRA folder; a run named ``control`` is the reference of the ``c_...``
            columns.
        split, per_class, seeds, real_count, parts, unet: see :class:`Scorer`.
        out: where to save one sample grid per model (``None``: none).

    Returns:
        One row per model, the base first (see :meth:`Scorer.compare`).
    """
    scorer = Scorer(split, per_class, seeds, real_count, parts, unet)
    models = {name: scorer.score(name, lora) for name, lora in runs.items()}
    if out is not None:
        for name, (_, images) in {"base": (None, scorer.base_images), **models}.items():
            save_grid(images[: min(seeds, 12)], out / f"samples_{name}.png")
    return scorer.compare(models)


#: The training-time curves of configs/demo.yaml: the proxy and the independent evaluator.
CURVES = ("val/guidance_iqa", "val/eval_iqa")


def curve_report(runs: dict[str, Path], out: Path | None = None) -> str:
    """Proxy against held-out: the logged ``val/guidance_iqa`` and ``val/eval_iqa`` of each run.

    Both are scored on the same images (demo.yaml's validation prompts) every 10 steps; step 0 is
    the base model (``_base``). Returns a markdown table (one row per step and run, each value's
    change since the base beside it) and, given ``out``, draws ``out/curves.png`` (matplotlib).
    """
    from acpo_demo.ablations.runs import read_curves

    lines = [
        "| run | step | guidance IQA (Δ since base) | eval IQA (Δ since base) |",
        "|---|---|---|---|",
    ]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, run_dir in runs.items():
        curves = read_curves(run_dir, ("val/",))
        series[name] = {}
        for tag in CURVES:
            base = curves.get(tag + "_base", [])
            series[name][tag] = [(0, base[0][1])] * bool(base) + curves.get(tag, [])
        steps = sorted({s for points in series[name].values() for s, _ in points})
        values = {tag: dict(points) for tag, points in series[name].items()}
        for step in steps:
            cells = []
            for tag in CURVES:
                value, start = values[tag].get(step), values[tag].get(0)
                change = "" if value is None or start is None else f" ({value - start:+.3f})"
                cells.append("–" if value is None else f"{value:.3f}{change}")
            lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    if out is not None:
        from acpo_demo.ablations.report import _pyplot

        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, tag in zip(axes, CURVES, strict=True):
            for name in runs:
                points = series[name][tag]
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name)
            ax.set_title(tag + (" (proxy)" if "guidance" in tag else " (independent)"))
            ax.set_xlabel("step")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Entry point: evaluate the base and every ``--run NAME=LORA_DIR``; write the table and grids."""
    parser = argparse.ArgumentParser(prog="python -m acpo_demo.evaluate", description=__doc__)
    parser.add_argument("--run", action="append", default=[], help="NAME=LORA_DIR (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--split", choices=sorted(SPLITS), default="test")
    parser.add_argument("--seeds", type=int, default=50, help="seeds per prompt")
    parser.add_argument("--per-class", type=int, default=2, help="prompts per class")
    parser.add_argument("--real-count", type=int, default=2000, help="real images (FID/KID)")
    parser.add_argument("--unet", default=None, help="base UNet folder (default: shipped)")
    parser.add_argument(
        "--guidance-head", default=None, help="guidance head folder (default: shipped)"
    )
    parser.add_argument(
        "--curves", action="append", default=[],
        help="NAME=RUN_DIR (repeatable): the run's logged proxy and held-out curves, in the report",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for spec in args.run:
        name, sep, lora = spec.partition("=")
        if not sep or not name or not lora:
            parser.error(f"--run {spec!r}: write NAME=LORA_DIR, e.g. ACPO=outputs/demo/lora/last")
        runs[name] = lora
    rows = evaluate_runs(
        runs, args.split, args.per_class, args.seeds, args.real_count,
        load_parts(args.guidance_head), args.out, args.unet,
    )  # fmt: skip
    table = results_table(rows)
    count = args.per_class * len(CLASS_NAMES)
    header = (
        f"Split `{args.split}` ({SPLITS[args.split][0]} wordings, seeds from "
        f"{SPLITS[args.split][1]}): {count} prompts x {args.seeds} seeds = {count * args.seeds} "
        f"images per model, DDIM {EVAL_STEPS} steps, CFG {EVAL_GUIDANCE}. ± is a 95 % interval: "
        "over seeds (Student t) for scores and Δ columns (paired: same prompts, seeds and initial "
        f"noise); over images (bootstrap) for FID/KID, on classifier features vs {args.real_count} "
        "real test images.\n\n"
    )
    if args.curves:
        curve_runs = dict(spec.split("=", 1) for spec in args.curves)
        table += (
            "\n\nDuring training, on the validation prompts (proxy: the guidance head it climbs; "
            "independent: the evaluator that never guides; curves.png):\n\n"
            + curve_report({k: Path(v) for k, v in curve_runs.items()}, args.out)
        )
    (args.out / "results.md").write_text(header + table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
