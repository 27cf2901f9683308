"""TwoStream NR-IQA: an image stream and a gradient stream fused into one quality score.

The gradient stream sees the Sobel derivatives of the luminance (a fixed convolution, so the whole
model stays differentiable with respect to the image); the image stream sees the RGB pixels. Each
stream is a small strided CNN summarised by the mean and standard deviation of its feature maps;
an MLP fuses both summaries into a logit, and the score is ``sigmoid(logit)`` in ``(0, 1)``.

:class:`TwoStreamNet` is the trainable network (trained by
:class:`acpo_lightning.quality.training.IQATrainingModule`); :class:`TwoStreamIQA` is the frozen
quality head that ACPO uses. Weights travel as ``model.safetensors`` plus ``config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from acpo_lightning.quality.base import QualityHead, resize_to_native

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
ARCHITECTURE = "TwoStreamIQA"
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_EPS = 1e-6


def _conv_stream(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """3x3 convolutions with SiLU; every stage after the first halves the resolution.

    No normalization layer on purpose: contrast and noise level are absolute image statistics
    that per-sample normalization would erase.
    """
    layers: list[nn.Module] = []
    for i, width in enumerate(channels):
        layers += [
            nn.Conv2d(in_channels, width, 3, stride=1 if i == 0 else 2, padding=1),
            nn.SiLU(),
        ]
        in_channels = width
    return nn.Sequential(*layers)


def _mean_std_pool(features: Tensor) -> Tensor:
    """Per-channel mean and standard deviation over space, ``[B, C, H, W] -> [B, 2C]``.

    The ``eps`` keeps the square root differentiable on flat feature maps.
    """
    mean = features.mean(dim=(2, 3))
    var = (features - mean[..., None, None]).pow(2).mean(dim=(2, 3))
    return torch.cat([mean, torch.sqrt(var + _EPS)], dim=1)


class TwoStreamNet(nn.Module):
    """The trainable TwoStream network; images ``[B, 3, H, W]`` in ``[0, 1]`` to scores ``[B]``.

    Args:
        channels: widths of the conv stages of each stream; their number sets the depth.
        hidden: width of the fusion MLP.
        native_size: side length inputs are resized to (antialiased bilinear) before the streams.

    Example:
        >>> net = TwoStreamNet(channels=(8, 16), hidden=16, native_size=32)
        >>> net(torch.rand(4, 3, 32, 32)).shape
        torch.Size([4])
    """

    def __init__(
        self, channels: Sequence[int] = (16, 32, 64), hidden: int = 64, native_size: int = 32
    ) -> None:
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels) or hidden < 1 or native_size < 4:
            raise ValueError(
                f"TwoStreamNet needs positive channels, hidden >= 1 and native_size >= 4; got "
                f"channels={tuple(channels)}, hidden={hidden}, native_size={native_size}."
            )
        self.channels, self.hidden, self.native_size = (
            tuple(int(c) for c in channels),
            hidden,
            native_size,
        )
        self.image_stream = _conv_stream(3, self.channels)
        self.gradient_stream = _conv_stream(3, self.channels)
        self.fusion = nn.Sequential(
            nn.Linear(4 * self.channels[-1], hidden), nn.SiLU(), nn.Linear(hidden, 1)
        )
        kernels = torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1)
        self.register_buffer("sobel", kernels, persistent=False)
        self.register_buffer("luma", _LUMA.view(1, 3, 1, 1), persistent=False)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as stored in ``config.json``."""
        return {
            "channels": list(self.channels),
            "hidden": self.hidden,
            "native_size": self.native_size,
        }

    def gradient_maps(self, images: Tensor) -> Tensor:
        """Sobel ``gx``, ``gy`` and magnitude of the luminance, ``[B, 3, H, W]``."""
        return sobel_gradient_maps(images, self.luma, self.sobel)

    def logits(self, images: Tensor) -> Tensor:
        """Unbounded quality logits ``[B]``; :meth:`forward` is their sigmoid."""
        images = resize_to_native(images, self.native_size)
        image_features = _mean_std_pool(self.image_stream(images * 2.0 - 1.0))
        gradient_features = _mean_std_pool(self.gradient_stream(self.gradient_maps(images)))
        fused = torch.cat([image_features, gradient_features], dim=1)
        return self.fusion(fused).squeeze(1)

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(images))

    def save_pretrained(self, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into the folder ``path``.

        Args:
            path: output folder (created if needed).
            metadata: JSON-serializable facts to keep beside the config (data, metrics, MOS range).

        Returns:
            The folder.
        """
        return save_export(self, path, ARCHITECTURE, self.config, metadata)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TwoStreamNet:
        """Build the network described by ``path``'s ``config.json`` and load its safetensors.

        Args:
            path: a folder written by :meth:`save_pretrained` (or the ``.safetensors`` file in it).

        Returns:
            The network, in train mode like any fresh ``nn.Module``.

        Raises:
            FileNotFoundError: the config or the weights are missing.
            ValueError: the config is not a TwoStream config or does not match the weights.
        """
        folder = export_folder(path)
        config = read_config(folder)
        net = cls(
            channels=config["channels"], hidden=config["hidden"], native_size=config["native_size"]
        )
        return load_export_weights(net, folder)


def export_folder(path: str | Path) -> Path:
    """The export folder for ``path``, which may name the folder or the ``.safetensors`` in it."""
    path = Path(path).expanduser()
    return path.parent if path.suffix == ".safetensors" else path


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read and check the ``config.json`` of an exported TwoStream model.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the file describes another architecture or format version.
    """
    return read_export_config(
        folder,
        ARCHITECTURE,
        f"a TwoStream export is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, written by "
        "TwoStreamNet.save_pretrained or IQATrainingModule.export.",
        " Re-export the model with this version of acpo-lightning.",
    )


# --------------------------------------------------------------- the export format, shared by nets
def save_export(
    net: nn.Module,
    path: str | Path,
    architecture: str,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``net``'s weights (``model.safetensors``) and ``config.json`` into the folder ``path``.

    The config holds ``architecture``, :data:`FORMAT_VERSION`, the constructor arguments
    ``config`` and ``metadata``. Returns the folder.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    record = {
        "architecture": architecture,
        "format_version": FORMAT_VERSION,
        **config,
        "metadata": dict(metadata or {}),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def read_export_config(
    folder: str | Path, architecture: str, layout: str, advice: str
) -> dict[str, Any]:
    """Read ``folder``'s ``config.json`` and check it describes ``architecture`` at this version.

    Args:
        folder: an export folder.
        architecture: the expected ``architecture`` entry.
        layout: what such an export is (the missing-file error's fix).
        advice: appended to the wrong-architecture error.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the file describes another architecture or format version.
    """
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found; {layout}")
    config = json.loads((folder / CONFIG_NAME).read_text())
    found = (config.get("architecture"), config.get("format_version"))
    if found != (architecture, FORMAT_VERSION):
        raise ValueError(
            f"{folder / CONFIG_NAME} describes architecture={found[0]!r} format_version="
            f"{found[1]!r}; expected {architecture!r} version {FORMAT_VERSION}.{advice}"
        )
    return config


def load_export_weights(net: nn.Module, folder: Path) -> nn.Module:
    """Load ``folder``'s safetensors into ``net`` (strict); returns ``net``.

    Raises:
        ValueError: the weights do not match the network its config describes.
    """
    try:
        net.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: {err}"
        ) from err
    return net


def sobel_gradient_maps(images: Tensor, luma: Tensor, sobel: Tensor) -> Tensor:
    """Sobel ``gx``, ``gy`` and magnitude of the luminance ``luma . images``, ``[B, 3, H, W]``."""
    gray = (images * luma.to(images.dtype)).sum(dim=1, keepdim=True)
    grads = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), sobel.to(images.dtype))
    magnitude = torch.sqrt(grads.pow(2).sum(dim=1, keepdim=True) + _EPS)
    return torch.cat([grads, magnitude], dim=1)


