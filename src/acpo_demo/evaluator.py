"""The demo's independent quality evaluator: another architecture, another distortion family.

The guidance head (``TwoStreamIQA``) learns from blur/noise/JPEG/downscale/contrast ladders and
from real-versus-generated pairs. This evaluator never sees any of those: it is a plain CNN
(GroupNorm, GELU, global average+max pooling; no gradient stream) trained to rank *structural*
corruptions of real Fashion-MNIST images: elastic warps, ghosting (a blend with another image),
occlusions, impulse noise and posterization. So an ACPO gain it confirms is not an artefact of
optimizing the guidance head itself. Images ``[B, 3, H, W]`` in ``[0, 1]``, score in ``(0, 1)``,
higher is better.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

EVAL_DISTORTIONS = ("warp", "ghost", "occlude", "impulse", "posterize")


def _warp(x: Tensor, s: Tensor, g: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    flow = torch.randn(n, 2, 4, 4, generator=g)
    flow = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=False)
    flow = flow / flow.flatten(1).std(1).view(-1, 1, 1, 1).clamp_min(1e-6)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], -1).expand(n, h, w, 2)
    offset = flow.permute(0, 2, 3, 1) * (s.view(-1, 1, 1, 1) * 4.0 / h)  # up to ~2 px rms
    return F.grid_sample(x, grid + offset, padding_mode="border", align_corners=True)


def _ghost(x: Tensor, s: Tensor, g: torch.Generator) -> Tensor:
    other = x[torch.randperm(len(x), generator=g)]
    shift = torch.randint(-4, 5, (2,), generator=g).tolist()
    other = torch.roll(other, shifts=shift, dims=(2, 3))
    a = 0.45 * s.view(-1, 1, 1, 1)
    return (1 - a) * x + a * other


def _occlude(x: Tensor, s: Tensor, g: torch.Generator) -> Tensor:
    n, _, h, _ = x.shape
    out = x.clone()
    for i in range(n):
        side = round(float(s[i]) * h * 0.45)
        if side == 0:
            continue
        top, left = torch.randint(0, h - side + 1, (2,), generator=g).tolist()
        out[i, :, top : top + side, left : left + side] = torch.rand(1, generator=g).item()
    return out


def _impulse(x: Tensor, s: Tensor, g: torch.Generator) -> Tensor:
    u = torch.rand(x[:, :1].shape, generator=g)
    p = 0.12 * s.view(-1, 1, 1, 1)
    value = (torch.rand(x[:, :1].shape, generator=g) < 0.5).float()
    return torch.where(u < p, value, x)


def _posterize(x: Tensor, s: Tensor, g: torch.Generator) -> Tensor:
    levels = (256 * torch.pow(2.0, -7.0 * s)).clamp_min(2).view(-1, 1, 1, 1)
    return torch.round(x * (levels - 1)) / (levels - 1)


_FNS = {
    "warp": _warp,
    "ghost": _ghost,
    "occlude": _occlude,
    "impulse": _impulse,
    "posterize": _posterize,
}


def structural_distort(
    x: Tensor, kind: str, strength: Tensor, generator: torch.Generator
) -> Tensor:
    """Apply one of :data:`EVAL_DISTORTIONS` at per-image ``strength`` in ``[0, 1]`` (batched).

    Args:
        x: images ``[N, 3, H, W]`` in ``[0, 1]``.
        kind: a name from :data:`EVAL_DISTORTIONS`.
        strength: ``[N]`` severities; 0 leaves the image as is.
        generator: randomness of the distortion.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in _FNS:
        raise ValueError(f"unknown distortion {kind!r}; choose from {EVAL_DISTORTIONS}")
    out = _FNS[kind](x, strength.float(), generator)
    return torch.where(strength.view(-1, 1, 1, 1) > 0, out, x).clamp(0, 1)


def ladders(x: Tensor, levels: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Severity ladders ``[N, levels+1, 3, H, W]`` (random kind per image) and targets ``[N, levels+1]``."""
    kinds = torch.randint(0, len(EVAL_DISTORTIONS), (len(x),), generator=generator)
    rungs = []
    for level in range(levels + 1):
        rung = x.clone()
        for k, kind in enumerate(EVAL_DISTORTIONS):
            chosen = kinds == k
            if chosen.any() and level > 0:
                s = torch.full((int(chosen.sum()),), level / levels)
                rung[chosen] = structural_distort(x[chosen], kind, s, generator)
        rungs.append(rung)
    target = 1.0 - torch.arange(levels + 1, dtype=torch.float32) / levels
    return torch.stack(rungs, 1), target.expand(len(x), -1)


class PatchQualityNet(nn.Module):
    """A plain CNN quality model: ``[B, 3, H, W]`` in ``[0, 1]`` to scores ``[B]`` in ``(0, 1)``.

    Example:
        >>> net = PatchQualityNet(width=8)
        >>> net(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.width = width
        w = width
        layers: list[nn.Module] = []
        for cin, cout, stride in [(3, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2)]:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(8 * w, 4 * w), nn.GELU(), nn.Linear(4 * w, 1))

    def logits(self, images: Tensor) -> Tensor:
        """Unbounded scores ``[B]``."""
        f = self.body(images * 2 - 1)
        pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return self.head(pooled).squeeze(1)

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(images))

    def save_pretrained(self, folder: str | Path, metadata: dict | None = None) -> None:
        """``model.safetensors`` + ``config.json`` in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(dict(self.state_dict()), folder / "model.safetensors")
        config = {
            "architecture": "PatchQualityNet",
            "width": self.width,
            "metadata": metadata or {},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PatchQualityNet:
        """Load a frozen, eval-mode evaluator saved by :meth:`save_pretrained`."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        net = cls(width=config["width"])
        net.load_state_dict(load_file(folder / "model.safetensors"))
        return net.requires_grad_(False).eval()
