"""The ablation study's pure parts: sweeps and run names, overlays, curve summaries, tables, plots.

The runs themselves train and evaluate the demo; ``tests/test_notebooks.py`` runs them all in the
smoke setting through notebook 02.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
import yaml

from acpo_demo import ablations
from acpo_demo.ablations import (
    ABLATION_BASE,
    SETTINGS,
    AblationResults,
    RunResult,
    curve_summary,
    overlay,
    plan,
    read_curves,
    run_name,
    run_point,
)
from acpo_demo.ablations import report as R
from conftest import CONFIGS


def _points(setting: str, sweep: str) -> list[dict]:
    found = next(s for s in SETTINGS[setting].sweeps if s.name == sweep)
    return [dict(p.overrides) for p in found.points]


def test_every_run_pins_the_study_base_whatever_demo_yaml_ships(tmp_path) -> None:
    from acpo_lightning import ACPOModule

    signature = inspect.signature(ACPOModule).parameters
    assert ABLATION_BASE["model.anchor_delta"] == signature["anchor_delta"].default
    tree = overlay(SETTINGS["full"], {"model.tau": 100}, tmp_path)
    for key, value in ABLATION_BASE.items():
        expected = 100 if key == "model.tau" else value
        assert tree["model"][key.removeprefix("model.")] == expected, key
    assert tree["model"]["quality_head"] == ablations.ABLATION_HEAD
    assert ablations.DEMO_CONFIG == CONFIGS / "demo.yaml"


def test_points_equal_to_the_demo_share_one_run_and_every_other_point_is_distinct() -> None:
    assert run_name({"model.w_anchor": 1.0, "model.anchor_mode": "penalty"}) == "default"
    assert run_name({"model.tau": 100, "model.k_late": 6}) == "k_late=6,tau=100"
    for setting in SETTINGS.values():
        runs = plan(setting)
        assert next(iter(runs)) == "default"
        for sweep in setting.sweeps:
            names = [p.run for p in sweep.points]
            assert len(set(names)) == len(names), (setting.name, sweep.name)
            assert set(names) <= set(runs)
    full = plan(SETTINGS["full"])
    assert len(full) == 14  # 1 + 3 (w_anchor) + 3 (w_perc) + 3 (tau) + 3 (share) + 1 (constraint)
    assert full["w_anchor=0"] == {"model.w_anchor": 0.0}
    with pytest.raises(ValueError, match=r"unknown sweep\(s\) \['nope'\]"):
        plan(SETTINGS["full"], ["w_anchor", "nope"])
    assert set(plan(SETTINGS["full"], ["tau"])) == {
        "k_late=6,tau=100",
        "k_late=6,tau=300",
        "k_late=6,tau=600",
    }


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_tau_point_opens_the_gate_on_a_different_share_of_the_scored_steps(
    setting: str,
) -> None:
    from acpo_demo import load_demo_sampler

    sampler = load_demo_sampler()
    sampler.set_timesteps(
        yaml.safe_load((CONFIGS / "demo.yaml").read_text())["model"]["rollout_steps"]
    )
    timesteps = sampler.timesteps.tolist()
    points = _points(setting, "tau")
    open_sets = []
    for point in points:
        candidates = timesteps[-point["model.k_late"] :]
        open_sets.append(tuple(t for t in candidates if t <= point["model.tau"]))
    assert all(open_sets) and len(set(open_sets)) == len(open_sets)
    # why the sweep widens k_late: with the demo's 3 candidates, its taus >= 200 are one run
    demo_candidates = timesteps[-ABLATION_BASE["model.k_late"] :]
    assert max(demo_candidates) == 200
    assert any(point["model.tau"] >= 200 for point in points)


def test_share_points_train_the_data_objective_and_anchor_mode_has_a_binding_delta() -> None:
    for setting in SETTINGS:
        assert all(p["model.objective"] == "data" for p in _points(setting, "perceptual_share"))
        constraint = _points(setting, "anchor_mode")[1]
        assert constraint["model.anchor_mode"] == "constraint"
        assert constraint["model.anchor_delta"] == ablations.CONSTRAINT_DELTA < 0.014


def test_overlay_changes_the_knobs_and_sends_every_output_to_the_run_folder(tmp_path) -> None:
    tree = overlay(SETTINGS["smoke"], {"model.tau": 100, "model.k_late": 6}, tmp_path)
    assert tree["model"]["tau"] == 100 and tree["model"]["k_late"] == 6
    assert tree["model"]["rollout_batch_size"] == 4
    assert tree["data"] == {"init_args": {"batch_size": 4}}
    assert tree["trainer"]["max_steps"] == 3 and tree["trainer"]["log_every_n_steps"] == 1
    assert tree["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path)
    assert tree["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(tmp_path / "lora")
    full = overlay(SETTINGS["full"], {}, tmp_path)
    assert "data" not in full and "rollout_batch_size" not in full.get("model", {})
    assert full["trainer"]["max_steps"] == 80
    assert yaml.safe_load(yaml.safe_dump(full)) == full


def test_curve_summary_reads_drift_gate_share_and_dual_variable() -> None:
    curves = {
        "train/loss_anchor_rollout": [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.4)],
        "train/loss_anchor": [(0, 9.0)] * 4,
        "train/loss_perc": [(0, -0.5), (1, 0.0), (2, -0.7), (3, 0.0)],
        "train/perc_share": [(i, 1.0) for i in range(4)],
        "train/iqa": [(0, 0.5), (1, 0.5), (2, 0.6), (3, 0.8)],
        "train/w_anchor": [(0, 1.0), (3, 2.5)],
    }
    summary = curve_summary(curves)
    assert summary["drift_tag"] == "train/loss_anchor_rollout"
    assert summary["drift"] == pytest.approx(0.4)  # last quarter of 4 steps: the last one
    assert summary["train_iqa"] == pytest.approx(0.8)
    assert summary["gate_open"] == 0.5 and summary["perc_share"] == 1.0
    assert summary["w_anchor_end"] == 2.5
    data_run = curve_summary({"train/loss_anchor": [(i, float(i)) for i in range(8)]})
    assert data_run["drift_tag"] == "train/loss_anchor" and data_run["drift"] == 6.5
    assert data_run["gate_open"] == 0.0 and math.isnan(data_run["perc_share"])


def test_read_curves_reads_the_train_scalars_of_tensorboard_logs(tmp_path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "tensorboard" / "version_0")
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        writer.add_scalar("val/loss", 5.0, step)
    writer.close()
    curves = read_curves(tmp_path)
    assert set(curves) == {"train/loss"}
    assert [s for s, _ in curves["train/loss"]] == [0, 1, 2]
    assert curves["train/loss"][2][1] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ the report
def _metrics(d_guidance: float, d_eval: float, kid: float, consistency: float) -> dict:
    return {
        "guidance_iqa": 0.6 + d_guidance, "guidance_iqa_ci": 0.01,
        "eval_iqa": 0.6 + d_eval, "eval_iqa_ci": 0.01,
        "consistency": consistency, "consistency_prob": 0.8, "kid": kid, "kid_ci": 0.01,
        "diversity": 4.0, "d_guidance": d_guidance, "d_guidance_ci": 0.02,
        "d_eval": d_eval, "d_eval_ci": 0.005, "d_consistency": consistency - 0.9,
        "d_consistency_ci": 0.01,
    }  # fmt: skip


@pytest.fixture
def results(tmp_path) -> AblationResults:
    """Results of the smoke setting's sweeps made by hand (no training)."""
    setting = SETTINGS["smoke"]
    preview = torch.rand(2, 10, 3, 32, 32)
    curves = {
        "train/iqa": [(s, 0.6 + 0.1 * s) for s in range(3)],
        "train/loss_anchor_rollout": [(s, 0.001 * s) for s in range(3)],
        "train/loss_anchor": [(s, 0.002 * s) for s in range(3)],
        "train/loss_diff": [(s, 0.1) for s in range(3)],
        "train/w_anchor": [(s, 1.0) for s in range(3)],
        "train/loss_perc": [(s, -0.6) for s in range(3)],
        "train/perc_share": [(s, 1.0) for s in range(3)],
    }
    runs = {}
    for i, (name, overrides) in enumerate(plan(setting).items()):
        runs[name] = RunResult(
            name=name,
            overrides=overrides,
            metrics=_metrics(0.1 * i, 0.01 * i, 0.05 + 0.01 * i, 0.9 - 0.01 * i),
            summary=curve_summary(curves),
            curves=curves,
            fit_s=1.0,
            eval_s=1.0,
            preview=preview,
            run_dir=tmp_path / name,
        )
    base = {**_metrics(0.0, 0.0, 0.05, 0.9), "d_guidance_ci": 0.0, "d_eval_ci": 0.0}
    return AblationResults(setting, list(setting.sweeps), base, preview, runs, 1.0, 10.0)


