"""Data inputs read as written and bad settings refused at construction, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from acpo_lightning.cli import describe, main
from acpo_lightning.data import (
    BadSampleError,
    PromptImageDataModule,
    ShapesDataModule,
    read_imagefolder,
    read_manifest,
    read_prompts,
)
from conftest import CONFIGS

TINY = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        Image.new("RGB", (20, 20), (40 * index, 0, 0)).save(folder / f"{index}.png")
        names.append(f"{index}.png")
    return names


def test_a_bad_sample_found_in_a_loader_worker_reads_as_in_the_main_process(tmp_path) -> None:
    names = _images(tmp_path, 4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": n, "text": f"c {n}"}) + "\n" for n in names))
    data = PromptImageDataModule("manifest", str(manifest), resolution=16, num_workers=1)
    data.setup("fit")
    (tmp_path / "2.png").write_bytes(b"corrupted after the scan")
    with pytest.raises(BadSampleError) as caught:
        list(data.train_dataloader())
    message = describe(caught.value)  # what `acpo: error:` prints
    assert message.startswith(f"manifest {manifest}, row 2 (")
    assert "Traceback" not in message and "worker process" not in message, message


def test_a_utf8_bom_is_not_part_of_a_txt_caption(tmp_path) -> None:
    _images(tmp_path, 1)
    (tmp_path / "0.txt").write_text("\ufeffa red square", encoding="utf-8")
    assert read_imagefolder(tmp_path, "file_name", "text").prompt(0) == "a red square"


def test_jsonl_and_txt_rows_are_split_at_newlines_only(tmp_path) -> None:
    """U+2028 may stand unescaped in a JSON string (json.dumps(ensure_ascii=False) writes it)."""
    names = _images(tmp_path, 2)
    captions = ["a cat\u2028on a mat", "a dog\u2029in fog"]
    manifest = tmp_path / "m.jsonl"
    rows = [{"image": n, "text": c} for n, c in zip(names, captions, strict=True)]
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    table = read_manifest(manifest, "image", "text")
    assert [table.prompt(i) for i in range(len(table))] == captions
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(captions) + "\n", encoding="utf-8")
    table = read_prompts(prompts)
    assert [table.prompt(i) for i in range(len(table))] == captions


def test_normalize_zero_one_is_refused_for_the_module_takes_minus_one_one(tmp_path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(ValueError, match=r"normalize must be 'minus_one_one', got 'zero_one'"):
        PromptImageDataModule("prompts", str(prompts), normalize="zero_one")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, r"num_workers must be an integer >= 0"),
        ({"data_seed": -1}, r"data_seed must be a non-negative integer, got -1"),
    ],
)
def test_shapes_data_module_refuses_bad_numbers_at_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ShapesDataModule(train_size=4, **kwargs)


@pytest.mark.parametrize(
    ("knob", "expected"),
    [
        ("--model.seed", "seed must be a non-negative integer, got -1"),
        ("--data.init_args.data_seed", "data_seed must be a non-negative integer, got -1"),
        ("--data.init_args.batch_size", "batch_size must be an integer >= 1, got -1"),
    ],
)
def test_a_negative_seed_or_batch_size_ends_the_cli_in_one_line(
    knob: str, expected: str, capsys, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["fit", *TINY, knob, "-1", "--trainer.max_steps", "1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("acpo: error:")]
    assert expected in line and "Traceback" not in err, err
