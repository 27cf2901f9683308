"""Image-text alignment metrics on transformers' ``CLIPModel``: :class:`CLIPScore` and :class:`PickScore`.

Both are written on ``CLIPModel`` directly (torchmetrics 1.9's ``CLIPScore`` breaks with
transformers 5, PickScore is in no library) and run with transformers 4.4x and 5.x. Images go
through :class:`~acpo_lightning.metrics.preprocess.CLIPImagePreprocess`, the processor's resize,
crop and normalization in torch; text through the processor's tokenizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from acpo_lightning.metrics import functional as MF
from acpo_lightning.metrics.preprocess import CLIPImagePreprocess
from acpo_lightning.models.loading import ModelNotFoundError, load_pretrained, resolve_dtype


def load_clip(
    model_name_or_path: str,
    processor_name_or_path: str | None = None,
    what: str = "CLIP model",
    local_files_only: bool | None = None,
) -> tuple[nn.Module, Any]:
    """Load a ``CLIPModel`` and a ``CLIPProcessor`` from hub ids or local directories.

    Args:
        model_name_or_path: the model (hub id or directory).
        processor_name_or_path: where the processor lives (default: beside the model).
        what: the model's name in error messages.
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).

    Raises:
        ModelNotFoundError: weights, config or processor files missing; the message names the
            model, where it was looked for, and how to provide it.
    """
    from transformers import CLIPModel, CLIPProcessor

    processor_name_or_path = processor_name_or_path or model_name_or_path
    loads = (
        (CLIPModel.from_pretrained, what, model_name_or_path, "pretrained_model_name_or_path"),
        (
            CLIPProcessor.from_pretrained,
            f"{what}'s processor",
            processor_name_or_path,
            "processor_name_or_path",
        ),
    )
    loaded = []
    for loader, name, path, argument in loads:
        try:
            loaded.append(
                load_pretrained(loader, name, path, None, local_files_only=local_files_only)
            )
        except ModelNotFoundError as error:
            message = str(error).replace("as pretrained_model_name_or_path", f"as {argument}")
            raise ModelNotFoundError(f"{message} (now {argument}={path!r})") from error
    return loaded[0], loaded[1]


def _float32_logit_scale(model: nn.Module) -> float:
    """The model's ``logit_scale`` as a float; warns when it is already stored in half precision."""
    scale = model.logit_scale.detach()
    if scale.dtype in (torch.float16, torch.bfloat16):
        warnings.warn(
            f"the CLIP model's logit_scale is stored in {scale.dtype} ({float(scale):.5f}), which "
            "rounds exp(logit_scale) by up to 1 % (ln 100 -> 98.86 in bfloat16); pass the model in "
            "float32 with torch_dtype='bfloat16' so that the scale stays in float32.",
            RuntimeWarning,
            stacklevel=3,
        )
    return float(scale.float())


class _CLIPPairMetric(Metric):
    """Mean of a per-pair score of image ``i`` with prompt ``i`` on a frozen ``CLIPModel``."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    default_model: str = ""
    default_processor: str | None = None
    formula: str = ""
    typical_range: str = ""

    def __init__(
        self,
        pretrained_model_name_or_path: str | None = None,
        processor_name_or_path: str | None = None,
        local_files_only: bool | None = None,
        torch_dtype: str | None = None,
        model: nn.Module | None = None,
        processor: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (model is None) != (processor is None):
            raise ValueError("pass both model and processor, or neither (then they are loaded).")
        self.model_name = pretrained_model_name_or_path or self.default_model
        self.processor_name = processor_name_or_path or self.default_processor or self.model_name
        if model is None:
            model, processor = load_clip(
                self.model_name,
                self.processor_name,
                type(self).__name__ + " model",
                local_files_only,
            )
        #: ``logit_scale`` in float32, read before any cast: bf16 stores PickScore's ln 100 as
        #: 4.59375, whose exp is 98.86 (every score 1.14 % low).
        self.logit_scale = _float32_logit_scale(model)
        dtype = resolve_dtype(torch_dtype)
        self.model = model.to(dtype) if dtype is not None else model
        self.model.requires_grad_(False).eval()
        self.tokenizer = processor.tokenizer
        self.preprocess = CLIPImagePreprocess.from_image_processor(processor.image_processor)
        self.add_state("score_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> _CLIPPairMetric:
        """The backbone stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def info(self) -> dict[str, str]:
        """Backbone, formula and range, for logging as hyper-parameters."""
        return {
            "backbone": self.model_name,
            "processor": self.processor_name,
            "formula": self.formula,
            "range": self.typical_range,
        }

    def _text_length(self) -> int:
        limit = int(getattr(self.tokenizer, "model_max_length", 77) or 77)
        positions = getattr(self.model.config.text_config, "max_position_embeddings", limit)
        return min(limit, int(positions))

    @torch.no_grad()
    def cosine(self, images: MF.ImageInput, prompts: str | Sequence[str]) -> Tensor:
        """Cosine similarity of each image with its prompt, ``[B]`` (float32)."""
        items = MF.as_unit_images(images)
        prompts = MF.as_prompt_list(prompts, len(items))
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        self.preprocess.to(device)
        pixels = torch.cat([self.preprocess(batch.to(device)) for batch in MF.batched(items)])
        pixels = pixels.to(dtype)
        tokens = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self._text_length(),
            return_tensors="pt",
        ).to(device)
        image_embeds = MF.embedding(self.model.get_image_features(pixel_values=pixels))
        text_embeds = MF.embedding(
            self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
            )
        )
        return MF.paired_cosine(image_embeds, text_embeds)

    def score(self, images: MF.ImageInput, prompts: str | Sequence[str]) -> Tensor:
        """Per-pair scores ``[B]`` without touching the metric's state."""
        raise NotImplementedError

    def update(self, images: MF.ImageInput, prompts: str | Sequence[str]) -> None:
        """Add the scores of ``images`` (uint8 or ``[0, 1]`` float) against their ``prompts``."""
        scores = self.score(images, prompts)
        self.score_sum += scores.sum().to(self.score_sum)
        self.n_samples += scores.numel()

    def compute(self) -> Tensor:
        """Mean score over all pairs seen (all processes once synced)."""
        return self.score_sum / self.n_samples


