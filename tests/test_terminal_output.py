"""What reaches a user's terminal in normal use: no import-time noise, no page-long warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acpo_lightning.quiet_imports import quiet_imports

#: What bitsandbytes logs when peft (which diffusers' model classes import) imports it on a CPU
#: with AVX512-BF16 and without the ``kernels`` package.
KERNELS_NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ..."


def test_quiet_imports_drops_only_that_message_and_only_inside() -> None:
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        with quiet_imports():
            logger.warning(KERNELS_NOISE, "inside")
            logger.warning("another bitsandbytes warning")
        logger.warning(KERNELS_NOISE, "after")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another bitsandbytes warning", KERNELS_NOISE % "after"]
    assert logger.filters == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["-m", "acpo_lightning", "--help"],  # peft first imported by models/lora.py
        ["-c", "import acpo_lightning.testing"],  # by diffusers' UNet2DConditionModel
        ["-c", "import acpo_lightning.demo.assets"],  # the same, for the demo
    ],
    ids=["acpo-help", "testing", "demo"],
)
def test_a_fresh_process_prints_no_bitsandbytes_kernel_warning(
    args: list[str], tmp_path: Path
) -> None:
    """Each first importer of peft in a new process (~6 s each: torch, diffusers, peft).

    On a CPU without AVX512-BF16 bitsandbytes logs nothing and this test cannot fail there.
    """
    result = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "gemm_4bit_forward" not in output and "kernels-community" not in output, output[:500]
