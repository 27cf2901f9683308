"""FLOPs of each part of an ACPO step at full Stable Diffusion 1.5 size, counted on the meta device.

No weights and no arithmetic: the real diffusers/transformers/torchvision modules are built on
``torch.device("meta")`` and run under torch's ``FlopCounterMode``, so the count for 512 px images
takes seconds on any machine. Backward passes are counted as they run (frozen weights get no weight
gradient, so a frozen decoder's backward costs about one forward, not two). From the parts it
predicts the FLOPs ratio of an ACPO step to a plain LoRA step, with the SD VAE decoder or TAESD
(``AutoencoderTiny``) in the perceptual path, with and without cached latents. Writes
``outputs/bench/component_flops.json``.

With ``--time`` the same parts are also built with (random) weights on a real device and timed
(median of ``--repeats`` after one warm-up), with gradient checkpointing on as in
``configs/acpo.yaml`` (so a checkpointed backward also recomputes its forward): where the seconds
of a step go, next to where the FLOPs go.

    python benchmarks/component_flops.py                   # batch 4, 512 px, share 0.25
    python benchmarks/component_flops.py --batch 8 --share 0.5
    python benchmarks/component_flops.py --latent 32 --time          # + seconds at 256 px (CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from step_cost import cpu_name, iqa_sized_head, sd15_unet, sd15_vae
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def count(fn) -> float:
    """GFLOP of ``fn()`` (forward, and backward if ``fn`` runs one)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def timer(repeats: int, device: torch.device):
    """``measure(fn)``: median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""

    def measure(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return measure


def parts(
    batch: int, scored: int, latent: int, head_size: int, device: str = "meta", measure=count
) -> dict[str, float]:
    """Each part's cost: GFLOP (``measure=count``, on the meta device) or seconds (a timer)."""
    from diffusers import AutoencoderTiny
    from transformers import CLIPTextConfig, CLIPTextModel

    from acpo_lightning.models import add_lora

    torch.manual_seed(0)
    with torch.device(device):
        unet = add_lora(sd15_unet(1.0, latent), rank=16)  # LoRA r16 on the attention projections
        vae = sd15_vae(1.0).requires_grad_(False)
        taesd = AutoencoderTiny().requires_grad_(False)
        head = iqa_sized_head(head_size)
        text = CLIPTextModel(CLIPTextConfig()).requires_grad_(False)  # CLIP ViT-L/14 text tower
        images = torch.randn(batch, 3, latent * 8, latent * 8)
        latents = torch.randn(batch, 4, latent, latent)
        timesteps = torch.randint(0, 1000, (batch,))
        tokens = torch.randint(0, 49408, (batch, 77))
        cond = torch.randn(batch, 77, 768)
        scored_latents = torch.randn(scored, 4, latent, latent, requires_grad=True)
    if device != "meta":  # timed as configs/acpo.yaml trains: checkpointed UNet and decoders
        for part in (unet, vae, taesd):
            part.enable_gradient_checkpointing()
        unet.train()

    def lora_step() -> None:
        unet(latents, timesteps, encoder_hidden_states=cond).sample.pow(2).mean().backward()

    def anchor() -> None:
        with torch.no_grad():
            unet(latents, timesteps, encoder_hidden_states=cond)

    def decode_and_score(decoder) -> None:
        image = (decoder.decode(scored_latents).sample / 2 + 0.5).clamp(0, 1)
        image = torch.nn.functional.interpolate(image, size=head_size, mode="bilinear")
        head(image).sum().backward()

    def head_only() -> None:
        image = torch.rand(scored, 3, head_size, head_size, device=device, requires_grad=True)
        head(image).sum().backward()

    with torch.no_grad():
        encode = measure(lambda: vae.encode(images).latent_dist.mean)
        text_encode = measure(lambda: text(tokens))
    head_cost = measure(head_only)
    return {
        "text_encoder": text_encode,
        "vae_encode": encode,
        "unet_lora_fwd_bwd": measure(lora_step),
        "anchor_unet_fwd": measure(anchor),
        "head_fwd_bwd": head_cost,
        "vae_decode_fwd_bwd": measure(lambda: decode_and_score(vae)) - head_cost,
        "taesd_decode_fwd_bwd": measure(lambda: decode_and_score(taesd)) - head_cost,
    }


def step_totals(p: dict[str, float]) -> dict[str, float]:
    """Plain LoRA and ACPO steps summed from their parts, encoding each step or with cached latents."""
    plain = p["text_encoder"] + p["vae_encode"] + p["unet_lora_fwd_bwd"]
    extra = p["anchor_unet_fwd"] + p["head_fwd_bwd"]
    steps = {
        "plain LoRA": plain,
        "ACPO, SD VAE decoder": plain + extra + p["vae_decode_fwd_bwd"],
        "ACPO, TAESD decoder": plain + extra + p["taesd_decode_fwd_bwd"],
    }
    cached = {f"{k}, cached latents": v - p["vae_encode"] for k, v in steps.items()}
    return {**steps, **cached}


def print_table(p: dict[str, float], unit: str) -> dict[str, float]:
    print(f"| part | {unit} |\n|---|---|")
    for name, value in p.items():
        print(f"| {name} | {value:,.{0 if unit == 'GFLOP' else 2}f} |")
    totals = step_totals(p)
    print(f"\n| step | {unit} | x plain |\n|---|---|---|")
    for name, value in totals.items():
        base = totals["plain LoRA, cached latents" if "cached" in name else "plain LoRA"]
        print(f"| {name} | {value:,.{0 if unit == 'GFLOP' else 2}f} | {value / base:.2f} |")
    print()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--share", type=float, default=0.25, help="perceptual share of the batch")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--head-size", type=int, default=224, help="quality head input side")
    parser.add_argument("--time", action="store_true", help="also time each part on --device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per part (median)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "component_flops.json"))
    args = parser.parse_args()
    scored = round(args.share * args.batch)
    print(
        f"SD-1.5 sizes: batch {args.batch}, {args.latent * 8} px, {scored} scored "
        f"(share {args.share}), ResNet-50 head at {args.head_size} px; per step\n"
    )
    flops = parts(args.batch, scored, args.latent, args.head_size)
    report = {"args": vars(args), "parts": flops, "steps": print_table(flops, "GFLOP")}
    if args.time:
        device = torch.device(args.device)
        seconds = parts(
            args.batch,
            scored,
            args.latent,
            args.head_size,
            args.device,
            timer(args.repeats, device),
        )
        machine = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else (f"{cpu_name()}, {torch.get_num_threads()} threads")
        )
        print(f"seconds on {machine} (gradient checkpointing on):\n")
        report["seconds"] = {
            "machine": machine,
            "parts": seconds,
            "steps": print_table(seconds, "s"),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
