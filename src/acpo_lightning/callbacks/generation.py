"""One generation pass per evaluation, shared by every metric callback with the same settings.

The metric callbacks (:mod:`acpo_lightning.callbacks.evaluation`) register with an
:class:`EvaluationPass` for their :class:`GenerationSettings`. The first callback whose hook fires
at an evaluation point runs the pass for all callbacks due there: each batch of images is generated
once with ``ACPOModule.generate`` and handed to every metric, then dropped (only the few images of
the grid are kept). The base model's images (``use_anchor=True``) are generated at the first
evaluation only; their metric values are cached.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from torch import Tensor

from acpo_lightning.callbacks.grid import caption_grid
from acpo_lightning.metrics.functional import shard_bounds


@dataclass(frozen=True)
class GenerationSettings:
    """What an evaluation generates: fixed prompts and seeds (image ``i`` uses ``seed + i``).

    ``num_inference_steps``/``guidance_scale`` of ``None`` take the module's defaults.
    """

    prompts: tuple[str, ...]
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 8


class EvaluationConsumer(Protocol):
    """What a metric callback offers the shared pass."""

    metric_name: str
    compare_base: bool
    log_images: int

    @property
    def cache_key(self) -> tuple: ...

    def is_due(self, trainer: pl.Trainer, event: str) -> bool: ...
    def update(self, images: Tensor, prompts: list[str], first: int) -> None: ...
    def finish(self) -> float: ...


_PASSES: weakref.WeakKeyDictionary[pl.LightningModule, dict[GenerationSettings, EvaluationPass]] = (
    weakref.WeakKeyDictionary()
)


class EvaluationPass:
    """Generates the evaluation images once per evaluation point and feeds every registered metric.

    Attributes:
        stats: ``evaluations`` (passes run), ``images`` (images generated, base included) and
            ``seconds`` (wall time of the passes, generation and scoring).
    """

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings
        self.consumers: list[EvaluationConsumer] = []
        self.stats: dict[str, float] = {"evaluations": 0, "images": 0, "seconds": 0.0}
        self._done: dict[int, tuple[str, int]] = {}  # id(consumer) -> last (kind, global_step)
        self._base_images: Tensor | None = None
        self.base_values: dict[tuple, float] = {}  # consumer.cache_key -> the base model's value
        self._conditional = True

    @classmethod
    def shared(cls, pl_module: pl.LightningModule, settings: GenerationSettings) -> EvaluationPass:
        """The pass of ``pl_module`` for ``settings`` (created on first use; base values live here)."""
        passes = _PASSES.setdefault(pl_module, {})
        return passes.setdefault(settings, cls(settings))

    def register(self, consumer: EvaluationConsumer) -> None:
        if all(c is not consumer for c in self.consumers):
            self.consumers.append(consumer)

    def unregister(self, consumer: EvaluationConsumer) -> None:
        """Leave the pass at the end of a run; the next run evaluates afresh."""
        self.consumers = [c for c in self.consumers if c is not consumer]
        self._done.pop(id(consumer), None)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: str) -> None:
        """Run the pass for the consumers due at ``event`` (``step``, ``epoch`` or ``validate``)."""
        key = ("validate" if event == "validate" else "fit", trainer.global_step)
        due = [
            c for c in self.consumers if self._done.get(id(c)) != key and c.is_due(trainer, event)
        ]
        if not due:
            return
        start = time.perf_counter()
        keep = max(c.log_images for c in due) if trainer.is_global_zero else 0
        with evaluation_mode(pl_module):
            base = [c for c in due if c.compare_base and c.cache_key not in self.base_values]
            if base:
                self._base_images = self._generate(trainer, pl_module, base, True, keep)
                for consumer in base:
                    self.base_values[consumer.cache_key] = consumer.finish()
            tuned_images = self._generate(trainer, pl_module, due, False, keep)
            values = [c.finish() for c in due]
        for consumer in due:
            self._done[id(consumer)] = key
        self._log(trainer, due, values, tuned_images)
        self.stats["evaluations"] += 1
        self.stats["seconds"] += time.perf_counter() - start

    def _generate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        consumers: list[EvaluationConsumer],
        use_anchor: bool,
        keep: int,
    ) -> Tensor | None:
        """Generate this rank's shard batch by batch; feed each batch to the consumers."""
        s = self.settings
        begin, end = shard_bounds(len(s.prompts), trainer.global_rank, trainer.world_size)
        kept: list[Tensor] = []
        conditional = self._conditional = is_conditional(pl_module)
        for first in range(begin, end, s.batch_size):
            prompts = list(s.prompts[first : min(first + s.batch_size, end)])
            with trainer.precision_plugin.forward_context():
                images = pl_module.generate(
                    prompts if conditional else len(prompts),
                    seed=s.seed + first,  # image i of the whole list always uses seed + i
                    num_inference_steps=s.num_inference_steps,
                    guidance_scale=s.guidance_scale,
                    use_anchor=use_anchor,
                )
            images = images.float()
            for consumer in consumers:
                consumer.update(images, prompts, first)
            if sum(len(k) for k in kept) < keep:
                kept.append(images[: keep - sum(len(k) for k in kept)].cpu())
            self.stats["images"] += len(prompts)
        return torch.cat(kept) if kept else None

    def _log(
        self,
        trainer: pl.Trainer,
        consumers: list[EvaluationConsumer],
        values: list[float],
        tuned_images: Tensor | None,
    ) -> None:
        metrics: dict[str, float] = {}
        for consumer, value in zip(consumers, values, strict=True):
            name = consumer.metric_name
            metrics[f"val/{name}"] = value
            base = self.base_values.get(consumer.cache_key)
            if consumer.compare_base and base is not None:
                metrics[f"val/{name}_base"] = base
                metrics[f"val/{name}_delta"] = value - base
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if tuned_images is not None and trainer.is_global_zero:
            self._log_grid(trainer, tuned_images)

    def _log_grid(self, trainer: pl.Trainer, tuned: Tensor) -> None:
        base = self._base_images
        count = len(tuned) if base is None else min(len(tuned), len(base))
        columns = [tuned[:count]] if base is None else [base[:count], tuned[:count]]
        headers = (
            [f"step {trainer.global_step}"]
            if base is None
            else ["base", f"step {trainer.global_step}"]
        )
        captions = list(self.settings.prompts[:count])
        if not self._conditional:  # prompts only set the number of images
            captions = [f"seed {self.settings.seed + i}" for i in range(count)]
        grid = caption_grid(columns, captions, headers)
        prompts = "\n".join(f"{i}. {p}" for i, p in enumerate(captions))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/samples", grid, trainer.global_step, dataformats="CHW")
                experiment.add_text("val/samples_prompts", prompts, trainer.global_step)


