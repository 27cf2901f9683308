"""Multi-process training: two CPU processes (DDP over gloo) from the CLI; the FSDP/DeepSpeed overlays.

DDP draws each rank's noise, timesteps and prompt dropout from its own generator (seeded with the
rank), so two ranks with batch 2 are not one process with batch 4. What they must equal is one
process that, at every step, takes the loss of rank 0's batch with rank 0's randomness and the loss
of rank 1's batch with rank 1's randomness, averages the two (DDP averages the gradients), clips
and steps AdamW. :func:`reference` replays exactly that from the same configs, on the batches each
rank recorded (:class:`BatchRecorder`), and the tests compare weights, exports, logged losses,
synced validation losses and synced evaluation metrics with the 2-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.distributed import _get_default_process_group_backend_for_device
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from lightning.pytorch.trainer.states import RunningStage
from safetensors.torch import load_file

from acpo_lightning import ACPOModule
from acpo_lightning import testing as T
from acpo_lightning.cli import build_cli
from acpo_lightning.data import ShapesDataModule, collate_prompt_images
from acpo_lightning.data.collate import ResumableDataLoader
from acpo_lightning.metrics import CLIPScore, PickScore
from acpo_lightning.models.lora import lora_state_dict
from conftest import CONFIGS, make_module

TESTS = Path(__file__).resolve().parent
WORLD = 2
BATCH = 2
STEPS = 4  # 8 images / (2 ranks x batch 2) = 2 steps per epoch: two epochs, two epoch ends
STEPS_PER_EPOCH = 2
PROMPTS = ["a red square", "a blue circle", "a green stripe", "a white square", "a cat"]
EVAL_STEPS = 2
#: Everything the 2-process run may write, relative to its working directory.
EXPECTED_FILES = {
    "outputs/tiny/checkpoints/config.yaml",
    "outputs/tiny/checkpoints/epoch=0-step=2.ckpt",
    "outputs/tiny/checkpoints/epoch=1-step=4.ckpt",
    "outputs/tiny/checkpoints/last.ckpt",
    "outputs/tiny/lora/step-000002/pytorch_lora_weights.safetensors",
    "outputs/tiny/lora/step-000004/pytorch_lora_weights.safetensors",
    "outputs/tiny/lora/last/pytorch_lora_weights.safetensors",
    "outputs/tiny/tensorboard/version_0/config.yaml",
    "outputs/tiny/tensorboard/version_0/hparams.yaml",
    "outputs/tiny/tensorboard/version_0/events.out.tfevents.*",  # exactly one
    "probe/rank-0.json",
    "probe/rank-1.json",
}


class BatchRecorder(pl.Callback):
    """Record what this rank trains and validates on; written to ``<directory>/rank-<r>.json``.

    Used by class path (``test_ddp.BatchRecorder``) in the 2-process run, whose ``PYTHONPATH``
    holds ``tests/``.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.train: list[dict[str, Any]] = []
        self.val: list[list[str]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        self.train.append({**record, "batch_idx": batch_idx, "prompts": list(batch["prompts"])})

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module, batch, *args) -> None:
        if not trainer.sanity_checking:
            self.val.append(list(batch["prompts"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "loader": type(loader).__name__,
            "sampler": type(loader.batch_sampler.sampler).__name__,
            "train": self.train,
            "val": self.val,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))


def _overlays(directory: Path, clip_dir: Path) -> tuple[Path, Path]:
    """``run.yaml`` (shared by the 2-process run and the reference) and ``ddp_run.yaml`` (callbacks)."""
    run = {
        "trainer": {"max_steps": STEPS, "enable_progress_bar": False},
        "model": {
            # a large step without warm-up: a wrong gradient moves the weights far from the reference
            "optimizer": {"init_args": {"lr": 1.0e-2}},
            "lr_scheduler": None,
            "perceptual_share": 0.5,  # one sample of batch 2 scored on every step (0.25: on half)
        },
        "data": {
            "init_args": {"train_size": 8, "val_size": 4, "batch_size": BATCH, "num_workers": 1}
        },
    }
    (directory / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    clip = {
        "pretrained_model_name_or_path": str(clip_dir),
        "prompts": str(directory / "prompts.txt"),  # 5 prompts: shards of 2 and 3 images
        "num_inference_steps": EVAL_STEPS,
        "batch_size": 2,
        "every_n_epochs": 1,
    }
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": "outputs/tiny/checkpoints",
                "every_n_train_steps": 2,
                "save_last": True,
                "save_top_k": -1,
            },
        },
        {
            "class_path": "acpo_lightning.callbacks.LoRAExportCallback",
            "init_args": {"dirpath": "outputs/tiny/lora", "every_n_steps": 2},
        },
        {
            "class_path": "acpo_lightning.callbacks.PickScoreCallback",
            "init_args": {**clip, "processor_name_or_path": str(clip_dir), "log_images": 2},
        },
        {
            "class_path": "acpo_lightning.callbacks.CLIPScoreCallback",
            "init_args": {**clip, "log_images": 0},
        },
        {"class_path": "test_ddp.BatchRecorder", "init_args": {"directory": "probe"}},
    ]
    run_file, ddp_file = directory / "run.yaml", directory / "ddp_run.yaml"
    run_file.write_text(yaml.safe_dump(run))
    ddp_file.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return run_file, ddp_file


