"""Ablation sweeps on the embedded demo: what each ACPO knob does, measured.

Each sweep changes one knob of ``configs/demo.yaml`` (everything else as in ``make demo``). A point
trains a LoRA through the CLI's own config path (``build_cli`` with the demo config and an overlay
written next to the run), is evaluated by :mod:`acpo_demo.evaluate` on the held-out
prompts, paired with one evaluation of the base model per sweep run, and its training curves are
read back from TensorBoard. Points that are the same run (the demo itself appears in several sweeps)
are trained once. :data:`SETTINGS` holds ``smoke`` (a minute or two; CI runs the notebooks with it)
and ``full`` (the figures of ``docs/ablations.md``, about 35 minutes on 2 CPU cores).

* :mod:`~acpo_demo.ablations.sweeps`: the settings, sweeps and run overlays (pure);
* :mod:`~acpo_demo.ablations.runs`: training, evaluation, training curves;
* :mod:`~acpo_demo.ablations.report`: tables, plots and the markdown report.

Usage::

    python -m acpo_demo.ablations --setting full --out docs/ablations

writes ``results.json``, ``results.md`` (a table per sweep) and PNG plots to ``--out``; the runs
(overlay YAML, LoRA, TensorBoard logs, sample grids) go to ``outputs/ablations/<setting>``.
``notebooks/02_ablations.ipynb`` calls the same functions.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from acpo_demo.ablations.runs import (
    AblationResults,
    Evaluation,
    RunResult,
    curve_summary,
    evaluate_lora,
    prepare_evaluation,
    read_curves,
    run_point,
    run_sweeps,
    torch_threads,
    train_run,
)
from acpo_demo.ablations.sweeps import (
    ABLATION_BASE,
    ABLATION_HEAD,
    CONSTRAINT_DELTA,
    DEMO_CONFIG,
    SETTINGS,
    Point,
    Setting,
    Sweep,
    overlay,
    plan,
    run_name,
)

__all__ = [
    "ABLATION_BASE",
    "ABLATION_HEAD",
    "CONSTRAINT_DELTA",
    "DEMO_CONFIG",
    "SETTINGS",
    "AblationResults",
    "Evaluation",
    "Point",
    "RunResult",
    "Setting",
    "Sweep",
    "curve_summary",
    "evaluate_lora",
    "main",
    "overlay",
    "plan",
    "prepare_evaluation",
    "read_curves",
    "run_name",
    "run_point",
    "run_sweeps",
    "torch_threads",
    "train_run",
]


def main(argv: list[str] | None = None) -> AblationResults:
    """Entry point: run a setting's sweeps and write the report (tables, plots, JSON) to ``--out``."""
    from acpo_demo.ablations.report import write_report

    parser = argparse.ArgumentParser(prog="python -m acpo_demo.ablations")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="smoke")
    parser.add_argument("--out", type=Path, default=None, help="report folder")
    parser.add_argument("--work", type=Path, default=None, help="runs folder")
    parser.add_argument("--sweep", action="append", default=None, help="only this sweep")
    parser.add_argument("--reuse", action="store_true", help="reuse finished, unchanged runs")
    parser.add_argument("--config", default=None, help="the demo config (default: the checkout's)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the setting's, 1)"
    )
    args = parser.parse_args(argv)
    work = args.work or Path("outputs/ablations") / args.setting
    out = args.out or work / "report"
    setting = SETTINGS[args.setting]
    if args.threads is not None:
        setting = dataclasses.replace(setting, threads=args.threads)
    results = run_sweeps(setting, work, args.sweep, args.reuse, args.config)
    command = "python -m acpo_demo.ablations " + " ".join(
        ["--setting", args.setting, "--out", str(out)] + [f"--sweep {s}" for s in args.sweep or []]
    )
    write_report(results, out, command)
    print(f"[ablations] report in {out} ({results.total_s / 60:.1f} min)")
    return results
