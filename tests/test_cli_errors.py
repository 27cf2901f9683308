"""Bad input, end to end through the CLI: one ``acpo: error:`` line, a non-zero exit, nothing lost.

Each case runs the real ``acpo`` on the tiny config (in-process where it can, in a subprocess
where the case needs its own process: an empty Hugging Face cache, dropped root privileges, a
file-size limit). Exit 2: the input is wrong and nothing ran; exit 1: the run stopped part-way.
An unknown key or a value of the wrong type ends at parse time, before any model is built.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import io
import json
import os
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from acpo_lightning import checkpoint_io
from acpo_lightning.checkpoint_io import (
    CheckpointWriteError,
    SafeCheckpointIO,
    UnsafeCheckpointError,
)
from acpo_lightning.cli import build_cli, main
from conftest import CONFIGS, run_acpo

TINY = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
CHECKPOINTS = Path("outputs", "tiny", "checkpoints")
GOOD, ODD = 4, ("palette.png", "la.png", "i16.png", "cmyk.jpg")
BAD = ("missing.png", "corrupt.png", "truncated.png")


def one_error(err: str) -> str:
    """The single ``acpo: error:`` message in ``err`` (with its continuation lines)."""
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("acpo: error: ")]
    assert len(starts) == 1, err[-3000:]
    end = next(i for i in range(starts[0], len(lines)) if lines[i].startswith("(set ACPO_DEBUG"))
    return "\n".join(lines[starts[0] : end])


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACPO_DEBUG", raising=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of 2 steps: ``outputs/tiny/checkpoints/{epoch=0-step=2,last}.ckpt`` + config."""
    run = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run)
        main(["fit", *TINY, "--trainer.max_steps", "2"])
    assert (run / CHECKPOINTS / "last.ckpt").is_file()
    return run


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the finished run, as the working directory; the original stays untouched."""
    shutil.copytree(finished_run / "outputs", tmp_path / "outputs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    """The bytes of every checkpoint or export in ``folder`` (the saved config.yaml is rewritten)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".ckpt", ".safetensors")
    }


# ------------------------------------------------------------------ config keys and types
def parse_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one ``acpo: error:`` line of a command line that fails to parse (exit 2, no usage)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and "tip:" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("acpo: error:")]
    assert len(errors) == 1, err[-3000:]
    assert err.splitlines()[-2:] == [errors[0], "(set ACPO_DEBUG=1 for the traceback)"], err
    return errors[0]


def test_an_unknown_key_on_the_command_line_is_one_line_with_the_closest_key(
    capsys: pytest.CaptureFixture,
) -> None:
    line = parse_error(capsys, "--model.w_anchr", "1")
    assert "unknown key model.w_anchr" in line and "on the command line" in line
    assert "closest valid key: model.w_anchor (float)" in line
    line = parse_error(capsys, "--model.not_a_knob", "1")  # nothing close: still the nearest
    assert "unknown key model.not_a_knob" in line and "closest valid key: model." in line


def test_an_unknown_key_in_a_config_file_is_one_line_with_the_closest_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  w_percc: 0.5\n")
    line = parse_error(capsys, "--config", str(bad))
    assert "unknown key model.w_percc" in line and "in a config file" in line
    assert "closest valid key: model.w_perc (float)" in line


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model.tau", "four hundred"], "model.tau expects int, got 'four hundred'"),
        (
            ["--model.anchor_mode", "soft"],
            "model.anchor_mode expects one of 'penalty', 'constraint'",
        ),
        (["--trainer.max_steps", "ten"], "trainer.max_steps expects int, got 'ten'"),
        (["--data.init_args.batch_size", "many"], "data.init_args.batch_size expects int"),
    ],
    ids=["int", "literal", "trainer-int", "init-arg"],
)
def test_a_value_of_the_wrong_type_is_one_line_with_the_type(
    args: list[str], named: str, capsys: pytest.CaptureFixture
) -> None:
    line = parse_error(capsys, *args)
    assert named in line
    assert f"Fix: e.g. `{args[0]} " in line


