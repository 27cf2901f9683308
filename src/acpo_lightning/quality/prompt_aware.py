"""Prompt-aware NR-IQA: a quality score that also asks whether the image shows what the prompt says.

:class:`PromptAwareNet` reuses the two conv streams of
:class:`~acpo_lightning.quality.two_stream.TwoStreamNet` (RGB pixels and Sobel gradients, each
summarised by the mean and standard deviation of its feature maps) and fuses them with a sentence
embedding of the prompt in two ways, so the text can move the score:

- a *quality term*: an MLP on the image features whose hidden layer is FiLM-modulated by the
  text (``h * (1 + gamma(t)) + beta(t)``), so what counts as a defect may depend on the prompt;
- a *match term*: ``scale * cos(P_img f, P_txt t)``, a learned image-text agreement.

The logit is their sum; the score is ``sigmoid(logit)`` in ``(0, 1)``. A net whose fusion ignored
the text would give an image the same score under every prompt.

:class:`PromptEmbedder` turns prompts into that embedding with any frozen Hugging Face text encoder
(mean of the last hidden states over the attention mask, L2-normalized, the sentence-transformers
recipe) and caches it per prompt. :class:`PromptAwareIQA` is the frozen quality head that ACPO
uses; :class:`~acpo_lightning.quality.prompt_data.PromptPairDataset` and
:func:`~acpo_lightning.quality.prompt_data.collate_prompt_groups` feed
:class:`~acpo_lightning.quality.training.PromptIQATrainingModule`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acpo_lightning.quality.base import QualityHead, resize_to_native

# the stream builders and Sobel constants are shared with TwoStream on purpose: the same image
# features, so the two heads differ only in what they do with the prompt
from acpo_lightning.quality.two_stream import (
    _LUMA,
    _SOBEL_X,
    CONFIG_NAME,
    WEIGHTS_NAME,
    _conv_stream,
    _mean_std_pool,
    export_folder,
    load_export_weights,
    read_export_config,
    save_export,
    sobel_gradient_maps,
)

ARCHITECTURE = "PromptAwareIQA"
_EPS = 1e-6


class PromptAwareNet(nn.Module):
    """The trainable prompt-aware network: images ``[B, 3, H, W]`` in ``[0, 1]`` and text embeddings to scores.

    Args:
        text_dim: size of the prompt embedding (384 for all-MiniLM-L6-v2).
        channels: widths of the conv stages of each stream; their number sets the depth.
        hidden: width of the FiLM-modulated quality MLP and of the image-text match space.
        native_size: side length inputs are resized to (antialiased bilinear) before the streams.

    Raises:
        ValueError: a non-positive size.

    Example:
        >>> net = PromptAwareNet(text_dim=8, channels=(8, 16), hidden=16, native_size=16)
        >>> net(torch.rand(4, 3, 16, 16), F.normalize(torch.randn(4, 8), dim=-1)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        text_dim: int,
        channels: Sequence[int] = (16, 32, 64),
        hidden: int = 64,
        native_size: int = 32,
    ) -> None:
        super().__init__()
        if text_dim < 1 or not channels or min(int(c) for c in channels) < 1 or hidden < 1:
            raise ValueError(
                f"PromptAwareNet needs text_dim >= 1, positive channels and hidden >= 1; got "
                f"text_dim={text_dim}, channels={tuple(channels)}, hidden={hidden}."
            )
        if native_size < 4:
            raise ValueError(f"PromptAwareNet needs native_size >= 4, got {native_size}.")
        self.text_dim, self.hidden, self.native_size = int(text_dim), int(hidden), int(native_size)
        self.channels = tuple(int(c) for c in channels)
        features = 4 * self.channels[-1]
        self.image_stream = _conv_stream(3, self.channels)
        self.gradient_stream = _conv_stream(3, self.channels)
        self.image_proj = nn.Linear(features, hidden)
        self.film = nn.Linear(text_dim, 2 * hidden)
        self.quality_out = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )
        self.match_image = nn.Linear(features, hidden)
        self.match_text = nn.Linear(text_dim, hidden)
        # log of the cosine's scale, CLIP-style: the match term can grow to dominate when it must
        self.match_log_scale = nn.Parameter(torch.tensor(1.0))
        kernels = torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1)
        self.register_buffer("sobel", kernels, persistent=False)
        self.register_buffer("luma", _LUMA.view(1, 3, 1, 1), persistent=False)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as stored in ``config.json``."""
        return {
            "text_dim": self.text_dim,
            "channels": list(self.channels),
            "hidden": self.hidden,
            "native_size": self.native_size,
        }

    def image_features(self, images: Tensor) -> Tensor:
        """Pooled features of both streams, ``[B, 4 * channels[-1]]``."""
        images = resize_to_native(images, self.native_size)
        gradient_maps = sobel_gradient_maps(images, self.luma, self.sobel)
        return torch.cat(
            [
                _mean_std_pool(self.image_stream(images * 2.0 - 1.0)),
                _mean_std_pool(self.gradient_stream(gradient_maps)),
            ],
            dim=1,
        )

    def logits(self, images: Tensor, text_emb: Tensor) -> Tensor:
        """Unbounded logits ``[B]`` (quality term + match term); :meth:`forward` is their sigmoid.

        Args:
            images: ``[B, 3, H, W]`` in ``[0, 1]``.
            text_emb: ``[B, text_dim]`` prompt embeddings, one per image.

        Raises:
            ValueError: ``text_emb`` does not have shape ``[B, text_dim]``.
        """
        if text_emb.shape != (images.shape[0], self.text_dim):
            raise ValueError(
                f"text_emb must be [B, text_dim] = [{images.shape[0]}, {self.text_dim}] for "
                f"{images.shape[0]} images; got {tuple(text_emb.shape)}."
            )
        features = self.image_features(images)
        text_emb = text_emb.to(features.dtype)
        gamma, beta = self.film(text_emb).chunk(2, dim=1)
        hidden = F.silu(self.image_proj(features)) * (1.0 + gamma) + beta
        quality = self.quality_out(hidden).squeeze(1)
        agreement = F.cosine_similarity(
            self.match_image(features), self.match_text(text_emb), dim=1, eps=_EPS
        )
        return quality + self.match_log_scale.exp() * agreement

    def forward(self, images: Tensor, text_emb: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(images, text_emb))

    def save_pretrained(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into the folder ``path``.

        Args:
            path: output folder (created if needed).
            metadata: JSON-serializable facts to keep beside the config (text encoder, data, metrics).

        Returns:
            The folder.
        """
        return save_export(self, path, ARCHITECTURE, self.config, metadata)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PromptAwareNet:
        """Build the network of ``path``'s ``config.json`` and load its safetensors (train mode).

        Raises:
            FileNotFoundError: the config or the weights are missing.
            ValueError: the config is not a prompt-aware config or does not match the weights.
        """
        folder = export_folder(path)
        config = read_prompt_config(folder)
        net = cls(
            text_dim=config["text_dim"],
            channels=config["channels"],
            hidden=config["hidden"],
            native_size=config["native_size"],
        )
        return load_export_weights(net, folder)


