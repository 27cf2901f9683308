"""No hidden side effects on the user's process: warning filters and ``torch.load`` stay theirs."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs in a fresh interpreter: records every warnings.filterwarnings/simplefilter call made from
# the package's own files, imports the modules named in argv, and prints the filters those calls
# left installed (a call inside ``warnings.catch_warnings()`` leaves none).
_RECORD_FILTERS = """
import importlib, json, sys, warnings
package_dir = sys.argv[1]
calls = []

def recording(real):
    def call(*args, **kwargs):
        before = list(warnings.filters)
        real(*args, **kwargs)
        caller = sys._getframe(1)
        if caller.f_code.co_filename.startswith(package_dir):
            added = [f for f in warnings.filters if f not in before]
            calls.append((caller.f_code.co_filename, caller.f_lineno, added))
    return call

warnings.filterwarnings = recording(warnings.filterwarnings)
warnings.simplefilter = recording(warnings.simplefilter)
for name in sys.argv[2:]:
    importlib.import_module(name)
left = [
    f"{file}:{line}" for file, line, added in calls if any(f in warnings.filters for f in added)
]
print(json.dumps(left))
"""


def filters_left_by_importing(*modules: str) -> list[str]:
    """``file:line`` of each warning filter the package installed, and kept, on import."""
    package_dir = str(SRC / "acpo_lightning")
    result = subprocess.run(
        [sys.executable, "-c", _RECORD_FILTERS, package_dir, *modules],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_package_and_its_data_leaves_warning_filters_alone() -> None:
    """Failed before: data/collate.py called warnings.filterwarnings at import."""
    assert filters_left_by_importing("acpo_lightning", "acpo_lightning.data") == []


def test_importing_the_cli_leaves_warning_filters_alone() -> None:
    """The whole CLI import chain, module.py included (it filtered at import before)."""
    left = filters_left_by_importing("acpo_lightning.cli", "acpo_lightning.quality")
    assert left == []


def test_the_loader_drops_torchdatas_set_vital_notice_where_it_arises() -> None:
    """What the import-time filter hid stays hidden, and only while the loader is built."""
    import warnings

    from acpo_lightning.data.collate import ResumableDataLoader

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ResumableDataLoader(list(range(4)), batch_size=2)
        torch.set_vital("Dataloader", "enabled", "True")  # the same call, outside the loader
    messages = [str(w.message) for w in seen]
    assert len(messages) == 1 and "'set_vital' is deprecated" in messages[0]


# ------------------------------------------------------------------ pyiqa's torch.load
class Harmless:
    """A plain class: ``weights_only=True`` refuses to unpickle it, ``weights_only=False`` loads it."""


def _pickled_object() -> bytes:
    buffer = io.BytesIO()
    torch.save({"object": Harmless()}, buffer)
    return buffer.getvalue()


def _load_as(module_name: str, data: bytes) -> object:
    """``torch.load(..., weights_only=False)`` called from code whose module is ``module_name``."""
    scope = {"__name__": module_name, "torch": torch, "io": io, "data": data}
    exec("result = torch.load(io.BytesIO(data), weights_only=False)", scope)
    return scope["result"]


def test_weights_only_is_forced_on_pyiqas_loads_only_and_only_inside() -> None:
    """Failed before: every torch.load in the process was forced to weights_only while pyiqa
    built its metric, the user's and other libraries' included."""
    from acpo_lightning.quality.pyiqa_head import _weights_only_loads

    real_load, data = torch.load, _pickled_object()
    with _weights_only_loads():
        assert torch.load is not real_load
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            _load_as("pyiqa.archs.brisque_arch", data)
        assert isinstance(_load_as("timm.models", data)["object"], Harmless)
        assert isinstance(_load_as(__name__, data)["object"], Harmless)
    assert torch.load is real_load
    assert isinstance(_load_as("pyiqa.archs.brisque_arch", data)["object"], Harmless)


def test_torch_load_is_restored_when_the_block_raises() -> None:
    from acpo_lightning.quality.pyiqa_head import _weights_only_loads

    real_load = torch.load
    with pytest.raises(RuntimeError, match="boom"), _weights_only_loads():
        raise RuntimeError("boom")
    assert torch.load is real_load


def test_pyiqa_head_leaves_torch_load_as_it_found_it(tmp_path: Path) -> None:
    """Through pyiqa's own loading call: a BRISQUE file it reads, then one it refuses."""
    pytest.importorskip("pyiqa")
    from acpo_lightning.quality.pyiqa_head import PyiqaQualityHead

    real_load = torch.load
    good = tmp_path / "brisque.pth"
    torch.save((torch.zeros(3), torch.zeros(3, 36)), good)
    head = PyiqaQualityHead("brisque", pretrained_model_path=good)
    assert head.net.sv.shape == (3, 36) and torch.load is real_load
    bad = tmp_path / "pickled.pth"
    bad.write_bytes(_pickled_object())
    with pytest.raises(pickle.UnpicklingError):
        PyiqaQualityHead("brisque", pretrained_model_path=bad)
    assert torch.load is real_load