def _configs(*files: Path) -> list[str]:
    return [arg for f in files for arg in ("--config", str(f))]


def _run_to_completion(command: list[str], cwd: Path, timeout: float) -> str:
    """Run ``command`` in a process group of its own; on a timeout kill the group (every rank)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "MASTER_"))}
    for key in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE"):  # from other tests' runs
        env.pop(key, None)
    path = [str(TESTS), *filter(None, [env.get("PYTHONPATH")])]
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join(path))
    env["OMP_NUM_THREADS"] = "1"  # Lightning's choice on a 2-core machine, fixed for any machine
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-process run hung (> {timeout:.0f} s):\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


@dataclass
class DDPRun:
    root: Path
    run_file: Path
    clip_dir: Path
    seconds: float
    ranks: list[dict[str, Any]]  # BatchRecorder's record of each rank


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> DDPRun:
    """``acpo fit`` on acpo.yaml + tiny.yaml + ddp.yaml with two CPU processes, in a subprocess."""
    root = tmp_path_factory.mktemp("ddp")
    clip_dir = T.write_tiny_clip(root.parent / f"{root.name}-clip")
    run_file, ddp_file = _overlays(root, clip_dir)
    configs = [CONFIGS / "acpo.yaml", CONFIGS / "tiny.yaml", CONFIGS / "ddp.yaml"]
    script = Path(sys.executable).parent / "acpo"
    command = [str(script), "fit", *_configs(*configs, run_file, ddp_file)]
    command += ["--trainer.accelerator", "cpu", "--trainer.devices", str(WORLD)]
    start = time.perf_counter()
    output = _run_to_completion(command, root, timeout=300)
    seconds = time.perf_counter() - start
    assert "distributed_backend=gloo" in output and f"Starting with {WORLD} processes" in output
    ranks = [json.loads((root / "probe" / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    return DDPRun(root, run_file, clip_dir, seconds, ranks)


@contextmanager
def as_rank(module: ACPOModule, rank: int) -> Iterator[ACPOModule]:
    """Within the block ``module`` is ``rank`` (its ``global_rank``), so it draws that rank's randomness."""
    cls = type(module)
    module.__class__ = type(f"{cls.__name__}AsRank{rank}", (cls,), {"global_rank": rank})
    try:
        yield module
    finally:
        module.__class__ = cls


@dataclass
class Reference:
    """One process replaying both ranks: weights, losses and evaluation values along the run."""

    lora: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> export layout
    trained: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint keys, at the end
    rank_losses: list[list[float]] = field(default_factory=list)  # [step][rank]
    val_losses: list[list[float]] = field(default_factory=list)  # [epoch][rank]
    scores: dict[str, list[float]] = field(default_factory=dict)  # val/<name> -> [epoch]


def _batch(dataset, prompts: list[str]) -> dict:
    index = {dataset[i]["prompt"]: i for i in range(len(dataset))}
    assert len(index) == len(dataset), "prompts must name the items of the tiny datasets"
    return collate_prompt_images([dataset[index[p]] for p in prompts])