class CLIPScore(_CLIPPairMetric):
    """CLIPScore: how well each image matches its prompt, ``100 * max(cos(E_img, E_txt), 0)``.

    Backbone: ``openai/clip-vit-large-patch14`` by default (any ``CLIPModel``: hub id or folder).
    Formula: image and text embeddings of the backbone's projection heads, L2-normalized; the score
    of a pair is ``100 * max(cos, 0)`` and the metric is the mean over pairs (torchmetrics clamps the
    mean instead of each pair; the two agree whenever cosines are positive, as for real pairs).
    Range: ``[0, 100]``; matching text-image pairs typically score 20-35 with ViT-L/14.

    Args:
        pretrained_model_name_or_path: the CLIP model (default ``openai/clip-vit-large-patch14``).
        processor_name_or_path: its processor (default: the model's).
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: backbone dtype (``bfloat16`` halves memory); scores are summed in float32.
        model: an already loaded ``CLIPModel`` (then ``processor`` too); nothing is loaded.
        processor: an already loaded ``CLIPProcessor``.
        **kwargs: ``torchmetrics.Metric`` options (``sync_on_compute``, ...).

    Raises:
        ModelNotFoundError: the model or processor cannot be found (the message says how to provide it).

    Example:
        >>> metric = CLIPScore("openai/clip-vit-large-patch14")  # doctest: +SKIP
        >>> metric.update(torch.rand(2, 3, 512, 512), ["a cat", "a dog"])  # doctest: +SKIP
        >>> metric.compute()  # doctest: +SKIP
    """

    default_model = "openai/clip-vit-large-patch14"
    formula = "100 * max(cos(image_embeds, text_embeds), 0), mean over pairs"
    typical_range = "[0, 100]; matching pairs about 20-35 (ViT-L/14)"
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    def score(self, images: MF.ImageInput, prompts: str | Sequence[str]) -> Tensor:
        """Per-pair CLIPScores ``[B]``."""
        return MF.clip_score_from_cosine(self.cosine(images, prompts))


class PickScore(_CLIPPairMetric):
    """PickScore (Kirstain et al., 2023): a CLIP-H reward model of human preference for a prompt.

    Backbone: ``yuvalkirstain/PickScore_v1`` (CLIP ViT-H/14 fine-tuned on Pick-a-Pic) with the
    processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as in the authors' reference code.
    Formula: ``exp(logit_scale) * cos(E_img, E_txt)`` with the model's own ``logit_scale``
    (``exp`` = 100 for PickScore_v1), mean over pairs.
    Range: ``[-100, 100]`` in principle; text-to-image samples typically score about 17-24.

    Args:
        pretrained_model_name_or_path: the reward model (default ``yuvalkirstain/PickScore_v1``).
        processor_name_or_path: its processor (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        torch_dtype: backbone dtype (``bfloat16`` halves the 4 GB of ViT-H); ``logit_scale``, the
            cosine and the sums stay float32.
        model: an already loaded ``CLIPModel`` (then ``processor`` too); nothing is loaded.
        processor: an already loaded ``CLIPProcessor``.
        **kwargs: ``torchmetrics.Metric`` options.

    Raises:
        ModelNotFoundError: the model or processor cannot be found (the message says how to provide it).

    Example:
        >>> metric = PickScore()  # doctest: +SKIP
        >>> metric.update(torch.rand(2, 3, 512, 512), ["a cat", "a dog"])  # doctest: +SKIP
        >>> metric.compute()  # doctest: +SKIP
    """

    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    formula = "exp(logit_scale) * cos(image_embeds, text_embeds), mean over pairs"
    typical_range = "[-100, 100]; text-to-image samples about 17-24"

    def score(self, images: MF.ImageInput, prompts: str | Sequence[str]) -> Tensor:
        """Per-pair PickScores ``[B]``."""
        return MF.pickscore_from_cosine(self.cosine(images, prompts), self.logit_scale)
