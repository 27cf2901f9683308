"""The notebooks: committed without outputs, in step with their generator, and run in CI.

The slow tests execute both notebooks with nbclient in the smoke setting, on a kernel that is this
interpreter, with their outputs in a temp folder (never in the repository); any cell error fails.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_ablations.ipynb")
KERNEL = "acpo-test-venv"


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, name
    for cell in code:
        assert cell.outputs == [], f"{name} cell {cell.id} has outputs: clear them"
        assert cell.execution_count is None, f"{name} cell {cell.id} has an execution count"
    assert "widgets" not in notebook.metadata


def test_committed_notebooks_match_their_generator(capsys: pytest.CaptureFixture) -> None:
    assert _generator().main(["--check"]) == 0, capsys.readouterr().err


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec whose interpreter is this one (the venv's), found through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "acpo test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def _execute(name: str, kernel: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.setenv("ACPO_NOTEBOOK_SETTING", "smoke")
    # acpo_demo is not installed with the library: the kernel imports it from the checkout's src/
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.setenv("ACPO_NOTEBOOK_OUT", str(out))
    # one thread: the kernel's small ops otherwise crawl when other jobs share the machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=300,  # per cell
        kernel_name=kernel,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    nbformat.write(notebook, out / name)  # the executed copy, for inspection


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_notebook_runs_in_the_smoke_setting(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _execute("01_quickstart.ipynb", kernel, out, monkeypatch)
    assert (out / "quickstart" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "quickstart" / "logs").rglob("metrics.csv"))
    assert not (NOTEBOOKS / "quickstart").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ablations_notebook_runs_every_sweep_in_the_smoke_setting(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from acpo_demo.ablations import SETTINGS, plan

    out = tmp_path / "out"
    _execute("02_ablations.ipynb", kernel, out, monkeypatch)
    report = out / "ablations_smoke" / "report"
    results = json.loads((report / "results.json").read_text())
    assert set(results["runs"]) == set(plan(SETTINGS["smoke"]))
    assert [s["name"] for s in results["sweeps"]] == [
        "w_anchor",
        "w_perc",
        "tau",
        "perceptual_share",
        "anchor_mode",
    ]
    for name in ("tradeoff.png", "curves_w_anchor.png", "samples_tau.png", "results.md"):
        assert (report / name).is_file(), name
    runs = results["runs"]
    for run in runs.values():
        assert all(math.isfinite(run["metrics"][k]) for k in ("d_guidance", "d_eval", "kid"))
    # every knob acted in training: what the logs say, not what the config says
    assert runs["k_late=6,tau=100"]["summary"]["gate_open"] < 1.0
    assert runs["k_late=6,tau=600"]["summary"]["gate_open"] == 1.0
    assert runs["objective=data"]["summary"]["perc_share"] == pytest.approx(0.25)
    assert runs["objective=data,perceptual_share=1"]["summary"]["perc_share"] == 1.0
    assert runs["w_anchor=0"]["summary"]["w_anchor_end"] == 0.0
    assert runs["anchor_delta=0.005,anchor_mode=constraint"]["summary"]["w_anchor_end"] != 1.0
    assert runs["w_perc=0"]["metrics"]["d_guidance"] != runs["default"]["metrics"]["d_guidance"]