def _evaluate(
    module: ACPOModule, data: ShapesDataModule, run: DDPRun, epoch: int, ref: Reference
) -> None:
    """Each rank's validation loss, and the evaluation callbacks' scores on all the prompts."""
    module.eval()
    with torch.no_grad():
        losses = []
        for rank in range(WORLD):
            (prompts,) = run.ranks[rank]["val"][epoch : epoch + 1]  # limit_val_batches: 1
            with as_rank(module, rank):
                generator = module.step_generator("val", 0, 0)
                terms, _ = module.compute_terms(_batch(data.val_set, prompts), generator)
            losses.append(terms.loss.item())
        ref.val_losses.append(losses)
        clip = str(run.clip_dir)
        metrics = {"pickscore": PickScore(clip, clip), "clipscore": CLIPScore(clip)}
        for use_anchor, suffix in ((False, ""), (True, "_base")):
            images = module.generate(
                PROMPTS, seed=0, num_inference_steps=EVAL_STEPS, use_anchor=use_anchor
            )
            for name, metric in metrics.items():
                value = metric.score(images, PROMPTS).mean().item()
                ref.scores.setdefault(f"val/{name}{suffix}", []).append(value)
    module.train()


@pytest.fixture(scope="module")
def reference(ddp_run: DDPRun) -> Reference:
    """The one-process replay of the 2-process run, built from the same configs.

    One thread, as each rank has (``OMP_NUM_THREADS=1``): the same reduction order in every
    kernel, so the replay is bitwise equal. With 2 threads here the weights differ by about 3e-4
    after 4 steps (AdamW at lr 1e-2 scales rounding differences of near-zero gradients up to ~lr).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _replay(ddp_run)
    finally:
        torch.set_num_threads(threads)


def _replay(ddp_run: DDPRun) -> Reference:
    configs = [CONFIGS / "acpo.yaml", CONFIGS / "tiny.yaml", ddp_run.run_file]
    cli = build_cli([*_configs(*configs), "--trainer.logger", "false"], run=False)
    module, data = cli.model, cli.datamodule
    module.train()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    ref = Reference()
    for step in range(STEPS):
        optimizer.zero_grad()
        losses = []
        for rank in range(WORLD):
            seen = ddp_run.ranks[rank]["train"][step]
            assert seen["step"] == step and seen["batch_idx"] == step % STEPS_PER_EPOCH
            with as_rank(module, rank):
                generator = module.step_generator("train", step, seen["batch_idx"])
                terms, _ = module.compute_terms(_batch(data.train_set, seen["prompts"]), generator)
            (terms.loss / WORLD).backward()  # DDP: the mean of the ranks' gradients
            losses.append(terms.loss.item())
        ref.rank_losses.append(losses)
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)  # gradient_clip_val
        optimizer.step()
        ref.lora[step + 1] = {k: v.clone() for k, v in lora_state_dict(module.unet).items()}
        if (step + 1) % STEPS_PER_EPOCH == 0:
            _evaluate(module, data, ddp_run, step // STEPS_PER_EPOCH, ref)
    keep = module.trained_state_keys()
    ref.trained = {k: v.detach().clone() for k, v in module.state_dict().items() if k in keep}
    return ref


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_each_rank_keeps_the_resumable_loader_and_gets_a_disjoint_half_of_every_epoch(
    ddp_run: DDPRun,
) -> None:
    everything = {ShapesDataModule(train_size=8).train_set[i]["prompt"] for i in range(8)}
    for record in ddp_run.ranks:
        assert record["world_size"] == WORLD and record["loader"] == ResumableDataLoader.__name__
        assert record["sampler"] == "SeededShuffle"  # the data seed's, resumable: see below
    for epoch in range(STEPS // STEPS_PER_EPOCH):
        halves = [
            [p for b in record["train"] if b["epoch"] == epoch for p in b["prompts"]]
            for record in ddp_run.ranks
        ]
        assert [len(h) for h in halves] == [4, 4] and set(halves[0]) | set(halves[1]) == everything
    val = [record["val"][0] for record in ddp_run.ranks]
    assert not set(val[0]) & set(val[1])


@pytest.mark.slow
def test_two_processes_train_like_one_process_averaging_the_two_ranks(
    ddp_run: DDPRun, reference: Reference
) -> None:
    state = torch.load(
        ddp_run.root / "outputs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert state["global_step"] == STEPS
    assert _max_difference(state["state_dict"], reference.trained) < 1e-5
    lora = ddp_run.root / "outputs" / "tiny" / "lora"
    for name, step in (("step-000002", 2), ("step-000004", 4), ("last", STEPS)):
        exported = load_file(lora / name / "pytorch_lora_weights.safetensors")
        assert _max_difference(exported, reference.lora[step]) < 1e-5, name
    # the comparison can fail: the weights moved far more than the tolerance, the ranks' losses differ
    assert _max_difference(reference.lora[STEPS], reference.lora[1]) > 1e-2
    assert all(abs(a - b) > 1e-4 for a, b in reference.rank_losses)


@pytest.mark.slow
def test_train_validation_and_evaluation_metrics_are_synced_over_the_ranks(
    ddp_run: DDPRun, reference: Reference
) -> None:
    scalars = _scalars(ddp_run.root / "outputs" / "tiny" / "tensorboard" / "version_0")
    # train/* is logged every step, synced: the mean of the two ranks' losses (which differ)
    assert all(abs(r[0] - r[1]) > 1e-4 for r in reference.rank_losses)
    expected_train = [sum(r) / WORLD for r in reference.rank_losses]
    assert scalars["train/loss"] == pytest.approx(expected_train, abs=1e-5)
    # val/* is synced at each epoch end: the mean over the ranks' shards
    assert all(abs(r[0] - r[1]) > 1e-4 for r in reference.val_losses)
    expected = [sum(r) / WORLD for r in reference.val_losses]
    assert scalars["val/loss"] == pytest.approx(expected, abs=1e-5)
    # evaluation callbacks: ranks generate 2 and 3 of the 5 prompts, synced to the 5-prompt value
    for name in ("val/pickscore", "val/pickscore_base", "val/clipscore", "val/clipscore_base"):
        assert scalars[name] == pytest.approx(reference.scores[name], abs=1e-3), name
    assert scalars["val/pickscore"] != pytest.approx(scalars["val/pickscore_base"], abs=1e-3)


@pytest.mark.slow
def test_checkpoints_exports_and_logs_are_written_once_and_nothing_hangs(ddp_run: DDPRun) -> None:
    written = {
        p.relative_to(ddp_run.root).as_posix()
        for folder in ("outputs", "probe")
        for p in (ddp_run.root / folder).rglob("*")
        if p.is_file()
    }
    events = {p for p in written if "events.out.tfevents." in p}
    assert len(events) == 1  # rank 1 opens no TensorBoard writer
    assert (written - events) | {"outputs/tiny/tensorboard/version_0/events.out.tfevents.*"} == (
        EXPECTED_FILES
    )
    assert ddp_run.seconds < 300  # both ranks got through every epoch end and evaluation


# ---------------------------------------------------------------- the loader under DDP, in-process
def _rank_loader(
    rank: int | None, data_seed: int = 0, train_size: int = 8, num_workers: int = 0
) -> ResumableDataLoader:
    """What Lightning makes of ShapesDataModule's training loader on ``rank`` of 2 (``None``: 1
    process): the DataModule attached to a 2-process DDP Trainer, the loader prepared by the
    Trainer's own data connector (which swaps in its DistributedSampler where it sees fit)."""
    data = ShapesDataModule(
        train_size=train_size,
        batch_size=BATCH,
        image_size=8,
        data_seed=data_seed,
        num_workers=num_workers,
    )
    if rank is None:
        return data.train_dataloader()
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", logger=False)
    trainer.strategy.cluster_environment.set_global_rank(rank)
    data.trainer = trainer
    connector = trainer._data_connector
    return connector._prepare_dataloader(
        data.train_dataloader(), shuffle=True, mode=RunningStage.TRAINING
    )


