"""Evaluation callbacks: PickScore, CLIPScore and MANIQA of generated images during training.

Every callback scores the images of one shared generation pass (see
:mod:`acpo_lightning.callbacks.generation`): fixed prompts and seeds, ``ACPOModule.generate`` in
eval mode under ``no_grad``, prompts sharded across DDP ranks and metrics synced. Each logs
``val/<name>``, the base model's value ``val/<name>_base`` (``use_anchor=True``, computed once) and
``val/<name>_delta``; the pass logs an image grid (base | tuned, prompts as captions) to TensorBoard.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import Metric

from acpo_lightning.callbacks.generation import (
    EvaluationPass,
    GenerationSettings,
    describe_settings,
    is_conditional,
)
from acpo_lightning.callbacks.prompts import load_prompts

_METRIC_NUMBERS = itertools.count()  # one per built metric: the base-value cache's key


class GenerationMetricCallback(Callback):
    """Base class: score the module's samples on fixed prompts and seeds every N epochs or steps.

    Args:
        prompts: a shipped prompt list (``acpo_eval``, ``drawbench``, ``partiprompts``) or a
            ``.txt``/``.csv``/``.tsv`` file
            (see :func:`~acpo_lightning.callbacks.prompts.load_prompts`).
        max_prompts: use only the first ``max_prompts`` prompts.
        seed: image ``i`` of the list is generated with seed ``seed + i`` (on every rank).
        num_inference_steps: sampler steps (``None``: the module's default).
        guidance_scale: CFG scale (``None``: the module's default).
        batch_size: images generated per ``generate`` call.
        every_n_epochs: evaluate at the end of every N-th training epoch (``None``: never).
        every_n_steps: evaluate after every N-th optimizer step (``None``: never).
        compare_base: also score the base model (``use_anchor=True``) once and log ``_base``/``_delta``.
        log_images: prompts shown in the TensorBoard grid (``0``: no grid).
        name: the logged name (``val/<name>``); default the metric's (``pickscore`` ...).

    A ``validate`` run (``acpo validate --ckpt_path ...``) evaluates once, whatever the frequency.
    Callbacks with equal generation settings (prompts, seed, steps, guidance, batch size) share one
    generation pass per evaluation.
    """

    metric_name: str = "metric"
    needs_prompts: bool = True

    def __init__(
        self,
        prompts: str | Path = "acpo_eval",
        max_prompts: int | None = None,
        seed: int = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 8,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        compare_base: bool = True,
        log_images: int = 8,
        name: str | None = None,
    ) -> None:
        for knob, value in (
            ("batch_size", batch_size),
            ("every_n_epochs", every_n_epochs),
            ("every_n_steps", every_n_steps),
        ):
            if value is not None and value < 1:
                raise ValueError(
                    f"{knob}={value} must be >= 1" + ("" if knob == "batch_size" else " or null.")
                )
        if log_images < 0:
            raise ValueError(f"log_images={log_images} must be >= 0 (0 turns the image grid off).")
        self.prompt_source = str(prompts)
        self.settings = GenerationSettings(
            tuple(load_prompts(prompts, max_prompts)),
            seed,
            num_inference_steps,
            guidance_scale,
            batch_size,
        )
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.compare_base, self.log_images = compare_base, log_images
        self.metric_name = name or self.metric_name
        self.metric: Metric | None = None
        self._metric_number = -1
        self.evaluation_pass: EvaluationPass | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.metric_name)

    def build_metric(self) -> Metric:
        """Build (load) the metric; called once, at ``setup``."""
        raise NotImplementedError

    def direction(self, pl_module: pl.LightningModule) -> tuple[bool, str] | None:
        """Whether a higher ``val/<name>`` is better, and what says so; ``None``: unknown (the
        metric is not built yet). Read by :class:`~acpo_lightning.callbacks.BestLoRACallback`."""
        higher = getattr(self.metric, "higher_is_better", None)
        return None if higher is None else (bool(higher), type(self.metric).__name__)

    @property
    def cache_key(self) -> tuple:
        """Identifies the metric for the base-value cache: its name and the metric object built.

        A base value holds for the very metric that computed it: another head of the same class
        (another fit, a rebuilt metric) scores the base images differently. The number is drawn
        once per built metric and never reused, unlike ``id()``.
        """
        return (self.metric_name, self._metric_number)

    def use_metric(self, metric: Metric) -> None:
        """Score with ``metric`` from now on (its base values are computed afresh)."""
        self.metric, self._metric_number = metric, next(_METRIC_NUMBERS)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Load the metric now (missing weights fail here, before training) and join the shared pass."""
        if not callable(getattr(pl_module, "generate", None)):
            raise TypeError(
                f"{type(self).__name__} needs a module with generate(prompts, seed, ...), such as "
                f"ACPOModule; got {type(pl_module).__name__}."
            )
        conditional = is_conditional(pl_module)  # one that does not say is refused here
        if self.needs_prompts and not conditional:
            raise ValueError(
                f"{type(self).__name__} scores images against their prompts, but "
                f"{type(pl_module).__name__} is unconditional; use MANIQACallback instead."
            )
        if self.metric is None:
            self.use_metric(self.build_metric())
        self.evaluation_pass = EvaluationPass.shared(pl_module, self.settings)
        self.evaluation_pass.register(self)
        params = {f"eval/{self.metric_name}/{k}": v for k, v in self.metric.info.items()}
        params.update(describe_settings(self.settings, self.prompt_source))
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.evaluation_pass is not None:
            self.evaluation_pass.unregister(self)

    # ------------------------------------------------------------------ when
    def is_due(self, trainer: pl.Trainer, event: str) -> bool:
        """Whether this callback evaluates at ``event`` (``step``, ``epoch`` or ``validate``)."""
        if event == "validate":
            return True
        if event == "step":
            n = self.every_n_steps
            return bool(n) and trainer.global_step > 0 and trainer.global_step % n == 0
        n = self.every_n_epochs
        return bool(n) and (trainer.current_epoch + 1) % n == 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self.every_n_steps:
            self._evaluate(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs:
            self._evaluate(trainer, pl_module, "epoch")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._evaluate(trainer, pl_module, "validate")

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str) -> None:
        if self.evaluation_pass is not None and not trainer.sanity_checking:
            self.evaluation_pass.evaluate(trainer, pl_module, event)

    # ------------------------------------------------------------------ what the pass calls
    def update(self, images: Tensor, prompts: list[str], first: int = 0) -> None:
        """Score a batch of generated images (on the images' device); its first image is image
        ``first`` of the prompt list."""
        if self.metric.device != images.device:
            self.metric.to(images.device)
        self.metric.update(images, prompts)

    def finish(self) -> float:
        """The synced mean over all ranks; the metric is reset for the next evaluation."""
        value = float(self.metric.compute())
        self.metric.reset()
        return value


class _CLIPMetricCallback(GenerationMetricCallback):
    metric_class: type[Metric]

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        processor_name_or_path: str | None = None,
        local_files_only: bool | None = None,
        torch_dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.metric_args = dict(
            pretrained_model_name_or_path=pretrained_model_name_or_path,
            processor_name_or_path=processor_name_or_path,
            local_files_only=local_files_only,
            torch_dtype=torch_dtype,
        )

    def build_metric(self) -> Metric:
        return self.metric_class(**self.metric_args)


class PickScoreCallback(_CLIPMetricCallback):
    """Log ``val/pickscore`` (:class:`~acpo_lightning.metrics.PickScore`) of generated images.

    Args:
        pretrained_model_name_or_path: the reward model (default ``yuvalkirstain/PickScore_v1``).
        processor_name_or_path: its processor (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: backbone dtype, e.g. ``bfloat16``.
        **kwargs: the generation and frequency options of :class:`GenerationMetricCallback`.

    Example:
        >>> callbacks = [PickScoreCallback(every_n_steps=500, every_n_epochs=None)]
    """

    metric_name = "pickscore"

    @property
    def metric_class(self) -> type[Metric]:
        from acpo_lightning.metrics import PickScore

        return PickScore


class CLIPScoreCallback(_CLIPMetricCallback):
    """Log ``val/clipscore`` (:class:`~acpo_lightning.metrics.CLIPScore`) of generated images.

    Args:
        pretrained_model_name_or_path: the CLIP model (default ``openai/clip-vit-large-patch14``).
        processor_name_or_path: its processor (default: the model's).
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: backbone dtype, e.g. ``bfloat16``.
        **kwargs: the generation and frequency options of :class:`GenerationMetricCallback`.

    Example:
        >>> callbacks = [CLIPScoreCallback(prompts="partiprompts", max_prompts=64)]
    """

    metric_name = "clipscore"

    @property
    def metric_class(self) -> type[Metric]:
        from acpo_lightning.metrics import CLIPScore

        return CLIPScore


class MANIQACallback(GenerationMetricCallback):
    """Log ``val/maniqa`` (:class:`~acpo_lightning.metrics.MANIQA`, through pyiqa) of generated images.

    Works with unconditional models too (the prompt list then only sets the number of images).

    Args:
        variant: ``maniqa`` (KonIQ-10k), ``maniqa-kadid`` or ``maniqa-pipal``.
        pretrained_model_path: a local MANIQA checkpoint instead of pyiqa's download.
        crops: uniform 224-px crops per image (pyiqa's protocol: 20).
        resize_to: resize to this square side first (``None``: pyiqa's protocol).
        head: an already built quality head used instead of pyiqa's MANIQA (nothing is loaded).
        **kwargs: the generation and frequency options of :class:`GenerationMetricCallback`.

    Example:
        >>> callbacks = [MANIQACallback(crops=20)]
    """

    metric_name = "maniqa"
    needs_prompts = False

    def __init__(
        self,
        variant: str = "maniqa",
        pretrained_model_path: str | None = None,
        crops: int = 20,
        resize_to: int | None = None,
        head: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.metric_args = dict(
            variant=variant,
            pretrained_model_path=pretrained_model_path,
            crops=crops,
            resize_to=resize_to,
            head=head,
        )

    def build_metric(self) -> Metric:
        from acpo_lightning.metrics import MANIQA

        return MANIQA(**self.metric_args)
