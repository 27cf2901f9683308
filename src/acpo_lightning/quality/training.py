"""Train a :class:`~acpo_lightning.quality.two_stream.TwoStreamNet` as an NR-IQA head.

The objective mixes an absolute and a relative term: mean squared error between the score
(``sigmoid(logit)``) and the target quality in ``[0, 1]``, plus a RankNet-style logistic loss on
every pair of items of one group whose targets differ (a group is one severity ladder of a
synthetic batch, or a whole MOS batch), plus optionally a PLCC loss. Validation reports SROCC and
PLCC on the held-out split as ``val/srocc`` and ``val/plcc``.

:class:`PromptIQATrainingModule` trains a
:class:`~acpo_lightning.quality.prompt_aware.PromptAwareNet` the same way on prompt groups
(:class:`~acpo_lightning.quality.prompt_data.PromptPairDataset`), with precomputed prompt
embeddings, and also reports ``val/mismatch_accuracy``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from acpo_lightning.quality.prompt_aware import PromptAwareNet
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
        # text_embeddings: a subclass's table of tensors, which has no place in the hparams
        self.save_hyperparameters(ignore=["net", "optimizer", "text_embeddings"])
        self.net, self.optimizer = net, optimizer
        with warnings.catch_warnings():  # held-out sets here are small; the buffer warning is noise
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
            self.val_srocc, self.val_plcc = SpearmanCorrCoef(), PearsonCorrCoef()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _logits(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, targets and group ids ``[N]`` of a batch (subclasses feed the net more inputs)."""
        images, target, groups = flatten_batch(batch)
        return self.net.logits(images), target, groups

    def _losses(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The loss terms, the logits ``[N]`` and the targets ``[N]`` of a batch."""
        logits, target, groups = self._logits(batch)
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
        return terms, logits, target

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        terms, _, target = self._losses(batch)
        self.log_dict(
            {f"train/{k}": v for k, v in terms.items()}, prog_bar=False, batch_size=len(target)
        )
        return terms["loss"]

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._log_validation(*self._losses(batch))

    def _log_validation(self, terms: Mapping[str, Tensor], logits: Tensor, target: Tensor) -> None:
        scores = torch.sigmoid(logits)
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


class MismatchAccuracy(Metric):
    """Share of (group, mismatched row) pairs where the group's row 0 scores strictly higher.

    Row 0 of a prompt group is the real image with its own caption; a mismatched row is the same
    image under another class's caption. Pass logits rather than sigmoid scores: two saturated
    sigmoids would tie. A head blind to the prompt ties on every pair and scores 0.

    Example:
        >>> metric = MismatchAccuracy()
        >>> metric.update(torch.tensor([[2.0, 1.0, 3.0]]), torch.tensor([[False, True, True]]))
        >>> float(metric.compute())
        0.5
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("wins", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, mismatched: Tensor) -> None:
        """Count the pairs of ``logits [B, K]`` whose ``mismatched [B, K]`` row is ``True``."""
        wins = (logits[:, :1] > logits)[mismatched]
        # not in place: a state reset under inference mode (trainer.validate) cannot be updated so
        self.wins = self.wins + wins.sum()
        self.pairs = self.pairs + wins.numel()

    def compute(self) -> Tensor:
        return self.wins / self.pairs.clamp_min(1.0)


class PromptIQATrainingModule(IQATrainingModule):
    """Train a :class:`PromptAwareNet` on prompt groups: quality ladders and prompt mismatches.

    The loss is :class:`IQATrainingModule`'s (MSE + pairwise ranking within each group, + PLCC);
    the prompts of a batch are looked up in a table of precomputed embeddings (the text encoder
    never runs, nor enters the checkpoint). Validation adds ``val/mismatch_accuracy``: the share
    of (group, mismatched row) pairs in which the group's first row (the real image with its own
    caption) scores higher than the same image with the mismatched caption.

    Args:
        net: the network to train.
        text_embeddings: ``{prompt: embedding [text_dim]}`` for every prompt of the data, e.g.
            ``PromptEmbedder(encoder, tokenizer).table(prompts)``.
        optimizer: callable building the optimizer from the parameters.
        mse_weight: weight of the MSE between score and target.
        rank_weight: weight of the pairwise logistic ranking loss.
        plcc_weight: weight of the PLCC loss.

    Raises:
        ValueError: the table is empty or its embeddings are not ``[text_dim]``.

    Example:
        >>> from acpo_lightning.quality.prompt_aware import PromptAwareNet
        >>> table = {"a cat": torch.ones(8), "a dog": -torch.ones(8)}
        >>> module = PromptIQATrainingModule(PromptAwareNet(8, (8,), 8, 16), table)
        >>> module(torch.rand(2, 3, 16, 16), ["a cat", "a dog"]).shape
        torch.Size([2])
    """

    def __init__(
        self,
        net: PromptAwareNet,
        text_embeddings: Mapping[str, Tensor],
        optimizer: OptimizerCallable = default_iqa_optimizer,
        mse_weight: float = 1.0,
        rank_weight: float = 1.0,
        plcc_weight: float = 0.0,
    ) -> None:
        super().__init__(net, optimizer, mse_weight, rank_weight, plcc_weight)
        shapes = {tuple(v.shape) for v in text_embeddings.values()}
        if shapes != {(net.text_dim,)}:
            raise ValueError(
                f"text_embeddings must map each prompt to a [{net.text_dim}] embedding (the net's "
                f"text_dim); got shapes {sorted(shapes)} for {len(text_embeddings)} prompts."
            )
        self.prompt_index = {prompt: i for i, prompt in enumerate(text_embeddings)}
        table = torch.stack([v.detach().float() for v in text_embeddings.values()])
        self.register_buffer("text_table", table, persistent=False)  # frozen: not checkpointed
        self.val_mismatch = MismatchAccuracy()

    def embed(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings ``[N, text_dim]`` of ``prompts`` from the table.

        Raises:
            KeyError: a prompt is not in the table (names it and says how to add it).
        """
        missing = [p for p in prompts if p not in self.prompt_index]
        if missing:
            raise KeyError(
                f"prompt(s) {missing[:3]} have no precomputed embedding; build text_embeddings "
                "from every prompt the data can produce (PromptEmbedder.table(prompts))."
            )
        return self.text_table[[self.prompt_index[p] for p in prompts]]

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.net(images, self.embed(prompts).to(images.dtype))

    def _logits(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        images, target, groups = flatten_batch(batch)
        prompts = [p for group in batch["prompts"] for p in group]
        if len(prompts) != len(images):
            raise ValueError(
                f"a prompt batch needs one prompt per image: {len(prompts)} prompts for "
                f"{len(images)} images (batch it with collate_prompt_groups)."
            )
        return self.net.logits(images, self.embed(prompts).to(images.dtype)), target, groups

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        terms, logits, target = self._losses(batch)
        self._log_validation(terms, logits, target)
        mismatched = batch.get("mismatched")
        if mismatched is not None and mismatched.any():
            self.val_mismatch.update(logits.view(mismatched.shape), mismatched)
            self.log("val/mismatch_accuracy", self.val_mismatch, prog_bar=True)
