"""One parser for all six subcommands: ``acpo fit|validate|test|predict|export|cache-latents``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from acpo_lightning.cli import main
from conftest import CONFIGS

SUBCOMMANDS = ("fit", "validate", "test", "predict", "export", "cache-latents")


def help_of(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_acpo_help_lists_all_six_subcommands(capsys: pytest.CaptureFixture) -> None:
    """Failed before: export and cache-latents were dispatched around the parser, unlisted."""
    listed = re.search(r"\{(fit,[^}]*)\}", help_of([], capsys))
    assert listed and tuple(listed.group(1).split(",")) == SUBCOMMANDS


def test_export_help_names_its_options(capsys: pytest.CaptureFixture) -> None:
    text = help_of(["export"], capsys)
    assert all(option in text for option in ("--ckpt", "--out", "--config"))
    assert "--trainer" not in text  # export reads no run config of its own


def test_cache_latents_help_has_its_options_and_fits_keys(capsys: pytest.CaptureFixture) -> None:
    """Failed before: `acpo cache-latents --help` showed only five options; fit's were hidden."""
    text = help_of(["cache-latents"], capsys)
    for option in ("--out", "--batch-size", "--device", "--shard-size", "--overwrite"):
        assert option in text
    assert "--data.help" in text and "--trainer.max_steps" in text and "--config" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["export", "--out", "x"], "export.ckpt"),
        (["cache-latents", "--out", "x"], "give the run config(s) you train with: --config"),
        (
            [
                "cache-latents",
                "--config",
                str(CONFIGS / "acpo.yaml"),
                "--out",
                "x",
                "--batch-size",
                "0",
            ],
            "--batch-size and --shard-size must be >= 1, got 0, 1024",
        ),
        (
            ["cache-latents", "--config", str(CONFIGS / "acpo.yaml"), "--out", "x", "--nope", "1"],
            "unknown key nope",
        ),
    ],
)
def test_the_tool_subcommands_end_in_one_line(
    args: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("acpo: error: ") and expected in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 2  # the error and the ACPO_DEBUG hint
    assert not (tmp_path / "x").exists()
