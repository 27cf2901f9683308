"""The mix of objectives: which perceptual signal a step trains on, and the combined loss."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from acpo_lightning import losses
from acpo_lightning.objectives.base import ObjectiveContext, batch_length, has_targets
from acpo_lightning.objectives.data import DataObjective
from acpo_lightning.objectives.rollout import RolloutObjective, RolloutTerms


class StepResult(NamedTuple):
    """One training step: its terms, the scored share, the samples its drift averages over, and
    the rollout's values to log with its sample count (empty and 0 without a rollout)."""

    terms: losses.ACPOTerms
    perc_share: float
    samples: int
    rollout: dict[str, Tensor]
    rollout_count: int = 0


class ObjectiveMix:
    """Data steps, rollout steps, or a random mix of both, with the loss weights.

    The diffusion loss on the real pairs (``w_diff``) and their anchor penalty apply in every mode;
    on a rollout step the perceptual term comes from the rollout and the anchor term is the mean
    drift over every sample of the step, data and rollout alike.

    Args:
        objective: ``data``, ``rollout`` or ``both`` (each step is a rollout step with probability
            ``rollout_ratio``).
        w_diff: weight of the diffusion loss.
        w_perc: weight of the perceptual loss.
        rollout_ratio: share of rollout steps in ``both`` mode.
        data: the data objective.
        rollout: the rollout objective.
    """

    def __init__(
        self,
        objective: Literal["data", "rollout", "both"] = "data",
        w_diff: float = 1.0,
        w_perc: float = 0.1,
        rollout_ratio: float = 0.5,
        data: DataObjective | None = None,
        rollout: RolloutObjective | None = None,
    ) -> None:
        if objective not in ("data", "rollout", "both"):
            raise ValueError(f"objective={objective!r} must be 'data', 'rollout' or 'both'.")
        if min(w_diff, w_perc) < 0:
            raise ValueError(f"loss weights must be >= 0, got w_diff={w_diff}, w_perc={w_perc}.")
        if not 0.0 <= rollout_ratio <= 1.0:
            raise ValueError(
                f"rollout_ratio={rollout_ratio} must be in [0, 1] (share of rollout steps)."
            )
        self.objective, self.w_diff, self.w_perc = objective, w_diff, w_perc
        self.rollout_ratio = rollout_ratio
        self.data = data or DataObjective()
        self.rollout = rollout or RolloutObjective()

    def is_rollout_step(self, generator: torch.Generator) -> bool:
        """Whether a training step rolls out (drawn from a host generator in ``both`` mode)."""
        if self.objective == "both":  # resumes replay the same choice
            return bool(torch.rand((), generator=generator) < self.rollout_ratio)
        return self.objective == "rollout"

    def data_terms(
        self,
        ctx: ObjectiveContext,
        batch: dict,
        generator: torch.Generator,
        score: bool = True,
        choice: torch.Generator | None = None,
    ) -> tuple[losses.ACPOTerms, dict[str, float]]:
        """The data objective's terms on a paired batch (``choice``: the rank-free generator of
        the scored count)."""
        return self.data.terms(ctx, batch, generator, self.w_diff, self.w_perc, score, choice)

    def training_step(
        self,
        ctx: ObjectiveContext,
        batch: dict,
        generator: torch.Generator,
        use_rollout: bool,
        choice: torch.Generator | None = None,
    ) -> StepResult:
        """One training step's terms; ``choice`` draws the rollout's scored step on the host."""
        if has_targets(batch):
            terms, stats = self.data_terms(ctx, batch, generator, not use_rollout, choice)
            samples, share = batch_length(batch), stats["perc_share"]
        elif use_rollout:
            zero = ctx.w_anchor.new_zeros(())
            terms = losses.ACPOTerms(zero, zero, zero, zero, zero.new_tensor(float("nan")))
            samples, share = 0, 0.0
        else:
            raise ValueError(
                "objective='data' needs image/prompt pairs, but the batch has no 'pixel_values' "
                "(nor cached 'latent_moments'); use a paired DataModule or objective: rollout for "
                "prompt-only data."
            )
        if not use_rollout:
            return StepResult(terms, share, samples, {})
        prompts = batch.get("rollout_prompts", batch.get("prompts"))
        count = len(prompts) if prompts is not None else batch_length(batch)
        count = min(count, self.rollout.batch_size or count)
        roll = self.rollout.terms(
            ctx,
            list(prompts[:count]) if ctx.denoiser.is_conditional else None,
            count,
            generator,
            choice,
        )
        total = samples + count
        anchor = (terms.anchor * samples + roll.anchor * count) / total
        trained = anchor if ctx.anchor_on else torch.zeros_like(anchor)  # weight 0: measured only
        loss = losses.weighted_objective(
            terms.diff, trained, roll.perc, self.w_diff, ctx.w_anchor, self.w_perc
        )
        logged = {"train/rollout_t": roll.timestep, "train/rollout_iqa": roll.iqa}
        if ctx.drift_measured:
            logged["train/loss_anchor_rollout"] = roll.anchor.detach()
            logged["train/loss_anchor_data"] = terms.anchor.detach()
        terms = losses.ACPOTerms(loss, terms.diff, anchor, roll.perc, roll.iqa)
        return StepResult(terms, 1.0, total, logged, count)

    def logged_terms(
        self, stage: str, terms: losses.ACPOTerms, share: float, rollout: bool, drift: bool
    ) -> dict[str, Tensor | float]:
        """A step's values to log as ``stage/name`` (``loss`` and ``w_anchor`` aside).

        ``loss_perc`` whenever the step has a perceptual term, 0 when this batch scored no
        sample (what its loss holds), so that the epoch mean of ``loss`` is ``w_diff``,
        ``w_anchor`` and ``w_perc`` times those of its parts; ``loss_anchor`` only where the
        drift was measured (``drift``); ``iqa`` only where a sample was scored.

        Args:
            stage: ``train``, ``val`` or ``test``.
            terms: the step's terms.
            share: the scored share of the batch.
            rollout: whether the perceptual term came from a rollout.
            drift: whether the anchor ran, so that ``terms.anchor`` is a measured drift.
        """
        values: dict[str, Tensor | float] = {"loss_diff": terms.diff.detach(), "perc_share": share}
        if drift:
            values["loss_anchor"] = terms.anchor.detach()
        if self.w_perc > 0 and (rollout or self.data.perceptual_share > 0):
            values["loss_perc"] = terms.perc.detach()
        if share > 0:
            values["iqa"] = terms.iqa
        return {f"{stage}/{name}": value for name, value in values.items()}

    def evaluate_rollout(
        self, ctx: ObjectiveContext, prompts: list[str], generator: torch.Generator
    ) -> tuple[RolloutTerms, Tensor]:
        """A prompt-only evaluation batch: score the policy's own samples; returns the rollout
        and its loss (anchor and perceptual terms)."""
        self.rollout.check(ctx.process, ctx.sampler)
        roll = self.rollout.terms(
            ctx, prompts if ctx.denoiser.is_conditional else None, len(prompts), generator
        )
        return roll, ctx.w_anchor * roll.anchor + self.w_perc * roll.perc