def read_prompt_config(folder: str | Path) -> dict[str, Any]:
    """Read and check the ``config.json`` of an exported :class:`PromptAwareNet`.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the file describes another architecture or format version.
    """
    return read_export_config(
        folder,
        ARCHITECTURE,
        f"a prompt-aware IQA export is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, written by "
        "PromptAwareNet.save_pretrained or PromptIQATrainingModule.export.",
        " (A TwoStream export loads with TwoStreamIQA.from_pretrained.)",
    )


class PromptEmbedder(nn.Module):
    """Frozen sentence embeddings of prompts, cached per prompt string.

    The embedding is the mean of the encoder's last hidden states over the attention mask,
    L2-normalized. Prompts are embedded under ``no_grad``; each distinct prompt is encoded once
    and kept in a bounded least-recently-used cache, so the few prompts of a training run cost
    nothing after their first batch.

    Args:
        text_encoder: a Hugging Face encoder whose output ``[0]`` is ``[B, L, D]`` hidden states
            (``BertModel``, ``CLIPTextModel``, ...). It is frozen and put in eval mode here.
        tokenizer: its tokenizer (padding and truncation to ``model_max_length``).
        cache_size: most prompts kept (0: no cache).

    Example:
        >>> from acpo_demo.text import load_minilm, load_minilm_tokenizer  # doctest: +SKIP
        >>> embed = PromptEmbedder(load_minilm(), load_minilm_tokenizer())  # doctest: +SKIP
        >>> embed(["a sneaker", "a bag"]).shape  # doctest: +SKIP
        torch.Size([2, 384])
    """

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, cache_size: int = 4096) -> None:
        super().__init__()
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}.")
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer, self.cache_size = tokenizer, cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def train(self, mode: bool = True) -> PromptEmbedder:
        """Stay in eval mode: the text encoder is never trained."""
        return super().train(False)

    @property
    def dim(self) -> int | None:
        """The embedding size (``config.hidden_size``), or ``None`` when the encoder has no config."""
        return getattr(getattr(self.text_encoder, "config", None), "hidden_size", None)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Embed ``prompts`` without the cache, ``[N, D]`` float32 on the encoder's device."""
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).to(device)
        hidden = self.text_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )[0].float()
        mask = tokens["attention_mask"].to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings ``[N, D]`` (float32, encoder's device) of ``prompts``, from the cache when seen."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = dict(zip(missing, self.encode(missing), strict=True)) if missing else {}
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        if self.cache_size:
            for prompt in prompts:
                if prompt in self._cache:
                    self._cache.move_to_end(prompt)
            self._cache.update(fresh)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return torch.stack(rows)

    def table(self, prompts: Iterable[str], batch_size: int = 256) -> dict[str, Tensor]:
        """``{prompt: embedding [D]}`` (CPU) for every distinct prompt: precomputed training inputs."""
        unique = list(dict.fromkeys(prompts))
        rows = [self.encode(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
        return dict(zip(unique, torch.cat(rows).cpu(), strict=True)) if unique else {}


class PromptAwareIQA(QualityHead):
    """A frozen :class:`PromptAwareNet` with its text encoder; higher is better, in ``(0, 1)``.

    Needs the prompts: ``head(images, prompts)`` with one prompt per image.

    Args:
        net: the trained network (frozen in place).
        text_encoder: the frozen text encoder the net was trained with.
        tokenizer: its tokenizer.
        cache_size: prompts whose embeddings are kept (see :class:`PromptEmbedder`).
        metadata: facts recorded at export (shown, never used).

    Raises:
        ValueError: the text encoder's size differs from the net's ``text_dim``.

    Example:
        >>> head = PromptAwareIQA.from_pretrained(  # doctest: +SKIP
        ...     "weights/prompt_iqa", load_minilm(), load_minilm_tokenizer()
        ... )
        >>> head(images, ["a sneaker", "a bag"]).shape  # doctest: +SKIP
        torch.Size([2])
    """

    higher_is_better = True
    score_range = (0.0, 1.0)

    def __init__(
        self,
        net: PromptAwareNet,
        text_encoder: nn.Module,
        tokenizer: Any,
        cache_size: int = 4096,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.embedder = PromptEmbedder(text_encoder, tokenizer, cache_size)
        if self.embedder.dim is not None and self.embedder.dim != net.text_dim:
            raise ValueError(
                f"the text encoder makes {self.embedder.dim}-d embeddings but the net expects "
                f"text_dim={net.text_dim}; load it with the text encoder it was trained with."
            )
        self.net, self.native_size = net, net.native_size
        self.metadata = dict(metadata or {})
        self.freeze()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, text_encoder: nn.Module, tokenizer: Any, cache_size: int = 4096
    ) -> PromptAwareIQA:
        """Load an exported net (safetensors only; nothing is unpickled) beside its text encoder."""
        metadata = read_prompt_config(export_folder(path)).get("metadata", {})
        net = PromptAwareNet.from_pretrained(path)
        return cls(net, text_encoder, tokenizer, cache_size, metadata)

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        if prompts is None:
            raise ValueError(
                "PromptAwareIQA scores an image against its prompt, so it needs the prompts: "
                "call head(images, prompts) with one prompt per image. For a prompt-free score "
                "use TwoStreamIQA (or wrap this head with the prompts it should use)."
            )
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            count = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(
                f"PromptAwareIQA needs one prompt per image: got {count} for "
                f"{images.shape[0]} images; pass a list of {images.shape[0]} strings."
            )
        text_emb = self.embedder(prompts).to(device=images.device, dtype=images.dtype)
        return self.net(images, text_emb)
