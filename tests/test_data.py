"""PromptImageDataModule end to end on real files: each source, bad samples, split, tokens, loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DistributedSampler

from acpo_lightning.data import BadSampleError, PromptImageDataModule
from acpo_lightning.data.shuffle import SeededShuffle
from acpo_lightning.testing import TINY_MAX_LENGTH, tiny_tokenizer

SIZE = 16  # training resolution of these tests
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def write_good(folder: Path, count: int) -> list[dict]:
    """``count`` solid-colour 24x20 PNGs under ``folder/img`` and their manifest rows."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        Image.new("RGB", (24, 20), PALETTE[index % len(PALETTE)]).save(
            folder / "img" / f"{index}.png"
        )
        rows.append({"image": f"img/{index}.png", "text": f"colour number {index}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _noise(path: Path, **save) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path, **save)
    return path


def _truncated(path: Path, **save) -> Path:
    data = _noise(path, **save).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# name -> (writes the bad row's files and returns the row, reason in the message)
BAD_CASES = {
    "missing file": (lambda d: {"image": "img/missing.png", "text": "a cat"}, "file not found"),
    "garbage file": (
        lambda d: (
            (d / "img" / "garbage.png").write_bytes(b"\x00garbage" * 30)
            and {"image": "img/garbage.png", "text": "a cat"}
        ),
        "cannot decode",
    ),
    "truncated jpeg": (
        lambda d: (
            _truncated(d / "img" / "cut.jpg", quality=95)
            and {"image": "img/cut.jpg", "text": "a cat"}
        ),
        "truncated",
    ),
    "truncated png": (
        lambda d: _truncated(d / "img" / "cut.png") and {"image": "img/cut.png", "text": "a cat"},
        "truncated",
    ),
    "too small": (
        lambda d: (
            Image.new("RGB", (12, 40)).save(d / "img" / "small.png")
            or {"image": "img/small.png", "text": "a cat"}
        ),
        "12x40, smaller than the 16x16 crop",
    ),
    "empty caption": (lambda d: {"image": "img/0.png", "text": "   "}, "caption is empty"),
    "number caption": (lambda d: {"image": "img/0.png", "text": 42}, "got int 42"),
    "null caption": (lambda d: {"image": "img/0.png", "text": None}, "got NoneType None"),
}


def make_module(manifest: Path, **kwargs) -> PromptImageDataModule:
    kwargs = {"resolution": SIZE, "batch_size": 2, **kwargs}
    return PromptImageDataModule("manifest", str(manifest), **kwargs)


def all_batches(loader) -> list[dict]:
    return list(loader)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_bad_sample_is_an_error_naming_the_file_and_row(tmp_path, case):
    rows = write_good(tmp_path, 3)
    write_bad, reason = BAD_CASES[case]
    rows.insert(2, write_bad(tmp_path))
    manifest = write_jsonl(tmp_path / "train.jsonl", rows)
    module = make_module(manifest)  # the structure is fine: construction succeeds
    with pytest.raises(BadSampleError) as caught:
        module.setup("fit")
    message = str(caught.value)
    assert f"manifest {manifest}, row 2 ({tmp_path / rows[2]['image']})" in message
    assert reason in message
    assert "on_bad_sample: skip" in message
    assert [problem.row for problem in caught.value.problems] == [2]


def test_skip_mode_drops_counts_and_reports_every_bad_sample(tmp_path):
    rows = write_good(tmp_path, 3)
    rows += [write_bad(tmp_path) for write_bad, _ in BAD_CASES.values()]
    module = make_module(write_jsonl(tmp_path / "train.jsonl", rows), on_bad_sample="skip")
    with pytest.warns(UserWarning, match=f"skipped {len(BAD_CASES)} of {len(rows)} rows") as record:
        module.setup("fit")
    assert "file not found" in str(record[0].message) and "too small" in str(record[0].message)
    assert module.num_skipped == len(BAD_CASES)
    assert sorted(problem.row for problem in module.skipped) == list(range(3, len(rows)))
    batches = all_batches(module.train_dataloader())
    prompts = sorted(p for batch in batches for p in batch["prompts"])
    assert prompts == ["colour number 0", "colour number 1", "colour number 2"]


def test_error_mode_lists_all_bad_rows_at_once(tmp_path):
    rows = write_good(tmp_path, 2) + [{"image": f"img/gone{i}.png", "text": "x"} for i in range(3)]
    with pytest.raises(BadSampleError, match="3 bad rows") as caught:
        make_module(write_jsonl(tmp_path / "m.jsonl", rows)).setup("fit")
    for row in (2, 3, 4):
        assert f"row {row} ({tmp_path / 'img' / f'gone{row - 2}.png'}): file not found" in str(
            caught.value
        )


def test_a_dataset_left_empty_is_an_error_not_a_zero_step_run(tmp_path):
    rows = [{"image": "img/nope.png", "text": "a"}, {"image": "img/nope2.png", "text": "b"}]
    (tmp_path / "img").mkdir()
    module = make_module(write_jsonl(tmp_path / "m.jsonl", rows), on_bad_sample="skip")
    with (
        pytest.warns(UserWarning, match="skipped 2"),
        pytest.raises(ValueError, match="is empty: 2 rows, 2 skipped"),
    ):
        module.setup("fit")


def test_manifest_is_validated_at_construction(tmp_path):
    rows = write_good(tmp_path, 2)
    wrong = write_jsonl(
        tmp_path / "wrong.jsonl", [{"path": r["image"], "text": r["text"]} for r in rows]
    )
    with pytest.raises(
        ValueError, match=r"missing column\(s\) \['image'\]; its columns are \['path', 'text'\]"
    ):
        make_module(wrong)
    header_only = tmp_path / "header.csv"
    header_only.write_text("image,text\n")
    with pytest.raises(ValueError, match="zero rows"):
        make_module(header_only)
    with pytest.raises(FileNotFoundError, match=r"absent\.csv"):
        make_module(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="source must be one of"):
        PromptImageDataModule("webdataset", str(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        make_module(wrong, val_fraction=0.5, val_prompts_path=str(header_only))


def test_imagefolder_with_metadata_end_to_end(tmp_path):
    rows = write_good(tmp_path, 4)
    write_jsonl(
        tmp_path / "metadata.jsonl", [{"file_name": r["image"], "text": r["text"]} for r in rows]
    )
    module = PromptImageDataModule("imagefolder", str(tmp_path), resolution=SIZE, batch_size=4)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE)
    assert batch["pixel_values"].dtype == torch.float32
    assert sorted(batch["prompts"]) == sorted(r["text"] for r in rows)
    # Solid colours in [-1, 1]: every channel is -1 or 1.
    assert set(batch["pixel_values"].unique().tolist()) == {-1.0, 1.0}


def test_imagefolder_with_txt_captions_end_to_end(tmp_path):
    rows = write_good(tmp_path, 3)
    for index, row in enumerate(rows):
        (tmp_path / "img" / f"{index}.txt").write_text(row["text"] + "\n")
    module = PromptImageDataModule("imagefolder", str(tmp_path), resolution=SIZE, batch_size=3)
    module.setup("fit")
    assert sorted(next(iter(module.train_dataloader()))["prompts"]) == sorted(
        r["text"] for r in rows
    )
    (tmp_path / "img" / "1.txt").unlink()
    with pytest.raises(BadSampleError, match=r"row 1 \(.*1\.png\): no caption.*no 1\.txt"):
        PromptImageDataModule("imagefolder", str(tmp_path), resolution=SIZE).setup("fit")


def test_uncaptioned_images_for_unconditional_models(tmp_path):
    write_good(tmp_path, 3)  # no metadata, no .txt: LSUN-church style
    with pytest.raises(BadSampleError, match="3 bad rows"):
        PromptImageDataModule("imagefolder", str(tmp_path), resolution=SIZE).setup("fit")
    module = PromptImageDataModule(
        "imagefolder", str(tmp_path), caption_column=None, resolution=SIZE, batch_size=3
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["prompts"] == ["", "", ""] and batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": f"img/{i}.png"} for i in range(3)])
    module = make_module(manifest, caption_column=None)
    module.setup("fit")
    assert len(module.train_dataset) == 3 and module.train_dataset[0]["prompt"] == ""


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_formats_end_to_end(tmp_path, suffix):
    rows = write_good(tmp_path / "data", 3)
    manifest = tmp_path / "data" / f"train{suffix}"
    if suffix == ".csv":
        manifest.write_text(
            "file,prompt\n" + "".join(f'{r["image"]},"{r["text"]}"\n' for r in rows)
        )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.Table.from_pylist([{"file": r["image"], "prompt": r["text"]} for r in rows]),
            manifest,
        )
    module = make_module(manifest, image_column="file", caption_column="prompt", batch_size=3)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert sorted(batch["prompts"]) == sorted(r["text"] for r in rows)


def test_hf_dataset_saved_to_disk_end_to_end(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    good = [Image.new("RGB", (20, 20), color) for color in PALETTE[:3]]
    data = {
        "picture": [*good, {"bytes": b"garbage", "path": None}],
        "caption": ["r", "g", "b", "bad"],
    }
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "ds"))
    kwargs = dict(image_column="picture", caption_column="caption", resolution=SIZE, batch_size=4)
    with pytest.raises(
        BadSampleError, match=r"Hugging Face dataset .*ds.*, row 3 \(<7 encoded bytes>\)"
    ):
        PromptImageDataModule("hf", str(tmp_path / "ds"), **kwargs).setup("fit")
    module = PromptImageDataModule("hf", str(tmp_path / "ds"), on_bad_sample="skip", **kwargs)
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and sorted(batch["prompts"]) == [
        "b",
        "g",
        "r",
    ]


def test_hf_hub_name_is_not_loaded_at_construction(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    module = PromptImageDataModule("hf", "acpo-test/not-downloaded")
    assert module.table is None
    with pytest.raises(
        ValueError, match="could not load the Hugging Face dataset 'acpo-test/not-downloaded'"
    ):
        module.prepare_data()


def _odd_mode_images(folder: Path) -> list[tuple[str, tuple[float, float, float]]]:
    """Files in odd modes and the colour their centre must have after loading (0..1)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    expected = []

    def save(name, image, colour, **kwargs):
        image.save(folder / "img" / name, **kwargs)
        expected.append((f"img/{name}", colour))

    save("l.png", Image.new("L", (20, 20), 51), (0.2, 0.2, 0.2))
    save("la.png", Image.new("LA", (20, 20), (0, 0)), (1, 1, 1))
    save("rgba.png", Image.new("RGBA", (20, 20), (0, 0, 255, 0)), (1, 1, 1))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    save("p.png", palette, (1, 1, 1), transparency=0)
    save("i16.png", Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)), (1, 1, 1))
    save("cmyk.tiff", Image.new("CMYK", (20, 20), (255, 0, 255, 0)), (0, 1, 0))
    rotated = Image.new("RGB", (40, 20), (0, 0, 0))
    rotated.paste((255, 0, 0), (0, 0, 20, 20))  # left half red: on top once rotated (EXIF 6)
    exif = rotated.getexif()
    exif[0x0112] = 6
    save("exif6.png", rotated, (1, 0, 0), exif=exif.tobytes())
    return expected


def test_odd_image_modes_and_exif_end_to_end(tmp_path):
    expected = _odd_mode_images(tmp_path)
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"image": name, "text": name} for name, _ in expected]
    )
    module = make_module(manifest, center_crop=True, batch_size=len(expected))
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    for prompt, pixels in zip(batch["prompts"], batch["pixel_values"], strict=True):
        colour = dict(expected)[prompt]
        top = (pixels[:, 2, SIZE // 2] + 1) / 2  # [-1, 1] back to the colours' [0, 1]
        assert torch.allclose(top, torch.tensor(colour, dtype=torch.float32), atol=0.02), prompt
    exif_pixels = (batch["pixel_values"][batch["prompts"].index("img/exif6.png")] + 1) / 2
    assert exif_pixels[0, -2, SIZE // 2] < 0.1  # the bottom is black: rotated, not flipped or kept


def test_split_is_deterministic_in_the_seed_and_disjoint(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", write_good(tmp_path, 20))

    def split(seed):
        module = make_module(manifest, val_fraction=0.25, data_seed=seed)
        module.setup("fit")
        return module.train_dataset.indices, module.val_dataset.indices

    train, val = split(seed=3)
    assert split(seed=3) == (train, val)
    assert split(seed=4) != (train, val)
    assert len(val) == 5 and sorted(train + val) == list(range(20))


def test_a_bad_row_does_not_move_other_rows_across_the_split(tmp_path):
    rows = write_good(tmp_path, 12)
    clean = make_module(write_jsonl(tmp_path / "clean.jsonl", rows), val_fraction=0.25)
    clean.setup("fit")
    rows[clean.train_dataset.indices[0]] = {"image": "img/missing.png", "text": "x"}
    dirty = make_module(
        write_jsonl(tmp_path / "dirty.jsonl", rows), val_fraction=0.25, on_bad_sample="skip"
    )
    with pytest.warns(UserWarning, match="skipped 1"):
        dirty.setup("fit")
    assert dirty.val_dataset.indices == clean.val_dataset.indices
    assert dirty.train_dataset.indices == clean.train_dataset.indices[1:]


def test_validation_split_uses_centre_crops_without_flips(tmp_path):
    (tmp_path / "img").mkdir()
    image = Image.new("RGB", (48, 16), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 32, 16))  # white middle third
    rows = []
    for index in range(4):
        image.save(tmp_path / "img" / f"{index}.png")
        rows.append({"image": f"img/{index}.png", "text": f"stripe {index}"})
    module = make_module(
        write_jsonl(tmp_path / "m.jsonl", rows), val_fraction=0.5, random_flip=True
    )
    module.setup("fit")
    for batch in module.val_dataloader():
        assert torch.all(batch["pixel_values"] == 1.0)  # the centre crop is the white third


def test_tokenization_pads_and_truncates_to_the_encoder_length(tmp_path):
    rows = write_good(tmp_path, 2)
    rows[0]["text"] = "a very long prompt " * 10
    rows[1]["text"] = "short"
    tokenizer = tiny_tokenizer(str(tmp_path / "tokenizer"))
    module = make_module(
        write_jsonl(tmp_path / "m.jsonl", rows), tokenizer=tokenizer, center_crop=True
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert (
        batch["input_ids"].shape == (2, TINY_MAX_LENGTH) and batch["input_ids"].dtype == torch.long
    )
    assert batch["attention_mask"].shape == (2, TINY_MAX_LENGTH)
    masks = {
        prompt: mask.sum().item()
        for prompt, mask in zip(batch["prompts"], batch["attention_mask"], strict=True)
    }
    assert masks[rows[0]["text"].strip()] == TINY_MAX_LENGTH  # truncated
    assert masks["short"] < TINY_MAX_LENGTH  # padded
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)


def test_prompt_only_source_and_validation_prompts(tmp_path):
    (tmp_path / "train.txt").write_text("a cat\na dog\n\na bird\n")
    (tmp_path / "val.csv").write_text('prompt\n"a red, shiny car"\n""\na boat\n')
    tokenizer = tiny_tokenizer(str(tmp_path / "tokenizer"))
    module = PromptImageDataModule(
        "prompts",
        str(tmp_path / "train.txt"),
        val_prompts_path=str(tmp_path / "val.csv"),
        val_prompts_column="prompt",
        tokenizer=tokenizer,
        batch_size=8,
        on_bad_sample="skip",
    )
    with pytest.warns(
        UserWarning, match=r"skipped 1 of 3 rows of prompts file .*val.csv.*row 1: caption is empty"
    ):
        module.setup("fit")
    train = next(iter(module.train_dataloader()))
    assert sorted(train["prompts"]) == ["a bird", "a cat", "a dog"]
    assert "pixel_values" not in train and train["input_ids"].shape == (3, TINY_MAX_LENGTH)
    for loader in (module.val_dataloader(), module.predict_dataloader()):
        batch = next(iter(loader))
        assert batch["prompts"] == ["a red, shiny car", "a boat"] and "pixel_values" not in batch


def test_loaders_before_setup_and_without_validation(tmp_path):
    module = make_module(write_jsonl(tmp_path / "m.jsonl", write_good(tmp_path, 3)))
    with pytest.raises(RuntimeError, match="call setup"):
        module.train_dataloader()
    module.setup("fit")
    assert module.val_dataloader() == []
    predict = next(iter(module.predict_dataloader()))
    assert "pixel_values" not in predict and len(predict["prompts"]) == 2


def test_worker_processes_and_an_error_raised_inside_one(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", write_good(tmp_path, 4))
    module = make_module(manifest, num_workers=1, persistent_workers=True, pin_memory=False)
    module.setup("fit")
    loader = module.train_dataloader()
    assert loader.persistent_workers
    for _ in range(2):  # two epochs on the same persistent worker
        assert sum(len(batch["prompts"]) for batch in loader) == 4
    (tmp_path / "img" / "2.png").write_bytes(b"corrupted after the scan")
    with pytest.raises(BadSampleError, match=r"row 2 \(.*2\.png\): cannot decode"):
        list(module.train_dataloader())


def test_shuffle_is_seeded_and_shared_out_over_the_ranks(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", write_good(tmp_path, 8))
    orders = []
    for _ in range(2):
        module = make_module(manifest, data_seed=5)
        module.setup("fit")
        orders.append([p for batch in module.train_dataloader() for p in batch["prompts"]])
    assert orders[0] == orders[1]
    # Under DDP the DataModule's sampler takes the Trainer's ranks (tests/test_ddp.py runs it
    # through Lightning); here the ranks are given: disjoint halves of the same permutation.
    loader = module.train_dataloader()
    shards = []
    for rank in range(2):
        sampler = SeededShuffle(loader.dataset, seed=5, num_replicas=2, rank=rank)
        assert isinstance(sampler, DistributedSampler)  # so Lightning keeps it
        shards.append([loader.dataset[i]["prompt"] for i in sampler])
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 8
    assert [p for pair in zip(*shards, strict=True) for p in pair] == orders[0]


def test_lightning_cli_parses_the_module_with_a_tokenizer_class_path(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringModel

    manifest = write_jsonl(tmp_path / "m.jsonl", write_good(tmp_path, 2))
    config = {
        "data": {
            "source": "manifest",
            "path": str(manifest),
            "resolution": SIZE,
            "on_bad_sample": "skip",
            "tokenizer": {
                "class_path": "acpo_lightning.testing.tiny_tokenizer",
                "init_args": {"directory": str(tmp_path / "tokenizer")},
            },
        },
        "seed_everything": 0,
        "trainer": {"logger": False, "enable_checkpointing": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr("sys.argv", ["acpo"])
    cli = LightningCLI(
        BoringModel,
        PromptImageDataModule,
        run=False,
        args=["--config", str(tmp_path / "config.yaml")],
    )
    assert type(cli.datamodule.tokenizer).__name__ == "CLIPTokenizer"
    assert cli.datamodule.max_length == TINY_MAX_LENGTH and cli.datamodule.on_bad_sample == "skip"
    with pytest.raises(SystemExit):
        LightningCLI(
            BoringModel,
            PromptImageDataModule,
            run=False,
            args=["--config", str(tmp_path / "config.yaml"), "--data.on_bad_sample=ignore"],
        )
