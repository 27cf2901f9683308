"""The four readers on real files: formats, relative paths, up-front validation, HF datasets."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from acpo_lightning.data import read_hf, read_imagefolder, read_manifest, read_prompts
from acpo_lightning.data.images import open_image
from acpo_lightning.data.sources import MissingCaption, check_prompt

ROWS = [
    ("img/a.png", "a red square"),
    ("img/b.png", "a green square"),
    ("img/c.png", "a blue square"),
]
COLORS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}


def write_images(folder):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for name, color in COLORS.items():
        Image.new("RGB", (8, 8), color).save(folder / "img" / f"{name}.png")


def write_manifest(path, rows, image_key="image", text_key="text"):
    records = [{image_key: image, text_key: text} for image, text in rows]
    if path.suffix == ".csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, [image_key, text_key])
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_manifest_paths_are_relative_to_the_manifest(tmp_path, suffix, monkeypatch):
    write_images(tmp_path / "data")
    manifest = write_manifest(tmp_path / "data" / f"train{suffix}", ROWS, "file", "prompt")
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    table = read_manifest(manifest, image_column="file", caption_column="prompt")
    assert list(table.prompts) == [text for _, text in ROWS]
    assert table.images[1] == tmp_path / "data" / "img" / "b.png"
    assert open_image(table.images[1]).getpixel((0, 0)) == COLORS["b"]
    assert str(manifest) in table.origin


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_manifest_missing_column_names_the_columns_there_are(tmp_path, suffix):
    manifest = write_manifest(tmp_path / f"m{suffix}", ROWS, "path", "text")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]") as caught:
        read_manifest(manifest)
    assert "'path'" in str(caught.value) and str(manifest) in str(caught.value)


def test_manifest_with_zero_rows_is_an_error(tmp_path):
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("image,text\n")
    with pytest.raises(ValueError, match="zero rows"):
        read_manifest(csv_file)
    jsonl_file = tmp_path / "m.jsonl"
    jsonl_file.write_text("\n\n")
    with pytest.raises(ValueError, match="zero rows"):
        read_manifest(jsonl_file)
    parquet_file = write_manifest(tmp_path / "m.parquet", ROWS)
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(parquet_file).slice(0, 0), parquet_file)
    with pytest.raises(ValueError, match=r"zero rows \(only a header: \['image', 'text'\]\)"):
        read_manifest(parquet_file)


def test_manifest_bad_path_format_and_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"unknown table format '\.xlsx'"):
        read_manifest(tmp_path / "m.xlsx")
    broken = tmp_path / "m.jsonl"
    broken.write_text('{"image": "a.png", "text": "ok"}\n{"image": "b.png", "te\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_manifest(broken)


def test_imagefolder_with_metadata_jsonl(tmp_path):
    write_images(tmp_path)
    write_manifest(tmp_path / "metadata.jsonl", ROWS, "file_name", "text")
    table = read_imagefolder(tmp_path)
    assert list(table.prompts) == [text for _, text in ROWS]
    assert table.images[2] == tmp_path / "img" / "c.png"
    assert "metadata.jsonl" in table.origin


def test_imagefolder_falls_back_to_sibling_txt_captions(tmp_path):
    write_images(tmp_path)
    (tmp_path / "img" / "a.txt").write_text("a red square\n")
    (tmp_path / "img" / "c.txt").write_text("a blue square")
    (tmp_path / "notes.md").write_text("not an image")
    table = read_imagefolder(tmp_path)
    assert [p.name for p in table.images] == ["a.png", "b.png", "c.png"]
    assert table.prompts[0] == "a red square\n" and check_prompt(table.prompts[0]) == "a red square"
    assert isinstance(table.prompts[1], MissingCaption) and "b.txt" in table.prompts[1].reason


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_imagefolder(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no metadata\.jsonl.* and no images"):
        read_imagefolder(tmp_path)
    write_manifest(tmp_path / "metadata.jsonl", ROWS, "file_name", "caption")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['text'\]"):
        read_imagefolder(tmp_path)


def test_prompts_from_text_lines_and_from_a_column(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n\n  \na dog\n")
    assert list(read_prompts(text).prompts) == ["a cat", "a dog"]
    table = write_manifest(tmp_path / "prompts.csv", ROWS, "image", "prompt")
    assert read_prompts(table, column="prompt").prompts[0] == "a red square"
    assert read_prompts(text).images is None
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="has no rows"):
        read_prompts(tmp_path / "blank.txt")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "caption is empty"),
        ("  \n", "caption is empty"),
        (None, "got NoneType None"),
        (42, "got int 42"),
        (float("nan"), "got float nan"),
        (["a"], "got list"),
    ],
)
def test_check_prompt_rejects_non_captions(value, message):
    with pytest.raises(ValueError, match=message):
        check_prompt(value)


def _hf_dataset(columns=("image", "text")):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {columns[0]: datasets.Image(), columns[1]: datasets.Value("string")}
    )
    images = [Image.new("RGB", (8, 8), color) for color in COLORS.values()]
    return datasets.Dataset.from_dict(
        {columns[0]: images, columns[1]: [text for _, text in ROWS]}, features=features
    )


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    _hf_dataset().save_to_disk(str(tmp_path / "single"))
    table = read_hf(str(tmp_path / "single"))
    assert list(table.prompts) == [text for _, text in ROWS]
    assert open_image(table.images[2]).getpixel((0, 0)) == COLORS["c"]
    datasets.DatasetDict({"validation": _hf_dataset()}).save_to_disk(str(tmp_path / "dict"))
    assert len(read_hf(str(tmp_path / "dict"), split="validation")) == 3
    with pytest.raises(ValueError, match=r"no split 'train'; its splits are \['validation'\]"):
        read_hf(str(tmp_path / "dict"))


def test_hf_missing_column(tmp_path):
    pytest.importorskip("datasets")
    _hf_dataset(("picture", "text")).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\].*'picture'"):
        read_hf(str(tmp_path / "ds"))


def test_hf_load_dataset_on_a_local_imagefolder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    write_images(tmp_path / "folder")
    write_manifest(tmp_path / "folder" / "metadata.jsonl", ROWS, "file_name", "text")
    table = read_hf(str(tmp_path / "folder"))
    assert sorted(table.prompts) == sorted(text for _, text in ROWS)
    assert open_image(table.images[0]).size == (8, 8)


def test_hf_hub_name_offline_gives_an_actionable_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ValueError, match="could not load the Hugging Face dataset 'acpo-test/none'"
    ) as caught:
        read_hf("acpo-test/none")
    assert "save_to_disk" in str(caught.value) and "HF_DATASETS_OFFLINE" in str(caught.value)
