"""Build ACPO's parts from ``ACPOModule``'s flat keyword arguments, or take injected ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import SchedulerMixin

from acpo_lightning.anchor_weight import AnchorWeight
from acpo_lightning.denoisers import Denoiser, UNetDenoiser
from acpo_lightning.guard import NonFiniteGuard
from acpo_lightning.objectives import DataObjective, ObjectiveMix, RolloutObjective
from acpo_lightning.processes import DiffusionProcess, VPProcess

#: the flat keyword arguments each injectable part is built from
PART_KNOBS = {
    "process": ("noise_scheduler", "tau", "t_min"),
    "denoiser": ("unet", "text_encoder", "tokenizer", "anchor_unet", "max_prompt_length"),
    "anchor_weight": ("w_anchor", "anchor_mode", "anchor_delta", "dual_lr", "drift_ema"),
    "guard": ("skip_nonfinite", "max_consecutive_skips"),
    "objectives": (
        "objective", "w_diff", "w_perc", "rollout_ratio", "perceptual_share", "prompt_dropout",
        "rollout_steps", "k_late", "draft_k", "rollout_batch_size", "rollout_guidance_scale",
    ),
}  # fmt: skip


@dataclass
class Parts:
    """Everything ``ACPOModule`` delegates to, validated and ready."""

    process: DiffusionProcess
    sample_scheduler: SchedulerMixin
    denoiser: Denoiser
    objectives: ObjectiveMix
    anchor_weight: AnchorWeight
    guard: NonFiniteGuard


def assemble(knobs: dict[str, Any], defaults: dict[str, Any]) -> Parts:
    """The parts from ``ACPOModule``'s arguments ``knobs`` (``defaults``: their defaults).

    Raises:
        ValueError: a flat knob set beside the injected part that owns it, a missing required
            part, or any part's own validation error.
    """
    _refuse_knobs_beside_parts(knobs, defaults)
    k = knobs
    if k["quality_head"] is None:
        raise ValueError("quality_head is required: a frozen NR-IQA head (quality.QualityHead).")
    process = k["process"]
    if process is None:
        if k["noise_scheduler"] is None:
            raise ValueError("pass noise_scheduler (the training scheduler) or a process.")
        process = VPProcess(k["noise_scheduler"], tau=k["tau"], t_min=k["t_min"])
    sampler = k["sample_scheduler"] or process.default_sampler()
    objectives = k["objectives"] or ObjectiveMix(
        k["objective"], k["w_diff"], k["w_perc"], k["rollout_ratio"],
        DataObjective(k["perceptual_share"], k["prompt_dropout"]),
        RolloutObjective(
            k["rollout_steps"], k["k_late"], k["draft_k"], k["rollout_batch_size"],
            k["rollout_guidance_scale"],
        ),
    )  # fmt: skip
    if objectives.objective != "data":
        objectives.rollout.check(process, sampler)
    denoiser = k["denoiser"]
    if denoiser is None:
        if k["unet"] is None:
            raise ValueError("pass unet (the policy) or a denoiser.")
        denoiser = UNetDenoiser(
            k["unet"], k["text_encoder"], k["tokenizer"], k["anchor_unet"],
            k["max_prompt_length"], k["channels_last"],
        )  # fmt: skip
    anchor_weight = k["anchor_weight"] or AnchorWeight(
        k["w_anchor"], k["anchor_mode"], k["anchor_delta"], k["dual_lr"], k["drift_ema"]
    )
    if anchor_weight.active:
        denoiser.check_anchor()
    guard = k["guard"] or NonFiniteGuard(k["skip_nonfinite"], k["max_consecutive_skips"])
    return Parts(process, sampler, denoiser, objectives, anchor_weight, guard)


def _refuse_knobs_beside_parts(knobs: dict[str, Any], defaults: dict[str, Any]) -> None:
    """An injected part owns its knobs: refuse flat ones set beside it (they would be ignored)."""
    for part, names in PART_KNOBS.items():
        if knobs.get(part) is None:
            continue
        clashing = [n for n in names if knobs[n] is not defaults[n] and knobs[n] != defaults[n]]
        if clashing:
            raise ValueError(
                f"{part} was injected, so it owns {', '.join(clashing)}; set them on the {part} "
                f"(its init_args) and drop them from the module's arguments."
            )
