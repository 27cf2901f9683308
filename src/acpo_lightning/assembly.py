"""Build ACPO's parts from ``ACPOModule``'s flat keyword arguments, or take injected ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import SchedulerMixin

from acpo_lightning.anchor_weight import AnchorWeight
from acpo_lightning.denoisers import Denoiser, UNetDenoiser
from acpo_lightning.guard import NonFiniteGuard
from acpo_lightning.objectives import DataObjective, ObjectiveMix, RolloutObjective
from acpo_lightning.processes import DiffusionProcess, FlowProcess, VPProcess, is_flow_scheduler

#: the flat keyword arguments each injectable part is built from
PART_KNOBS = {
    "process": ("noise_scheduler", "tau", "t_min"),
    "denoiser": ("unet", "text_encoder", "tokenizer", "anchor_unet", "max_prompt_length"),
    "anchor_weight": (
        "w_anchor", "anchor_mode", "anchor_delta", "dual_lr", "drift_ema", "measure_drift",
    ),
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
        process = _default_process(k, defaults)
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
        k["w_anchor"], k["anchor_mode"], k["anchor_delta"], k["dual_lr"], k["drift_ema"],
        k["measure_drift"],
    )  # fmt: skip
    if anchor_weight.active:
        denoiser.check_anchor()
    _check_process_fits(process, sampler, denoiser)
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


def _default_process(knobs: dict[str, Any], defaults: dict[str, Any]) -> DiffusionProcess:
    """VP from a DDPM-type ``noise_scheduler`` (``tau``, ``t_min``), flow from a flow one."""
    scheduler = knobs["noise_scheduler"]
    if scheduler is None:
        raise ValueError("pass noise_scheduler (the training scheduler) or a process.")
    if not is_flow_scheduler(scheduler):
        return VPProcess(scheduler, tau=knobs["tau"], t_min=knobs["t_min"])
    changed = [n for n in ("tau", "t_min") if knobs[n] != defaults[n]]
    if changed:
        raise ValueError(
            f"{', '.join(changed)} gate VP timesteps, but noise_scheduler "
            f"{type(scheduler).__name__} is a flow: the gate is a sigma bound there. Inject "
            "process: {class_path: acpo_lightning.processes.FlowProcess, init_args: "
            "{sigma_max: 0.4}} and drop tau/t_min."
        )
    return FlowProcess(scheduler)


def _check_process_fits(
    process: DiffusionProcess, sampler: SchedulerMixin, denoiser: Denoiser
) -> None:
    """The process, the sampler and the denoiser must belong to one model family."""
    name = type(denoiser.trained).__name__
    if process.kind != denoiser.process_kind:
        fix = {"flow": "FlowMatchEulerDiscreteScheduler (or process: FlowProcess)",
               "vp": "DDPMScheduler (or process: VPProcess)"}[denoiser.process_kind]  # fmt: skip
        raise ValueError(
            f"the denoiser's {name} was trained as a {denoiser.process_kind} model, but the "
            f"process is {type(process).__name__} ({process.kind}), from noise_scheduler "
            f"{type(getattr(process, 'noise_scheduler', None)).__name__}; use {fix} from the same "
            "model folder."
        )
    seq_len = getattr(process, "image_seq_len", None)
    if seq_len is not None and process.noise_scheduler.config.get("use_dynamic_shifting"):
        _, height, width = denoiser.latent_shape()
        tokens = (height // 2) * (width // 2)  # 2x2 latent patches (SD3, FLUX)
        if seq_len != tokens:
            raise ValueError(
                f"the process shifts its sigmas for image_seq_len={seq_len}, but {name} samples "
                f"{height}x{width} latents: {tokens} tokens. Set the process's image_seq_len to "
                f"{tokens} (or the denoiser's resolution to the size you train at)."
            )
    if is_flow_scheduler(sampler) != (process.kind == "flow"):
        raise ValueError(
            f"sample_scheduler {type(sampler).__name__} does not sample a {process.kind} model "
            f"({type(process).__name__}); drop sample_scheduler to use the process's default, or "
            f"pass a {'FlowMatchEulerDiscreteScheduler' if process.kind == 'flow' else 'DDIMScheduler'}."
        )