def _epochs(loader: ResumableDataLoader, count: int) -> list[list[list[str]]]:
    result = []
    for epoch in range(count):
        _set_sampler_epoch(loader, epoch)  # as Lightning does at each epoch start
        result.append([batch["prompts"] for batch in loader])
    return result


def test_the_loader_lightning_builds_for_a_rank_keeps_its_class_and_shards_every_epoch() -> None:
    halves = [_epochs(_rank_loader(rank), 2) for rank in range(WORLD)]
    assert type(_rank_loader(0)) is ResumableDataLoader
    for epoch in range(2):
        seen = [[p for batch in half[epoch] for p in batch] for half in halves]
        assert len(seen[0]) == len(seen[1]) == 4 and len(set(seen[0]) | set(seen[1])) == 8
    assert halves[0][0] != halves[0][1]  # a new permutation each epoch


def test_under_ddp_the_data_seed_orders_each_rank_and_lightnings_seed_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    firsts = {seed: _epochs(_rank_loader(0, data_seed=seed), 1)[0] for seed in (0, 1, 12345)}
    assert len({str(order) for order in firsts.values()}) == 3, firsts
    monkeypatch.setenv("PL_GLOBAL_SEED", "777")  # what seed_everything drew for this launch
    assert _epochs(_rank_loader(0, data_seed=1), 1)[0] == firsts[1]


