"""Any differentiable no-reference metric of pyiqa as a frozen ACPO quality head.

pyiqa (``pip install 'acpo-lightning[iqa]'``; PolyForm Noncommercial licence) is imported only
when a :class:`PyiqaQualityHead` is built, so the rest of the package works without it.

What the adapter changes compared with ``pyiqa.create_metric(name, as_loss=True)``:

- it calls the metric's network directly: no ``set_grad_enabled`` switch, no input-range assert,
  no device picked behind your back (the head is built on the CPU; move it with ``.to()``);
- it stays in eval mode and frozen (MANIQA, for one, random-crops in train mode);
- it saves and restores torch's global cuDNN / determinism flags around everything pyiqa runs;
- while pyiqa builds the metric, and only then, every ``torch.load`` that pyiqa's own modules
  make is forced to ``weights_only=True`` (pyiqa unpickles some weight files, which would run
  code a crafted file carries); ``torch.load`` is the original function again afterwards, also
  when pyiqa raises (see ``pyiqa_loading._weights_only_loads``);
- when a weight file is neither cached nor downloadable it raises one :class:`PyiqaWeightsError`
  naming the metric, pyiqa's cache folder and ``TORCH_HOME``; with ``HF_HUB_OFFLINE=1`` it does
  not try the network at all;
- images the metric cannot score (NIQE/BRISQUE on a flat image or a pure ramp: zero local
  variance) get the worst nominal score and no gradient instead of NaN, and are counted in
  ``unscorable_images``. Training calls (gradient enabled) do this on the device, without a host
  sync; calls without gradient (evaluation, the pre-training probe) also warn, naming the images,
  and the probe refuses a head that cannot score its random images.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from acpo_lightning.quality.base import QualityHead
from acpo_lightning.quality.pyiqa_loading import (  # noqa: F401  (tests reach them here)
    PyiqaWeightsError,
    _hub_offline,
    _pyiqa_downloads,
    _torch_flags_preserved,
    _weights_message,
    _weights_only_loads,
)

#: Dataset-level metrics: they score a set of images, not each image.
_SET_METRICS = frozenset({"fid", "sfid", "fid_dinov2", "inception_score"})
#: Metrics pyiqa's own gradient test leaves out because they have no useful input gradient.
_NOT_DIFFERENTIABLE = frozenset({"pi", "nrqm", "entropy"})
#: Smallest side each classical metric can score (NIQE works on 96x96 blocks).
_MIN_SIZE = {"niqe": 96, "niqe_matlab": 96, "ilniqe": 84}
#: Defaults where pyiqa's are wasteful for a differentiable head: MANIQA averages 20 crops of
#: 224 px, all identical once the input is resized to 224, so one crop gives the same score.
_DEFAULTS: dict[str, dict[str, Any]] = {
    name: {"native_size": 224, "options": {"test_sample": 1}}
    for name in ("maniqa", "maniqa-kadid", "maniqa-pipal")
}
#: Keyword under which a prompt-aware metric takes the prompts.
_PROMPT_KEYWORD = {"clipscore": "caption_list"}


class PyiqaQualityHead(QualityHead):
    """A frozen, differentiable pyiqa no-reference metric.

    Direction comes from pyiqa's ``lower_better`` flag; the nominal range from pyiqa's
    ``score_range`` entry (``"~0, ~100"`` reads as ``(0, 100)``). Some common metrics:

    ============  ================  ===========  ====================================
    metric        higher_is_better  score_range  resizing by this head (native_size)
    ============  ================  ===========  ====================================
    maniqa        True              (0, 1)       to 224, scored as one 224 crop
    topiq_nr      True              (0, 1)       none
    musiq         True              (0, 100)     none
    clipiqa+      True              (0, 1)       none
    niqe          False             (0, 100)     none; sides below 96 px are refused
    brisque       False             (0, 150)     none
    ============  ================  ===========  ====================================

    Natural photos score far inside the nominal span (NIQE about 3-20, BRISQUE about 0-100); pass
    ``score_range`` to normalize over the span your images actually cover.

    Args:
        metric_name: a pyiqa NR metric name (``pyiqa.list_models(metric_mode="NR")``).
        pretrained_model_path: local weights, skipping pyiqa's download (NIQE: a ``.mat``, BRISQUE:
            a ``(sv_coef, sv)`` ``.pth``; see :func:`acpo_lightning.quality.assets.fetch_classic_iqa_params`).
        score_range: override of the nominal ``(low, high)``; required where pyiqa leaves a bound open.
        native_size: side length inputs are resized to (default: the table above, else no resize).
        **metric_options: passed to pyiqa's network constructor (e.g. ``test_sample=1``).

    Attributes:
        unscorable_images: how many images so far got the worst score because the metric returned
            NaN/inf or failed on them (a long tensor on the scores' device; reading it syncs).

    Raises:
        ImportError: pyiqa is not installed.
        ValueError: the metric is unknown, full-reference, dataset-level or not differentiable.
        FileNotFoundError: ``pretrained_model_path`` does not exist.
        PyiqaWeightsError: weights are missing and cannot be downloaded.

    Example:
        >>> from acpo_lightning.quality.assets import fetch_classic_iqa_params
        >>> head = PyiqaQualityHead("niqe", fetch_classic_iqa_params().niqe)  # doctest: +SKIP
        >>> head(torch.rand(2, 3, 128, 128)).shape  # doctest: +SKIP
        torch.Size([2])
    """

    def __init__(
        self,
        metric_name: str,
        pretrained_model_path: str | Path | None = None,
        score_range: tuple[float, float] | None = None,
        native_size: int | None = None,
        **metric_options: Any,
    ) -> None:
        super().__init__()
        pyiqa = _import_pyiqa()
        config = _metric_config(metric_name)
        defaults = _DEFAULTS.get(metric_name, {})
        self.metric_name = metric_name
        self.higher_is_better = not config.get("lower_better", False)
        self.score_range = _resolve_range(metric_name, config.get("score_range"), score_range)
        self.native_size = native_size if native_size is not None else defaults.get("native_size")
        self.min_size = _MIN_SIZE.get(metric_name)
        options = {**defaults.get("options", {}), **metric_options}
        if pretrained_model_path is not None:
            options["pretrained_model_path"] = str(
                _existing_file(metric_name, pretrained_model_path)
            )
        with _torch_flags_preserved(), _pyiqa_downloads(pyiqa, metric_name), _weights_only_loads():
            metric = pyiqa.create_metric(
                metric_name, as_loss=True, device=torch.device("cpu"), **options
            )
        self.net = metric.net
        self._warned = False
        #: Images scored as the worst score so far; a plain tensor, not a buffer, so that DDP does
        #: not overwrite each rank's count with rank 0's.
        self.unscorable_images = torch.zeros((), dtype=torch.long)
        self.freeze()

    def extra_repr(self) -> str:
        return f"metric_name={self.metric_name!r}, score_range={self.score_range}"

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        """Score images with the pyiqa network; an image it cannot score gets the worst score.

        With gradient enabled (a training step) non-finite scores are replaced on the device, with
        no host sync; without (evaluation, the probe) the batch is checked on the host and rescored
        image by image, with a warning naming the images.
        """
        self._check_size(images)
        inputs = _with_finite_grad(images)
        with _torch_flags_preserved():
            try:
                out = self._run(inputs, prompts)
            except (torch.linalg.LinAlgError, AssertionError):
                return self._score_each(inputs, prompts)
            if not torch.is_grad_enabled():  # a host sync costs nothing outside training steps
                return out if bool(torch.isfinite(out).all()) else self._score_each(inputs, prompts)
        finite = torch.isfinite(out)
        self._count_unscorable((~finite).sum())
        return torch.where(finite, out, torch.full_like(out, self._worst))

    @property
    def _worst(self) -> float:
        return self.score_range[0] if self.higher_is_better else self.score_range[1]

    def _count_unscorable(self, count: Tensor | int) -> None:
        device = count.device if isinstance(count, Tensor) else self.unscorable_images.device
        self.unscorable_images = self.unscorable_images.to(device) + count

    def _run(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        keyword = _PROMPT_KEYWORD.get(self.metric_name)
        kwargs = {keyword: prompts} if keyword and prompts is not None else {}
        out = self.net(images, **kwargs)
        out = out[0] if isinstance(out, tuple | list) else out
        if out.numel() != images.shape[0]:
            raise ValueError(
                f"pyiqa metric {self.metric_name!r} returned shape {tuple(out.shape)} for "
                f"{images.shape[0]} images; PyiqaQualityHead supports metrics with one score per image."
            )
        return out.reshape(-1).to(images.dtype)

    def _score_each(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        """Score one image at a time; an image that fails gets the worst nominal score, no gradient."""
        worst = self._worst
        scores, failed = [], []
        for i in range(images.shape[0]):
            one_prompt = None if prompts is None else prompts[i : i + 1]
            try:
                value = self._run(images[i : i + 1], one_prompt)
            except (torch.linalg.LinAlgError, AssertionError):
                value = images.new_full((1,), float("nan"))
            if not torch.isfinite(value).all():
                failed.append(i)
                value = images.new_full((1,), worst)
            scores.append(value)
        self._count_unscorable(len(failed))
        if failed and not self._warned:
            self._warned = True
            warnings.warn(
                f"pyiqa metric {self.metric_name!r} cannot score images {failed} of this batch "
                f"(no local variance: flat or a pure ramp); they get the worst score {worst} and no "
                "gradient. Further occurrences are not reported.",
                RuntimeWarning,
                stacklevel=3,
            )
        return torch.cat(scores)

    def _check_size(self, images: Tensor) -> None:
        if self.min_size is not None and min(images.shape[-2:]) < self.min_size:
            raise ValueError(
                f"pyiqa metric {self.metric_name!r} needs images of at least {self.min_size} px per "
                f"side, got {tuple(images.shape[-2:])}; pass native_size={self.min_size} (or more) "
                "to resize inputs before scoring."
            )


def _import_pyiqa():
    try:
        return importlib.import_module("pyiqa")
    except ImportError as err:
        raise ImportError(
            "PyiqaQualityHead needs pyiqa: `pip install 'acpo-lightning[iqa]'` (pyiqa is licensed "
            "PolyForm Noncommercial). Without it, use TwoStreamIQA or SharpnessHead."
        ) from err


def _metric_config(metric_name: str) -> dict[str, Any]:
    """pyiqa's default configuration of ``metric_name``, after checking it suits a quality head."""
    configs = importlib.import_module("pyiqa.default_model_configs").DEFAULT_CONFIGS
    nr_metrics = sorted(k for k, v in configs.items() if v.get("metric_mode") == "NR")
    if metric_name not in configs:
        close = difflib.get_close_matches(metric_name, nr_metrics, n=3)
        raise ValueError(
            f"unknown pyiqa metric {metric_name!r}; close names: {close}. "
            "`pyiqa.list_models(metric_mode='NR')` lists the no-reference metrics."
        )
    config = configs[metric_name]
    if config.get("metric_mode") != "NR":
        raise ValueError(
            f"pyiqa metric {metric_name!r} is full-reference (it compares with a reference image); "
            "a quality head needs a no-reference metric such as 'maniqa', 'topiq_nr' or 'niqe'."
        )
    if metric_name in _SET_METRICS | _NOT_DIFFERENTIABLE:
        kind = "scores a set of images" if metric_name in _SET_METRICS else "has no useful gradient"
        raise ValueError(
            f"pyiqa metric {metric_name!r} {kind}, so it cannot guide ACPO; choose a differentiable "
            "per-image metric such as 'maniqa', 'topiq_nr', 'musiq', 'clipiqa+', 'niqe' or 'brisque'."
        )
    return config


def _resolve_range(metric_name: str, pyiqa_range: str | None, override) -> tuple[float, float]:
    """Parse pyiqa's ``"~0, ~100"`` notation, or validate the caller's override."""
    if override is not None:
        low, high = (float(v) for v in override)
    else:
        bounds = [part.strip().lstrip("~") for part in (pyiqa_range or ",").split(",")]
        if len(bounds) != 2 or not all(bounds):
            raise ValueError(
                f"pyiqa gives metric {metric_name!r} the open range {pyiqa_range!r}; pass "
                "score_range=(low, high) spanning the scores of your images."
            )
        low, high = float(bounds[0]), float(bounds[1])
    if not high > low:
        raise ValueError(
            f"score_range for {metric_name!r} must have high > low, got {(low, high)}."
        )
    return (low, high)


def _existing_file(metric_name: str, path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        hint = (
            " acpo_lightning.quality.assets.fetch_classic_iqa_params() makes NIQE/BRISQUE files."
            if metric_name in ("niqe", "brisque")
            else ""
        )
        raise FileNotFoundError(
            f"pretrained_model_path {str(path)!r} for pyiqa metric {metric_name!r} does not exist.{hint}"
        )
    return path


def _with_finite_grad(images: Tensor) -> Tensor:
    """A view of ``images`` whose gradient has NaN/inf replaced by 0 (classical NSS features can
    have infinite local derivatives at zero variance even when the score itself is finite)."""
    if not images.requires_grad:
        return images
    view = images.view_as(images)
    view.register_hook(lambda grad: torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0))
    return view