def test_an_unknown_init_arg_of_a_class_is_one_line_with_the_closest_parameter(
    capsys: pytest.CaptureFixture,
) -> None:
    line = parse_error(capsys, "--model.unet.init_args.rankk", "3")
    assert "unknown key model.unet.init_args.rankk" in line
    assert "closest valid key: model.unet.init_args.rank (int)" in line


# ------------------------------------------------------------------ missing weights
@pytest.mark.slow
def test_missing_weights_offline_name_the_model_and_the_fix(tmp_path: Path) -> None:
    """acpo.yaml's real loaders, offline, with an empty Hugging Face cache."""
    empty = tmp_path / "hf-home"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    result = run_acpo(
        ["fit", "--config", str(CONFIGS / "acpo.yaml")],
        tmp_path,
        base_env=env,
        HF_HOME=str(empty),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = one_error(result.stderr)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert str(empty) in message and "HF_HUB_OFFLINE is set" in message
    assert "Fix: on a machine with network run `hf download" in message


# ------------------------------------------------------------------ data
def write_image_folder(root: Path) -> Path:
    """Good RGB images, odd modes that must train, and bad rows; metadata.jsonl in that order."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def rgb() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))

    rows = []
    for i in range(GOOD):
        rgb().save(root / f"good{i}.png")
        rows.append((f"good{i}.png", f"a red square {i}"))
    rgb().convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png", transparency=0)
    rgb().convert("LA").save(root / "la.png")
    Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(root / "i16.png")
    rgb().convert("CMYK").save(root / "cmyk.jpg")
    assert [Image.open(root / name).mode for name in ODD] == ["P", "LA", "I;16", "CMYK"]
    rows += [(name, f"odd mode {name}") for name in ODD]
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
    encoded = io.BytesIO()
    rgb().save(encoded, format="PNG")
    (root / "truncated.png").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    rows += [(name, f"bad {name}") for name in BAD]  # missing.png is never written
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def data_args(path: Path, *extra: str) -> list[str]:
    return [
        "--data",
        "acpo_lightning.data.PromptImageDataModule",
        "--data.init_args.source",
        "imagefolder",
        "--data.init_args.path",
        str(path),
        "--data.init_args.resolution",
        "32",
        *extra,
    ]


def test_bad_images_stop_the_run_before_training_with_every_file_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    images = write_image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, *data_args(images)])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert "3 bad rows" in message and "on_bad_sample: skip" in message
    for name in BAD:
        assert str(images / name) in message
    for name in ODD:  # P with transparency, LA, I;16 and CMYK are fine
        assert name not in message
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_skipping_bad_images_trains_on_the_odd_modes_and_reports_the_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = write_image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    args = data_args(images, "--data.init_args.on_bad_sample", "skip")
    with pytest.warns(UserWarning, match=r"skipped 3 of 11 rows .* 2 cannot decode, 1 file not"):
        cli = build_cli(["fit", *TINY, *args, "--trainer.max_steps", "2"])
    assert cli.datamodule.num_skipped == 3
    assert len(cli.datamodule.train_dataset) == GOOD + len(ODD)  # one epoch: every odd image
    assert cli.trainer.global_step == 2
    assert (tmp_path / CHECKPOINTS / "last.ckpt").is_file()


def test_a_folder_of_only_bad_images_is_an_error_even_when_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A plain ValueError from the DataModule's ``setup`` is the user's too: one line."""
    images = write_image_folder(tmp_path / "images")
    rows = (images / "metadata.jsonl").read_text().splitlines()
    (images / "metadata.jsonl").write_text("\n".join(rows[-len(BAD) :]) + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, *data_args(images, "--data.init_args.on_bad_sample", "skip")])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert "the training set of imagefolder" in message and "3 skipped as bad" in message