def test_sweep_table_has_the_base_and_one_row_per_point(results: AblationResults) -> None:
    sweep = results.sweeps[0]  # w_anchor: 0, 1
    lines = R.sweep_table(sweep, results).splitlines()
    assert lines[0].startswith("| w_anchor | run | guidance IQA Δ")
    assert len(lines) == 2 + 1 + len(sweep.points)
    assert lines[2].startswith("| base | – | 0.600 | 0.600 | 90.0% | 50.0 |")
    index = list(results.runs).index("w_anchor=0")
    assert lines[3].startswith(f"| 0 | `w_anchor=0` | +{0.1 * index:.3f} ± 0.020 |")
    assert "| 2.00 | 100% | 1.00 | 1.00 |" in lines[3]  # drift x1e3, gate, share, w_anchor


def test_tradeoff_data_starts_at_the_base_and_scales_to_the_plotted_units(
    results: AblationResults,
) -> None:
    points = R.tradeoff_data(results.sweeps[0], results)
    assert [p["label"] for p in points] == ["base", "0", "1"]
    assert points[0]["d_guidance"] == 0.0 and points[0]["drift"] == 0.0
    assert points[0]["kid"] == pytest.approx(50.0)  # x1e3
    run = results.runs["w_anchor=0"]
    assert points[1]["d_eval"] == run.metrics["d_eval"]
    assert points[1]["d_consistency"] == pytest.approx(100 * run.metrics["d_consistency"])
    assert points[1]["drift"] == pytest.approx(1e3 * run.summary["drift"])


