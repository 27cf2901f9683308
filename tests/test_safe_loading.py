"""Safe loading: no file a user points at is unpickled beyond ``torch.load(weights_only=True)``.

Every entry point that reads weights from a user path is handed a file whose unpickling would run
code (it writes a marker file); each must refuse it, and the marker must never appear. A control
test shows the payload does run under an unsafe load, so that a refusal here means something.
"""

from __future__ import annotations

import ast
import contextlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.checkpoint_io import SafeCheckpointIO, UnsafeCheckpointError
from acpo_lightning.cli import main
from acpo_lightning.models import load_lora, load_text_encoder, load_unet
from acpo_lightning.quality import TwoStreamIQA, TwoStreamNet
from conftest import CONFIGS, REPO, make_module

TINY = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
FORMATS = ("zip", "pickle")  # torch.save's zip archive, and a bare pickle (torch's legacy format)


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def write_malicious(path: Path, marker: Path, fmt: str = "zip", **tensors: torch.Tensor) -> Path:
    """A Lightning-looking checkpoint (or a weights file) with a code-execution payload in it."""
    content = {
        "state_dict": {"unet.x.lora_A.default.weight": torch.zeros(4, 8), **tensors},
        "global_step": 1,
        "hyper_parameters": {},
        "payload": Payload(marker),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=2))
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the payload ran: a loader unpickled code from a user file"


@pytest.mark.parametrize("fmt", FORMATS)
def test_control_the_payload_runs_when_unpickled_unsafely(fmt: str, tmp_path: Path) -> None:
    fired = tmp_path / "fired"
    path = write_malicious(tmp_path / "evil.ckpt", fired, fmt)
    if fmt == "zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert fired.read_text() == "pwned"


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("fmt", FORMATS)
def test_safe_checkpoint_io_refuses_it(fmt: str, tmp_path: Path, marker: Path) -> None:
    path = write_malicious(tmp_path / "evil.ckpt", marker, fmt)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        SafeCheckpointIO().load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_refuses_it(
    subcommand: str, fmt: str, tmp_path: Path, marker: Path, monkeypatch, capsys
) -> None:
    path = write_malicious(tmp_path / "evil.ckpt", marker, fmt)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *TINY, "--ckpt_path", str(path)])
    assert exit_info.value.code == 2
    assert f"acpo: error: {path}" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", FORMATS)
