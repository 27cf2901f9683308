"""Tables, plots and the markdown report of :mod:`acpo_demo.ablations`.

The pure parts (:func:`sweep_table`, :func:`tradeoff_data`, :func:`moving_average`) shape the
results; the plots (matplotlib, the ``dev`` extra) return figures that the notebook shows and
:func:`write_report` saves next to ``results.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acpo_demo import evaluate
from acpo_demo.ablations.runs import (
    DRIFT_TAGS,
    AblationResults,
    Sweep,
    first_curve,
    run_json,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Panels of the training-curve figures: title and the tags tried in order (the first logged wins).
CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("guidance score of the scored samples", ("train/iqa",)),
    ("drift ‖f − f_base‖² (rollout, else data)", DRIFT_TAGS),
    ("diffusion loss", ("train/loss_diff",)),
    ("w_anchor", ("train/w_anchor",)),
)
#: The quantity constraint mode holds at ``anchor_delta``, shown in the anchor-mode sweep.
CONSTRAINED_PANEL = ("anchor penalty, data + rollout (constrained)", ("train/loss_anchor",))


def _pm(value: float, ci: float, digits: int = 3, sign: bool = False) -> str:
    body = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return body if math.isnan(ci) else f"{body} ± {ci:.{digits}f}"


def sweep_table(sweep: Sweep, results: AblationResults) -> str:
    """The markdown table of one sweep: the base, then one row per point.

    Columns: paired Δ of the guidance and the independent evaluator's IQA, prompt consistency
    (and its paired Δ in points), KID, diversity, then from the training curves the drift over the
    last quarter, the share of steps with the perceptual gate open, the logged perceptual share
    and the final ``w_anchor``.
    """
    lines = [
        f"| {sweep.name} | run | guidance IQA Δ | eval IQA Δ | consistency (Δ pts) | KID ×1e3 "
        "| diversity | drift ×1e3 (train) | gate open | perc share | w_anchor (end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    b = results.base
    lines.append(
        f"| base | – | {b['guidance_iqa']:.3f} | {b['eval_iqa']:.3f} "
        f"| {100 * b['consistency']:.1f}% | {1e3 * b['kid']:.1f} | {b['diversity']:.3f} "
        "| – | – | – | – |"
    )
    for point, run in results.rows(sweep):
        m, s = run.metrics, run.summary
        lines.append(
            f"| {point.label} | `{run.name}` | {_pm(m['d_guidance'], m['d_guidance_ci'], sign=True)} "
            f"| {_pm(m['d_eval'], m['d_eval_ci'], sign=True)} "
            f"| {100 * m['consistency']:.1f}% ({_pm(100 * m['d_consistency'], 100 * m['d_consistency_ci'], 1, True)}) "
            f"| {1e3 * m['kid']:.1f} | {m['diversity']:.3f} | {1e3 * s['drift']:.2f} "
            f"| {100 * s['gate_open']:.0f}% | {s['perc_share']:.2f} | {s['w_anchor_end']:.2f} |"
        )
    return "\n".join(lines)


def tradeoff_data(sweep: Sweep, results: AblationResults) -> list[dict[str, Any]]:
    """The points of one sweep's quality-vs-drift curve, the base first (at zero gain).

    Each has ``label``, ``kid`` and ``kid_ci`` (×1e3), ``drift`` (×1e3, from training; 0 for the
    base), ``d_consistency`` (points) and the paired gains ``d_guidance``, ``d_eval``, each with its
    ``_ci``.
    """
    keys = ("d_guidance", "d_eval", "d_consistency")
    rows = [("base", results.base, 0.0)] + [
        (p.label, r.metrics, r.summary["drift"]) for p, r in results.rows(sweep)
    ]
    points = []
    for label, m, drift in rows:
        point = {"label": label, "kid": 1e3 * m["kid"], "kid_ci": 1e3 * m["kid_ci"]}
        point["drift"], point["drift_ci"] = 1e3 * drift, 0.0
        for key in keys:
            scale = 100.0 if key == "d_consistency" else 1.0
            point[key] = scale * m[key]
            point[key + "_ci"] = scale * m.get(key + "_ci", 0.0)
        points.append(point)
    return points


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start), same length as ``values``."""
    window = max(1, window)
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "the ablation plots need matplotlib: pip install 'acpo-lightning[dev]' (or matplotlib)"
        ) from error
    return plt