class TwoStreamIQA(QualityHead):
    """The built-in learned quality head: a frozen :class:`TwoStreamNet`; higher is better, in ``(0, 1)``.

    Args:
        pretrained_path: folder of an exported model (``config.json`` + ``model.safetensors``).
        net: an in-memory network to wrap instead (it is frozen in place). With neither argument
            the head wraps an untrained default network, which is only useful in tests.

    Raises:
        ValueError: both ``pretrained_path`` and ``net`` are given.

    Example:
        >>> head = TwoStreamIQA(net=TwoStreamNet(channels=(8,), hidden=8, native_size=16))
        >>> head(torch.rand(2, 3, 64, 64)).shape, head.higher_is_better
        (torch.Size([2]), True)
    """

    higher_is_better = True
    score_range = (0.0, 1.0)

    def __init__(
        self, pretrained_path: str | Path | None = None, net: TwoStreamNet | None = None
    ) -> None:
        super().__init__()
        if pretrained_path is not None and net is not None:
            raise ValueError("pass either pretrained_path or net to TwoStreamIQA, not both.")
        if pretrained_path is not None:
            net = TwoStreamNet.from_pretrained(pretrained_path)
            self.metadata = read_config(export_folder(pretrained_path)).get("metadata", {})
        else:
            self.metadata = {}
        self.net = net if net is not None else TwoStreamNet()
        self.native_size = self.net.native_size
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TwoStreamIQA:
        """Load an exported model as a frozen head (safetensors only; nothing is unpickled)."""
        return cls(pretrained_path=path)

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        return self.net(images)