def test_one_process_keeps_the_order_of_successive_seeded_permutations() -> None:
    """The single-process order is what it was with torchdata's RandomSampler: epoch e is the
    e-th ``randperm`` of a generator seeded with the data seed."""
    dataset = ShapesDataModule(train_size=8, image_size=8, data_seed=3).train_set
    generator = torch.Generator().manual_seed(3)
    for epoch, order in enumerate(_epochs(_rank_loader(None, data_seed=3), 3)):
        expected = [dataset[i]["prompt"] for i in torch.randperm(8, generator=generator).tolist()]
        assert [p for batch in order for p in batch] == expected, epoch


def test_a_sampler_saved_after_its_epochs_last_item_starts_the_next_epoch_whole() -> None:
    """A checkpoint at the last step of an epoch holds every item of it handed out (the pass has
    not ended yet); Lightning resumes in the next epoch (``set_epoch(e + 1)``), which must be
    whole, not the empty rest of epoch e (the end-of-epoch resume of tests/test_reliability.py
    ran an empty epoch and ended in epoch 2 instead of 1)."""
    from acpo_lightning.data.shuffle import SeededShuffle

    sampler = SeededShuffle(range(8), seed=3)
    uninterrupted = [list(sampler) for _ in range(2)]
    saved = SeededShuffle(range(8), seed=3)
    iterator = iter(saved)
    assert [next(iterator) for _ in range(8)] == uninterrupted[0]  # the last item, pass not over
    resumed = SeededShuffle(range(8), seed=3)
    resumed.load_state_dict(saved.state_dict())
    resumed.set_epoch(1)
    assert list(resumed) == uninterrupted[1]
    mid = SeededShuffle(range(8), seed=3)  # a mid-epoch state still continues its epoch
    mid.load_state_dict({"epoch": 1, "yielded": 3})
    mid.set_epoch(1)
    assert list(mid) == uninterrupted[1][3:]


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("epoch", [0, 1])
def test_a_loader_resumed_mid_epoch_yields_the_rest_of_that_epoch(
    epoch: int, rank: int | None, num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    uninterrupted = _epochs(_rank_loader(rank, num_workers=num_workers), epoch + 1)[epoch]
    loader = _rank_loader(rank, num_workers=num_workers)
    _epochs(loader, epoch)
    _set_sampler_epoch(loader, epoch)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    del iterator
    # the resumed launch drew another global seed (LightningCLI's default seed_everything: true)
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    resumed = _rank_loader(rank, num_workers=num_workers)
    resumed.load_state_dict(state)  # what Lightning does with the loader state of a checkpoint
    _set_sampler_epoch(resumed, epoch)
    assert [batch["prompts"] for batch in resumed] == uninterrupted[1:]


# ---------------------------------------------------------------- a 2-process resume mid-epoch
RESUME_ITEMS = 12  # 2 ranks x batch 2: 3 steps per epoch


def _resume_launch(root: Path, probe: str, global_seed: int, steps: int, *extra: str) -> None:
    run = {
        "trainer": {
            "max_steps": steps,
            "enable_progress_bar": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": "outputs/tiny/checkpoints",
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                    },
                },
                {"class_path": "test_ddp.BatchRecorder", "init_args": {"directory": probe}},
            ],
        },
        "data": {
            "init_args": {
                "train_size": RESUME_ITEMS,
                "val_size": 2,
                "batch_size": BATCH,
                "num_workers": 1,
                "data_seed": 5,
            }
        },
    }
    run_file = root / f"{probe}.yaml"
    run_file.write_text(yaml.safe_dump(run))
    configs = [CONFIGS / "acpo.yaml", CONFIGS / "tiny.yaml", CONFIGS / "ddp.yaml", run_file]
    command = [str(Path(sys.executable).parent / "acpo"), "fit", *_configs(*configs)]
    command += ["--trainer.accelerator", "cpu", "--trainer.devices", str(WORLD)]
    command += ["--seed_everything", str(global_seed), *extra]
    _run_to_completion(command, root, timeout=300)


