"""Training, evaluation and training curves of the ablation runs.

A run trains through the CLI's own config path (``build_cli`` on ``configs/demo.yaml`` plus the
run's overlay, then ``trainer.fit``), is evaluated by :mod:`acpo_demo.evaluate` paired
with one cached evaluation of the base model, and its curves are read back from TensorBoard.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acpo_demo import evaluate
from acpo_demo.ablations.sweeps import (
    DEMO_CONFIG,
    SETTINGS,
    Point,
    Setting,
    Sweep,
    overlay,
    plan,
    selected_sweeps,
)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (devices, ``max_steps`` reached) are noise in a sweep of many runs."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # the args come from this module, not the command line
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (``None``: leave them), then restore the number."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def demo_config(config: str | Path | None = None) -> Path:
    """The demo config file (default :data:`DEMO_CONFIG`).

    Raises:
        FileNotFoundError: it does not exist (the ablations need a source checkout).
    """
    path = Path(config) if config is not None else DEMO_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"demo config {path} not found: the ablations read configs/demo.yaml of a source "
            "checkout of acpo-lightning (`pip install -e .` there), or pass its path as config."
        )
    return path


def train_run(
    setting: Setting,
    overrides: Mapping[str, Any],
    run_dir: str | Path,
    config: str | Path | None = None,
) -> float:
    """Train one run: ``build_cli`` on the demo config and the run's overlay, then ``fit``.

    Returns:
        The seconds ``fit`` took (the models' loading excluded).

    Raises:
        RuntimeError: the CLI refused the configuration (its message is printed above).
    """
    return fit_overlay(overlay(setting, overrides, Path(run_dir)), run_dir, config)


def fit_overlay(
    tree: Mapping[str, Any], run_dir: str | Path, config: str | Path | None = None
) -> float:
    """Write ``tree`` to ``run_dir/overlay.yaml`` and fit the demo config with it.

    ``acpo fit --config configs/demo.yaml --config <run_dir>/overlay.yaml`` repeats the run.

    Returns:
        The seconds ``fit`` took (the models' loading excluded).

    Raises:
        RuntimeError: the CLI refused the configuration (its message is printed above).
    """
    import yaml

    from acpo_lightning.cli import build_cli

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "overlay.yaml"
    path.write_text(yaml.safe_dump(dict(tree), sort_keys=False))
    with _quiet_lightning():
        try:
            cli = build_cli(
                ["--config", str(demo_config(config)), "--config", str(path)], run=False
            )
        except SystemExit as error:  # the CLI's one-line error; a notebook must see a failure
            raise RuntimeError(f"the CLI refused {path} (exit {error.code}); see above") from error
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        seconds = time.perf_counter() - start
    del cli
    gc.collect()
    return seconds


def read_curves(
    run_dir: str | Path, prefixes: tuple[str, ...] = ("train/",)
) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under ``prefixes`` in a run's TensorBoard logs, ``tag -> [(step, value), ...]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for folder in sorted({p.parent for p in Path(run_dir).rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith(prefixes):
                curves.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def first_curve(curves: Mapping[str, list], tags: tuple[str, ...]) -> tuple[str, list] | None:
    """The first of ``tags`` that the run logged, with its points (``None`` if none)."""
    return next(((t, curves[t]) for t in tags if curves.get(t)), None)


#: Drift on the model's own samples where the run has rollouts, else on the data batch.
DRIFT_TAGS = ("train/loss_anchor_rollout", "train/loss_anchor")


def curve_summary(curves: Mapping[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """What the training curves say about a run, in the units of the tables.

    * ``drift``: mean anchor penalty over the last quarter of the steps (``drift_tag`` says which:
      the rollout's where the run has rollouts, so runs without the anchor are measured too);
    * ``train_iqa``: mean normalized guidance score of the scored samples, same quarter;
    * ``gate_open``: share of steps whose perceptual loss is non-zero (the ``tau`` gate);
    * ``perc_share``: mean logged ``train/perc_share``; ``w_anchor_end``: its last value.
    """

    def tail_mean(points: list[tuple[int, float]]) -> float:
        tail = points[len(points) - max(1, len(points) // 4) :]
        return sum(v for _, v in tail) / len(tail)

    summary: dict[str, Any] = {"drift": float("nan"), "drift_tag": None}
    drift = first_curve(curves, DRIFT_TAGS)
    if drift is not None:
        summary["drift_tag"], summary["drift"] = drift[0], tail_mean(drift[1])
    iqa = curves.get("train/iqa")
    summary["train_iqa"] = tail_mean(iqa) if iqa else float("nan")
    perc = curves.get("train/loss_perc", [])
    summary["gate_open"] = sum(v != 0 for _, v in perc) / len(perc) if perc else 0.0
    share = curves.get("train/perc_share", [])
    summary["perc_share"] = sum(v for _, v in share) / len(share) if share else float("nan")
    w_anchor = curves.get("train/w_anchor", [])
    summary["w_anchor_end"] = w_anchor[-1][1] if w_anchor else float("nan")
    return summary


# ------------------------------------------------------------------------------ evaluation
@dataclass
class Evaluation:
    """The held-out prompts and seeds, the frozen evaluators, the real images' features (the FID/KID
    reference) and the base's result.

    Built once per sweep run by :func:`prepare_evaluation`; every run is paired with ``base``.

    Example:
        >>> evaluation = prepare_evaluation(SETTINGS["smoke"])  # doctest: +SKIP
        >>> metrics, images = evaluate_lora(evaluation, "outputs/demo/lora/last")  # doctest: +SKIP
    """

    prompts: list[str]
    labels: list[int]
    seeds: list[int]
    parts: dict
    real_features: Tensor
    base: dict = field(default_factory=dict)
    base_images: Tensor | None = None
    seconds: float = 0.0


def prepare_evaluation(setting: Setting) -> Evaluation:
    """Load the evaluators and evaluate the base model once (the reference of every paired delta)."""
    from acpo_demo.assets import load_demo_guidance_head

    prompts, labels = evaluate.heldout_prompts(setting.per_class)
    parts = evaluate.load_parts()
    parts["guidance"] = load_demo_guidance_head()  # the head the runs optimize (ABLATION_HEAD)
    evaluation = Evaluation(
        prompts=prompts,
        labels=labels,
        seeds=list(range(setting.seeds)),
        parts=parts,
        real_features=evaluate.classifier_features(
            parts, evaluate.real_reference(setting.real_count)
        ),
    )
    start = time.perf_counter()
    evaluation.base, evaluation.base_images = _evaluate_model(evaluation, None)
    evaluation.seconds = time.perf_counter() - start
    return evaluation


def _evaluate_model(evaluation: Evaluation, lora: Path | None) -> tuple[dict, Tensor]:
    module = evaluate.demo_module(None, lora, head=evaluation.parts["guidance"])
    images = evaluate.sample(module, evaluation.prompts, evaluation.seeds)
    row = evaluate.image_metrics(
        images, evaluation.labels, evaluation.parts, evaluation.real_features, evaluation.prompts
    )
    return row, images


def evaluate_lora(evaluation: Evaluation, lora: str | Path) -> tuple[dict[str, float], Tensor]:
    """The demo's evaluation of a LoRA export, with paired deltas to the base.

    Returns:
        The metrics (the columns of ``evaluate.results_table`` and ``d_consistency``) and the
        images ``[S, P, 3, H, W]``.
    """
    row, images = _evaluate_model(evaluation, Path(lora))
    row.update(evaluate.paired_deltas(row.pop("per_image"), evaluation.base["per_image"]))
    return row, images


def base_metrics(evaluation: Evaluation) -> dict[str, float]:
    """The base's metrics in the shape of a run's (its paired deltas are zero)."""
    row = {k: v for k, v in evaluation.base.items() if k != "per_image"}
    zero = evaluate.paired_deltas(evaluation.base["per_image"], evaluation.base["per_image"])
    return {**row, **{k: 0.0 for k in zero}}


def preview(images: Tensor, per_class: int, seeds: int = 2) -> Tensor:
    """One prompt per class under the first ``seeds`` seeds: ``[min(S, seeds), 10, 3, H, W]``."""
    return images[:seeds, ::per_class].clone()


# ------------------------------------------------------------------------------ the runs
@dataclass
class RunResult:
    """A trained and evaluated run (what its ``run.json`` and ``preview.pt`` hold).

    ``metrics`` are the evaluation's columns with paired deltas to the base, ``summary`` what the
    training curves say (:func:`curve_summary`), ``preview`` one image per class for two seeds.

    Example:
        >>> overrides = {"model.w_anchor": 0.0}
        >>> run = run_point("w_anchor=0", overrides, setting, evaluation, "out")  # doctest: +SKIP
        >>> run.metrics["d_eval"], run.summary["drift"], run.grid  # doctest: +SKIP
    """

    name: str
    overrides: dict[str, Any]
    metrics: dict[str, float]
    summary: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]]
    fit_s: float
    eval_s: float
    preview: Tensor
    run_dir: Path
    reused: bool = False

    @property
    def grid(self) -> Path:
        """The evaluation's sample grid (rows: prompts, columns: seeds)."""
        return self.run_dir / "samples.png"


def run_point(
    name: str,
    overrides: Mapping[str, Any],
    setting: Setting,
    evaluation: Evaluation,
    work: str | Path,
    reuse: bool = False,
    config: str | Path | None = None,
) -> RunResult:
    """Train and evaluate one run under ``work/runs/<name>`` (or reuse it if ``reuse`` and unchanged).

    Args:
        name: the run's name (:func:`~acpo_demo.ablations.sweeps.run_name`).
        overrides: its changes to ``configs/demo.yaml`` (dotted keys, ``model.tau``).
        setting: steps, batch and evaluation size.
        evaluation: the prepared evaluation with the base's result (unused when reused).
        work: the runs folder; the run writes ``overlay.yaml``, ``tensorboard/``, ``lora/``,
            ``samples.png``, ``preview.pt`` and ``run.json`` to ``work/runs/<name>``.
        reuse: reuse a finished run whose stored overlay and evaluation settings equal these.
        config: the demo config (default: the checkout's).
    """
    run_dir = Path(work) / "runs" / name
    record = run_dir / "run.json"
    wanted = {"overlay": overlay(setting, overrides, run_dir), "eval": setting.evaluation_key()}
    if reuse and record.is_file() and (run_dir / "preview.pt").is_file():
        stored = json.loads(record.read_text())
        if {"overlay": stored["overlay"], "eval": stored["eval"]} == wanted:
            return _load_run(stored, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    fit_s = train_run(setting, overrides, run_dir, config)
    start = time.perf_counter()
    metrics, images = evaluate_lora(evaluation, run_dir / "lora" / "last")
    eval_s = time.perf_counter() - start
    evaluate.save_grid(images, run_dir / "samples.png")
    result = RunResult(
        name=name,
        overrides=dict(overrides),
        metrics=metrics,
        summary=curve_summary(curves := read_curves(run_dir)),
        curves=curves,
        fit_s=fit_s,
        eval_s=eval_s,
        preview=preview(images, setting.per_class),
        run_dir=run_dir,
    )
    torch.save(result.preview, run_dir / "preview.pt")
    record.write_text(json.dumps({**wanted, **run_json(result)}, indent=1) + "\n")
    return result


def run_json(result: RunResult) -> dict[str, Any]:
    """The JSON-able part of a run (everything but the preview images and the folder)."""
    keys = ("name", "overrides", "metrics", "summary", "curves", "fit_s", "eval_s")
    return {key: getattr(result, key) for key in keys}


def _load_run(stored: dict, run_dir: Path) -> RunResult:
    curves = {tag: [tuple(p) for p in points] for tag, points in stored["curves"].items()}
    images = torch.load(run_dir / "preview.pt", weights_only=True)
    fields = {k: stored[k] for k in ("name", "overrides", "metrics", "summary", "fit_s", "eval_s")}
    return RunResult(**fields, curves=curves, preview=images, run_dir=run_dir, reused=True)


@dataclass
class AblationResults:
    """Every run of a sweep study, the base's evaluation, and how long it all took.

    Example:
        >>> results = run_sweeps("smoke", "outputs/ablations/smoke")  # doctest: +SKIP
        >>> for point, run in results.rows(results.sweeps[0]):  # doctest: +SKIP
        ...     print(point.label, run.metrics["d_guidance"], run.summary["drift"])
    """

    setting: Setting
    sweeps: list[Sweep]
    base: dict[str, float]
    base_preview: Tensor
    runs: dict[str, RunResult]
    base_eval_s: float = 0.0
    total_s: float = 0.0

    def rows(self, sweep: Sweep) -> list[tuple[Point, RunResult]]:
        """The sweep's points with their runs, in the sweep's order."""
        return [(point, self.runs[point.run]) for point in sweep.points]


def run_sweeps(
    setting: Setting | str,
    work: str | Path,
    sweeps: list[str] | None = None,
    reuse: bool = False,
    config: str | Path | None = None,
    log: Callable[[str], None] = print,
    on_run: Callable[[RunResult], None] | None = None,
) -> AblationResults:
    """Evaluate the base once, then train and evaluate every run of the (selected) sweeps.

    Args:
        setting: a :class:`Setting` or the name of one in :data:`SETTINGS`.
        work: folder of the runs (``work/runs/<name>``).
        sweeps: names of the sweeps to run (default: all of the setting's).
        reuse: reuse a finished run whose overlay and evaluation settings are unchanged.
        config: the demo config (default: the checkout's ``configs/demo.yaml``).
        log: where the one-line progress messages go.
        on_run: called with each run as soon as it is evaluated (the notebook shows it).
    """
    setting = SETTINGS[setting] if isinstance(setting, str) else setting
    with torch_threads(setting.threads):
        return _run_sweeps(setting, work, sweeps, reuse, config, log, on_run)


def _run_sweeps(
    setting: Setting,
    work: str | Path,
    sweeps: list[str] | None,
    reuse: bool,
    config: str | Path | None,
    log: Callable[[str], None],
    on_run: Callable[[RunResult], None] | None,
) -> AblationResults:
    start = time.perf_counter()
    runs = plan(setting, sweeps)
    log(f"[ablations] {setting.name}: {len(runs)} runs: {', '.join(runs)}")
    evaluation = prepare_evaluation(setting)
    log(f"[ablations] base evaluated in {evaluation.seconds:.0f}s")
    results = AblationResults(
        setting=setting,
        sweeps=selected_sweeps(setting, sweeps),
        base=base_metrics(evaluation),
        base_preview=preview(evaluation.base_images, setting.per_class),
        runs={},
        base_eval_s=evaluation.seconds,
    )
    for name, overrides in runs.items():
        result = run_point(name, overrides, setting, evaluation, work, reuse, config)
        results.runs[name] = result
        m = result.metrics
        timing = "reused" if result.reused else f"fit {result.fit_s:.0f}s eval {result.eval_s:.0f}s"
        log(
            f"[ablations] {name}: {timing}; "
            f"Δ guidance {m['d_guidance']:+.3f} Δ eval {m['d_eval']:+.3f} "
            f"drift {result.summary['drift']:.4f}"
        )
        if on_run is not None:
            on_run(result)
    results.total_s = time.perf_counter() - start
    return results
