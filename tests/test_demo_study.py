"""The demo's evaluation table, the proxy-against-held-out curves and the seed study's assembly.

Training and sampling are exercised by the demo's smoke fit (tests/test_demo.py); these tests feed
hand-made per-image scores and features, so every number they check is known.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from acpo_demo import evaluate, study
from conftest import CONFIGS


# ------------------------------------------------------------------------------ configs
def test_demo_callbacks_move_every_output_and_the_overlays_repeat_demo_yamls_list(tmp_path) -> None:
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["trainer"]["callbacks"]
    names = [c["class_path"].rsplit(".", 1)[1] for c in demo]
    assert names == [
        "QualityHeadCallback",
        "QualityHeadCallback",
        "BestLoRACallback",
        "LoRAExportCallback",
    ]
    proxy, gold = demo[0]["init_args"], demo[1]["init_args"]
    # one generation pass: every generation setting equal, only the head and name differ
    shared = ("prompts", "seed", "batch_size", "every_n_steps", "every_n_epochs")
    assert all(proxy[k] == gold[k] for k in shared) and "head" not in proxy
    assert gold["name"] == "eval_iqa" and demo[2]["init_args"]["monitor"] == "val/eval_iqa"
    moved = study.demo_callbacks(tmp_path / "run")
    assert [c["init_args"].get("dirpath") for c in moved] == [
        None,
        None,
        *[str(tmp_path / "run" / "lora")] * 2,
    ]
    for overlay in ("demo_control.yaml", "demo_no_anchor.yaml"):
        tree = yaml.safe_load((CONFIGS / overlay).read_text())
        out = tree["trainer"]["logger"]["init_args"]["save_dir"]
        assert tree["trainer"]["callbacks"] == study.demo_callbacks(f"{out}"), overlay


def test_the_curve_prompts_are_the_validation_wordings_never_the_evaluation_ones() -> None:
    from acpo_lightning.callbacks.prompts import load_prompts

    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["trainer"]["callbacks"][0]
    prompts = load_prompts(CONFIGS.parent / demo["init_args"]["prompts"])
    assert prompts == evaluate.heldout_prompts(3, "val")[0]
    assert not set(prompts) & set(evaluate.heldout_prompts(3, "test")[0])
    assert demo["init_args"]["seed"] == evaluate.SPLITS["val"][1] != evaluate.SPLITS["test"][1]


def test_study_overlay_sets_the_training_seed_everywhere_and_keeps_outputs_in_the_run(
    tmp_path,
) -> None:
    tree = study.study_overlay({"model.w_anchor": 0.0}, 2, tmp_path, max_steps=5, batch_size=4)
    assert tree["seed_everything"] == 2 and tree["model"]["seed"] == 2
    assert tree["data"]["init_args"] == {"data_seed": 2, "batch_size": 4}
    assert tree["model"]["w_anchor"] == 0.0 and tree["trainer"]["max_steps"] == 5
    assert tree["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path)
    assert yaml.safe_load(yaml.safe_dump(tree)) == tree


# ------------------------------------------------------------------------------ the table
def _row(
    eval_shift: float, hit: float, feature_shift: float, seeds: int = 8, prompts: int = 5
) -> dict:
    g = torch.Generator().manual_seed(0)  # the same noise for every model: paired
    noise = 0.05 * torch.randn(seeds, prompts, generator=g)
    features = torch.randn(seeds * prompts, 4, generator=g) + feature_shift
    return {
        "per_image": {
            "guidance": 0.5 + noise, "eval": 0.5 + eval_shift + noise,
            "hit": torch.full((seeds, prompts), hit), "features": features,
        },
        "guidance_iqa": 0.5, "guidance_iqa_ci": 0.01, "eval_iqa": 0.5 + eval_shift,
        "eval_iqa_ci": 0.01, "consistency": hit, "consistency_prob": 0.8, "fid": 1.0,
        "fid_ci": 0.1, "kid": 0.0, "kid_ci": 0.01, "diversity": 4.0,
    }  # fmt: skip


def test_paired_deltas_are_to_the_base_and_to_the_control() -> None:
    rows = {
        "base": _row(0.0, 0.9, 0.0),
        "ACPO": _row(0.05, 0.95, 0.0),
        "control": _row(0.01, 0.9, 0.0),
    }
    real = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    evaluate.add_paired_deltas(rows, real)
    acpo = rows["ACPO"]
    assert acpo["d_eval"] == pytest.approx(0.05) and acpo["c_eval"] == pytest.approx(0.04)
    assert acpo["c_eval_ci"] == pytest.approx(0.0, abs=1e-6)  # the same noise cancels
    assert acpo["c_consistency"] == pytest.approx(0.05) and acpo["d_consistency"] == pytest.approx(
        0.05
    )
    assert acpo["c_fid"] == pytest.approx(0.0, abs=1e-9)  # identical features
    assert rows["control"]["c_eval"] == 0 and "per_image" not in acpo
    table = evaluate.results_table(rows)
    header, rule, *lines = table.splitlines()
    assert header.count("|") == rule.count("|") == lines[0].count("|")
    assert "Δ vs control" in header and "+0.040 ± 0.000" in lines[1]


def test_without_a_control_the_table_has_no_control_columns() -> None:
    rows = {"base": _row(0.0, 0.9, 0.0), "ACPO": _row(0.05, 0.95, 0.0)}
    evaluate.add_paired_deltas(rows)
    assert "c_eval" not in rows["ACPO"] and "control" not in evaluate.results_table(rows)


def test_unknown_splits_are_refused_and_the_two_splits_share_no_prompt() -> None:
    with pytest.raises(ValueError, match="split='train'"):
        evaluate.heldout_prompts(2, "train")
    val, test = evaluate.heldout_prompts(3, "val")[0], evaluate.heldout_prompts(3, "test")[0]
    assert len(set(val)) == len(set(test)) == 30 and not set(val) & set(test)


def test_student_t_quantiles_match_the_tables() -> None:
    # two-sided 95 %: df 2 -> 4.303, 12 -> 2.179, 30 -> 2.042, 120 -> 1.980
    for dof, value in ((2, 4.303), (12, 2.179), (30, 2.042), (120, 1.980)):
        assert evaluate.t975(dof) == pytest.approx(value, abs=3e-3)


# ------------------------------------------------------------------------------ the seed study
def _seed_rows(gain: float, fid_delta: float) -> dict:
    def row(c_eval, c_fid, diversity=4.0):
        return {
            "c_eval": c_eval, "c_eval_ci": 0.01, "c_consistency": 0.0, "c_consistency_ci": 0.01,
            "c_fid": c_fid, "c_fid_ci": 0.1, "c_kid": 0.0, "c_kid_ci": 0.001, "d_guidance": 0.2,
            "d_guidance_ci": 0.02, "fid": 5.0 + c_fid, "fid_ci": 0.5, "diversity": diversity,
            "pixel_drift": 0.01,
        }  # fmt: skip

    return {"base": row(0, 0), "ACPO": row(gain, fid_delta), "control": row(0.0, 0.0)}


def test_the_goal_needs_every_training_seed() -> None:
    good = [_seed_rows(0.05, 0.0) for _ in range(3)]
    assert all(study._goal(good, "ACPO").values())
    one_bad = [*good[:2], _seed_rows(0.005, 0.0)]  # interval 0.005 ± 0.01 includes 0
    assert not study._goal(one_bad, "ACPO")["eval_gain_excludes_0_every_seed"]
    worse_fid = [*good[:2], _seed_rows(0.05, 0.5)]
    assert not study._goal(worse_fid, "ACPO")["fid_no_worse_than_control_beyond_interval"]


def test_seed_table_has_a_row_per_seed_and_the_spread_over_seeds() -> None:
    rows = [_seed_rows(g, 0.0) for g in (0.04, 0.05, 0.06)]
    table = study.seed_table(rows, [0, 1, 2])
    mean_row = next(line for line in table.splitlines() if line.startswith("| **ACPO**"))
    # mean 0.05, sd 0.01, 95 % t half-width 4.303 * 0.01 / sqrt(3) = 0.025
    assert "**+0.050** (0.010; ± 0.025)" in mean_row
    assert sum(line.startswith("| ACPO |") for line in table.splitlines()) == 3


# ------------------------------------------------------------------------------ curves
def test_curve_report_reads_the_proxy_and_held_out_curves_with_the_base_at_step_0(tmp_path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "run" / "tensorboard" / "version_0")
    writer.add_scalar("val/guidance_iqa_base", 0.60, 10)
    writer.add_scalar("val/eval_iqa_base", 0.50, 10)
    for step, (proxy, gold) in {10: (0.7, 0.52), 20: (0.8, 0.49)}.items():
        writer.add_scalar("val/guidance_iqa", proxy, step)
        writer.add_scalar("val/eval_iqa", gold, step)
    writer.close()
    table = evaluate.curve_report({"ACPO": tmp_path / "run"}, tmp_path)
    lines = table.splitlines()[2:]
    assert lines[0] == "| ACPO | 0 | 0.600 (+0.000) | 0.500 (+0.000) |"
    assert lines[2] == "| ACPO | 20 | 0.800 (+0.200) | 0.490 (-0.010) |"
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_merge_joins_seed_runs_split_over_processes(tmp_path) -> None:
    parts = []
    for seeds in ([0, 1], [2]):
        part = tmp_path / f"part{seeds[0]}"
        part.mkdir()
        record = {
            "command": f"python -m acpo_demo.study seeds --seeds {seeds}", "seeds": seeds,
            "rows": [_seed_rows(0.05, 0.0) for _ in seeds], "runs": {f"ACPO_seed{s}": {} for s in seeds},
            "seconds": 60, "header": f"`python -m acpo_demo.study seeds --seeds {seeds}`: split test.\n\n",
        }  # fmt: skip
        (part / "study.json").write_text(json.dumps(record))
        parts.append(part)
    merged = study.merge_studies(parts, tmp_path / "all")
    assert merged["seeds"] == [0, 1, 2] and merged["seconds"] == 120 and len(merged["rows"]) == 3
    assert all(merged["goals"]["ACPO"].values())
    text = (tmp_path / "all" / "study.md").read_text()
    assert text.startswith("`python -m acpo_demo.study seeds --seeds [0, 1]` + `python")
    with pytest.raises(ValueError, match="repeat training seeds"):
        study.merge_studies([parts[0], parts[0]], tmp_path / "again")


def test_selection_ranks_candidates_meeting_the_goal_first_and_merges_split_runs(tmp_path) -> None:
    def result(name: str, gain: float, fid_delta: float) -> dict:
        rows = _seed_rows(gain, fid_delta)
        rows[name] = rows.pop("ACPO")
        return {"rows": rows, "runs": {}, "meets_goal": study._goal([rows], name)}

    parts = []
    for i, chunk in enumerate(({"big-but-worse-fid": (0.09, 0.5)}, {"small": (0.02, 0.0)})):
        part = tmp_path / f"part{i}"
        part.mkdir()
        results = {name: result(name, *values) for name, values in chunk.items()}
        header = f"`python -m acpo_demo.study select --out {part}`: split `val`; 3 min on this machine.\n\n"
        study.write_select(results, header, part)
        parts.append(part)
    merged = study.merge_selects(parts, tmp_path / "all")
    # the larger gain worsens FID beyond its interval: the goal ranks the smaller gain first
    assert merged["ranked"] == ["small", "big-but-worse-fid"]
    text = (tmp_path / "all" / "select.md").read_text()
    assert "3 + 3 min in processes side by side" in text and "Chosen: **small**" in text
