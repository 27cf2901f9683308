"""The demo's independent quality evaluator: another architecture, other distortion families.

The guidance head (``TwoStreamIQA``) learns from Gaussian blur, Gaussian noise, JPEG, downscale
and contrast ladders of the first 3,000 Fashion-MNIST train images, and from real-versus-generated
pairs. This evaluator shares none of that: it is a plain CNN (GroupNorm, GELU, global average+max
pooling; no gradient stream) trained on train images from :data:`EVAL_TRAIN_START` on, never on
generated ones, to rank two families of corruptions:

* softness, the defects of a diffusion generator, through other kernels than the head's: defocus
  (a flat disk), motion (a streak), smudge (detail washed out inside soft random blobs) and median
  (a median filter's loss of thin strokes and texture);
* structure: elastic warps, ghosting (a blend with another image), occlusions, impulse noise and
  posterization.

Severities are calibrated across kinds (:data:`SEVERITY_KNOTS`), so an ACPO gain it confirms is
not an artefact of optimizing the guidance head itself. Images ``[B, 3, H, W]`` in ``[0, 1]``,
score in ``(0, 1)``, higher is better.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

# Train images from this index on (the guidance head learns from the first 3,000).
EVAL_TRAIN_START = 3000

SOFTNESS = ("defocus", "motion", "smudge", "median")
STRUCTURAL = ("warp", "ghost", "occlude", "impulse", "posterize")
EVAL_DISTORTIONS = SOFTNESS + STRUCTURAL

# A strength s in [0, 1] sets each kind's own parameter by piecewise-linear interpolation between
# five knots, at s = 0, 1/4, 1/2, 3/4 and 1 (the first knot leaves the image as it is). The knots
# are calibrated so that one level does about the same harm in every kind: the mean 1 - SSIM
# (7x7 window, grey) to the clean image is about 0.07, 0.14, 0.21, 0.28 at the four levels on
# Fashion-MNIST train images, raised where a level would be invisible without the clean image
# (warp, ghost, occlude, posterize: SSIM overrates sub-pixel shifts and underrates banding and
# faint overlays; a first probe ranked those four worst at the SSIM-equal knots). Comparable levels across kinds
# are what make one pooled ranking over all kinds meaningful.
SEVERITY_KNOTS: dict[str, tuple[float, float, float, float, float]] = {
    "defocus": (0.5, 0.8, 1.2, 1.6, 2.0),  # disk radius, px (0.5: a single pixel)
    "motion": (0.0, 1.5, 2.5, 3.5, 4.5),  # streak length, px
    "smudge": (0.0, 0.4, 0.6, 0.8, 1.0),  # blob coverage 0.15 + 0.55 p, blur radius 1 + 2 p px
    "median": (0.0, 0.75, 1.25, 1.75, 2.35),  # 0-1-2-3: to the 3x3, 5x5, 7x7 medians
    "warp": (0.0, 0.8, 1.3, 1.8, 2.3),  # displacement, px rms
    "ghost": (0.0, 0.1, 0.18, 0.26, 0.34),  # weight of a shifted other image
    "occlude": (0.0, 0.25, 0.33, 0.41, 0.5),  # side of a flat square on the object / height
    "impulse": (0.0, 0.008, 0.016, 0.027, 0.04),  # fraction of salt-and-pepper pixels
    "posterize": (8.0, 2.6, 2.0, 1.5, 1.0),  # bits of grey levels
}


def severity_parameter(kind: str, strength: Tensor) -> Tensor:
    """The parameter of ``kind`` at ``strength`` ``[N]`` in ``[0, 1]`` (see :data:`SEVERITY_KNOTS`)."""
    knots = torch.tensor(SEVERITY_KNOTS[kind])
    pos = strength.float().clamp(0, 1) * (len(knots) - 1)
    i = pos.floor().long().clamp(max=len(knots) - 2)
    return knots[i] + (pos - i) * (knots[i + 1] - knots[i])


def _filter(x: Tensor, kernels: Tensor) -> Tensor:
    """Convolve each image with its own normalized ``[k, k]`` kernel (``kernels [N, k, k]``)."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    weight = (kernels / kernels.sum((1, 2), keepdim=True)).repeat_interleave(c, 0)[:, None]
    padded = F.pad(x.reshape(1, n * c, h, w), [k // 2] * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=n * c).view(n, c, h, w)


def _offsets(k: int) -> tuple[Tensor, Tensor]:
    r = torch.arange(k, dtype=torch.float32) - k // 2
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return dx, dy


def _disk(x: Tensor, radius: Tensor) -> Tensor:
    """Defocus: an anti-aliased disk kernel (flat, sharp-edged: unlike a Gaussian)."""
    dx, dy = _offsets(2 * math.ceil(float(radius.max())) + 1)
    d = torch.sqrt(dx**2 + dy**2)
    return _filter(x, (radius.view(-1, 1, 1) + 0.5 - d).clamp(0, 1))


def _defocus(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    return _disk(x, p)


def _motion(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    """A straight streak of length ``p`` px at a random angle."""
    angle = torch.rand(len(x), generator=g) * math.pi
    ux, uy = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    dx, dy = _offsets(2 * math.ceil(float(p.max()) / 2) + 1)
    half = p.view(-1, 1, 1) / 2
    t = (dx * ux + dy * uy).clamp(-half, half)
    dist = torch.sqrt((dx - t * ux) ** 2 + (dy - t * uy) ** 2)
    return _filter(x, (1 - dist).clamp(0, 1))


def _blobs(n: int, h: int, w: int, coverage: Tensor, g: torch.Generator) -> Tensor:
    """Soft random blobs ``[N, 1, H, W]`` in ``[0, 1]`` covering about ``coverage`` of each image."""
    field = F.interpolate(torch.randn(n, 1, 5, 5, generator=g), size=(h, w), mode="bicubic")
    field = (field - field.mean((2, 3), keepdim=True)) / field.std((2, 3), keepdim=True)
    threshold = torch.special.ndtri(1 - coverage).view(-1, 1, 1, 1)
    return torch.sigmoid((field - threshold) / 0.2)


def _smudge(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    """Detail washed out inside soft random blobs: a local, partial defocus."""
    n, _, h, w = x.shape
    mask = _blobs(n, h, w, 0.15 + 0.55 * p, g)
    return x + mask * (_disk(x, 1 + 2 * p) - x)


def _median(x: Tensor, size: int) -> Tensor:
    if x.shape[1] > 1 and torch.equal(
        x[:, :1].expand_as(x), x
    ):  # grey images: one channel is enough (3x faster)
        return _median(x[:, :1], size).expand_as(x)
    n, c, h, w = x.shape
    patches = F.unfold(F.pad(x, [size // 2] * 4, mode="replicate"), size)
    return patches.view(n, c, size * size, h, w).median(2).values


def _median_blend(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    """Detail loss of a median filter: thin strokes and texture vanish, edges stay.

    ``p`` in ``[0, 3]`` walks from the image to its 3x3, 5x5 and 7x7 medians.
    """
    a = p.view(-1, 1, 1, 1)
    needed = min(3, math.ceil(float(p.max())))  # the larger medians cost the most
    steps = [x] + [_median(x, size) for size in (3, 5, 7)[:needed]]
    steps += [steps[-1]] * (4 - len(steps))
    out = x
    for i in range(3):
        t = (a - i).clamp(0, 1)
        out = torch.where(a > i, steps[i] + t * (steps[i + 1] - steps[i]), out)
    return out


def _warp(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    flow = torch.randn(n, 2, 4, 4, generator=g)
    flow = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=False)
    flow = flow / flow.flatten(1).std(1).view(-1, 1, 1, 1).clamp_min(1e-6)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], -1).expand(n, h, w, 2)
    offset = flow.permute(0, 2, 3, 1) * (p.view(-1, 1, 1, 1) * 2.0 / h)  # p px rms
    return F.grid_sample(x, grid + offset, padding_mode="border", align_corners=True)


def _ghost(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    other = x[torch.randperm(len(x), generator=g)]
    shift = torch.randint(-4, 5, (2,), generator=g).tolist()
    other = torch.roll(other, shifts=shift, dims=(2, 3))
    a = p.view(-1, 1, 1, 1)
    return (1 - a) * x + a * other


def _occlude(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    """A flat grey square centred on a random pixel of the object (never lost in the background)."""
    n, _, h, w = x.shape
    out = x.clone()
    weights = (x.mean(1).flatten(1) > 0.1).float() + 1e-3
    centres = torch.multinomial(weights, 1, generator=g).squeeze(1).tolist()
    for i in range(n):
        side = max(1, round(float(p[i]) * h))
        top = min(max(centres[i] // w - side // 2, 0), h - side)
        left = min(max(centres[i] % w - side // 2, 0), w - side)
        out[i, :, top : top + side, left : left + side] = torch.rand(1, generator=g).item()
    return out


def _impulse(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    u = torch.rand(x[:, :1].shape, generator=g)
    value = (torch.rand(x[:, :1].shape, generator=g) < 0.5).float()
    return torch.where(u < p.view(-1, 1, 1, 1), value, x)


def _posterize(x: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
    levels = torch.pow(2.0, p).view(-1, 1, 1, 1)
    return torch.round(x * (levels - 1)) / (levels - 1)


_FNS = {
    "defocus": _defocus,
    "motion": _motion,
    "smudge": _smudge,
    "median": _median_blend,
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

    The strength sets the kind's own parameter through :func:`severity_parameter`; equal
    strengths do about equal harm across kinds.

    Args:
        x: images ``[N, 3, H, W]`` in ``[0, 1]``.
        kind: a name from :data:`EVAL_DISTORTIONS`.
        strength: ``[N]`` severities; 0 leaves the image as is.
        generator: randomness of the distortion.

    Returns:
        The distorted images ``[N, 3, H, W]`` in ``[0, 1]``.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in _FNS:
        raise ValueError(f"unknown distortion {kind!r}; choose from {EVAL_DISTORTIONS}")
    strength = strength.float()
    out = _FNS[kind](x, severity_parameter(kind, strength), generator)
    return torch.where(strength.view(-1, 1, 1, 1) > 0, out, x).clamp(0, 1)


def ladders(
    x: Tensor,
    levels: int,
    generator: torch.Generator,
    kinds: tuple[str, ...] = EVAL_DISTORTIONS,
) -> tuple[Tensor, Tensor]:
    """Severity ladders of ``x``: one random kind of ``kinds`` per image, strengths ``0 .. 1``.

    Args:
        x: images ``[N, 3, H, W]`` in ``[0, 1]``.
        levels: rungs above the clean image.
        generator: picks the kinds and drives the distortions.
        kinds: the distortion kinds to draw from (e.g. one kind, for a per-family figure).

    Returns:
        Ladders ``[N, levels+1, 3, H, W]`` (rung 0 is ``x``) and targets ``1 - level/levels``
        ``[N, levels+1]``.
    """
    picks = torch.randint(0, len(kinds), (len(x),), generator=generator)
    rungs = [x]
    for level in range(1, levels + 1):
        rung = x.clone()
        for k, kind in enumerate(kinds):
            chosen = picks == k
            if chosen.any():
                s = torch.full((int(chosen.sum()),), level / levels)
                rung[chosen] = structural_distort(x[chosen], kind, s, generator)
        rungs.append(rung)
    target = 1.0 - torch.arange(levels + 1, dtype=torch.float32) / levels
    return torch.stack(rungs, 1), target.expand(len(x), -1)


class PatchQualityNet(nn.Module):
    """A plain CNN quality model: ``[B, 3, H, W]`` in ``[0, 1]`` to scores ``[B]`` in ``(0, 1)``.

    It meets the ``QualityHead`` contract (``higher_is_better``, ``score_range``, prompts accepted
    and ignored), so the training callbacks score with it as with any head; it never guides.

    Example:
        >>> net = PatchQualityNet(width=8)
        >>> net(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    higher_is_better = True
    score_range = (0.0, 1.0)

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

    def forward(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """Scores ``[B]`` in ``(0, 1)``; ``prompts`` is ignored (a no-reference model)."""
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
