"""The model's ``seed`` and the data's ``data_seed`` are two knobs: both through the CLI with a logger.

Lightning merges the module's and the DataModule's hyperparameters into one table when a logger
is attached, and refuses a key that both hold with different values. The shipped configs all have
a logger, so a test without one would never see the clash.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.utilities.rank_zero import LightningDeprecationWarning

from acpo_lightning.cli import main
from acpo_lightning.data import CachedLatentsDataModule, PromptImageDataModule, ShapesDataModule
from conftest import CONFIGS

TINY = ["--config", str(CONFIGS / "acpo.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
ONE_STEP = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]


def _logged_hparams(root: Path) -> dict:
    (hparams,) = (root / "outputs" / "tiny" / "tensorboard").rglob("hparams.yaml")
    return yaml.safe_load(hparams.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("data_key", ["data_seed", "seed"])  # the new key and the deprecated one
def test_model_seed_and_data_seed_differ_in_a_logged_cli_run(
    data_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", *TINY, *ONE_STEP, "--model.seed", "1", f"--data.init_args.{data_key}", "5"]
    if data_key == "seed":
        with pytest.warns(LightningDeprecationWarning, match=r"`seed` .* renamed `data_seed`"):
            main(args)
    else:
        main(args)
    logged = _logged_hparams(tmp_path)  # TensorBoard's merged table: module and DataModule
    assert logged["seed"] == 1 and logged["data_seed"] == 5


@pytest.mark.slow
def test_the_issue_command_with_only_the_model_seed_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`acpo fit --config configs/acpo.yaml --config configs/tiny.yaml --model.seed 1`."""
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, *ONE_STEP, "--model.seed", "1"])
    logged = _logged_hparams(tmp_path)
    assert logged["seed"] == 1 and logged["data_seed"] == 0


def test_every_data_module_names_its_seed_data_seed_and_maps_the_old_key(tmp_path) -> None:
    assert ShapesDataModule(train_size=4, data_seed=3).hparams["data_seed"] == 3
    with pytest.warns(LightningDeprecationWarning, match="renamed `data_seed`"):
        old = ShapesDataModule(train_size=4, seed=3)
    assert old.hparams["data_seed"] == 3 and "seed" not in old.hparams
    assert old.train_set[0]["pixel_values"].equal(
        ShapesDataModule(train_size=4, data_seed=3).train_set[0]["pixel_values"]
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    with pytest.warns(LightningDeprecationWarning, match="renamed `data_seed`"):
        dm = PromptImageDataModule("prompts", str(prompts), seed=7)
    assert dm.hparams["data_seed"] == 7 and "seed" not in dm.hparams
    with pytest.raises(ValueError, match=r"both `seed` .*and `data_seed`"):
        ShapesDataModule(train_size=4, seed=1, data_seed=2)
    assert "data_seed" in CachedLatentsDataModule.__init__.__code__.co_varnames
