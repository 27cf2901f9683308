"""The sweeps of the ablation study: settings, points, run names and each run's config overlay.

Pure definitions (no model is loaded here): :data:`SETTINGS` holds ``smoke`` and ``full``; a
:class:`Sweep` is a knob and its :class:`Point` values; points that are the same run (the demo
itself appears in several sweeps) get the same :func:`run_name` and are trained once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``configs/demo.yaml`` of the source checkout this package runs from (``src/acpo_demo`` -> root).
DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
#: The study's base setting: the demo's settings when the study was designed and measured
#: (``docs/ablations.md``: rollout objective, ``w_anchor`` 1, the TwoStream guidance head;
#: ``anchor_delta`` is the module's default). Every run's overlay sets these and
#: :data:`ABLATION_HEAD`, so the sweeps stay what they measured whatever ``configs/demo.yaml``
#: ships now; a run is named after the knobs that differ from these.
ABLATION_BASE: dict[str, Any] = {
    "model.w_anchor": 1.0,
    "model.w_perc": 1.0,
    "model.tau": 400,
    "model.k_late": 3,
    "model.perceptual_share": 0.25,
    "model.objective": "rollout",
    "model.anchor_mode": "penalty",
    "model.anchor_delta": 1e-3,
}
#: The guidance head of the study's runs (``configs/demo.yaml`` now guides with a composite).
ABLATION_HEAD = {"class_path": "acpo_demo.load_demo_guidance_head"}
#: Allowed mean drift of the constraint-mode point: about a third of the anchor penalty (data +
#: rollout) that the demo's penalty run (w_anchor 1) logs in training, so that the constraint binds.
CONSTRAINT_DELTA = 5e-3


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its label in tables and plots, and its changes to ``demo.yaml``.

    Example:
        >>> Point("0", (("model.w_anchor", 0.0),)).run
        'w_anchor=0'
    """

    label: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def run(self) -> str:
        """The name of the run this point is (shared by points with the same effective config)."""
        return run_name(dict(self.overrides))


@dataclass(frozen=True)
class Sweep:
    """A knob and its values; ``how`` says in markdown how the knob acts in this setting.

    Example:
        >>> sweep = axis("w_anchor", (0.0, 1.0), "the anchor weight")
        >>> [p.run for p in sweep.points]
        ['w_anchor=0', 'default']
    """

    name: str
    title: str
    how: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Setting:
    """How long every run trains, how it is evaluated, and which sweeps run.

    Args:
        name: ``smoke`` or ``full``.
        max_steps: optimizer steps per run (the demo: 80).
        per_class: held-out prompts per class in the evaluation (the demo: 2, i.e. 20 prompts).
        seeds: evaluation seeds per prompt (the demo: 12).
        real_count: real test images of the KID reference (the demo: 1000).
        sweeps: the sweeps.
        batch_size: images per data batch and prompts per rollout (``None``: the demo's 16).
        threads: torch CPU threads while the sweep runs (``None``: torch's default, all cores).
            Both settings use 1: the demo's small convolutions gain little from a second thread
            (1 thread: about 2 s per rollout step, as `make demo` with 2), and on a machine that
            other jobs share, two threads waiting on each other at every small op made steps up
            to 50 times slower.

    Example:
        >>> import dataclasses
        >>> quick = dataclasses.replace(SETTINGS["full"], max_steps=20, seeds=4)
        >>> len(plan(quick, ["w_anchor"]))
        4
    """

    name: str
    max_steps: int
    per_class: int
    seeds: int
    real_count: int
    sweeps: tuple[Sweep, ...]
    batch_size: int | None = None
    threads: int | None = None

    def evaluation_key(self) -> dict[str, int]:
        """What an evaluation depends on (a cached run is reused only when this matches)."""
        return {"per_class": self.per_class, "seeds": self.seeds, "real_count": self.real_count}


def axis(
    knob: str, values: tuple, title: str, how: str = "", common: Mapping[str, Any] | None = None
) -> Sweep:
    """A sweep of ``model.<knob>`` over ``values``, each point with the ``common`` overrides too."""
    common = dict(common or {})
    points = tuple(
        Point(_fmt(value), tuple({**common, f"model.{knob}": value}.items())) for value in values
    )
    return Sweep(knob, title, how, points)


def demo_sweeps(
    w_anchor: tuple, w_perc: tuple, tau: tuple, share: tuple, delta: float = CONSTRAINT_DELTA
) -> tuple[Sweep, ...]:
    """The five sweeps of the ablation study with the given values (see ``docs/ablations.md``)."""
    return (
        axis("w_anchor", w_anchor, "Anchor weight `w_anchor`", _HOW["w_anchor"]),
        axis("w_perc", w_perc, "Perceptual weight `w_perc`", _HOW["w_perc"]),
        axis("tau", tau, "Late-denoising gate `tau`", _HOW["tau"], {"model.k_late": 6}),
        axis(
            "perceptual_share",
            share,
            "Perceptual share `perceptual_share`",
            _HOW["perceptual_share"],
            {"model.objective": "data"},
        ),
        Sweep(
            "anchor_mode",
            "Anchor mode: penalty vs constraint",
            _HOW["anchor_mode"].format(delta=_fmt(delta)),
            (
                Point("penalty"),
                Point(
                    f"constraint (δ={_fmt(delta)})",
                    (("model.anchor_mode", "constraint"), ("model.anchor_delta", delta)),
                ),
            ),
        ),
    )


