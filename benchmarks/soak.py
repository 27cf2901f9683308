"""Soak test: a long tiny run with checkpoints, LoRA exports and evaluation callbacks; is memory flat?

Runs ``configs/acpo.yaml`` + ``configs/tiny.yaml`` through the real CLI path (``build_cli``) for
``--steps`` optimizer steps with validation every epoch, ``ModelCheckpoint`` and
``LoRAExportCallback`` every ``--every`` steps and the PickScore/CLIPScore callbacks (a tiny
offline CLIP, one shared generation pass) every ``--every`` steps, and records the process's
resident memory (RSS) after every ``--sample`` steps. It reports the growth after warm-up as a
least-squares slope (MiB per 1,000 steps) and writes everything to ``outputs/bench/soak.json``.

    python benchmarks/soak.py                 # 3,000 steps (about 10 min on 2 CPU cores)
    python benchmarks/soak.py --steps 200     # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import psutil
import torch
import yaml

from acpo_lightning.cli import build_cli
from acpo_lightning.testing import write_tiny_clip

REPO = Path(__file__).resolve().parents[1]


class MemoryRecorder(pl.Callback):
    """RSS (MiB) and live tensor count after every ``sample`` steps."""

    def __init__(self, sample: int) -> None:
        self.sample = sample
        self.records: list[dict] = []
        self.process = psutil.Process()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.sample:
            return
        gc.collect()
        self.records.append(
            {
                "step": step,
                "rss_mib": self.process.memory_info().rss / 2**20,
                "python_objects": len(gc.get_objects()),
                "seconds": time.perf_counter() - self.start,
            }
        )


def slope_per_1000(records: list[dict], key: str) -> float:
    """Least-squares slope of ``key`` against the step, per 1,000 steps."""
    steps = torch.tensor([r["step"] for r in records], dtype=torch.float64)
    values = torch.tensor([r[key] for r in records], dtype=torch.float64)
    centred = steps - steps.mean()
    return float((centred * (values - values.mean())).sum() / (centred**2).sum() * 1000)


def overlay(folder: Path, every: int, clip_dir: Path) -> Path:
    common = {
        "prompts": "acpo_eval",
        "max_prompts": 8,
        "batch_size": 8,
        "every_n_steps": every,
        "every_n_epochs": None,
        "num_inference_steps": 4,
        "pretrained_model_name_or_path": str(clip_dir),
        "processor_name_or_path": str(clip_dir),
    }
    config = {
        "trainer": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(folder), "name": "tensorboard"},
            },
            "log_every_n_steps": 10,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(folder / "checkpoints"),
                        "every_n_train_steps": every,
                        "save_last": True,
                        "save_top_k": 2,
                        "monitor": "step",
                        "mode": "max",
                    },
                },
                {
                    "class_path": "acpo_lightning.callbacks.LoRAExportCallback",
                    "init_args": {"dirpath": str(folder / "lora"), "every_n_steps": every},
                },
                {"class_path": "acpo_lightning.callbacks.PickScoreCallback", "init_args": common},
                {
                    "class_path": "acpo_lightning.callbacks.CLIPScoreCallback",
                    "init_args": {**common, "log_images": 0},
                },
            ],
        },
        "data": {"init_args": {"train_size": 64, "val_size": 4, "num_workers": 0}},
    }
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument(
        "--every", type=int, default=250, help="checkpoint/export/evaluation period"
    )
    parser.add_argument("--sample", type=int, default=50, help="record memory every N steps")
    parser.add_argument(
        "--warmup", type=float, default=0.2, help="share of the run ignored in the slope"
    )
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "soak.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory(prefix="acpo-soak-") as tmp:
        folder = Path(tmp)
        clip_dir = write_tiny_clip(folder / "clip")
        cli = build_cli(
            [
                "--config", str(REPO / "configs" / "acpo.yaml"),
                "--config", str(REPO / "configs" / "tiny.yaml"),
                "--config", str(overlay(folder, args.every, clip_dir)),
                "--trainer.max_steps", str(args.steps),
            ],
            run=False,
        )  # fmt: skip
        recorder = MemoryRecorder(args.sample)
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        exports = sorted(p.name for p in (folder / "lora").iterdir())
        checkpoints = sorted(p.name for p in (folder / "checkpoints").glob("*.ckpt"))

    records = recorder.records
    steady = [r for r in records if r["step"] >= args.warmup * args.steps]
    result = {
        "steps": args.steps,
        "every": args.every,
        "wall_s": records[-1]["seconds"],
        "rss_first_mib": records[0]["rss_mib"],
        "rss_after_warmup_mib": steady[0]["rss_mib"],
        "rss_last_mib": records[-1]["rss_mib"],
        "rss_max_mib": max(r["rss_mib"] for r in records),
        "rss_slope_mib_per_1000_steps": slope_per_1000(steady, "rss_mib"),
        "objects_slope_per_1000_steps": slope_per_1000(steady, "python_objects"),
        "skipped_steps": int(cli.model.guard.skipped_steps),
        "checkpoints_kept": checkpoints,
        "exports": exports,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "records": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"{args.steps} steps in {result['wall_s']:.0f} s; RSS {result['rss_first_mib']:.0f} MiB at "
        f"step {records[0]['step']}, {result['rss_after_warmup_mib']:.0f} MiB after warm-up, "
        f"{result['rss_last_mib']:.0f} MiB at the end (max {result['rss_max_mib']:.0f}); slope after "
        f"warm-up {result['rss_slope_mib_per_1000_steps']:+.2f} MiB / 1,000 steps, Python objects "
        f"{result['objects_slope_per_1000_steps']:+.0f} / 1,000 steps; written to {args.out}"
    )


if __name__ == "__main__":
    main()
