"""Cost of the evaluation callbacks as a share of a training epoch, on the tiny config.

Builds the model and data of ``configs/acpo.yaml`` + ``configs/tiny.yaml`` through the CLI, then
trains ``--epochs`` epochs with PickScore, CLIPScore and MANIQA callbacks evaluating at every
epoch end (tiny CLIP written to a temp folder; MANIQA's network replaced by the tiny IQA head,
since pyiqa's weights are not available offline). The three callbacks share one generation pass;
the base model's images are generated at the first evaluation only. Prints a table and writes
``outputs/bench/eval_cost.json``.

    python benchmarks/eval_cost.py [--epochs 3] [--max-prompts 32] [--train-size 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]


class EpochTimer(pl.Callback):
    """Placed before the evaluation callbacks: times the training part of each epoch."""

    def __init__(self) -> None:
        self.train_seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.train_seconds.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--max-prompts", type=int, default=32, help="prompts of the shipped acpo_eval list"
    )
    parser.add_argument(
        "--train-size", type=int, default=16, help="images per epoch (tiny.yaml: 16)"
    )
    args = parser.parse_args()

    from acpo_lightning import testing as T
    from acpo_lightning.callbacks import CLIPScoreCallback, MANIQACallback, PickScoreCallback
    from acpo_lightning.cli import build_cli

    configs = [
        "--config",
        str(REPO / "configs" / "acpo.yaml"),
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli(
            [
                *configs,
                "--data.init_args.train_size",
                str(args.train_size),
                "--trainer.logger",
                "false",
                "--trainer.default_root_dir",
                tmp,
            ],
            run=False,
        )
        clip = str(T.write_tiny_clip(Path(tmp) / "clip"))
        common = dict(
            prompts="acpo_eval", max_prompts=args.max_prompts, every_n_epochs=1, batch_size=8
        )
        evaluators = [
            PickScoreCallback(
                pretrained_model_name_or_path=clip, processor_name_or_path=clip, **common
            ),
            CLIPScoreCallback(pretrained_model_name_or_path=clip, log_images=0, **common),
            MANIQACallback(head=T.TinyQualityHead(), log_images=0, **common),
        ]
        timer = EpochTimer()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=args.epochs,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer, *evaluators],
            default_root_dir=tmp,
        )
        eval_seconds: list[float] = []

        class EvalTimer(pl.Callback):
            def on_train_epoch_end(self, trainer, module) -> None:
                total = evaluators[0].evaluation_pass.stats["seconds"]
                eval_seconds.append(total - sum(eval_seconds))

        trainer.callbacks.append(EvalTimer())
        trainer.fit(cli.model, datamodule=cli.datamodule)
        stats = dict(evaluators[0].evaluation_pass.stats)

    rows = []
    for epoch, (train, evaluation) in enumerate(
        zip(timer.train_seconds, eval_seconds, strict=True)
    ):
        rows.append(
            {
                "epoch": epoch,
                "train_s": train,
                "eval_s": evaluation,
                "eval_share_of_epoch": evaluation / (train + evaluation),
            }
        )
    steps = cli.model.num_inference_steps
    print(
        f"tiny config: {args.train_size} images/epoch, {args.max_prompts} prompts, {steps} sampler steps, "
        f"CFG {cli.model.guidance_scale}; passes {stats['evaluations']}, images {stats['images']}"
    )
    print(f"{'epoch':>5} {'train s':>8} {'eval s':>8} {'eval share':>10}")
    for row in rows:
        print(
            f"{row['epoch']:>5} {row['train_s']:>8.2f} {row['eval_s']:>8.2f} {row['eval_share_of_epoch']:>10.1%}"
        )
    out = REPO / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_cost.json").write_text(
        json.dumps({"args": vars(args), "stats": stats, "epochs": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