def test_acpo_export_refuses_it(
    fmt: str, tmp_path: Path, marker: Path, monkeypatch, capsys
) -> None:
    path = write_malicious(tmp_path / "checkpoints" / "evil.ckpt", marker, fmt)
    (tmp_path / "checkpoints" / "config.yaml").write_text((CONFIGS / "tiny.yaml").read_text())
    monkeypatch.delenv("ACPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(path), "--out", str(tmp_path / "lora")])
    assert exit_info.value.code == 2
    assert f"acpo: error: {path}" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()


def test_load_from_checkpoint_refuses_it(tmp_path: Path, marker: Path) -> None:
    """Lightning's classmethod passes weights_only=None: torch >= 2.6 reads that as True."""
    path = write_malicious(tmp_path / "evil.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError):
        ACPOModule.load_from_checkpoint(path)


# ------------------------------------------------------------------ files that are no checkpoint
def not_a_checkpoint(kind: str, folder: Path) -> Path:
    """A file a user may pass as a checkpoint by mistake: text, a config, an image, a data file,
    or a LoRA export (torch >= 2.5 reads a ``.safetensors`` file as a dict of tensors)."""
    from PIL import Image
    from safetensors.torch import save_file

    path = folder / {"text": "bad.ckpt", "yaml": "config.yaml", "png": "image.png",
                     "jsonl": "data.jsonl", "safetensors": "lora.safetensors"}[kind]  # fmt: skip
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "yaml":
        path.write_text((CONFIGS / "tiny.yaml").read_text())
    elif kind == "png":
        Image.new("RGB", (8, 8)).save(path)
    elif kind == "jsonl":
        path.write_text('{"image": "a.png", "prompt": "a cat"}\n')
    else:
        save_file({"unet.x.lora_A.weight": torch.zeros(4, 8)}, str(path))
    return path


NOT_CHECKPOINTS = ("text", "yaml", "png", "jsonl", "safetensors")
NOT_A_CHECKPOINT = "is not a PyTorch checkpoint"


@pytest.mark.parametrize("kind", NOT_CHECKPOINTS)
def test_a_file_that_is_no_checkpoint_is_named_so(kind: str, tmp_path: Path) -> None:
    """Not "pickled Python objects" (advice to re-save it), not a raw ``KeyError: 101``."""
    path = not_a_checkpoint(kind, tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error_info:
        SafeCheckpointIO().load_checkpoint(path)
    message = str(error_info.value)
    assert message.startswith(f"{path} {NOT_A_CHECKPOINT}") and "Fix:" in message
    assert "pickled" not in message and "\n" not in message


@pytest.mark.parametrize("kind", NOT_CHECKPOINTS)
@pytest.mark.parametrize("command", ["fit", "export"])
def test_the_cli_says_a_file_is_no_checkpoint_in_one_line(
    command: str, kind: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``fit --ckpt_path`` and ``export --ckpt`` read the file with the same loader; the text case
    is the README's example ("What errors look like")."""
    path = not_a_checkpoint(kind, tmp_path).name
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACPO_DEBUG", raising=False)
    if command == "fit":
        args = ["fit", *TINY, "--ckpt_path", path]
    else:
        args = ["export", "--ckpt", path, "--out", "my_lora"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("acpo: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"acpo: error: {path} {NOT_A_CHECKPOINT}")
    if kind == "text":  # the same line for both commands, shown under the export command
        readme = (REPO / "README.md").read_text()
        command_line = "$ echo hello > bad.ckpt; acpo export --ckpt bad.ckpt --out my_lora"
        assert f"{command_line}    # fit --ckpt_path: the same line\n{errors[0]}\n" in readme


# ------------------------------------------------------------------ LoRA adapters
@pytest.mark.parametrize("name", ["pytorch_lora_weights.bin", "pytorch_lora_weights.safetensors"])
def test_load_lora_reads_safetensors_only(name: str, tmp_path: Path, marker: Path) -> None:
    """A pickled ``.bin`` (or one renamed ``.safetensors``) is never unpickled."""
    path = write_malicious(tmp_path / "lora" / name, marker)
    module = make_module()
    with pytest.raises(Exception, match="deserializing header"):
        module.load_lora(path)
    with pytest.raises(Exception, match="deserializing header"):
        load_lora(module.unet, path)
    if name.endswith(".bin"):  # the folder holds no safetensors file: named as missing
        with pytest.raises(FileNotFoundError, match=r"pytorch_lora_weights\.safetensors"):
            module.load_lora(path.parent)


def test_lora_exports_are_safetensors_only(tmp_path: Path) -> None:
    from safetensors import safe_open

    written = make_module(lora_init=False).save_lora(tmp_path / "lora")
    assert [p.name for p in (tmp_path / "lora").iterdir()] == ["pytorch_lora_weights.safetensors"]
    with safe_open(str(written), framework="pt") as weights:
        assert all(".lora" in key for key in weights.keys())  # noqa: SIM118


# ------------------------------------------------------------------ heads and models
def test_two_stream_iqa_reads_safetensors_only(tmp_path: Path, marker: Path) -> None:
    folder = TwoStreamNet(channels=(8,), hidden=8, native_size=16).save_pretrained(tmp_path / "iqa")
    (folder / "model.safetensors").unlink()
    write_malicious(folder / "pytorch_model.bin", marker)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found"):
        TwoStreamIQA.from_pretrained(folder)
    shutil.move(folder / "pytorch_model.bin", folder / "model.safetensors")
    with pytest.raises(Exception, match="deserializing header"):
        TwoStreamIQA.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architecture"] == "TwoStreamIQA"


@pytest.fixture
def pickled_repo(tmp_path: Path, marker: Path) -> Path:
    """A local SD-shaped folder whose UNet and text encoder weights are pickles with a payload."""
    repo = tmp_path / "repo"
    T.tiny_unet().save_pretrained(repo / "unet")
    T.tiny_text_encoder().save_pretrained(repo / "text_encoder")
    for sub, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (repo / sub / f"{name}.safetensors").unlink()
        bin_name = "diffusion_pytorch_model.bin" if sub == "unet" else "pytorch_model.bin"
        write_malicious(repo / sub / bin_name, marker)
    return repo


def test_model_loaders_refuse_pickled_weights(pickled_repo: Path) -> None:
    """diffusers and transformers read ``.bin`` weights with ``weights_only=True``."""
    for loader, what in ((load_unet, "UNet"), (load_text_encoder, "text encoder")):
        with pytest.raises(ValueError, match=f"{what} weights at .* hold pickled Python objects"):
            loader(str(pickled_repo))


def test_the_cli_refuses_pickled_model_weights_in_one_line(
    pickled_repo: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    overlay = tmp_path / "encoder.yaml"
    encoder = {"class_path": "acpo_lightning.models.load_text_encoder"}
    encoder["init_args"] = {"pretrained_model_name_or_path": str(pickled_repo)}
    overlay.write_text(yaml.safe_dump({"model": {"text_encoder": encoder}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--config", str(overlay)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "acpo: error: text encoder weights at" in err and "hold pickled Python objects" in err
    assert "Unsupported global: GLOBAL exec" in err


def test_pyiqa_head_refuses_pickled_weights(tmp_path: Path) -> None:
    pytest.importorskip("pyiqa")
    from acpo_lightning.quality.pyiqa_head import PyiqaQualityHead

    fired = tmp_path / "fired"
    path = tmp_path / "brisque.pth"
    path.write_bytes(pickle.dumps((Payload(fired), torch.zeros(1)), protocol=2))
    with contextlib.suppress(Exception):  # any refusal will do; the marker is the test
        PyiqaQualityHead("brisque", pretrained_model_path=path)
    assert not fired.exists(), "PyiqaQualityHead unpickled code from pretrained_model_path"


# ------------------------------------------------------------------ the source itself
def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            found.append((name, node))
    return found


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return (
                ast.literal_eval(keyword.value) if isinstance(keyword.value, ast.Constant) else ...
            )
    return None


def test_no_source_file_unpickles_beyond_weights_only() -> None:
    """Audit of ``src/``: every ``torch.load`` says ``weights_only=True``; no pickle, joblib, dill,
    ``np.load(allow_pickle=True)`` or ``torch.load(weights_only=False)``."""
    problems = []
    for path in sorted((REPO / "src" / "acpo_lightning").rglob("*.py")):
        for name, call in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{call.lineno} {name}"
            if name.endswith("torch.load") and _keyword(call, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            if name.split(".")[0] in {"pickle", "joblib", "dill", "cloudpickle"} and "load" in name:
                problems.append(where)
            if name.endswith(("np.load", "numpy.load")) and _keyword(call, "allow_pickle"):
                problems.append(f"{where} with allow_pickle")
            if name.endswith("read_pickle"):
                problems.append(where)
    assert not problems, problems
