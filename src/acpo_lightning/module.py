"""``ACPOModule``: the LightningModule that wires injected parts into the ACPO objective."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from diffusers import SchedulerMixin
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase

from acpo_lightning import losses
from acpo_lightning.checkpoint_io import use_safe_checkpoint_io
from acpo_lightning.models.fingerprint import fingerprint_differences, vae_fingerprint
from acpo_lightning.models.lora import adapters_disabled, has_lora, load_lora, save_lora
from acpo_lightning.quality.base import check_quality_head
from acpo_lightning.rollout import check_rollout_settings, rollout_terms
from acpo_lightning.sampling import denoise, initial_noise, per_sample_generators

log = logging.getLogger(__name__)

# Frozen parts are in eval mode on purpose (see ACPOModule.train); Lightning's notice is noise here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
_STAGE_IDS = {"train": 0, "val": 1, "test": 2}
#: Non-parameter state that trains (constraint mode) and therefore goes into checkpoints.
_TRAINED_BUFFERS = (
    "w_anchor_state",
    "drift_ema",
    "drift_ema_steps",
    "skipped_steps",
    "overflow_steps",
)
#: Batch keys that carry the data targets: images, or cached VAE posterior parameters.
TARGET_KEYS = ("pixel_values", "latent_moments")


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


class ACPOModule(pl.LightningModule):
    """Fine-tune a diffusion UNet with ACPO: diffusion loss + anchor constraint + perceptual reward.

    Every network is injected; nothing is downloaded or built here. The default anchor is the
    policy UNet with its LoRA adapters switched off (no extra weights); pass ``anchor_unet`` for a
    separate frozen reference (full fine-tuning, or an anchor from another checkpoint).

    Args:
        unet: the policy, a diffusers ``UNet2DConditionModel`` (text-conditional) or ``UNet2DModel``
            (unconditional). With LoRA (``models.add_lora``) only the adapters train; without, the
            whole UNet trains and ``anchor_unet`` is required unless ``w_anchor`` is 0.
        quality_head: a frozen NR-IQA head (``quality.QualityHead`` contract).
        noise_scheduler: the diffusers training scheduler (schedule and ``prediction_type``).
        vae: ``AutoencoderKL`` for latent models; ``None`` for pixel-space models.
        text_encoder: text encoder for conditional UNets (output ``[0]`` = hidden states).
        tokenizer: the text encoder's tokenizer.
        anchor_unet: a separate frozen anchor UNet, or ``None`` for the adapter toggle.
        sample_scheduler: scheduler for ``generate``; default DDIM from the training config.
        optimizer: callable building the optimizer from the trainable parameters (default AdamW, lr 1e-4).
        lr_scheduler: callable building a per-step LR schedule from the optimizer, or ``None``.
        w_diff: weight of the diffusion loss.
        w_anchor: weight of the anchor penalty (the initial value in constraint mode).
        w_perc: weight of the perceptual loss.
        tau: late-denoising gate; only samples with ``t <= tau`` get perceptual gradient.
        t_min: lower end of the perceptual timesteps ``[t_min, tau]``.
        perceptual_share: share of each batch drawn from ``[t_min, tau]`` and scored; only those
            samples are decoded, so the cost scales with the share.
        anchor_mode: ``penalty`` (fixed ``w_anchor``) or ``constraint`` (dual ascent on ``w_anchor``
            so the running mean of the anchor penalty tracks ``anchor_delta``).
        anchor_delta: allowed drift in constraint mode. The drift is one quantity with one unit
            whatever the objective: the mean squared difference per element between the policy's
            and the anchor's raw model outputs (prediction-type space; each CFG branch on its own,
            never the guided combination), averaged over every sample a step evaluates (the data
            samples and the rollout samples alike) and over the micro-batches of an optimizer
            step. The anchor term of the loss is this same mean.
        dual_lr: dual-ascent step size in constraint mode.
        drift_ema: smoothing of the running mean drift in constraint mode.
        prompt_dropout: probability of replacing a prompt with the empty prompt (CFG training).
        max_prompt_length: token length for prompts (default: the tokenizer's, capped by the encoder).
        gradient_checkpointing: checkpoint UNet and VAE decoder activations to save memory.
        num_inference_steps: default sampler steps of ``generate``.
        guidance_scale: default CFG scale of ``generate``.
        seed: base seed; each step's randomness is a function of (seed, step, batch, rank).
        objective: where the perceptual signal comes from: ``data`` (x0 estimates of noised real
            images), ``rollout`` (the policy's own samples, see ``acpo_lightning.rollout``) or
            ``both`` (each step is a rollout step with probability ``rollout_ratio``). The diffusion
            loss on the real pairs (``w_diff``) and their anchor penalty apply in every mode.
        rollout_ratio: share of steps that are rollout steps in ``both`` mode.
        rollout_steps: sampler steps of a rollout (the sample scheduler, DDIM by default).
        k_late: the scored step is drawn among the last ``k_late`` sampler steps.
        draft_k: number of final sampler steps taken with gradient (1 = ReFL-like; more = DRaFT-K).
        rollout_batch_size: prompts per rollout (default: all prompts of the batch). Prompts come
            from the batch's ``rollout_prompts`` if present, else its ``prompts``.
        rollout_guidance_scale: CFG scale of rollouts (default: ``guidance_scale``).
        channels_last: store UNet and VAE convolution weights and UNet inputs in NHWC layout
            (faster convolutions on recent GPUs; the results are the same).
        compile_unet: ``torch.compile`` the policy UNet in place (``nn.Module.compile``: parameter
            names, checkpoints and LoRA exports are unchanged; the first steps pay the compile time).
        compile_backend: ``torch.compile`` backend (``inductor``; ``aot_eager`` to debug).
        perceptual_decoder: a cheaper frozen decoder for the perceptual path only, e.g. diffusers'
            ``AutoencoderTiny`` (TAESD, ``madebyollin/taesd``: about 1/18 of the SD VAE decoder's
            FLOPs). The scored x0 estimates are decoded with it (its own ``scaling_factor``);
            ``generate`` and the evaluation callbacks keep the full ``vae``.
        skip_nonfinite: skip the optimizer step (no weight or optimizer-state change) when the loss
            or a gradient is not finite; skips are counted in ``train/skipped_steps`` and each is
            logged with the offending term. Costs one host sync per step. Under fp16 mixed
            precision the loss scaler skips overflowing steps and backs off (as without the
            guard; counted in ``train/overflow_steps``) and the guard adds the loss check.
        max_consecutive_skips: stop the run with :class:`NonFiniteTrainingError` after this many
            consecutive skipped steps.

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
        unet: nn.Module,
        quality_head: nn.Module,
        noise_scheduler: SchedulerMixin,
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                "unet",
                "quality_head",
                "noise_scheduler",
                "vae",
                "text_encoder",
                "tokenizer",
                "anchor_unet",
                "sample_scheduler",
                "optimizer",
                "lr_scheduler",
                "perceptual_decoder",
            ]
        )
        self.unet, self.quality_head, self.vae = unet, quality_head, vae
        self.text_encoder, self.tokenizer, self.anchor_unet = text_encoder, tokenizer, anchor_unet
        self.noise_scheduler = noise_scheduler
        self.perceptual_decoder = perceptual_decoder
        self.sample_scheduler = sample_scheduler or _default_sampler(noise_scheduler)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.prediction_type = losses.check_prediction_type(noise_scheduler.config.prediction_type)
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self._validate_knobs()
        if objective != "data":
            check_rollout_settings(rollout_steps, k_late, draft_k, self.sample_scheduler)
        self.is_conditional = unet.config.get("cross_attention_dim") is not None
        self._validate_parts()
        for frozen in self.frozen_modules():
            frozen.requires_grad_(False).eval()
        if not has_lora(unet):
            unet.requires_grad_(True)  # full fine-tuning
        if channels_last:
            for part in (unet, anchor_unet, vae):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        if compile_unet:
            unet.compile(backend=compile_backend)
        self.register_buffer(
            "alphas_cumprod", noise_scheduler.alphas_cumprod.float().clone(), persistent=False
        )
        self.register_buffer("w_anchor_state", torch.tensor(float(w_anchor)))
        self.register_buffer("drift_ema", torch.tensor(0.0))
        self.register_buffer("drift_ema_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("skipped_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("overflow_steps", torch.tensor(0, dtype=torch.long))
        # the constrained drift of the micro-batches since the last optimizer step (sum, samples)
        self._drift_sum: Tensor | None = None
        self._drift_samples = 0
        self._known_scale: float | None = None  # fp16 loss scale after the last optimizer step
        self._consecutive_skips = 0
        self._step_terms: dict[str, Tensor] = {}
        self._warned_share = False
        self._null_embedding: Tensor | None = None
        self._checkpoint_head = False  # set by enable_gradient_checkpointing()
        self.strict_loading = (
            False  # frozen weights are not in our checkpoints (see on_save_checkpoint)
        )

    # ------------------------------------------------------------------ set-up and validation
    def _validate_knobs(self) -> None:
        hp = self.hparams
        if not 0 <= hp.t_min <= hp.tau < self.num_train_timesteps:
            raise ValueError(
                f"tau={hp.tau}, t_min={hp.t_min} must satisfy 0 <= t_min <= tau < num_train_timesteps "
                f"({self.num_train_timesteps}, from the noise scheduler); e.g. tau: 400, t_min: 0."
            )
        if not 0.0 <= hp.perceptual_share <= 1.0:
            raise ValueError(
                f"perceptual_share={hp.perceptual_share} must be in [0, 1] (e.g. 0.25)."
            )
        if not 0.0 <= hp.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout={hp.prompt_dropout} must be in [0, 1) (e.g. 0.1).")
        if hp.anchor_mode not in ("penalty", "constraint"):
            raise ValueError(f"anchor_mode={hp.anchor_mode!r} must be 'penalty' or 'constraint'.")
        if min(hp.w_diff, hp.w_anchor, hp.w_perc) < 0:
            raise ValueError(
                f"loss weights must be >= 0, got w_diff={hp.w_diff}, w_anchor={hp.w_anchor}, w_perc={hp.w_perc}."
            )
        if hp.objective not in ("data", "rollout", "both"):
            raise ValueError(f"objective={hp.objective!r} must be 'data', 'rollout' or 'both'.")
        if not 0.0 <= hp.rollout_ratio <= 1.0:
            raise ValueError(
                f"rollout_ratio={hp.rollout_ratio} must be in [0, 1] (share of rollout steps)."
            )
        if hp.max_consecutive_skips < 1:
            raise ValueError(
                f"max_consecutive_skips={hp.max_consecutive_skips} must be >= 1 (e.g. 10); set "
                "skip_nonfinite: false to turn the non-finite guard off."
            )
        if hp.anchor_mode == "constraint" and hp.anchor_delta <= 0:
            raise ValueError(
                f"anchor_delta={hp.anchor_delta} must be > 0 in constraint mode (allowed mean drift)."
            )

    def _validate_parts(self) -> None:
        if self.is_conditional and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                f"{type(self.unet).__name__} is text-conditional (cross_attention_dim="
                f"{self.unet.config.cross_attention_dim}) but text_encoder/tokenizer is missing; "
                "pass both (e.g. models.load_text_encoder and models.load_tokenizer)."
            )
        if not self.is_conditional and self.text_encoder is not None:
            raise ValueError(
                f"{type(self.unet).__name__} is unconditional but a text_encoder was given; drop "
                "text_encoder/tokenizer or use a UNet2DConditionModel."
            )
        if self.perceptual_decoder is not None and self.vae is None:
            raise ValueError(
                "perceptual_decoder was given but the model has no vae (a pixel-space UNet): "
                "there is nothing to decode; drop perceptual_decoder."
            )
        needs_anchor = self.hparams.w_anchor > 0 or self.hparams.anchor_mode == "constraint"
        if not has_lora(self.unet) and self.anchor_unet is None and needs_anchor:
            raise ValueError(
                "the UNet has no LoRA adapter (full fine-tuning), so the adapter-toggle anchor does not "
                "exist: pass anchor_unet (a frozen copy of the base), add LoRA with models.add_lora, or "
                "set w_anchor: 0."
            )

    def frozen_modules(self) -> list[nn.Module]:
        """The parts that never train: VAE, text encoder, separate anchor, quality head."""
        parts = (
            self.vae,
            self.text_encoder,
            self.anchor_unet,
            self.quality_head,
            self.perceptual_decoder,
        )
        return [m for m in parts if isinstance(m, nn.Module)]

    def train(self, mode: bool = True) -> ACPOModule:
        """Set train mode on the policy only: frozen parts stay in eval mode through ``fit``."""
        super().train(mode)
        for frozen in self.frozen_modules():
            frozen.eval()
        return self

    def setup(self, stage: str) -> None:
        """Check the quality head's contract on a probe batch before any step runs.

        A DataModule of cached latents (``latent_cache_fingerprint``) is checked against this
        model's VAE and UNet (:meth:`check_latent_cache`).

        Also makes the Trainer write checkpoints atomically and load them with
        ``weights_only=True`` (:func:`~acpo_lightning.checkpoint_io.use_safe_checkpoint_io`).
        """
        if self._trainer is not None:
            use_safe_checkpoint_io(self.trainer)
            self.check_latent_cache(getattr(self.trainer, "datamodule", None))
        check_quality_head(self.quality_head, self.image_size, self.device)
        if self.hparams.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet, VAE-decoder and quality-head activations in the backward pass."""
        for part in (self.unet, self.vae, self.perceptual_decoder):
            if part is not None and hasattr(part, "enable_gradient_checkpointing"):
                part.enable_gradient_checkpointing()
        self._checkpoint_head = True

    def score_images(self, images: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """Raw quality scores of ``images`` (checkpointed when gradient checkpointing is on)."""
        prompts = list(prompts) if prompts is not None else None
        if self._checkpoint_head and torch.is_grad_enabled() and images.requires_grad:
            return checkpoint(self.quality_head, images, prompts, use_reentrant=False)
        return self.quality_head(images, prompts)

    def normalized_quality(self, x0_hat: Tensor, prompts: Sequence[str] | None) -> Tensor:
        """Decode x0 estimates and score them: higher is better, 1.0 = the head's nominal span."""
        raw = self.score_images(self.decode(x0_hat, self.perceptual_decoder), prompts)
        head = self.quality_head
        return losses.normalize_score(raw, head.higher_is_better, head.score_range)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> tuple[int, int]:
        side = self.latent_size * self.vae_scale_factor
        return side, side

    @property
    def w_anchor(self) -> Tensor:
        """The current anchor weight (fixed in penalty mode, adapted in constraint mode)."""
        return self.w_anchor_state

    # ------------------------------------------------------------------ encoders and decoder
    def step_generator(self, stage: str, step: int, batch_idx: int) -> torch.Generator:
        """A generator seeded from (seed, stage, step, batch, rank): resumes replay the same draws."""
        return torch.Generator(device=self.device).manual_seed(
            self._step_seed(stage, step, batch_idx)
        )

    def host_generator(self, stage: str, step: int, batch_idx: int) -> torch.Generator:
        """A CPU generator for host-side choices (no device sync to read them).

        Seeded without the rank: every process makes the same choice (rollout step or not), so
        collective strategies (FSDP) never see ranks run different programs.
        """
        return torch.Generator().manual_seed(self._step_seed(stage, step, batch_idx, 0) ^ 0x5EED)

    def _step_seed(self, stage: str, step: int, batch_idx: int, rank: int | None = None) -> int:
        rank = self.global_rank if rank is None else rank
        words = [self.hparams.seed, _STAGE_IDS[stage], step, batch_idx, rank]
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)

    def _prompt_length(self) -> int:
        length = self.hparams.max_prompt_length or int(self.tokenizer.model_max_length)
        positions = getattr(self.text_encoder.config, "max_position_embeddings", None)
        return min(length, positions) if positions else length

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text-encoder hidden states ``[B, L, D]`` for ``prompts`` (frozen, no grad)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self._prompt_length(),
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def null_embedding(self, like: Tensor | None = None) -> Tensor:
        """Cached embedding of the empty prompt (the unconditional branch of CFG).

        Args:
            like: conditioning whose dtype the result takes. The cache keeps the dtype it was
                computed in (fp32 under CUDA autocast, where LayerNorm runs in fp32), which need
                not be the conditioning's dtype later (bf16 weights outside autocast).
        """
        if self._null_embedding is None or self._null_embedding.device != self.device:
            self._null_embedding = self.encode_prompts([""])
        return self._null_embedding if like is None else self._null_embedding.to(like.dtype)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, generator: torch.Generator) -> Tensor:
        """Images in ``[-1, 1]`` to the UNet's input space (scaled VAE latents, or the pixels)."""
        if self.vae is None:
            return pixel_values
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return self._scaled_latents(posterior.sample(generator=generator))

    @torch.no_grad()
    def sample_latents(self, latent_moments: Tensor, generator: torch.Generator) -> Tensor:
        """Cached VAE posterior parameters ``[B, 2C, h, w]`` to the UNet's input space.

        Draws a fresh latent from each posterior with the same random draws, in the same dtype,
        as :meth:`encode_images` does for the images the moments were encoded from.

        Raises:
            ValueError: the model has no VAE, or the moments are not ``[B, 2C, h, w]`` for this
                UNet's latents.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        self.check_latent_moments_shape(latent_moments.shape[1:])
        moments = latent_moments.to(self.device, self.vae.dtype)
        return self._scaled_latents(DiagonalGaussianDistribution(moments).sample(generator))

    def _scaled_latents(self, latents: Tensor) -> Tensor:
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def batch_latents(self, batch: dict, generator: torch.Generator) -> Tensor:
        """The UNet-space x0 of a paired batch: from ``latent_moments`` if cached, else ``pixel_values``."""
        if "latent_moments" in batch:
            return self.sample_latents(batch["latent_moments"], generator)
        return self.encode_images(batch["pixel_values"].to(self.device), generator)

    def check_latent_moments_shape(
        self, shape: Sequence[int] | None, where: str = "the batch"
    ) -> None:
        """Refuse cached moments that this model cannot sample from.

        Args:
            shape: one item's moments shape, ``(2C, h, w)``; ``None`` checks only for a VAE.
            where: what holds them, for the message.

        Raises:
            ValueError: no VAE (a pixel-space model), or ``shape`` is not
                ``(2 * latent_channels, latent_size, latent_size)``.
        """
        if self.vae is None:
            raise ValueError(
                f"{where} holds cached VAE latents (latent_moments), but this model has no vae (a "
                "pixel-space UNet). Fix: train it on images (e.g. PromptImageDataModule), or "
                "configure model.vae."
            )
        expected = (2 * self.latent_channels, self.latent_size, self.latent_size)
        if shape is not None and tuple(shape) != expected:
            raise ValueError(
                f"{where} holds latent moments of shape {list(shape)}, but this UNet needs "
                f"{list(expected)} (2 x {self.latent_channels} latent channels, latent side "
                f"{self.latent_size} = resolution {self.image_size[0]} / {self.vae_scale_factor}). "
                "Fix: re-run `acpo cache-latents` with the config you train with (its "
                "data.init_args.resolution and model.vae)."
            )

    def check_latent_cache(self, datamodule: Any) -> None:
        """Refuse a latent cache (``CachedLatentsDataModule``) encoded by another VAE.

        Compares the cache's ``latent_cache_fingerprint`` with :func:`models.vae_fingerprint` of
        this model's VAE, and the cached moments' shape with this UNet's latents.

        Raises:
            ValueError: no VAE, another VAE (the differing values named), or a moments shape
                this UNet cannot use.
        """
        cached = getattr(datamodule, "latent_cache_fingerprint", None)
        if cached is None:
            return
        where = f"the latent cache {getattr(datamodule, 'path', '')}".rstrip()
        self.check_latent_moments_shape(getattr(datamodule, "latent_moments_shape", None), where)
        differences = fingerprint_differences(cached, vae_fingerprint(self.vae))
        if differences:
            raise ValueError(
                f"{where} was encoded by another VAE than this model's: "
                f"{'; '.join(differences)}. Fix: re-run `acpo cache-latents` with the config(s) "
                "you train with (the same model.vae), or set model.vae to the VAE that encoded "
                "the cache."
            )

    def decode(self, latents: Tensor, decoder: nn.Module | None = None) -> Tensor:
        """UNet-space samples to images in ``[0, 1]`` (differentiable; VAE decode for latent models).

        ``decoder`` replaces the VAE (e.g. the perceptual path's ``perceptual_decoder``).
        """
        decoder = decoder if decoder is not None else self.vae
        if decoder is not None:
            shift = decoder.config.get("shift_factor") or 0.0
            latents = latents / decoder.config.scaling_factor + shift
            latents = decoder.decode(latents.to(decoder.dtype)).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def unet_output(
        self, unet: nn.Module, sample: Tensor, timesteps: Tensor, cond: Tensor | None
    ) -> Tensor:
        """Call a UNet and keep the part of its output that the prediction type refers to."""
        timesteps = timesteps.expand(sample.shape[0]) if timesteps.ndim == 0 else timesteps
        if self.hparams.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        if self.is_conditional:
            out = unet(sample, timesteps, encoder_hidden_states=cond).sample
        else:
            out = unet(sample, timesteps).sample
        if (
            out.shape[1] == 2 * sample.shape[1]
        ):  # learned variance: the first half is the mean output
            out = out[:, : sample.shape[1]]
        return out

    def anchor_output(self, sample: Tensor, timesteps: Tensor, cond: Tensor | None) -> Tensor:
        """The frozen anchor's output (separate UNet, or the policy with adapters off), no grad."""
        with torch.no_grad():
            if self.anchor_unet is not None:
                return self.unet_output(self.anchor_unet, sample, timesteps, cond)
            with adapters_disabled(self.unet):
                return self.unet_output(self.unet, sample, timesteps, cond)

    # ------------------------------------------------------------------ the objective
    def compute_terms(
        self, batch: dict, generator: torch.Generator, score: bool = True
    ) -> tuple[losses.ACPOTerms, dict[str, float]]:
        """Run one data-driven ACPO step on ``batch`` and return its terms and host-side stats.

        With ``score=False`` no sample is decoded or scored (the perceptual term comes from a rollout).
        """
        hp = self.hparams
        x0 = self.batch_latents(batch, generator)
        size = x0.shape[0]
        prompts = batch.get("prompts")
        cond = self._conditioning(prompts, size, generator)
        timesteps, n_perc = losses.sample_timesteps(
            size, self.num_train_timesteps, hp.tau, hp.t_min, hp.perceptual_share, generator
        )
        if n_perc == 0 and hp.perceptual_share > 0 and hp.w_perc > 0 and score:
            self._warn_share_rounds_to_zero(size)
        noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        alpha, sigma = losses.schedule_coefficients(self.alphas_cumprod, timesteps, x0)
        noisy = alpha * x0 + sigma * noise
        pred = self.unet_output(self.unet, noisy, timesteps, cond)
        target = losses.diffusion_target(
            x0, noise, self.alphas_cumprod, timesteps, self.prediction_type
        )
        diff = losses.diffusion_loss(pred, target)
        if self._uses_anchor():
            anchor = losses.anchor_penalty(pred, self.anchor_output(noisy, timesteps, cond))
        else:
            anchor = torch.zeros_like(diff)
        n_scored = n_perc if hp.w_perc > 0 and score else 0
        scores, gate = self._perceptual_scores(noisy, pred, timesteps, prompts, n_scored)
        # a copy: constraint mode updates the weight in place before backward runs
        w_anchor = self.w_anchor.detach().clone()
        terms = losses.acpo_objective(diff, anchor, scores, gate, hp.w_diff, w_anchor, hp.w_perc)
        return terms, {"perc_share": n_scored / size}

    def _warn_share_rounds_to_zero(self, size: int) -> None:
        """Each process scores round(share x its own batch) samples; say so (once) when that is 0."""
        if self._warned_share:
            return
        self._warned_share = True
        share = self.hparams.perceptual_share
        warnings.warn(
            f"perceptual_share={share} x per-process batch size {size} rounds to 0: no sample of "
            "this batch is scored, so the data objective's perceptual term is off. Raise "
            f"perceptual_share to >= {0.5 / size:.2g} or the batch size.",
            stacklevel=2,
        )

    def _uses_anchor(self) -> bool:
        return self.hparams.anchor_mode == "constraint" or self.hparams.w_anchor > 0

    def _conditioning(
        self, prompts: Sequence[str] | None, size: int, generator: torch.Generator
    ) -> Tensor | None:
        if not self.is_conditional:
            return None
        if prompts is None or len(prompts) != size:
            raise ValueError(
                f"the UNet is text-conditional but the batch has {0 if prompts is None else len(prompts)} "
                f"prompts for {size} images; the DataModule must yield a 'prompts' list per batch."
            )
        cond = self.encode_prompts(prompts)
        if self.training and self.hparams.prompt_dropout > 0:
            drop = (
                torch.rand(size, generator=generator, device=self.device)
                < self.hparams.prompt_dropout
            )
            cond = torch.where(drop.view(-1, 1, 1), self.null_embedding(cond), cond)
        return cond

    def _perceptual_scores(
        self,
        noisy: Tensor,
        pred: Tensor,
        timesteps: Tensor,
        prompts: Sequence[str] | None,
        count: int,
    ) -> tuple[Tensor, Tensor]:
        """Decode and score the first ``count`` samples (the perceptual share) only."""
        if count == 0:
            empty = pred.new_zeros(0, dtype=torch.float32)
            return empty, torch.zeros(0, dtype=torch.bool, device=pred.device)
        x0_hat = losses.predicted_original(
            noisy[:count],
            pred[:count].float(),
            self.alphas_cumprod,
            timesteps[:count],
            self.prediction_type,
        )
        scores = self.normalized_quality(x0_hat, prompts[:count] if prompts is not None else None)
        return scores, losses.late_mask(timesteps[:count], self.hparams.tau)

    def _add_step_drift(self, drift: Tensor, samples: int) -> None:
        """Add a micro-batch's mean drift over ``samples`` samples to the optimizer step's."""
        total = drift.detach().float() * samples
        self._drift_sum = total if self._drift_sum is None else self._drift_sum + total
        self._drift_samples += samples

    def _take_step_drift(self) -> Tensor | None:
        """The sample-weighted mean drift since the last optimizer step (then reset), or None."""
        drift, samples = self._drift_sum, self._drift_samples
        self._drift_sum, self._drift_samples = None, 0
        return drift / samples if drift is not None and samples > 0 else None

    def _update_anchor_weight(self, drift: Tensor) -> None:
        """Constraint mode: dual ascent on ``w_anchor`` against the running mean drift."""
        drift = drift.detach()
        if self._trainer is not None and self.trainer.world_size > 1:
            drift = self.trainer.strategy.reduce(drift, reduce_op="mean")
        # tensor arithmetic only: no host sync (the first update takes the drift as it is)
        # a non-finite drift (a step the guard will skip) leaves the dual state as it is
        finite = torch.isfinite(drift)
        beta = (self.drift_ema_steps > 0).to(drift.dtype) * self.hparams.drift_ema
        ema = beta * self.drift_ema + (1 - beta) * torch.where(finite, drift, 0.0)
        self.drift_ema.copy_(torch.where(finite, ema, self.drift_ema))
        self.drift_ema_steps += finite.long()
        updated = losses.dual_ascent_step(
            self.w_anchor_state, self.drift_ema, self.hparams.anchor_delta, self.hparams.dual_lr
        )
        self.w_anchor_state.copy_(torch.where(finite, updated, self.w_anchor_state))

    def _log_terms(
        self, stage: str, terms: losses.ACPOTerms, stats: dict[str, float], size: int
    ) -> None:
        on_step = stage == "train"
        values = {
            f"{stage}/loss_diff": terms.diff.detach(),
            f"{stage}/loss_anchor": terms.anchor.detach(),
            f"{stage}/w_anchor": self.w_anchor.detach(),
            f"{stage}/perc_share": stats["perc_share"],
        }
        if stats["perc_share"] > 0:
            values[f"{stage}/loss_perc"] = terms.perc.detach()
            values[f"{stage}/iqa"] = terms.iqa
        # synced in every stage: under DDP train/* are means over processes (one small all-reduce
        # per value and step; a no-op in a single process)
        self.log_dict(
            values, on_step=on_step, on_epoch=not on_step, batch_size=size, sync_dist=True
        )
        self.log(
            f"{stage}/loss",
            terms.loss.detach(),
            prog_bar=True,
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=size,
            sync_dist=True,
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        generator = self.step_generator("train", self.global_step, batch_idx)
        use_rollout = self._is_rollout_step(
            self.host_generator("train", self.global_step, batch_idx)
        )
        if _has_targets(batch):
            terms, stats = self.compute_terms(batch, generator, score=not use_rollout)
        elif use_rollout:
            zero = self.w_anchor.new_zeros(())
            terms, stats = (
                losses.ACPOTerms(zero, zero, zero, zero, zero.new_tensor(float("nan"))),
                {},
            )
        else:
            raise ValueError(
                "objective='data' needs image/prompt pairs, but the batch has no 'pixel_values' "
                "(nor cached 'latent_moments'); use a paired DataModule or objective: rollout for "
                "prompt-only data."
            )
        stats = {"perc_share": stats.get("perc_share", 0.0)}
        samples = _batch_length(batch) if _has_targets(batch) else 0
        if use_rollout:
            # the scored step is drawn with a rank-free seed (the same on every process); at rank 0
            # it equals the step generator's seed, as in a single-process run
            choice = torch.Generator().manual_seed(
                self._step_seed("train", self.global_step, batch_idx, 0)
            )
            terms, samples = self._add_rollout(batch, generator, terms, samples, stats, choice)
        if self.hparams.anchor_mode == "constraint":
            self._add_step_drift(terms.anchor, samples)
        self._log_terms("train", terms, stats, _batch_length(batch))
        self._step_terms = {
            "loss": terms.loss.detach(),
            "loss_diff": terms.diff.detach(),
            "loss_anchor": terms.anchor.detach(),
            "loss_perc": terms.perc.detach(),
        }
        return terms.loss

    def _is_rollout_step(self, generator: torch.Generator) -> bool:
        objective = self.hparams.objective
        if objective == "both":  # drawn from the step's generator: resumes replay the same choice
            return bool(torch.rand((), generator=generator) < self.hparams.rollout_ratio)
        return objective == "rollout"

    def _add_rollout(
        self,
        batch: dict,
        generator: torch.Generator,
        terms: losses.ACPOTerms,
        data_samples: int,
        stats: dict,
        choice: torch.Generator | None = None,
    ) -> tuple[losses.ACPOTerms, int]:
        """Add a rollout's anchor and perceptual terms to the data terms; log its parts separately.

        The anchor term becomes the mean drift over every sample of the step, data and rollout
        alike (one quantity whatever the mix; see ``anchor_delta``). Returns the terms and that
        sample count.
        """
        prompts = batch.get("rollout_prompts", batch.get("prompts"))
        count = len(prompts) if prompts is not None else _batch_length(batch)
        count = min(count, self.hparams.rollout_batch_size or count)
        roll = rollout_terms(
            self, list(prompts[:count]) if self.is_conditional else None, count, generator, choice
        )
        samples = data_samples + count
        anchor = (terms.anchor * data_samples + roll.anchor * count) / samples
        w_anchor = self.w_anchor.detach().clone()
        hp = self.hparams
        loss = losses.weighted_objective(
            terms.diff, anchor, roll.perc, hp.w_diff, w_anchor, hp.w_perc
        )
        self.log_dict(
            {
                "train/rollout_t": roll.timestep,
                "train/rollout_iqa": roll.iqa,
                "train/loss_anchor_rollout": roll.anchor.detach(),
                "train/loss_anchor_data": terms.anchor.detach(),
            },
            on_step=True,
            batch_size=count,
            sync_dist=True,
        )
        stats["perc_share"] = 1.0
        return losses.ACPOTerms(loss, terms.diff, anchor, roll.perc, roll.iqa), samples

    def _evaluation_step(self, stage: str, batch: dict, batch_idx: int) -> Tensor:
        generator = self.step_generator(stage, 0, batch_idx)
        if not _has_targets(batch):  # prompt-only evaluation data: score the policy's own samples
            return self._evaluate_rollout(stage, batch, generator)
        terms, stats = self.compute_terms(batch, generator)
        self._log_terms(stage, terms, stats, _batch_length(batch))
        return terms.loss

    def _evaluate_rollout(self, stage: str, batch: dict, generator: torch.Generator) -> Tensor:
        hp = self.hparams
        check_rollout_settings(hp.rollout_steps, hp.k_late, hp.draft_k, self.sample_scheduler)
        prompts = list(batch["prompts"])
        roll = rollout_terms(
            self, prompts if self.is_conditional else None, len(prompts), generator
        )
        loss = self.w_anchor * roll.anchor + hp.w_perc * roll.perc
        values = {
            f"{stage}/rollout_iqa": roll.iqa,
            f"{stage}/loss_anchor_rollout": roll.anchor,
            f"{stage}/rollout_loss": loss,
        }
        self.log_dict(values, on_epoch=True, batch_size=len(prompts), sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluation_step("val", batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._evaluation_step("test", batch, batch_idx)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Generate one image per prompt, seeded ``seed + index`` by the prompt's position.

        The position is the batch's ``indices`` (the project's prediction loaders carry them).
        Without them it is inferred for Lightning's (distributed) sampler without shuffling:
        item ``i`` of batch ``b`` on rank ``r`` of ``W`` is ``(b * batch_size + i) * W + r``.
        """
        prompts = list(batch["prompts"])
        indices = batch.get("indices")
        if indices is None:
            indices = self._prediction_indices(batch_idx, dataloader_idx, len(prompts))
        seeds = [self.hparams.seed + int(index) for index in indices]
        images = self.generate(prompts, seed=seeds)
        return {"prompts": prompts, "images": images, "seeds": seeds}

    def _prediction_indices(self, batch_idx: int, dataloader_idx: int, count: int) -> list[int]:
        loaders = self.trainer.predict_dataloaders if self._trainer is not None else None
        loader = loaders[dataloader_idx] if isinstance(loaders, list | tuple) else loaders
        batch_size = getattr(loader, "batch_size", None) or count
        world = self.trainer.world_size if self._trainer is not None else 1
        return [(batch_idx * batch_size + i) * world + self.global_rank for i in range(count)]

    # ------------------------------------------------------------------ non-finite guard
    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Run forward and backward, then step only if the loss and every gradient are finite.

        A skipped step changes no weight, no optimizer state and no dual state (the step counter
        and the LR schedule still advance, so per-step randomness and resumes stay aligned).
        Under fp16 mixed precision the loss scaler judges the gradients: an overflowing step is
        its to skip, and it backs the scale off (counted in ``train/overflow_steps``); the guard
        checks the loss, and counts a scaler skip as a non-finite gradient only once the loss
        scale is down to 1 or less, where no overflow is left to explain it.
        """
        scaler = self._loss_scaler()
        if not self.hparams.skip_nonfinite or optimizer_closure is None:
            scale = self._scale_before(scaler)
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            self._after_step(self._stepped(scaler, scale), None)
            return None
        result = optimizer_closure()
        reason = self._nonfinite_reason(result, check_gradients=scaler is None)
        if reason is None:
            scale = self._scale_before(scaler)
            optimizer.step(closure=lambda: result)  # the scaler (if any) unscales and may skip
            if self._stepped(scaler, scale):
                self._after_step(True, None)
                return None
            reason = "gradient" if self._known_scale <= 1.0 else None
            if reason is None:  # an fp16 overflow, already skipped and backed off by the scaler
                self._after_step(False, None)
                return None
        optimizer.zero_grad(set_to_none=True)
        self._after_step(False, reason)
        return None

    def _loss_scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler of the Trainer's precision plugin, if one is active."""
        if self._trainer is None:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _scale_before(self, scaler: torch.amp.GradScaler | None) -> float:
        """The loss scale before a step: the one seen after the last step (no sync), else read."""
        if scaler is None:
            return 1.0
        return self._known_scale if self._known_scale is not None else scaler.get_scale()

    def _stepped(self, scaler: torch.amp.GradScaler | None, scale_before: float) -> bool:
        """Whether the last optimizer step was taken: a scaler backs its scale off when it skips.

        Reads the scale after the step (one host sync per step, fp16 only).
        """
        if scaler is None:
            return True
        self._known_scale = scaler.get_scale()
        return self._known_scale >= scale_before

    def _after_step(self, stepped: bool, reason: str | None) -> None:
        """Book-keeping once per optimizer step: dual ascent on a taken step, skip counters else."""
        drift = self._take_step_drift()
        if stepped:
            self._consecutive_skips = 0
            if self.hparams.anchor_mode == "constraint" and drift is not None:
                self._update_anchor_weight(drift)
            return
        if reason is None:
            self.overflow_steps += 1
            log.info("step %d: fp16 overflow, skipped by the loss scaler", self.global_step)
            return
        self.skipped_steps += 1
        self._consecutive_skips += 1
        log.warning(
            "step %d skipped: non-finite %s (%d consecutive, %d in all)",
            self.global_step,
            reason,
            self._consecutive_skips,
            int(self.skipped_steps),
        )
        if self._consecutive_skips >= self.hparams.max_consecutive_skips:
            raise NonFiniteTrainingError(
                f"stopped at step {self.global_step}: {self._consecutive_skips} consecutive steps had a "
                f"non-finite {reason}, so no weight was updated. Likely causes: a learning rate too "
                "high (lower optimizer.init_args.lr), fp16 overflow (use precision bf16-mixed or "
                "32-true), or a quality head returning NaN/inf or scores far outside its "
                "score_range (check the head on your images). Resume from the last checkpoint "
                "after the fix; it holds no non-finite weight."
            )

    def _nonfinite_reason(self, loss: Tensor | None, check_gradients: bool = True) -> str | None:
        """``None`` when the step is finite, else the name of the offending term (one host sync).

        ``check_gradients=False`` under an fp16 loss scaler: its gradients are still scaled here,
        and the scaler checks them itself after unscaling.
        """
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        checks = [torch.isfinite(loss).all()] if loss is not None else []
        if grads and check_gradients:
            checks.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        finite = torch.stack(checks).all() if checks else torch.tensor(True, device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            # one decision for every rank: a rank that stepped alone would leave the others behind
            bad = self.trainer.strategy.reduce((~finite).float(), reduce_op="sum")
            finite = bad == 0
        if bool(finite):
            return None
        for name, value in self._step_terms.items():  # the slow path: find the culprit
            if name != "loss" and not bool(torch.isfinite(value).all()):
                return f"train/{name}"
        if loss is not None and not bool(torch.isfinite(loss).all()):
            return "train/loss"
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        culprit = next((n for n, g in named if not bool(torch.isfinite(g).all())), None)
        return f"gradient of {culprit}" if culprit else "loss on another process"

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hparams.skip_nonfinite:
            self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True)
        if self._loss_scaler() is not None:
            self.log("train/overflow_steps", self.overflow_steps.float(), on_step=True)

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
        count = prompts if isinstance(prompts, int) else len(prompts)
        if count < 1:
            raise ValueError("generate() needs at least one prompt (or a positive image count).")
        if self.is_conditional and isinstance(prompts, int):
            raise ValueError("this model is text-conditional: pass a list of prompts, not a count.")
        steps = num_inference_steps or self.hparams.num_inference_steps
        guidance = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        was_training = self.training
        self.eval()
        try:
            cond = uncond = None
            if self.is_conditional:
                cond = self.encode_prompts(list(prompts))
                uncond = self.null_embedding(cond).expand_as(cond) if guidance > 1.0 else None
            shape = (count, self.latent_channels, self.latent_size, self.latent_size)
            generators = per_sample_generators(seed, count)
            noise = initial_noise(
                shape, generators, self.device, cond.dtype if cond is not None else torch.float32
            )
            toggle = (
                adapters_disabled(self.unet)
                if use_anchor and self.anchor_unet is None
                else nullcontext()
            )
            unet = self.anchor_unet if use_anchor and self.anchor_unet is not None else self.unet
            with toggle:
                latents, _ = denoise(
                    lambda x, t, c: self.unet_output(unet, x, t, c),
                    self.sample_scheduler,
                    noise,
                    cond,
                    uncond,
                    guidance,
                    steps,
                    generator=generators,  # stochastic samplers: image i's noise from seed + i
                )
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
        optimizer = (
            self.optimizer_factory(params)
            if self.optimizer_factory
            else torch.optim.AdamW(params, lr=1e-4)
        )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def trained_state_keys(self) -> set[str]:
        """Names in ``state_dict`` that a checkpoint must hold: trainable weights and dual state."""
        # FSDP's auto-wrap adds `_fsdp_wrapped_module.` to parameter names, not to state-dict keys
        from torch.distributed.fsdp._common_utils import clean_tensor_name

        trainable = {clean_tensor_name(n) for n, p in self.named_parameters() if p.requires_grad}
        return trainable | set(_TRAINED_BUFFERS)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what trains; frozen parts are rebuilt from the config on load."""
        keep = self.trained_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint that lacks some of this module's trainable weights."""
        # counters and dual state a checkpoint may predate keep their initial values
        missing = sorted(
            self.trained_state_keys() - set(checkpoint["state_dict"]) - set(_TRAINED_BUFFERS)
        )
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} trainable weights of this module (e.g. {missing[:2]}); "
                "it was written with another LoRA rank/target_modules or another UNet."
            )

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> ACPOModule:
        """Lightning's ``load_from_checkpoint``, always with ``weights_only=True``.

        Our checkpoints hold no model parts: pass them (``unet=..., quality_head=..., ...``) as
        keyword arguments. ``weights_only=False`` is refused: nothing from a file is unpickled.
        """
        if weights_only is False:
            raise ValueError(
                "ACPOModule.load_from_checkpoint never unpickles Python objects (weights_only=False "
                "was asked); drop the argument, our checkpoints hold tensors only."
            )
        with warnings.catch_warnings():
            # Lightning lists every frozen weight (one line of ~20,000 characters at SD size);
            # they are left out on purpose, and a missing trainable weight is refused by
            # on_load_checkpoint before this warning. Keys the module lacks are still reported.
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
            )

    def save_lora(self, directory: str | Path) -> Path:
        """Write the adapter as ``pytorch_lora_weights.safetensors`` (diffusers' ``load_lora_weights`` format)."""
        return save_lora(self.unet, directory)

    def load_lora(self, path: str | Path) -> None:
        """Load an adapter written by :meth:`save_lora` into the policy UNet."""
        load_lora(self.unet, path)


def _has_targets(batch: dict) -> bool:
    """Whether ``batch`` holds training targets: images, or their cached VAE posteriors."""
    return any(key in batch for key in TARGET_KEYS)


def _batch_length(batch: dict) -> int:
    """The number of samples of ``batch``: its targets', else its prompts'."""
    key = next((key for key in TARGET_KEYS if key in batch), "prompts")
    return len(batch[key])


def _default_sampler(noise_scheduler: SchedulerMixin) -> SchedulerMixin:
    """DDIM from the training schedule, with the fixes ``StableDiffusionPipeline`` applies to old
    scheduler configs (``steps_offset`` 1, no ``clip_sample``), so ``generate`` matches it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1, clip_sample=False)