@pytest.mark.slow
def test_a_two_process_run_resumed_mid_epoch_trains_every_item_exactly_once(tmp_path) -> None:
    """Step 1 of 3 in one launch, steps 2 and 3 in another that resumes from its checkpoint with
    another global seed (LightningCLI's default draws one per launch): over both ranks and both
    launches the epoch holds each of the 12 items once."""
    _resume_launch(tmp_path, "first", 1, 1)
    checkpoint = tmp_path / "outputs" / "tiny" / "checkpoints" / "epoch=0-step=1.ckpt"
    _resume_launch(tmp_path, "resumed", 2, 3, "--ckpt_path", str(checkpoint))
    seen = []
    for probe in ("first", "resumed"):
        for rank in range(WORLD):
            record = json.loads((tmp_path / probe / f"rank-{rank}.json").read_text())
            assert record["sampler"] == "SeededShuffle"
            seen += [p for b in record["train"] if b["epoch"] == 0 for p in b["prompts"]]
    items = ShapesDataModule(train_size=RESUME_ITEMS).train_set
    assert sorted(seen) == sorted(items[i]["prompt"] for i in range(RESUME_ITEMS))


# ---------------------------------------------------------------- the strategy overlays
def _strategy(overlay: str) -> Strategy:
    """Build ``trainer.strategy`` of ``configs/<overlay>`` as LightningCLI does (jsonargparse)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    config = yaml.safe_load((CONFIGS / overlay).read_text())["trainer"]["strategy"]
    return parser.instantiate_classes(parser.parse_object({"strategy": config})).strategy


def test_ddp_overlay_leaves_the_backend_to_the_device() -> None:
    strategy = _strategy("ddp.yaml")
    assert isinstance(strategy, DDPStrategy) and strategy._process_group_backend is None
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, logger=False)
    assert trainer.world_size == WORLD and strategy._get_process_group_backend() == "gloo"
    assert _get_default_process_group_backend_for_device(torch.device("cuda", 0)) == "nccl"


def test_fsdp_overlay_builds_lightnings_fsdp_strategy_for_lora(capsys) -> None:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = _strategy("fsdp.yaml")
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert set(policy._module_classes) == {BasicTransformerBlock, ResnetBlock2D}
    # why no FSDP run here: Lightning accepts it only with a GPU accelerator
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, logger=False)
    # one dtype per flattened unit: acpo.yaml's bf16 base weights are loaded in fp32 under FSDP
    args = _configs(CONFIGS / "acpo.yaml", CONFIGS / "fsdp.yaml")
    with pytest.raises(SystemExit):
        build_cli(["fit", *args, "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    dtypes = [
        model["unet"]["init_args"]["unet"]["init_args"]["torch_dtype"],
        model["vae"]["init_args"]["torch_dtype"],
        model["text_encoder"]["init_args"]["torch_dtype"],
    ]
    assert dtypes == ["float32"] * 3


def test_under_fsdp_auto_wrap_a_checkpoint_keeps_every_lora_weight(tmp_path: Path) -> None:
    """torch's FSDP wraps as Lightning's FSDPStrategy does, on the CPU (one process, gloo)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    strategy = _strategy("fsdp.yaml")
    module = make_module()
    lora = {name for name, p in module.named_parameters() if p.requires_grad}
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        wrapped = FullyShardedDataParallel(module, device_id=torch.device("cpu"), **strategy.kwargs)
        with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
            checkpoint = {"state_dict": wrapped.state_dict()}  # FSDPStrategy, state_dict_type: full
    finally:
        dist.destroy_process_group()
    assert lora <= set(checkpoint["state_dict"])
    module.on_save_checkpoint(checkpoint)
    assert lora <= set(checkpoint["state_dict"])


def test_deepspeed_overlay_builds_the_strategy_or_lightning_asks_for_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401  (not among this project's extras)
    except ImportError:
        with pytest.raises(MisconfigurationException, match="pip install -U deepspeed"):
            _strategy("deepspeed.yaml")
        return
    strategy = _strategy("deepspeed.yaml")
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.exclude_frozen_parameters is True