def test_moving_average_is_a_trailing_mean() -> None:
    assert R.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert R.moving_average([2.0, 4.0], 0) == [2.0, 4.0]


def test_write_report_writes_tables_json_and_every_plot(results: AblationResults, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    results.runs["w_perc=0"].summary["train_iqa"] = float("nan")  # a run that logged no score
    path = R.write_report(results, out, "python -m acpo_demo.ablations --setting smoke")
    text = path.read_text()
    assert "`python -m acpo_demo.ablations --setting smoke`" in text
    for sweep in results.sweeps:
        assert f"## {sweep.title}" in text and R.sweep_table(sweep, results) in text
        for name in (R.curve_file(sweep), R.sample_file(sweep)):
            assert f"]({name})" in text and (out / name).stat().st_size > 1000
    assert (out / "tradeoff.png").stat().st_size > 1000
    data = json.loads((out / "results.json").read_text())
    assert set(data["runs"]) == set(results.runs) and data["setting"]["max_steps"] == 3
    assert data["runs"]["w_perc=0"]["summary"]["train_iqa"] is None  # strict JSON
    assert "curves" not in data["runs"]["default"]  # they stay in each run's run.json


def test_run_point_reuses_a_finished_run_only_when_its_config_is_unchanged(
    results: AblationResults, tmp_path, monkeypatch
) -> None:
    setting = SETTINGS["smoke"]
    run = results.runs["w_anchor=0"]
    run_dir = tmp_path / "runs" / run.name
    run_dir.mkdir(parents=True)
    stored = {
        "overlay": overlay(setting, run.overrides, run_dir),
        "eval": setting.evaluation_key(),
        **ablations.runs.run_json(run),
    }
    (run_dir / "run.json").write_text(json.dumps(stored))
    torch.save(run.preview, run_dir / "preview.pt")

    class Retrained(Exception):
        pass

    def train(*args, **kwargs):
        raise Retrained

    monkeypatch.setattr(ablations.runs, "train_run", train)
    again = run_point(run.name, run.overrides, setting, None, tmp_path, reuse=True)
    assert again.reused and again.metrics == run.metrics
    assert torch.equal(again.preview, run.preview)
    assert again.curves["train/iqa"] == run.curves["train/iqa"]
    with pytest.raises(Retrained):  # another number of steps: trains again
        longer = dataclasses.replace(setting, max_steps=4)
        run_point(run.name, run.overrides, longer, None, tmp_path, reuse=True)
    with pytest.raises(Retrained):  # reuse off
        run_point(run.name, run.overrides, setting, None, tmp_path, reuse=False)
