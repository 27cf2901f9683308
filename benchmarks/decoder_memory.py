"""Peak memory and time of the perceptual path's decode: checkpointing granularity and crops.

One image's x0 estimate is decoded by SD's VAE decoder layout (real widths, random weights),
scored by the ResNet-50 head and back-propagated to the latents, as the perceptual path does.
Each setting runs in its own fresh process, so its peak is its own: the growth of the peak
resident set (CPU) or of ``max_memory_allocated`` (CUDA) over the process's state after the
models were built, and the median time of ``--repeats`` runs after one warm-up.

- ``none``: no checkpointing (every activation kept for the backward pass);
- ``block``: diffusers' own checkpointing, one up-block at a time (before issue 18);
- ``resnet``: ``codec.checkpoint_resnets``, one ResNet block at a time (now);
- ``*_crop``: the latent window of one head-sized crop (``PerceptualCrop``, margin 4).

    python benchmarks/decoder_memory.py                 # 512 px, about 6 minutes on 2 CPU cores
    python benchmarks/decoder_memory.py --latent 32     # 256 px
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from step_cost import PeakMemory, cpu_name, iqa_sized_head, sd15_vae, timed_steps

SETTINGS = ("none", "block", "resnet", "block_crop", "resnet_crop")


def measure(setting: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    from acpo_lightning.codec import checkpoint_resnets

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    vae = sd15_vae(1.0).to(device).requires_grad_(False)
    head = iqa_sized_head(args.head_size).to(device)
    if setting.startswith("block"):
        vae.enable_gradient_checkpointing()
    elif setting.startswith("resnet"):
        vae.enable_gradient_checkpointing(checkpoint_resnets)
    crop = setting.endswith("crop")
    side = min(args.latent, args.head_size // 8 + 2 * args.margin) if crop else args.latent
    latents = torch.randn(1, 4, side, side, device=device)

    def step() -> None:
        x = latents.clone().requires_grad_(True)
        image = (vae.decode(x).sample / 2 + 0.5).clamp(0, 1)
        if crop:
            image = image[..., : args.head_size, : args.head_size]
        head(image).sum().backward()

    memory = PeakMemory(device.type == "cuda")
    times = timed_steps(step, device.type == "cuda", 1, args.repeats)
    peak = memory.growth()
    queue.put({"setting": setting, "window": side, "peak_mib": peak / 2**20,
               "seconds": statistics.median(times)})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latent", type=int, default=64, help="latent side (image = 8x)")
    parser.add_argument("--head-size", type=int, default=224, help="head input = crop side")
    parser.add_argument("--margin", type=int, default=4, help="latents around a crop")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/decoder_memory.json"))
    args = parser.parse_args()
    context = mp.get_context("spawn")
    rows = []
    for setting in args.settings:
        queue = context.Queue()
        process = context.Process(target=measure, args=(setting, args, queue))
        process.start()
        rows.append(queue.get())
        process.join()
        print(rows[-1], flush=True)
    base = next((r for r in rows if r["setting"] == "block"), rows[0])
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"\n{args.latent * 8} px, {machine}; ratios against `{base['setting']}`")
    print(
        "| decode of one image, fwd+bwd | window (latents) | peak MiB | x | s | x |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(f"| {r['setting']} | {r['window']} | {r['peak_mib']:,.0f} | "
              f"{r['peak_mib'] / base['peak_mib']:.2f} | {r['seconds']:.2f} | "
              f"{r['seconds'] / base['seconds']:.2f} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "settings": vars(args) | {"out": str(args.out)},
                                    "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
