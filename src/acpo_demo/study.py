"""The demo's study: settings chosen on the validation split, then ACPO against its control and its
``w_anchor: 0`` ablation over several training seeds, measured once on the held-out split.

Two stages, one command each (``make demo-study`` runs both)::

    python -m acpo_demo.study select --out outputs/demo_study   # candidates, one seed, val split
    python -m acpo_demo.study seeds --out outputs/demo_study    # 3 training seeds, test split

``merge --parts A B --out C`` joins ``seeds`` runs split over processes (``--seeds 0 1`` in one,
``--seeds 2`` in another) into one table.

``select`` trains each candidate of :data:`CANDIDATES` (objective and knobs) on training seed 0 and
evaluates it on the *validation* wordings and seeds against the control; it ranks them by the
independent evaluator's paired gain over the control and writes ``select.md``. The candidate that
``configs/demo.yaml`` ships is the one this stage chose; ``seeds`` never looks at the validation
split, and the held-out split is measured only there.

``seeds`` trains every variant of :data:`VARIANTS` (ACPO as ``configs/demo.yaml`` ships, the
``w_anchor: 0`` run and the ``w_perc: 0`` control) for each training seed, evaluates all of them on
the held-out wordings and seeds (image ``i`` of every model from the same prompt and initial
noise), and writes ``study.md`` / ``study.json``: per seed, the paired differences to that seed's
control with their evaluation-seed intervals, then the mean and spread over training seeds, and the
issue's goal checked line by line. Each run writes its TensorBoard curves (the guidance score and
the independent evaluator on validation prompts during training) and its LoRA (``last`` and
``best``) under ``<out>/runs/<stage>/<name>``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from acpo_demo import evaluate
from acpo_demo.ablations.runs import (
    curve_summary,
    demo_config,
    fit_overlay,
    read_curves,
    torch_threads,
)

#: The variants of the seed study: name -> changes to ``configs/demo.yaml``.
VARIANTS: dict[str, dict[str, Any]] = {
    "ACPO": {},
    "no-anchor": {"model.w_anchor": 0.0},
    "control": {"model.w_perc": 0.0},
}
#: The candidates of the selection stage (each also gets its own control: the same objective
#: with ``w_perc: 0``, since the data objective's control differs from the rollout one's).
CANDIDATES: dict[str, dict[str, Any]] = {
    "rollout": {"model.objective": "rollout"},
    "data-share0.25": {"model.objective": "data", "model.perceptual_share": 0.25},
    "both-share0.25": {"model.objective": "both", "model.perceptual_share": 0.25},
    "data-share0.25-anchor5": {
        "model.objective": "data",
        "model.perceptual_share": 0.25,
        "model.w_anchor": 5.0,
    },
    "data-share0.25-wperc0.3": {
        "model.objective": "data",
        "model.perceptual_share": 0.25,
        "model.w_perc": 0.3,
    },
    "rollout-quality-head-only": {
        "model.objective": "rollout",
        "model.quality_head": {"class_path": "acpo_demo.load_demo_guidance_head"},
    },
}
#: Knobs that do not change a ``w_perc: 0`` run (candidates differing only there share a control).
_INERT_WITHOUT_GUIDANCE = ("model.quality_head",)


def demo_callbacks(run_dir: str | Path, config: str | Path | None = None) -> list[dict[str, Any]]:
    """``configs/demo.yaml``'s callbacks with every ``dirpath`` moved to ``<run_dir>/lora``."""
    tree = yaml.safe_load(demo_config(config).read_text())
    callbacks = tree["trainer"]["callbacks"]
    for callback in callbacks:
        if "dirpath" in callback.get("init_args", {}):
            callback["init_args"]["dirpath"] = str(Path(run_dir) / "lora")
    return callbacks


def study_overlay(
    overrides: Mapping[str, Any],
    seed: int,
    run_dir: str | Path,
    max_steps: int | None = None,
    batch_size: int | None = None,
    config: str | Path | None = None,
) -> dict[str, Any]:
    """The overlay of one run: the training ``seed`` everywhere, outputs under ``run_dir``.

    The seed sets ``seed_everything``, the module's step generator (``model.seed``) and the data
    order and captions (``data.init_args.data_seed``): a training seed changes every random draw.
    """
    from acpo_demo.ablations.sweeps import nested

    dotted: dict[str, Any] = {
        "seed_everything": seed,
        "model.seed": seed,
        "data.init_args.data_seed": seed,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        **dict(overrides),
    }
    if max_steps is not None:
        dotted["trainer.max_steps"] = max_steps
    if batch_size is not None:
        dotted["data.init_args.batch_size"] = batch_size
        dotted["model.rollout_batch_size"] = batch_size
    tree = nested(dotted)
    tree["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "tensorboard"},
    }
    tree["trainer"]["callbacks"] = demo_callbacks(run_dir, config)
    return tree


