"""Train a :class:`~acpo_lightning.quality.two_stream.TwoStreamNet` as an NR-IQA head.

The objective mixes an absolute and a relative term: mean squared error between the score
(``sigmoid(logit)``) and the target quality in ``[0, 1]``, plus a RankNet-style logistic loss on
every pair of items of one group whose targets differ (a group is one severity ladder of a
synthetic batch, or a whole MOS batch), plus optionally a PLCC loss. Validation reports SROCC and
PLCC on the held-out split as ``val/srocc`` and ``val/plcc``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from acpo_lightning.quality.two_stream import TwoStreamNet


def default_iqa_optimizer(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with lr 2e-3 and weight decay 1e-4: trains the small TwoStream nets in a few epochs."""
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)


def pairwise_ranking_loss(logits: Tensor, target: Tensor, groups: Tensor) -> Tensor:
    """Mean of ``softplus(-(s_i - s_j))`` over pairs of one group with ``target_i > target_j``.

    Args:
        logits: predicted scores ``[N]`` (any monotone scale).
        target: target qualities ``[N]``.
        groups: group id of each item ``[N]``; only pairs within a group are compared.

    Returns:
        A scalar; zero (still attached to the graph) when no pair qualifies.
    """
    better = (target[:, None] > target[None, :]) & (groups[:, None] == groups[None, :])
    if not better.any():
        return logits.sum() * 0.0
    margins = logits[:, None] - logits[None, :]
    return F.softplus(-margins[better]).mean()


def plcc_loss(scores: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``(1 - PLCC) / 2`` in ``[0, 1]``; ``eps`` keeps it finite when either side is constant."""
    s, t = scores - scores.mean(), target - target.mean()
    plcc = (s * t).sum() / torch.sqrt(s.pow(2).sum() * t.pow(2).sum() + eps)
    return (1.0 - plcc) / 2.0


def flatten_batch(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Images ``[N, 3, H, W]``, targets ``[N]`` and group ids ``[N]`` of a batch of either kind.

    A synthetic batch (``images [B, L+1, 3, H, W]``) has one group per ladder; a MOS batch
    (``images [B, 3, H, W]``) is a single group.

    Raises:
        ValueError: the batch has other shapes.
    """
    images, target = batch["images"], batch["target"]
    if images.ndim == 5 and target.shape == images.shape[:2]:
        groups = torch.arange(images.shape[0], device=images.device).repeat_interleave(
            images.shape[1]
        )
        return images.flatten(0, 1), target.flatten(), groups
    if images.ndim == 4 and target.shape == images.shape[:1]:
        return images, target, torch.zeros_like(target, dtype=torch.long)
    raise ValueError(
        f"IQA batch needs images [B, 3, H, W] with target [B], or [B, K, 3, H, W] with target "
        f"[B, K]; got images {tuple(images.shape)} and target {tuple(target.shape)}."
    )


class IQATrainingModule(pl.LightningModule):
    """LightningModule that trains a TwoStream network on MOS labels or synthetic severity ladders.

    Args:
        net: the network to train (injected, e.g. ``TwoStreamNet(channels=(8, 16))``).
        optimizer: callable building the optimizer from the parameters.
        mse_weight: weight of the MSE between score and target.
        rank_weight: weight of the pairwise logistic ranking loss.
        plcc_weight: weight of the PLCC loss (useful with large MOS batches).

    Example:
        >>> from acpo_lightning.quality.iqa_data import IQADataModule
        >>> module = IQATrainingModule(TwoStreamNet(channels=(8, 16), hidden=16, native_size=32))
        >>> data = IQADataModule.from_images(torch.rand(16, 3, 32, 32))
        >>> pl.Trainer(max_epochs=2, logger=False).fit(module, data)  # doctest: +SKIP
        >>> from acpo_lightning.quality import TwoStreamIQA
        >>> head = TwoStreamIQA.from_pretrained(module.export("my_iqa"))  # doctest: +SKIP
    """

    def __init__(
        self,
        net: TwoStreamNet,
        optimizer: OptimizerCallable = default_iqa_optimizer,
        mse_weight: float = 1.0,
        rank_weight: float = 1.0,
        plcc_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if (
            min(mse_weight, rank_weight, plcc_weight) < 0
            or mse_weight + rank_weight + plcc_weight == 0
        ):
            raise ValueError(
                "loss weights must be >= 0 with a positive sum; got "
                f"mse_weight={mse_weight}, rank_weight={rank_weight}, plcc_weight={plcc_weight}."
            )
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.net, self.optimizer = net, optimizer
        with warnings.catch_warnings():  # held-out sets here are small; the buffer warning is noise
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
            self.val_srocc, self.val_plcc = SpearmanCorrCoef(), PearsonCorrCoef()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _losses(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        images, target, groups = flatten_batch(batch)
        logits = self.net.logits(images)
        scores = torch.sigmoid(logits)
        terms = {
            "loss_mse": F.mse_loss(scores, target),
            "loss_rank": pairwise_ranking_loss(logits, target, groups),
            "loss_plcc": plcc_loss(scores, target),
        }
        hp = self.hparams
        terms["loss"] = (
            hp.mse_weight * terms["loss_mse"]
            + hp.rank_weight * terms["loss_rank"]
            + hp.plcc_weight * terms["loss_plcc"]
        )
        return terms, scores, target

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        terms, _, target = self._losses(batch)
        self.log_dict(
            {f"train/{k}": v for k, v in terms.items()}, prog_bar=False, batch_size=len(target)
        )
        return terms["loss"]

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        terms, scores, target = self._losses(batch)
        self.val_srocc.update(scores.float(), target.float())
        self.val_plcc.update(scores.float(), target.float())
        self.log("val/loss", terms["loss"], batch_size=len(target))
        self.log("val/srocc", self.val_srocc, prog_bar=True)
        self.log("val/plcc", self.val_plcc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.net.parameters())

    def export(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Save the trained network for :meth:`TwoStreamIQA.from_pretrained` (safetensors + JSON).

        The loss weights and the last logged validation SROCC/PLCC go into the config's metadata.

        Args:
            path: output folder.
            metadata: more JSON-serializable facts to record (data source, MOS range, ...).

        Returns:
            The folder.
        """
        logged = (
            {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
            if self._trainer is not None
            else {}
        )
        facts = {"loss_weights": dict(self.hparams), **logged, **dict(metadata or {})}
        return self.net.save_pretrained(path, metadata=facts)
