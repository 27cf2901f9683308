"""Reliability: exact resume after a hard kill, atomic checkpoint writes, the non-finite guard."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from acpo_lightning.checkpoint_io import SafeCheckpointIO, UnsafeCheckpointError
from acpo_lightning.data import ShapesDataModule
from acpo_lightning.module import NonFiniteTrainingError
from acpo_lightning.testing import InjectNonFinite
from conftest import CONFIGS, make_module, run_acpo

#: The tiny config: 16 images in batches of 4, so an epoch is 4 steps. Constraint mode, so the
#: dual variable (w_anchor) and its running drift must be restored too; share 0.3 x 4 = 1.2, so
#: each step's scored count (1 or 2) is drawn and must be drawn again the same on resume.
TINY = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
COMMON = [
    "--model.anchor_mode", "constraint", "--trainer.max_steps", "6",
    "--model.perceptual_share", "0.3",
]  # fmt: skip


def _overlay(path: Path, every: int, kill_at: int | None) -> Path:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": "outputs/tiny/checkpoints",
                "every_n_train_steps": every,
                "save_last": True,
                "save_top_k": -1,
            },
        }
    ]
    if kill_at is not None:
        callbacks.append(
            {"class_path": "acpo_lightning.testing.KillAtStep", "init_args": {"step": kill_at}}
        )
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def _acpo(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_acpo(["fit", *TINY, *COMMON, *args], cwd, timeout=600, PYTHONHASHSEED="0")


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for name, value in opt_a[index].items():
            assert torch.equal(value, opt_b[index][name]), (index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step run (an epoch and a half) that nobody stops, checkpointed every step."""
    run = tmp_path_factory.mktemp("uninterrupted")
    result = _acpo(["--config", str(_overlay(run / "o.yaml", 1, None))], run)
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "outputs" / "tiny" / "checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("every", "kill_at", "resumed_from"),
    [(3, 4, "epoch=0-step=3.ckpt"), (2, 5, "epoch=0-step=4.ckpt")],
    ids=["mid-epoch", "end-of-epoch"],
)
def test_a_killed_run_resumed_with_ckpt_path_last_ends_bitwise_equal(
    uninterrupted: Path, tmp_path: Path, every: int, kill_at: int, resumed_from: str
) -> None:
    killed = _acpo(["--config", str(_overlay(tmp_path / "kill.yaml", every, kill_at))], tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, as a pre-empted job
    checkpoints = tmp_path / "outputs" / "tiny" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == int(resumed_from.split("step=")[1].split(".")[0])
    resumed = _acpo(
        ["--config", str(_overlay(tmp_path / "resume.yaml", every, None)), "--ckpt_path", "last"],
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    final = torch.load(checkpoints / "last.ckpt", weights_only=True)
    reference = torch.load(uninterrupted / "epoch=1-step=6.ckpt", weights_only=True)
    _assert_same_training_state(final, reference)
    assert (
        float(final["state_dict"]["anchor_weight.w_anchor_state"]) != 1.0
    )  # the dual variable moved
    assert not list(checkpoints.glob(".*.tmp-*"))


# ------------------------------------------------------------------ atomic writes
def test_a_write_interrupted_midway_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")  # some bytes reach the disk, then the job is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_truncated_checkpoint_is_refused_with_the_path_named(tmp_path: Path) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UnsafeCheckpointError, match=r"last\.ckpt is truncated"):
        io.load_checkpoint(path)


def test_the_module_installs_safe_checkpoint_io_in_a_plain_trainer(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(make_module(), ShapesDataModule(train_size=4, batch_size=4))
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)


# ------------------------------------------------------------------ non-finite guard
def _fit(module, tmp_path: Path, steps: int, callbacks: list, **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **trainer_args,
    )
    trainer.fit(module, ShapesDataModule(train_size=16, batch_size=4))
    return trainer


class _Snapshots(pl.Callback):
    """Trainable weights and AdamW state after every step."""

    def __init__(self) -> None:
        self.weights: list[dict] = []
        self.optimizer: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(
            {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        )
        state = trainer.optimizers[0].state
        self.optimizer.append(
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in state.items()}
        )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_quality_score_skips_the_step_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = make_module(w_perc=1.0, perceptual_share=1.0, anchor_mode="constraint")
    snaps = _Snapshots()
    with caplog.at_level(logging.WARNING, logger="acpo_lightning.module"):
        trainer = _fit(module, tmp_path, 4, [InjectNonFinite(steps=[2]), snaps])
    # step index 2 (the third step) was skipped: weights and optimizer state as after step 2
    assert _same(snaps.weights[2], snaps.weights[1])
    assert snaps.optimizer[2].keys() == snaps.optimizer[1].keys()
    for key, state in snaps.optimizer[2].items():
        assert _same(state, snaps.optimizer[1][key])
    assert not _same(snaps.weights[3], snaps.weights[2])  # the next step trains again
    assert all(torch.isfinite(w).all() for w in snaps.weights[3].values())
    assert torch.isfinite(module.anchor_weight.w_anchor_state) and torch.isfinite(
        module.anchor_weight.drift_ema
    )
    assert (
        int(module.anchor_weight.drift_ema_steps) == 3
    )  # the dual variable stepped with the weights only
    assert int(module.guard.skipped_steps) == 1
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert "step 2 skipped: non-finite train/loss_perc" in caplog.text


def test_a_nan_gradient_is_named_by_parameter(tmp_path: Path) -> None:
    module = make_module(max_consecutive_skips=3)
    name, param = next((n, p) for n, p in module.named_parameters() if p.requires_grad)
    param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(NonFiniteTrainingError) as error:
        _fit(module, tmp_path, 5, [])
    assert f"gradient of {name}" in str(error.value)
    assert "learning rate" in str(error.value) and "bf16-mixed" in str(error.value)


def test_consecutive_skips_stop_the_run_naming_the_term(tmp_path: Path) -> None:
    module = make_module(w_perc=1.0, perceptual_share=1.0, max_consecutive_skips=3)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with pytest.raises(
        NonFiniteTrainingError, match="3 consecutive steps had a non-finite train/loss_perc"
    ):
        _fit(module, tmp_path, 8, [InjectNonFinite(steps=[0, 1, 2, 3])])
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert _same(before, after)  # nothing non-finite ever reached the weights
    assert int(module.guard.skipped_steps) == 3


def test_the_guard_can_be_turned_off(tmp_path: Path) -> None:
    module = make_module(skip_nonfinite=False)
    param = next(p for p in module.parameters() if p.requires_grad)
    param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    _fit(module, tmp_path, 2, [])
    assert int(module.guard.skipped_steps) == 0
    assert not torch.isfinite(param).all()  # what the guard prevents


def _fp16_scaler(init_scale: float) -> tuple[torch.amp.GradScaler, list]:
    """A real GradScaler (CPU fp16 autocast) in Lightning's 16-mixed plugin."""
    from lightning.pytorch.plugins import MixedPrecision

    # the backoff factor makes recovery take one step instead of the 25 halvings from 2**40
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0**-32)
    return scaler, [MixedPrecision("16-mixed", "cpu", scaler=scaler)]


def test_fp16_overflow_is_skipped_and_backed_off_by_the_grad_scaler(tmp_path: Path) -> None:
    """An overflowing fp16 step is the scaler's to skip: it backs off and training goes on."""
    module = make_module(lora_init=False, max_consecutive_skips=2)
    scaler, plugins = _fp16_scaler(2.0**40)  # a scaled fp16 backward overflows at this scale
    snaps = _Snapshots()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = _fit(module, tmp_path, 4, [snaps], plugins=plugins)
    assert trainer.global_step == 4
    assert scaler.get_scale() <= 2.0**8  # backed off (once or more) from 2**40
    overflows = int(module.guard.overflow_steps)
    assert 1 <= overflows < 4 and int(module.guard.skipped_steps) == 0
    assert float(trainer.callback_metrics["train/overflow_steps"]) == overflows
    assert _same(snaps.weights[overflows - 1], before)  # the overflowing steps changed nothing
    assert not _same(snaps.weights[-1], before)  # then training went on
    assert all(torch.isfinite(w).all() for w in snaps.weights[-1].values())


def test_fp16_non_finite_loss_is_still_the_guards(tmp_path: Path) -> None:
    """Under a scaler the guard still skips a non-finite loss and leaves the loss scale alone."""
    module = make_module(w_perc=1.0, perceptual_share=1.0, max_consecutive_skips=3)
    scaler, plugins = _fp16_scaler(1.0)
    with pytest.raises(NonFiniteTrainingError, match="non-finite train/loss_perc"):
        _fit(module, tmp_path, 8, [InjectNonFinite(steps=[0, 1, 2, 3])], plugins=plugins)
    assert int(module.guard.skipped_steps) == 3 and scaler.get_scale() == 1.0