class Boom(Callback):
    """A bug in the middle of a step: not the user's to fix, so the traceback must survive."""

    def on_train_batch_start(self, *args: object) -> None:
        raise ValueError("a bug, not bad input")


def test_a_bug_during_training_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="a bug, not bad input"):
        main(["fit", *TINY, "--trainer.callbacks+", f"{__name__}.Boom"])
    assert "acpo: error:" not in capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank-lines"])
def test_an_empty_prompts_file_is_one_clear_error(
    content: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    monkeypatch.chdir(tmp_path)
    args = ["--data", "acpo_lightning.data.PromptImageDataModule"]
    args += ["--data.init_args.source", "prompts", "--data.init_args.path", str(prompts)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, *args])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert f"prompts file {prompts} has no rows" in message and "at least one row" in message


# ------------------------------------------------------------------ output folders
def test_an_output_folder_under_a_file_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "outputs").write_text("a file where the output folder should be")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert f"cannot write to the output folder {tmp_path / CHECKPOINTS}" in message
    assert "a part of the path is a file" in message and "Fix: move the file" in message
    assert "ModelCheckpoint" in message
    assert (tmp_path / "outputs").read_text() == "a file where the output folder should be"


def _without_dac_override() -> None:
    """In the child: drop root's power to write where the mode bits say no (before exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.slow
def test_a_read_only_checkpoint_folder_fails_before_training_and_keeps_the_checkpoints(
    run_copy: Path,
) -> None:
    """chmod 0o555 stops root only without CAP_DAC_OVERRIDE, so as root the child drops it."""
    checkpoints = run_copy / CHECKPOINTS
    before = snapshot(checkpoints)
    checkpoints.chmod(0o555)
    preexec = _without_dac_override if os.geteuid() == 0 else None
    try:
        result = run_acpo(["fit", *TINY, "--trainer.max_steps", "4"], run_copy, preexec)
    finally:
        checkpoints.chmod(0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    message = one_error(result.stderr)
    assert f"cannot write to the output folder {checkpoints}" in message
    assert "Permission denied" in message and "Fix: make the folder writable" in message
    assert snapshot(checkpoints) == before


# ------------------------------------------------------------------ disk full
def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # Python ignores SIGXFSZ: a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_full_disk_on_checkpoint_write_keeps_the_previous_checkpoint(run_copy: Path) -> None:
    checkpoints = run_copy / CHECKPOINTS
    before = snapshot(checkpoints)
    assert min(len(b) for n, b in before.items() if n.endswith(".ckpt")) > 64 * 1024
    args = ["fit", *TINY, "--ckpt_path", "last", "--trainer.max_steps", "4"]
    result = run_acpo(args, run_copy, _file_size_limit(64 * 1024))
    assert result.returncode == 1, result.stderr[-3000:]
    message = one_error(result.stderr)
    assert message.startswith(f"acpo: error: could not write checkpoint {checkpoints}")
    assert "File too large (EFBIG)" in message and "resume with --ckpt_path last" in message
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr
    for name in ("last.ckpt", "epoch=0-step=2.ckpt"):
        assert (checkpoints / name).read_bytes() == before[name]
    assert SafeCheckpointIO().load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "last.ckpt",
    ]
    assert not list(checkpoints.glob(".*"))  # no temporary file left


class _FillsUp:
    """A file that takes ``room`` bytes, then fails as a full disk does (part of a write lands)."""

    def __init__(self, path: Path, mode: str, room: int = 4096) -> None:
        self.file = builtins.open(path, mode)  # noqa: SIM115 (closed by __exit__)
        self.room = room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def test_no_space_left_midway_through_a_checkpoint_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io_plugin = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint_io, "open", _FillsUp, raising=False)
    big = {"state_dict": {"w": torch.zeros(100_000)}, "global_step": 2}
    with pytest.raises(CheckpointWriteError) as error_info:
        io_plugin.save_checkpoint(big, path)
    monkeypatch.undo()
    assert error_info.value.errno == errno.ENOSPC
    message = str(error_info.value.strerror)
    assert f"could not write checkpoint {path}: No space left on device (ENOSPC)" in message
    assert "the previous checkpoint there is intact" in message and "free disk space" in message
    assert path.read_bytes() == before
    assert io_plugin.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------ refused checkpoints
def test_a_checkpoint_cut_anywhere_is_refused_as_truncated(
    finished_run: Path, tmp_path: Path
) -> None:
    """torch's zip reader fails in three ways (RuntimeError, EOFError, OSError EINVAL) by cut."""
    data = (finished_run / CHECKPOINTS / "last.ckpt").read_bytes()
    path = tmp_path / "cut.ckpt"
    for cut in [*range(0, len(data), len(data) // 40), len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(UnsafeCheckpointError, match="is truncated or not a PyTorch checkpoint"):
            SafeCheckpointIO().load_checkpoint(path)


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def bad_checkpoint(kind: str, good: Path, target: Path, marker: Path) -> Path:
    """A copy of ``good`` cut in half, or with a code-execution payload next to its weights."""
    if kind == "truncated":
        target.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        checkpoint = torch.load(good, weights_only=True)
        checkpoint["callbacks"] = {"payload": _Payload(marker)}
        torch.save(checkpoint, target)
    return target


REASONS = {
    "truncated": "is truncated or not a PyTorch checkpoint",
    "pickled": "holds pickled Python objects that a weights_only load refuses "
    "(Unsupported global: GLOBAL exec was not an allowed global by default); nothing in it was run",
}


@pytest.mark.parametrize("kind", list(REASONS))
@pytest.mark.parametrize("given", ["path", "last"])
def test_a_bad_checkpoint_for_ckpt_path_is_refused_and_nothing_is_lost(
    kind: str, given: str, run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--ckpt_path FILE`` is read at start-up; ``--ckpt_path last`` when training is restored."""
    checkpoints, marker = run_copy / CHECKPOINTS, run_copy / "marker"
    if given == "last":
        bad = bad_checkpoint(kind, checkpoints / "last.ckpt", checkpoints / "last.ckpt", marker)
    else:
        bad = bad_checkpoint(kind, checkpoints / "last.ckpt", run_copy / "bad.ckpt", marker)
    before = snapshot(checkpoints)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--ckpt_path", "last" if given == "last" else str(bad)])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert str(bad) in message and REASONS[kind] in message and "Fix:" in message
    assert not marker.exists()
    assert snapshot(checkpoints) == before


def test_a_missing_ckpt_path_is_named_before_anything_runs(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *TINY, "--ckpt_path", "outputs/tiny/checkpoints/lost.ckpt"])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert "--ckpt_path outputs/tiny/checkpoints/lost.ckpt: no such file. Fix:" in message


@pytest.mark.parametrize("kind", list(REASONS))
def test_acpo_export_refuses_a_bad_checkpoint_and_keeps_the_earlier_export(
    kind: str, run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoints, marker, out = run_copy / CHECKPOINTS, run_copy / "marker", run_copy / "lora"
    main(["export", "--ckpt", str(checkpoints / "last.ckpt"), "--out", str(out)])
    exported = snapshot(out)
    assert list(exported) == ["pytorch_lora_weights.safetensors"]
    bad = bad_checkpoint(kind, checkpoints / "last.ckpt", checkpoints / "bad.ckpt", marker)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(bad), "--out", str(out), "--overwrite"])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert str(bad) in message and REASONS[kind] in message
    assert not marker.exists()
    assert snapshot(out) == exported


def test_acpo_export_refuses_to_replace_an_earlier_export_without_overwrite(
    run_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """As ``cache-latents``: an export in ``--out`` is replaced only with ``--overwrite``."""
    ckpt, out = run_copy / CHECKPOINTS / "last.ckpt", run_copy / "lora"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    written = out / "pytorch_lora_weights.safetensors"
    inode = written.stat().st_ino  # an export writes a new file and renames it over the old one
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert str(written) in message and "--overwrite" in message
    assert written.stat().st_ino == inode
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--format", "comfyui"])  # another file
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--overwrite"])
    assert written.stat().st_ino != inode
    assert sorted(p.name for p in out.iterdir()) == [
        "lora_comfyui.safetensors", "pytorch_lora_weights.safetensors"
    ]  # fmt: skip


def test_acpo_debug_shows_the_traceback(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    bad = bad_checkpoint(
        "truncated", run_copy / CHECKPOINTS / "last.ckpt", run_copy / "b.ckpt", run_copy / "m"
    )
    monkeypatch.setenv("ACPO_DEBUG", "1")
    with pytest.raises(UnsafeCheckpointError, match="is truncated"):
        main(["fit", *TINY, "--ckpt_path", str(bad)])
    assert "acpo: error:" not in capsys.readouterr().err


# ------------------------------------------------------------------ non-finite training
@pytest.mark.slow
def test_a_run_that_only_sees_nan_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    nan = '{"class_path": "acpo_lightning.testing.InjectNonFinite", "init_args": {"steps": [0, 1, 2, 3]}}'
    args = ["--trainer.callbacks+", nan, "--model.max_consecutive_skips", "2"]
    args += ["--model.w_perc", "1.0", "--model.perceptual_share", "1.0"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, *args])
    assert exit_info.value.code == 1
    message = one_error(capsys.readouterr().err)
    assert "2 consecutive steps had a non-finite" in message and "Resume from the last" in message


# ------------------------------------------------------------------ image sizes the model cannot take
def _backbone(name: str) -> list[str]:
    base = {"flux": "flux.yaml", "sd3": "sd35.yaml", "sd": "acpo.yaml"}[name]
    tiny = {"flux": "tiny_flux.yaml", "sd3": "tiny_sd3.yaml", "sd": "tiny.yaml"}[name]
    return ["--config", str(CONFIGS / base), "--config", str(CONFIGS / tiny)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "data", "expected"),
    [
        ("flux", ["--data.init_args.image_size", "15"],
         ["training images are 15x15 px", "FLUX packs 2x2 latent patches",
          "multiple of 2 latents x the VAE's scale factor 1 = 2 px", "data.init_args.image_size 14 or 16"]),
        ("sd3", ["--data.init_args.image_size", "15"],
         ["training images are 15x15 px", "2x2 latent patches", "multiple of 2 latents x the VAE's scale factor 1 = 2 px",
          "data.init_args.image_size 14 or 16"]),
        ("sd", ["--data.init_args.image_size", "8"],
         ["perceptual_crop size=16 is larger than the training images (8x8 px",
          "data.init_args.image_size", "perceptual_crop: 8", "perceptual_crop: null"]),
        ("sd", ["--data", "acpo_lightning.data.PromptImageDataModule",
                "--data.init_args.source", "imagefolder", "--data.init_args.resolution", "8"],
         ["perceptual_crop size=16 is larger than the training images (8x8 px",
          "data.init_args.resolution"]),
    ],
    ids=["flux-odd-side", "sd3-odd-latents", "crop-over-shapes", "crop-over-imagefolder"],
)  # fmt: skip
def test_a_training_image_size_the_model_cannot_take_is_one_line_at_setup(
    backbone: str,
    data: list[str],
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Before: a RuntimeError from a view, a loss on 14x14 against 15x15 latents, or
    ``random_`` at the first scored step; now ``acpo: error:`` before the first step."""
    monkeypatch.chdir(tmp_path)
    if "imagefolder" in data:
        from test_latent_cache import write_images

        data = [*data, "--data.init_args.path", str(write_images(tmp_path / "images"))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_backbone(backbone), *data, "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    message = one_error(capsys.readouterr().err)
    assert all(part in message for part in expected), message
    assert not list(tmp_path.glob("outputs/*/checkpoints/*.ckpt"))
