"""``ACPOModule``: the Lightning hooks around ACPO's parts (README, Layout), and ``generate``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from diffusers import SchedulerMixin
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from acpo_lightning import in_trainer, losses, seeding
from acpo_lightning.anchor_weight import AnchorWeight
from acpo_lightning.assembly import PART_KNOBS, assemble
from acpo_lightning.checkpoint_io import TrainedStateCheckpoints
from acpo_lightning.codec import LatentCodec
from acpo_lightning.conditioning import Conditioning
from acpo_lightning.crops import PerceptualCrop, as_crop, crop_hparam
from acpo_lightning.denoisers import Denoiser
from acpo_lightning.guard import NonFiniteGuard, NonFiniteTrainingError
from acpo_lightning.models.lora import load_lora, save_lora
from acpo_lightning.objectives import ObjectiveContext, ObjectiveMix, batch_length, has_targets
from acpo_lightning.processes import DiffusionProcess
from acpo_lightning.quality.base import check_quality_head
from acpo_lightning.sampling import sample_latents
from acpo_lightning.scoring import PerceptualScorer

__all__ = ["ACPOModule", "NonFiniteTrainingError"]

#: arguments that carry networks and callables: not hyperparameters
_NETWORK_ARGUMENTS = ("unet", "quality_head", "noise_scheduler", "vae", "text_encoder", "tokenizer",
    "anchor_unet", "sample_scheduler", "optimizer", "lr_scheduler", "perceptual_decoder")  # fmt: skip


class ACPOModule(in_trainer.ReloadWithNetworks, TrainedStateCheckpoints, pl.LightningModule):
    """Fine-tune a diffusion model with ACPO: diffusion loss + anchor constraint + perceptual reward.

    Every network is injected; nothing is downloaded or built here. The flat keyword arguments
    build the default parts; a part may be injected whole instead (``process``, ``denoiser``,
    ``anchor_weight``, ``guard``, ``objectives``), and then its flat arguments must stay at
    their defaults. The default anchor is the policy with its LoRA adapters switched off.

    Args:
        unet: the policy UNet; with LoRA (``models.add_lora``) only the adapters train.
        quality_head: a frozen NR-IQA head (``quality.QualityHead`` contract).
        noise_scheduler: the diffusers training scheduler (schedule and ``prediction_type``).
        vae: ``AutoencoderKL`` for latent models; ``None`` for pixel-space models.
        text_encoder: text encoder of a conditional UNet (output ``[0]`` = hidden states).
        tokenizer: the text encoder's tokenizer.
        anchor_unet: a separate frozen anchor UNet, or ``None`` for the adapter toggle.
        sample_scheduler: scheduler of ``generate`` and rollouts (default: DDIM from the schedule).
        optimizer: builds the optimizer from the trainable parameters (default AdamW, lr 1e-4).
        lr_scheduler: builds a per-step LR schedule from the optimizer, or ``None``.
        w_diff: weight of the diffusion loss.
        w_anchor: weight of the anchor penalty (the initial value in constraint mode).
        w_perc: weight of the perceptual loss.
        tau: late-denoising gate; only samples with ``t <= tau`` get perceptual gradient.
        t_min: lower end of the perceptual timesteps ``[t_min, tau]``.
        perceptual_share: share of each batch drawn from ``[t_min, tau]`` and scored (a mean).
        anchor_mode: ``penalty`` (fixed ``w_anchor``) or ``constraint`` (dual ascent on it).
        anchor_delta: allowed drift in constraint mode: the mean squared raw-output difference per
            element over every sample of an optimizer step (``anchor_weight.AnchorWeight``).
        dual_lr: dual-ascent step size in constraint mode.
        drift_ema: smoothing of the running mean drift in constraint mode.
        measure_drift: at ``w_anchor`` 0 (penalty mode), run the anchor without gradient to log
            the drift (one more forward pass per step); ``False`` skips it and logs no drift.
        prompt_dropout: probability of replacing a prompt with the empty prompt (CFG training).
        max_prompt_length: token length for prompts (default: the tokenizer's).
        gradient_checkpointing: checkpoint denoiser, decoder and quality-head activations.
        num_inference_steps: default sampler steps of ``generate``.
        guidance_scale: default CFG scale of ``generate`` (and of rollouts, unless set).
        seed: base seed (>= 0); each step's randomness is a function of (seed, step, batch, rank).
            The data's order has its own knob, the DataModules' ``data_seed``.
        objective: ``data`` (noised real images), ``rollout`` (the policy's own samples) or
            ``both`` (a rollout step with probability ``rollout_ratio``).
        rollout_ratio: share of rollout steps in ``both`` mode.
        rollout_steps: sampler steps of a rollout.
        k_late: the scored step is drawn among the last ``k_late`` sampler steps.
        draft_k: final sampler steps taken with gradient (1 = ReFL-like; more = DRaFT-K).
        rollout_batch_size: prompts per rollout (default: all prompts of the batch).
        rollout_guidance_scale: CFG scale of rollouts (default: ``guidance_scale``).
        channels_last: NHWC weights and inputs for UNet and VAE (faster on recent GPUs).
        compile_unet: ``torch.compile`` the policy UNet in place (names and exports unchanged).
        compile_backend: ``torch.compile`` backend (``inductor``; ``aot_eager`` to debug).
        skip_nonfinite: skip optimizer steps with a non-finite loss or gradient (``guard``).
        max_consecutive_skips: stop after this many consecutive skipped steps.
        perceptual_decoder: a cheaper frozen decoder for the perceptual path only (TAESD).
        perceptual_crop: score crops at native resolution (a side in pixels, or a
            ``crops.PerceptualCrop``), decoding a latent window each; ``None``: whole images.
        process: a ``processes.DiffusionProcess`` instead of ``noise_scheduler``/``tau``/``t_min``.
        denoiser: a ``denoisers.Denoiser`` instead of ``unet`` and its text encoder.
        anchor_weight: an ``anchor_weight.AnchorWeight`` instead of its flat knobs.
        guard: a ``guard.NonFiniteGuard`` instead of ``skip_nonfinite``/``max_consecutive_skips``.
        objectives: an ``objectives.ObjectiveMix`` instead of the objective knobs.

    Example:
        >>> from acpo_lightning import testing as T
        >>> from acpo_lightning.models import add_lora
        >>> module = ACPOModule(
        ...     unet=add_lora(T.tiny_unet(), rank=4), quality_head=T.TinyQualityHead(),
        ...     noise_scheduler=T.tiny_scheduler(), vae=T.tiny_vae(),
        ...     text_encoder=T.tiny_text_encoder(), tokenizer=T.tiny_tokenizer())
        >>> module.generate(["a red square"], num_inference_steps=2).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(
        self,
        unet: nn.Module | None = None,
        quality_head: nn.Module | None = None,
        noise_scheduler: SchedulerMixin | None = None,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        anchor_unet: nn.Module | None = None,
        sample_scheduler: SchedulerMixin | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        w_diff: float = 1.0,
        w_anchor: float = 1.0,
        w_perc: float = 0.1,
        tau: int = 400,
        t_min: int = 0,
        perceptual_share: float = 0.25,
        anchor_mode: Literal["penalty", "constraint"] = "penalty",
        anchor_delta: float = 1e-3,
        dual_lr: float = 10.0,
        drift_ema: float = 0.9,
        measure_drift: bool = True,
        prompt_dropout: float = 0.1,
        max_prompt_length: int | None = None,
        gradient_checkpointing: bool = False,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        objective: Literal["data", "rollout", "both"] = "data",
        rollout_ratio: float = 0.5,
        rollout_steps: int = 25,
        k_late: int = 5,
        draft_k: int = 1,
        rollout_batch_size: int | None = None,
        rollout_guidance_scale: float | None = None,
        channels_last: bool = False,
        compile_unet: bool = False,
        compile_backend: str = "inductor",
        skip_nonfinite: bool = True,
        max_consecutive_skips: int = 10,
        perceptual_decoder: nn.Module | None = None,
        perceptual_crop: int | PerceptualCrop | None = None,
        process: DiffusionProcess | None = None,
        denoiser: Denoiser | None = None,
        anchor_weight: AnchorWeight | None = None,
        guard: NonFiniteGuard | None = None,
        objectives: ObjectiveMix | None = None,
    ) -> None:
        super().__init__()
        seeding.check_seed(seed)
        knobs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.save_hyperparameters(ignore=[*_NETWORK_ARGUMENTS, *PART_KNOBS, "perceptual_crop"])
        parts = assemble(knobs, _DEFAULTS)
        self.process, self.denoiser, self.guard = parts.process, parts.denoiser, parts.guard
        self.sample_scheduler, self.objectives = parts.sample_scheduler, parts.objectives
        self.anchor_weight = parts.anchor_weight
        for name, network in self.denoiser.networks().items():
            setattr(self, name, network)  # registered under its own name: stable state-dict keys
        self.quality_head, self.vae, self.perceptual_decoder = quality_head, vae, perceptual_decoder
        self.noise_scheduler, self.tokenizer = noise_scheduler, tokenizer  # as given, for reloads
        # image_size builds the codec: this validates the decoders now
        self.perceptual_crop = as_crop(perceptual_crop, self.image_size, self.codec.scale_factor)
        self.save_hyperparameters({"perceptual_crop": crop_hparam(self.perceptual_crop)})
        self._checkpoint_head = False  # set by enable_gradient_checkpointing()
        for frozen in self.frozen_modules():
            frozen.requires_grad_(False).eval()
        self.denoiser.configure(channels_last, compile_backend if compile_unet else None)
        if channels_last and vae is not None:
            vae.to(memory_format=torch.channels_last)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.seed, self.num_inference_steps = seed, num_inference_steps
        self.guidance_scale, self.gradient_checkpointing = guidance_scale, gradient_checkpointing
        self._step_terms: dict[str, Tensor] = {}
        self._drift_measured = self.anchor_weight.measures_drift(self.denoiser.has_anchor())
        self.strict_loading = False  # frozen weights are not in our checkpoints

    # ------------------------------------------------------------------ parts and set-up
    def frozen_modules(self) -> list[nn.Module]:
        """The parts that never train: VAE, text encoder, separate anchor, quality head."""
        parts = [self.vae, *self.denoiser.frozen(), self.quality_head, self.perceptual_decoder]
        return [m for m in parts if isinstance(m, nn.Module)]

    def train(self, mode: bool = True) -> ACPOModule:
        """Set train mode on the policy only: frozen parts stay in eval mode through ``fit``."""
        super().train(mode)
        for frozen in self.frozen_modules():
            frozen.eval()
        return self

    def setup(self, stage: str) -> None:
        """Check a latent cache against this VAE and text encoders (installing its empty-prompt
        conditioning), probe the quality head, and make checkpoints atomic and loaded with
        ``weights_only=True`` (:func:`~acpo_lightning.checkpoint_io.use_safe_checkpoint_io`)."""
        if self._trainer is not None:
            in_trainer.check_trainer_and_data(self, self.trainer)
        crop = self.perceptual_crop
        check_quality_head(self.quality_head, crop.shape if crop else self.image_size, self.device)
        if self.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute denoiser, decoder and quality-head activations in the backward pass."""
        self.denoiser.enable_gradient_checkpointing()
        self.codec.enable_gradient_checkpointing()
        self._checkpoint_head = True

    @property
    def codec(self) -> LatentCodec:
        """Images and cached posteriors to the denoiser's input space, with the current VAE."""
        return LatentCodec(self.vae, self.perceptual_decoder, self.denoiser.latent_shape())

    @property
    def scorer(self) -> PerceptualScorer:
        """Decode-and-score with the current quality head (and crop)."""
        crop, head = self.perceptual_crop, self.quality_head
        return PerceptualScorer(head, self.codec, self._checkpoint_head, crop)

    @property
    def is_conditional(self) -> bool:
        """Whether the networks take a prompt (the denoiser's, from its injected networks):
        ``generate`` then needs prompts, not a count of images."""
        return self.denoiser.is_conditional

    @property
    def image_size(self) -> tuple[int, int]:
        _, height, width = self.denoiser.latent_shape()
        return height * self.codec.scale_factor, width * self.codec.scale_factor

    @property
    def w_anchor(self) -> Tensor:
        """The current anchor weight (fixed in penalty mode, adapted in constraint mode)."""
        return self.anchor_weight.value

    def context(self) -> ObjectiveContext:
        """The parts an objective step sees, as they are now (device, mode, anchor weight)."""
        weight, scorer = self.anchor_weight, self.scorer
        return ObjectiveContext(
            self.process, self.denoiser, scorer.codec, scorer, self.sample_scheduler,
            self.device, self.training, weight.current(), weight.active, self.guidance_scale,
            self._drift_measured,
        )  # fmt: skip

    def step_generator(self, stage: str, step: int, batch_idx: int) -> torch.Generator:
        """A generator seeded from (seed, stage, step, batch, rank): resumes replay the same draws."""
        seed = seeding.step_seed(self.seed, stage, step, batch_idx, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def step_generators(
        self, stage: str, step: int, batch_idx: int
    ) -> tuple[torch.Generator, torch.Generator]:
        """The step generator and a rank-free CPU one (rank 0's seed) for the choices every
        process must share: the scored count, the rollout's scored step."""
        seed = seeding.step_seed(self.seed, stage, step, batch_idx, 0)
        return self.step_generator(stage, step, batch_idx), torch.Generator().manual_seed(seed)

    def host_generator(self, stage: str, step: int, batch_idx: int) -> torch.Generator:
        """A CPU generator for host-side choices, the same on every process (no device sync)."""
        return torch.Generator().manual_seed(seeding.host_seed(self.seed, stage, step, batch_idx))

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The denoiser's conditioning for ``prompts`` (frozen, no grad)."""
        return self.denoiser.encode_prompts(prompts)

    def decode(self, latents: Tensor) -> Tensor:
        """Input-space samples to images in ``[0, 1]`` with the full VAE (differentiable)."""
        return self.codec.decode(latents)

    def compute_terms(
        self,
        batch: dict,
        generator: torch.Generator,
        score: bool = True,
        choice: torch.Generator | None = None,
    ) -> tuple[losses.ACPOTerms, dict[str, float]]:
        """The data objective's terms and stats on a paired ``batch`` (a notebook entry)."""
        return self.objectives.data_terms(self.context(), batch, generator, score, choice)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        in_trainer.refuse_outside_trainer(self)
        in_trainer.check_first_batch(self, "train", batch)
        result = in_trainer.step_result(self, batch, batch_idx, self.global_step)
        terms = result.terms
        if result.rollout:
            count = result.rollout_count
            self.log_dict(result.rollout, on_step=True, batch_size=count, sync_dist=True)
        self.anchor_weight.add_drift(terms.anchor, result.samples)
        self._log_terms(
            "train", terms, result.perc_share, batch_length(batch), bool(result.rollout)
        )
        names = ("loss", "loss_diff", "loss_anchor", "loss_perc")  # the guard names a culprit
        self._step_terms = {
            name: value.detach() for name, value in zip(names, terms[:4], strict=True)
        }
        return terms.loss

    def _log_terms(
        self, stage: str, terms: losses.ACPOTerms, share: float, size: int, rollout: bool = False
    ) -> None:
        on_step = stage == "train"
        values = self.objectives.logged_terms(stage, terms, share, rollout, self._drift_measured)
        values[f"{stage}/w_anchor"] = self.w_anchor.detach()
        # synced in every stage: under DDP train/* are means over processes (one small all-reduce
        # per value and step; a no-op in a single process)
        log = {"on_step": on_step, "on_epoch": not on_step, "batch_size": size, "sync_dist": True}
        self.log_dict(values, **log)
        self.log(f"{stage}/loss", terms.loss.detach(), prog_bar=True, **log)

    def _evaluation_step(self, stage: str, batch: dict, batch_idx: int) -> Tensor:
        in_trainer.check_first_batch(self, stage, batch)
        generator, choice = self.step_generators(stage, 0, batch_idx)
        if not has_targets(batch):  # prompt-only evaluation data: score the policy's own samples
            prompts = list(batch["prompts"])
            roll, loss = self.objectives.evaluate_rollout(self.context(), prompts, generator)
            values = {"rollout_iqa": roll.iqa, "rollout_loss": loss}
            if self._drift_measured:
                values["loss_anchor_rollout"] = roll.anchor
            values = {f"{stage}/{name}": value for name, value in values.items()}
            self.log_dict(values, on_epoch=True, batch_size=len(prompts), sync_dist=True)
            return loss
        terms, stats = self.compute_terms(batch, generator, choice=choice)
        self._log_terms(stage, terms, stats["perc_share"], batch_length(batch))
        return terms.loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluation_step("val", batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluation_step("test", batch, batch_idx)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Generate one image per prompt, seeded ``seed + index`` by the prompt's position.

        The position is the batch's ``indices`` (the project's prediction loaders carry them), else
        ``seeding.prediction_indices`` infers it for Lightning's sampler without shuffling.
        """
        prompts = list(batch["prompts"])
        indices = batch.get("indices")
        if indices is None:
            indices = seeding.prediction_indices(
                self._trainer, dataloader_idx, batch_idx, len(prompts), self.global_rank
            )
        seeds = [self.seed + int(index) for index in indices]
        return {"prompts": prompts, "images": self.generate(prompts, seed=seeds), "seeds": seeds}

    # ------------------------------------------------------------------ optimizer step
    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Step through the non-finite guard; then, on a taken step, one dual-ascent step."""
        scaler, (reduce_sum, reduce_mean) = in_trainer.amp_scaler(self), in_trainer.reducers(self)
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        stepped = self.guard.step(
            optimizer, optimizer_closure, trainable, lambda: self._step_terms, scaler, reduce_sum,
            self.global_step,
        )  # fmt: skip
        self.anchor_weight.finish_step(stepped, reduce_mean)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.guard.enabled:
            self.log("train/skipped_steps", self.guard.skipped_steps.float(), on_step=True)
        if in_trainer.amp_scaler(self) is not None:
            self.log("train/overflow_steps", self.guard.overflow_steps.float(), on_step=True)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | int,
        seed: int | Sequence[int] = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        use_anchor: bool = False,
    ) -> Tensor:
        """Sample images in ``[0, 1]`` with the policy (or the frozen base with ``use_anchor``).

        Image ``i`` uses a generator seeded ``seed + i`` (or ``seed[i]``), so a prompt's image does
        not depend on the batch it was generated in; the loop matches diffusers'
        ``StableDiffusionPipeline`` given the same generators.

        Args:
            prompts: list of prompts, or a number of images for unconditional models.
            seed: base seed, or one seed per image.
            num_inference_steps: sampler steps (default: the constructor's).
            guidance_scale: classifier-free guidance scale (default: the constructor's; 1 disables).
            use_anchor: sample from the anchor (base model) instead of the policy.

        Returns:
            ``[B, 3, H, W]`` images in ``[0, 1]``, float32, on the module's device.
        """
        steps = num_inference_steps or self.num_inference_steps
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        was_training = self.training
        self.eval()
        try:
            latents = sample_latents(
                self.denoiser, self.sample_scheduler, prompts, seed, steps, guidance, self.device,
                use_anchor,
            )  # fmt: skip
            return self.decode(latents)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ optimisation and checkpoints
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients: the LoRA weights (or the whole UNet without LoRA)."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError(
                "no trainable parameters: add LoRA (models.add_lora) or pass a trainable UNet."
            )
        factory = self.optimizer_factory or (lambda p: torch.optim.AdamW(p, lr=1e-4))
        optimizer = factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = in_trainer.lr_scheduler_entry(self.lr_scheduler_factory(optimizer))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def save_lora(self, directory: str | Path) -> Path:
        """Write the adapter as ``pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights`` format)."""
        name = self.denoiser.trained_name
        return save_lora(self.denoiser.trained, directory, name)

    def load_lora(self, path: str | Path) -> None:
        """Load an adapter written by :meth:`save_lora` into the policy network."""
        load_lora(self.denoiser.trained, path, self.denoiser.trained_name)


_DEFAULTS = {
    name: p.default for name, p in inspect.signature(ACPOModule.__init__).parameters.items()
}