def plot_curves(sweep: Sweep, results: AblationResults) -> Figure:
    """Training curves of a sweep's runs: raw (faint) and a moving average, one panel per quantity.

    Sweeps with a constraint-mode point get a panel of the constrained penalty, with ``anchor_delta``
    dashed.
    """
    plt = _pyplot()
    deltas = {
        i: dict(p.overrides)["model.anchor_delta"]
        for i, p in enumerate(sweep.points)
        if dict(p.overrides).get("model.anchor_mode") == "constraint"
    }
    panels = CURVE_PANELS[:-1] + ((CONSTRAINED_PANEL,) if deltas else ()) + CURVE_PANELS[-1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    window = max(1, results.setting.max_steps // 10)
    for ax, (title, tags) in zip(axes, panels, strict=True):
        for i, (point, run) in enumerate(results.rows(sweep)):
            found = first_curve(run.curves, tags)
            if found is None:
                continue
            steps, values = zip(*found[1], strict=True)
            ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), color=f"C{i}", label=point.label)
            if (title, tags) == CONSTRAINED_PANEL and i in deltas:
                ax.axhline(deltas[i], color=f"C{i}", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(title=sweep.name, fontsize=8)
    fig.suptitle(f"{sweep.title}: training curves", fontsize=10)
    fig.tight_layout()
    return fig


_TRADEOFF_AXES = (
    ("kid", "KID ×1e3 to real images (lower: closer)"),
    ("d_consistency", "prompt consistency Δ vs base (points)"),
    ("drift", "drift ×1e3 in training, last quarter (rollout; share sweep: data)"),
)
_GAINS = (("d_guidance", "guidance IQA Δ (optimized)"), ("d_eval", "eval IQA Δ (independent)"))


def plot_tradeoff(results: AblationResults) -> Figure:
    """Quality gain against drift for every sweep, each sweep a line through its points.

    Rows: the gain in guidance IQA (the optimized head) and in the independent evaluator's IQA.
    Columns: KID to real images, the change in prompt consistency, and the training drift (the
    base sits at the star: its KID, and zero change and drift).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(_TRADEOFF_AXES), figsize=(5 * len(_TRADEOFF_AXES), 8))
    for i, sweep in enumerate(results.sweeps):
        points = tradeoff_data(sweep, results)
        for row, (gain, gain_label) in enumerate(_GAINS):
            for col, (drift, drift_label) in enumerate(_TRADEOFF_AXES):
                ax = axes[row][col]
                xs = [p[drift] for p in points[1:]]
                ys = [p[gain] for p in points[1:]]
                ax.errorbar(
                    xs,
                    ys,
                    xerr=[p[drift + "_ci"] for p in points[1:]] if col == 1 else None,
                    yerr=[p[gain + "_ci"] for p in points[1:]],
                    color=f"C{i}",
                    marker="o",
                    capsize=2,
                    label=sweep.name,
                )
                for p in points[1:]:
                    ax.annotate(p["label"], (p[drift], p[gain]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")  # fmt: skip
                ax.set_xlabel(drift_label, fontsize=9)
                ax.set_ylabel(gain_label, fontsize=9)
    for row in axes:
        for col, ax in enumerate(row):
            base_x = results.base["kid"] * 1e3 if col == 0 else 0.0
            ax.plot([base_x], [0.0], marker="*", color="black", markersize=10, linestyle="")
            ax.axhline(0.0, color="grey", linewidth=0.5)
    axes[0][0].legend(fontsize=8, title="sweep (★ = base)")
    fig.suptitle("Quality gain against drift (paired Δ vs base; bars: 95% CI over seeds)")
    fig.tight_layout()
    return fig


def plot_samples(sweep: Sweep, results: AblationResults) -> Figure:
    """Samples of a sweep: one row per model (base first), one prompt per class, first seed."""
    import torch

    plt = _pyplot()
    models = [("base", results.base_preview)] + [
        (p.label, r.preview) for p, r in results.rows(sweep)
    ]
    columns = results.base_preview.shape[1]
    fig, axes = plt.subplots(
        len(models), 1, figsize=(1.1 * columns, 1.25 * len(models)), squeeze=False
    )
    for ax, (label, images) in zip(axes[:, 0], models, strict=True):
        strip = torch.cat(list(images[0]), dim=2)  # [3, H, W * columns]
        ax.imshow(strip.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"{sweep.title}: one held-out prompt per class, seed 0", fontsize=10)
    fig.tight_layout()
    return fig


def results_json(results: AblationResults) -> dict[str, Any]:
    """What the report shows, as strict JSON (non-finite numbers become ``null``).

    The per-step curves stay in each run's ``run.json``; here are their summaries.
    """
    setting = results.setting
    runs = {}
    for name, run in results.runs.items():
        runs[name] = {k: v for k, v in run_json(run).items() if k != "curves"}
    return _finite_or_null(
        {
            "setting": {
                "name": setting.name,
                "max_steps": setting.max_steps,
                "batch_size": setting.batch_size,
                **setting.evaluation_key(),
            },
            "sweeps": [
                {"name": s.name, "points": [{"label": p.label, "run": p.run} for p in s.points]}
                for s in results.sweeps
            ],
            "base": results.base,
            "runs": runs,
            "base_eval_s": results.base_eval_s,
            "total_s": results.total_s,
        }
    )


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def report_markdown(results: AblationResults, command: str) -> str:
    """``results.md``: how it was made, one section per sweep (how the knob acts, table, plots)."""
    s = results.setting
    prompts = 10 * s.per_class
    lines = [
        f"# Ablations of the embedded demo: {s.name} setting",
        "",
        f"Made by `{command}` in {results.total_s / 60:.1f} minutes. Every run is "
        f"`configs/demo.yaml` with one knob changed, {s.max_steps} steps"
        + (f", batch {s.batch_size}" if s.batch_size else "")
        + f"; evaluation as `make demo`: {prompts} held-out prompts × {s.seeds} seeds, DDIM "
        f"{evaluate.EVAL_STEPS} steps, CFG {evaluate.EVAL_GUIDANCE}, KID on classifier features "
        f"vs {s.real_count} real test images. Δ is the paired difference to the base (same "
        "prompts, seeds and noise) with its 95% interval over seeds. *drift (train)* is the mean "
        "anchor penalty ‖f − f_base‖² over the last quarter of training, on the rollout's x_t "
        "(logged even without the anchor) or, for `objective: data` runs, on the data batch. "
        "Runs share the seed, so every run sees the same batches, noise and rollout steps.",
        "",
        "![quality gain against drift](tradeoff.png)",
        "",
    ]
    for sweep in results.sweeps:
        lines += [
            f"## {sweep.title}",
            "",
            sweep.how,
            "",
            sweep_table(sweep, results),
            "",
            f"![training curves]({curve_file(sweep)})",
            "",
            f"![samples]({sample_file(sweep)})",
            "",
        ]
    lines += [
        "## Runs",
        "",
        "| run | overrides of demo.yaml | fit s | eval s |",
        "|---|---|---|---|",
    ]
    for name, run in results.runs.items():
        changes = ", ".join(f"`{k}: {v}`" for k, v in run.overrides.items()) or "–"
        lines.append(f"| `{name}` | {changes} | {run.fit_s:.0f} | {run.eval_s:.0f} |")
    lines.append(f"| base (evaluation only) | – | – | {results.base_eval_s:.0f} |")
    return "\n".join(lines) + "\n"


def curve_file(sweep: Sweep) -> str:
    """File name of a sweep's training-curve figure."""
    return f"curves_{sweep.name}.png"


def sample_file(sweep: Sweep) -> str:
    """File name of a sweep's sample figure."""
    return f"samples_{sweep.name}.png"


def write_report(results: AblationResults, out: str | Path, command: str) -> Path:
    """Write ``results.md``, ``results.json``, ``tradeoff.png`` and per-sweep curve and sample PNGs.

    Returns:
        The path of ``results.md``.
    """
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: Mapping[str, Figure] = {
        "tradeoff.png": plot_tradeoff(results),
        **{curve_file(s): plot_curves(s, results) for s in results.sweeps},
        **{sample_file(s): plot_samples(s, results) for s in results.sweeps},
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
    (out / "results.json").write_text(
        json.dumps(results_json(results), indent=1, allow_nan=False) + "\n"
    )
    path = out / "results.md"
    path.write_text(report_markdown(results, command))
    return path