def _train(
    name: str, overrides: Mapping[str, Any], seed: int, run_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    tree = study_overlay(overrides, seed, run_dir, args.max_steps, args.batch_size)
    print(f"[study] training {name} (seed {seed}) -> {run_dir}", flush=True)
    fit_s = fit_overlay(tree, run_dir)
    curves = read_curves(run_dir, ("train/", "val/"))
    best = run_dir / "lora" / "best" / "best.json"
    return {
        "fit_s": round(fit_s, 1),
        "summary": curve_summary(curves),
        "val_curves": {k: v for k, v in curves.items() if k.startswith("val/")},
        "best": json.loads(best.read_text()) if best.is_file() else None,
    }


def _goal(rows_by_seed: Sequence[Mapping[str, dict]], name: str) -> dict[str, Any]:
    """The issue's goal for variant ``name`` against each seed's control."""
    runs = [rows[name] for rows in rows_by_seed]
    bases = [rows["base"] for rows in rows_by_seed]
    return {
        "eval_gain_excludes_0_every_seed": all(r["c_eval"] - r["c_eval_ci"] > 0 for r in runs),
        "consistency_at_worst_-0.5_points": all(100 * r["c_consistency"] >= -0.5 for r in runs),
        "fid_no_worse_than_control_beyond_interval": all(r["c_fid"] - r["c_fid_ci"] <= 0 for r in runs),
        "diversity_within_5%_of_base": all(
            r["diversity"] >= 0.95 * b["diversity"] for r, b in zip(runs, bases, strict=True)
        ),
    }  # fmt: skip


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, standard deviation and 95 % t half-width over training seeds."""
    x = torch.tensor(values, dtype=torch.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan"), float("nan")
    sd = float(x.std(unbiased=True))
    return float(x.mean()), sd, evaluate.t975(len(x) - 1) * sd / math.sqrt(len(x))


#: Columns of the seed table: (row key, header, scale, digits).
COLUMNS = (
    ("c_eval", "Δ eval IQA vs control", 1.0, 3),
    ("c_consistency", "Δ consistency vs control (points)", 100.0, 1),
    ("c_fid", "ΔFID vs control", 1.0, 2),
    ("c_kid", "ΔKID ×1e3 vs control", 1e3, 2),
    ("d_guidance", "Δ guidance IQA vs base", 1.0, 3),
)


def seed_table(rows_by_seed: Sequence[Mapping[str, dict]], seeds: Sequence[int]) -> str:
    """Markdown: per variant and training seed, the paired differences to that seed's control."""
    head = (
        ["variant", "training seed"] + [c[1] for c in COLUMNS] + ["FID", "diversity", "pixel drift"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = [n for n in rows_by_seed[0] if n != "base"]
    for name in names:
        for seed, rows in zip(seeds, rows_by_seed, strict=True):
            m = rows[name]
            cells = [name, str(seed)]
            for key, _, scale, digits in COLUMNS:
                value, ci = scale * m[key], scale * m[key + "_ci"]
                cells.append(f"{value:+.{digits}f} ± {ci:.{digits}f}")
            cells += [f"{m['fid']:.2f} ± {m['fid_ci']:.2f}", f"{m['diversity']:.3f}"]
            cells.append(f"{m['pixel_drift']:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        cells = [f"**{name}**", "mean (sd; 95 % over seeds)"]
        for key, _, scale, digits in COLUMNS:
            mean, sd, half = _spread([scale * rows[name][key] for rows in rows_by_seed])
            cells.append(f"**{mean:+.{digits}f}** ({sd:.{digits}f}; ± {half:.{digits}f})")
        fid = _spread([rows[name]["fid"] for rows in rows_by_seed])
        div = _spread([rows[name]["diversity"] for rows in rows_by_seed])
        drift = _spread([rows[name]["pixel_drift"] for rows in rows_by_seed])
        cells += [f"{fid[0]:.2f} ({fid[1]:.2f})", f"{div[0]:.3f}", f"{drift[0]:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    base = rows_by_seed[0]["base"]
    lines.append(
        f"| base | – | | | | | | {base['fid']:.2f} ± {base['fid_ci']:.2f} "
        f"| {base['diversity']:.3f} | 0 |"
    )
    return "\n".join(lines)


def _header(args: argparse.Namespace, split: str, seconds: float) -> str:
    count = args.per_class * 10
    spread = (
        "; the mean row gives the standard deviation over training seeds and the 95 % t interval "
        "of their mean"
        if split == "test"
        else ""
    )
    return (
        f"`{args.command}`: split `{split}`, {count} prompts x {args.eval_seeds} seeds = "
        f"{count * args.eval_seeds} images per model, FID/KID against {args.real_count} real test "
        f"images on the classifier's features; {args.max_steps or 'demo.yaml'} training steps; "
        f"{seconds / 60:.0f} min on this machine. ± is a 95 % interval over evaluation seeds "
        f"(paired; bootstrap over images for FID/KID){spread}.\n\n"
    )


def rank_candidates(results: Mapping[str, dict]) -> list[str]:
    """Candidates meeting every goal first, each group by the evaluator's gain over its control."""

    def key(name: str) -> tuple[bool, float]:
        result = results[name]
        return (all(result["meets_goal"].values()), result["rows"][name]["c_eval"])

    return sorted(results, key=key, reverse=True)


def run_select(args: argparse.Namespace) -> dict[str, Any]:
    """Train each candidate and its control on seed 0; rank on the validation split."""
    start = time.time()
    scorer = evaluate.Scorer("val", args.per_class, args.eval_seeds, args.real_count)
    results: dict[str, Any] = {}
    controls: dict[str, tuple[dict, tuple[dict, Tensor]]] = {}
    for name in args.candidates:
        overrides = CANDIDATES[name]
        run_dir = args.out / "runs" / "select" / name
        runs = {name: _train(name, overrides, 0, run_dir, args)}
        models = {name: scorer.score(name, run_dir / "lora" / "last")}
        control = {k: v for k, v in overrides.items() if k not in _INERT_WITHOUT_GUIDANCE}
        control["model.w_perc"] = 0.0
        key = json.dumps(control, sort_keys=True)
        if key not in controls:  # candidates that differ only in the head share one control
            control_dir = args.out / "runs" / "select" / f"{name}_control"
            trained = _train("control", control, 0, control_dir, args)
            controls[key] = (
                trained,
                scorer.score(f"{name} control", control_dir / "lora" / "last"),
            )
        runs["control"], models["control"] = controls[key]
        rows = scorer.compare(models)
        results[name] = {"rows": rows, "runs": runs, "meets_goal": _goal([rows], name)}
    return write_select(results, _header(args, "val", time.time() - start), args.out)


def write_select(results: dict[str, Any], header: str, out: Path) -> dict[str, Any]:
    """The selection table (one row per candidate, ranked); writes ``select.md`` and ``.json``."""
    lines = [
        "| candidate | Δ eval IQA vs its control | Δ consistency vs control (points) "
        "| ΔFID vs control | Δ guidance IQA vs base | diversity | meets the goal |",
        "|---|---|---|---|---|---|---|",
    ]
    ranked = rank_candidates(results)
    for name in ranked:
        rows = results[name]["rows"]
        m = rows[name]
        lines.append(
            f"| {name} | {m['c_eval']:+.3f} ± {m['c_eval_ci']:.3f} "
            f"| {100 * m['c_consistency']:+.1f} ± {100 * m['c_consistency_ci']:.1f} "
            f"| {m['c_fid']:+.2f} ± {m['c_fid_ci']:.2f} | {m['d_guidance']:+.3f} "
            f"| {m['diversity']:.3f} (base {rows['base']['diversity']:.3f}) "
            f"| {'yes' if all(results[name]['meets_goal'].values()) else 'no'} |"
        )
    text = (
        header
        + "\n".join(lines)
        + "\n\nRanked (those meeting every goal first, then by the independent evaluator's gain "
        + f"over the control): {', '.join(ranked)}. Chosen: **{ranked[0]}**.\n"
    )
    (out / "select.md").write_text(text)
    record = {"header": header, "results": results, "ranked": ranked}
    (out / "select.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text, flush=True)
    return record


def merge_selects(parts: Sequence[Path], out: Path) -> dict[str, Any]:
    """One selection table from ``select`` runs split over processes (candidates in each)."""
    results: dict[str, Any] = {}
    commands: list[str] = []
    minutes: list[str] = []
    for part in parts:
        record = json.loads((Path(part) / "select.json").read_text())
        header = record.get("header") or (Path(part) / "select.md").read_text().split("\n\n")[0]
        commands.append(header.split("`: ", 1)[0] + "`")
        minutes += re.findall(r"(\d+) min on this machine", header)
        rest = header.split("`: ", 1)[1]
        part_results = record.get("results", record)
        if set(part_results) & set(results):
            raise ValueError(f"candidates {sorted(set(part_results) & set(results))} repeat.")
        results.update(part_results)
    rest = re.sub(
        r"\d+ min on this machine", " + ".join(minutes) + " min in processes side by side", rest
    ).split("\n\n")[0]
    out.mkdir(parents=True, exist_ok=True)
    return write_select(results, " + ".join(commands) + ": " + rest + "\n\n", out)


def run_seeds(args: argparse.Namespace) -> dict[str, Any]:
    """Train every variant for every training seed; measure on the held-out split."""
    start = time.time()
    scorer = evaluate.Scorer("test", args.per_class, args.eval_seeds, args.real_count)
    rows_by_seed, runs = [], {}
    for seed in args.seeds:
        models = {}
        for name in args.variants:
            run_dir = args.out / "runs" / "seeds" / f"{name}_seed{seed}"
            runs[f"{name}_seed{seed}"] = _train(name, VARIANTS[name], seed, run_dir, args)
            models[name] = scorer.score(f"{name} seed {seed}", run_dir / "lora" / "last")
        rows_by_seed.append(scorer.compare(models))
        evaluate.save_grid(models[args.variants[0]][1][:12], args.out / f"samples_seed{seed}.png")
    record = {
        "command": args.command, "seeds": args.seeds, "rows": rows_by_seed, "runs": runs,
        "seconds": round(time.time() - start), "header": _header(args, "test", time.time() - start),
    }  # fmt: skip
    return write_study(record, args.out)


def write_study(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """Add the goal checks to ``record``; write ``study.md`` and ``study.json`` into ``out``."""
    rows_by_seed = record["rows"]
    names = [n for n in rows_by_seed[0] if n not in ("base", "control")]
    record["goals"] = {name: _goal(rows_by_seed, name) for name in names}
    text = record["header"] + seed_table(rows_by_seed, record["seeds"])
    text += "\n\nGoal (against the control, every training seed):\n\n" + "\n".join(
        f"- {name}: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in goal.items())
        for name, goal in record["goals"].items()
    )
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text, flush=True)
    return record


def merge_studies(parts: Sequence[Path], out: Path) -> dict[str, Any]:
    """One study from the ``study.json`` of runs split over processes (e.g. one seed each).

    The parts must share their evaluation (split, prompts, seeds, real images): each scored the
    base itself, and the table keeps every part's own paired differences.
    """
    records = [json.loads((Path(part) / "study.json").read_text()) for part in parts]
    seeds = [seed for record in records for seed in record["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the parts repeat training seeds: {seeds}.")
    merged = {
        "command": " + ".join(record["command"] for record in records),
        "seeds": seeds,
        "rows": [rows for record in records for rows in record["rows"]],
        "runs": {k: v for record in records for k, v in record["runs"].items()},
        "seconds": sum(record["seconds"] for record in records),
        "parts": [str(part) for part in parts],
        "header": records[0]["header"].replace(f"`{records[0]['command']}`", " + ".join(
            f"`{record['command']}`" for record in records)),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    return write_study(merged, out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point: ``select``, ``seeds`` or ``merge`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m acpo_demo.study", description=__doc__)
    parser.add_argument("stage", choices=("select", "seeds", "merge"))
    parser.add_argument("--parts", type=Path, nargs="+", help="merge: folders with study.json")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo_study"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES)
    )
    parser.add_argument("--eval-seeds", type=int, default=100, help="evaluation seeds per prompt")
    parser.add_argument("--per-class", type=int, default=2, help="prompts per class")
    parser.add_argument("--real-count", type=int, default=2000)
    parser.add_argument("--max-steps", type=int, default=None, help="default: demo.yaml's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: demo.yaml's")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if "control" not in args.variants:
        parser.error("--variants must include control: every difference is paired with it.")
    args.command = "python -m acpo_demo.study " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "merge":
        parts = args.parts or []
        if parts and all((Path(part) / "select.json").is_file() for part in parts):
            return merge_selects(parts, args.out)
        return merge_studies(parts, args.out)
    with torch_threads(args.threads):
        return run_select(args) if args.stage == "select" else run_seeds(args)


if __name__ == "__main__":
    main()