_HOW = {
    "w_anchor": (
        "Weight of the anchor penalty ‖f − f_base‖² on the data batch and on the rollout step. "
        "0 removes the anchor: the central ablation of the paper's claim that the anchor keeps "
        "perceptual optimization stable."
    ),
    "w_perc": (
        "Weight of the perceptual reward on the scored rollout step. 0 is the control of "
        "`make demo` (the same LoRA training without guidance)."
    ),
    "tau": (
        "In rollout mode `tau` gates the scored rollout step only (perceptual gradient iff "
        "t ≤ tau). The demo samples DDIM 10 steps, t = 900, 800, …, 100, 0, and with `k_late: 3` "
        "the scored step is one of t = 200, 100, 0, so every tau ≥ 200 is the same run. This sweep "
        "widens `k_late` to 6 (scored step t ∈ {500, …, 0}): tau 100 opens the gate on 2 of the 6 "
        "candidates, 300 on 4, 600 on all 6 (no gating). The *gate open* column is the share of "
        "steps whose perceptual loss was non-zero. (tau also bounds the timesteps of the data "
        "term's perceptual share, [0, tau].)"
    ),
    "perceptual_share": (
        "`perceptual_share` is a knob of the data objective: the share of each real batch drawn "
        "from [t_min, tau], decoded and scored. The demo's rollout objective scores no data "
        "sample, so there the share would only move a few of the diffusion loss's timesteps; this "
        "sweep trains with `objective: data` (x0 estimates of noised real images are scored; "
        "0 is its control without perceptual signal). The *perc share* column is the logged "
        "`train/perc_share`."
    ),
    "anchor_mode": (
        "`penalty` keeps `w_anchor` at 1; `constraint` adapts it by dual ascent (`dual_lr` 10) "
        "so that the running mean of the anchor penalty (data batch + rollout, about 0.014 in "
        "`make demo`'s penalty run) tracks `anchor_delta` = {delta}: the user sets an allowed "
        "drift instead of a weight. The curves show the constrained penalty against δ and the "
        "dual variable `w_anchor`."
    ),
}

SETTINGS: dict[str, Setting] = {
    "smoke": Setting(
        name="smoke",
        max_steps=3,
        per_class=1,
        seeds=2,
        real_count=200,
        batch_size=4,
        threads=1,
        sweeps=demo_sweeps(
            w_anchor=(0.0, 1.0), w_perc=(0.0, 1.0), tau=(100, 600), share=(0.25, 1.0)
        ),
    ),
    "full": Setting(
        name="full",
        max_steps=80,
        per_class=2,
        seeds=12,
        real_count=1000,
        threads=1,
        sweeps=demo_sweeps(
            w_anchor=(0.0, 0.3, 1.0, 3.0),
            w_perc=(0.0, 0.3, 1.0, 3.0),
            tau=(100, 300, 600),
            share=(0.0, 0.25, 1.0),
        ),
    ),
}


def effective_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` without the entries that equal the demo's value (they change nothing)."""
    return {k: v for k, v in overrides.items() if k not in ABLATION_BASE or ABLATION_BASE[k] != v}


def run_name(overrides: Mapping[str, Any]) -> str:
    """A file-system-safe name listing the knobs that differ from the demo (``default`` if none).

    Example:
        >>> run_name({"model.tau": 100, "model.k_late": 6, "model.w_anchor": 1.0})
        'k_late=6,tau=100'
    """
    changed = effective_overrides(overrides)
    if not changed:
        return "default"
    return ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in sorted(changed.items()))


def plan(setting: Setting, sweeps: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The distinct runs of a setting, ``name -> overrides``: the demo run first, each run once.

    Raises:
        ValueError: ``sweeps`` names a sweep the setting does not have.
    """
    known = [s.name for s in setting.sweeps]
    unknown = sorted(set(sweeps or []) - set(known))
    if unknown:
        raise ValueError(f"unknown sweep(s) {unknown}; the {setting.name} setting has {known}.")
    runs: dict[str, dict[str, Any]] = {}
    for sweep in selected_sweeps(setting, sweeps):
        for point in sweep.points:
            runs.setdefault(point.run, effective_overrides(dict(point.overrides)))
    return dict(sorted(runs.items(), key=lambda item: item[0] != "default"))


def selected_sweeps(setting: Setting, sweeps: list[str] | None = None) -> list[Sweep]:
    """The setting's sweeps, or those named in ``sweeps``."""
    return [s for s in setting.sweeps if not sweeps or s.name in sweeps]


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.tau": 100}`` -> ``{"model": {"tau": 100}}`` (the shape of a YAML overlay)."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def overlay(setting: Setting, overrides: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """The YAML overlay on ``configs/demo.yaml`` of one run (its outputs go to ``run_dir``).

    ``acpo fit --config configs/demo.yaml --config <run_dir>/overlay.yaml`` repeats the run.
    """
    dotted: dict[str, Any] = {
        **ABLATION_BASE,
        "model.quality_head": ABLATION_HEAD,
        "trainer.max_steps": setting.max_steps,
        "trainer.log_every_n_steps": 1,  # a point per step for the curves; changes no result
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        **dict(overrides),
    }
    if setting.batch_size is not None:
        dotted["data.init_args.batch_size"] = setting.batch_size
        dotted["model.rollout_batch_size"] = setting.batch_size
    tree = nested(dotted)
    tree["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "tensorboard"},
    }
    tree["trainer"]["callbacks"] = [
        {
            "class_path": "acpo_lightning.callbacks.LoRAExportCallback",
            "init_args": {"dirpath": str(run_dir / "lora")},
        }
    ]
    return tree