def is_conditional(pl_module: pl.LightningModule) -> bool:
    """Whether ``pl_module`` generates from prompts (else from a count of images).

    Raises:
        TypeError: the module does not say (no ``is_conditional``, as ``ACPOModule`` has).
    """
    conditional = getattr(pl_module, "is_conditional", None)
    if not isinstance(conditional, bool):
        raise TypeError(
            f"the evaluation callbacks need a module that says whether it takes prompts "
            f"(is_conditional: bool), such as ACPOModule; {type(pl_module).__name__} has "
            f"is_conditional={conditional!r}."
        )
    return conditional


@contextlib.contextmanager
def evaluation_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode and ``no_grad`` for the block; train mode and the RNG states restored after it.

    The global RNGs are forked so that evaluating does not change the training run's random draws
    (generation uses its own seeded generators; some metrics draw from the global RNG).
    """
    was_training = pl_module.training
    device = pl_module.device
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    pl_module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        pl_module.train(was_training)


def describe_settings(settings: GenerationSettings, source: str) -> dict[str, Any]:
    """The generation settings as flat hyper-parameters."""
    return {
        "eval/prompts": source,
        "eval/num_prompts": len(settings.prompts),
        "eval/seed": settings.seed,
        "eval/num_inference_steps": str(settings.num_inference_steps or "module default"),
        "eval/guidance_scale": str(
            settings.guidance_scale if settings.guidance_scale is not None else "module default"
        ),
        "eval/batch_size": settings.batch_size,
    }
