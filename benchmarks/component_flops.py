"""FLOPs of each part of an ACPO step at a backbone's full size, counted on the meta device.

No weights and no arithmetic: the real diffusers/transformers/torchvision modules are built on
``torch.device("meta")`` and run under torch's ``FlopCounterMode``, so the count for 1024 px images
takes seconds on any machine. Backward passes are counted as they run (frozen weights get no weight
gradient, so a frozen decoder's backward costs about one forward, not two). From the parts it
predicts the FLOPs ratio of an ACPO step to a plain LoRA step, with the backbone's VAE decoder or
its TAESD (``AutoencoderTiny``: taesd, taesdxl, taesd3, taef1) in the perceptual path, with and
without cached latents. Parts: the denoiser's forward+backward with LoRA r16 on its attention
projections, the anchor's forward (the same network, adapters off, no grad), the VAE encoder,
the decoder's forward+backward for the scored images and a ResNet-50 head at 224 px (about
MANIQA's cost). ``--backbone`` picks SD-1.5 (512 px, default), SDXL base, SD3.5-Medium or
FLUX.1-dev (1024 px), real widths from ``backbones.py``; only SD-1.5 counts a text encoder (the
big backbones train on cached prompt embeddings). Writes ``outputs/bench/component_flops.json``
(SD-1.5) or ``component_flops_<backbone>.json``.

With ``--time`` the same parts are also built with (random) weights on a real device and timed
(median of ``--repeats`` after one warm-up), with gradient checkpointing on as in
``configs/acpo.yaml`` (so a checkpointed backward also recomputes its forward): where the seconds
of a step go, next to where the FLOPs go.

    python benchmarks/component_flops.py                   # SD-1.5, batch 4, 512 px, share 0.25
    python benchmarks/component_flops.py --batch 8 --share 0.5
    python benchmarks/component_flops.py --latent 32 --time          # + seconds at 256 px (CPU)
    python benchmarks/component_flops.py --backbone flux --batch 1 4  # FLUX.1-dev, 1024 px
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from backbones import BACKBONES
from step_cost import cpu_name, flop_counter, iqa_sized_head

REPO = Path(__file__).resolve().parents[1]


def count(fn) -> float:
    """GFLOP of ``fn()`` (forward, and backward if ``fn`` runs one)."""
    with flop_counter() as counter:  # attention counted on any device
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
    batch: int,
    scored: int,
    latent: int,
    head_size: int,
    device: str = "meta",
    measure=count,
    backbone: str = "sd15",
    scale: float = 1.0,
    margin: int = 4,
) -> dict[str, float]:
    """Each part's cost: GFLOP (``measure=count``, on the meta device) or seconds (a timer).

    The decoder and head parts are for ``scored`` images; the denoiser parts for ``batch``. The
    ``*_crop_*`` parts decode the latent window of one head-sized crop per scored image with
    ``margin`` latents on each side (``PerceptualCrop``) and score the crop as it is. SD-1.5
    also counts its CLIP-L text tower; the big backbones' text encoders (CLIP-L/bigG, T5-XXL) are
    left out: with their embeddings cached, as one trains them, a step never runs them.
    """
    from acpo_lightning.models import add_lora
    from acpo_lightning.models.lora import adapters_disabled

    spec = BACKBONES[backbone]
    torch.manual_seed(0)
    with torch.device(device):
        net = spec.make_denoiser(scale, latent)
        net = add_lora(net, rank=16, target_modules=spec.lora_targets)
        vae = spec.make_vae(scale).requires_grad_(False)
        taesd = spec.make_tiny_vae().requires_grad_(False)
        head = iqa_sized_head(head_size)
        images = torch.randn(batch, 3, latent * 8, latent * 8)
        inputs = spec.make_inputs(batch, latent, spec.tokens_at(latent), net)
        scored_latents = torch.randn(
            scored, spec.latent_channels, latent, latent, requires_grad=True
        )
        crop, window = head_size, min(latent, head_size // 8 + 2 * margin)
        window_latents = torch.randn(
            scored, spec.latent_channels, window, window, requires_grad=True
        )
        if spec.name == "sd15":
            from transformers import CLIPTextConfig, CLIPTextModel

            text = CLIPTextModel(CLIPTextConfig()).requires_grad_(False)  # CLIP ViT-L/14 text
            tokens = torch.randint(0, 49408, (batch, 77))
    if device != "meta":  # timed as configs/acpo.yaml trains: checkpointed denoiser and decoders
        from acpo_lightning.codec import checkpoint_resnets

        for part in (net, vae, taesd):  # the VAE decoder one ResNet block at a time, as ACPO does
            part.enable_gradient_checkpointing(checkpoint_resnets)
        net.train()

    def lora_step() -> None:
        net(**inputs).sample.float().pow(2).mean().backward()

    def anchor() -> None:  # the frozen base: the same network with its adapters off
        with torch.no_grad(), adapters_disabled(net):
            net(**inputs)

    def decode_and_score(decoder) -> None:
        image = (decoder.decode(scored_latents).sample / 2 + 0.5).clamp(0, 1)
        image = torch.nn.functional.interpolate(image, size=head_size, mode="bilinear")
        head(image).sum().backward()

    def decode_crop_and_score(decoder) -> None:
        image = (decoder.decode(window_latents).sample / 2 + 0.5).clamp(0, 1)
        head(image[..., :crop, :crop]).sum().backward()  # a crop at native size: no resize

    def head_only() -> None:
        image = torch.rand(scored, 3, head_size, head_size, device=device, requires_grad=True)
        head(image).sum().backward()

    with torch.no_grad():
        encode = measure(lambda: vae.encode(images).latent_dist.mean)
        text_encode = measure(lambda: text(tokens)) if spec.name == "sd15" else None
    head_cost = measure(head_only)
    costs = {
        "text_encoder": text_encode,
        "vae_encode": encode,
        "denoiser_lora_fwd_bwd": measure(lora_step),
        "anchor_fwd": measure(anchor),
        "head_fwd_bwd": head_cost,
        "vae_decode_fwd_bwd": measure(lambda: decode_and_score(vae)) - head_cost,
        "taesd_decode_fwd_bwd": measure(lambda: decode_and_score(taesd)) - head_cost,
    }
    if head_size < latent * 8:
        costs["vae_crop_decode_fwd_bwd"] = measure(lambda: decode_crop_and_score(vae)) - head_cost
        costs["taesd_crop_decode_fwd_bwd"] = (
            measure(lambda: decode_crop_and_score(taesd)) - head_cost
        )

    return {k: v for k, v in costs.items() if v is not None}


def step_totals(p: dict[str, float], taesd: str = "TAESD", per_scored: float = 1.0) -> dict:
    """Plain LoRA and ACPO steps summed from their parts, encoding each step or with cached latents.

    ``per_scored`` rescales the decoder and head parts (counted for some number of scored images)
    to the number a step scores: their cost is linear in that number.
    """
    plain = p.get("text_encoder", 0.0) + p["vae_encode"] + p["denoiser_lora_fwd_bwd"]
    extra = p["anchor_fwd"] + per_scored * p["head_fwd_bwd"]
    steps = {
        "plain LoRA": plain,
        "ACPO, VAE decoder": plain + extra + per_scored * p["vae_decode_fwd_bwd"],
        f"ACPO, {taesd} decoder": plain + extra + per_scored * p["taesd_decode_fwd_bwd"],
    }
    if "vae_crop_decode_fwd_bwd" in p:  # a crop scores at 224 px as the resized image does
        steps["ACPO, VAE decoder, crop"] = plain + extra + per_scored * p["vae_crop_decode_fwd_bwd"]
        steps[f"ACPO, {taesd} decoder, crop"] = (
            plain + extra + per_scored * p["taesd_crop_decode_fwd_bwd"]
        )
    cached = {f"{k}, cached latents": v - p["vae_encode"] for k, v in steps.items()}
    return {**steps, **cached}


def print_table(p: dict[str, float], unit: str, totals: dict[str, float] | None = None) -> dict:
    print(f"| part | {unit} |\n|---|---|")
    for name, value in p.items():
        print(f"| {name} | {value:,.{0 if unit == 'GFLOP' else 2}f} |")
    totals = totals if totals is not None else step_totals(p)
    print(f"\n| step | {unit} | x plain |\n|---|---|---|")
    for name, value in totals.items():
        base = totals["plain LoRA, cached latents" if "cached" in name else "plain LoRA"]
        print(f"| {name} | {value:,.{0 if unit == 'GFLOP' else 2}f} | {value / base:.2f} |")
    print()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=list(BACKBONES), default="sd15")
    parser.add_argument("--batch", type=int, nargs="+", default=[4], help="one or more sizes")
    parser.add_argument("--share", type=float, default=0.25, help="perceptual share of the batch")
    parser.add_argument(
        "--latent", type=int, default=None, help="latent side (default: native, 64 = 512 px)"
    )
    parser.add_argument("--head-size", type=int, default=224, help="quality head input side")
    parser.add_argument(
        "--crop-margin", type=int, default=4, help="latents decoded around a head-sized crop"
    )
    parser.add_argument("--time", action="store_true", help="also time each part on --device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="width multiplier (timing)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per part (median)")
    parser.add_argument("--out", default=None, help="JSON path (default outputs/bench/...)")
    args = parser.parse_args()
    spec = BACKBONES[args.backbone]
    args.latent = args.latent or spec.latent_side()
    suffix = "" if args.backbone == "sd15" else f"_{args.backbone}"
    args.out = args.out or str(REPO / "outputs" / "bench" / f"component_flops{suffix}.json")
    report = {"args": vars(args), "backbone": spec.title, "runs": {}}
    for batch in args.batch:
        report["runs"][str(batch)] = run(spec, batch, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"written to {out}")


def run(spec, batch: int, args: argparse.Namespace) -> dict:
    """Count (and with ``--time``, time) one batch size; print its tables."""
    # the expected count: ACPOModule scores floor(share x batch) images plus one more with
    # probability frac(share x batch) (losses.scored_count), so costs are per average step
    scored = args.share * batch
    # the decoder and head parts are counted for whole images, one at least, then rescaled
    counted = max(math.ceil(scored), 1)
    text = (
        "CLIP-L text tower counted"
        if spec.name == "sd15"
        else "text encoders not counted (embeddings cached)"
    )
    print(
        f"{spec.title}: batch {batch}, {args.latent * 8} px, {scored:g} scored on average "
        f"(share {args.share}), LoRA r16 on {', '.join(spec.lora_targets)}, ResNet-50 head at "
        f"{args.head_size} px, {text}; per step\n"
    )
    flops = parts(
        batch, counted, args.latent, args.head_size, backbone=spec.name, scale=args.scale,
        margin=args.crop_margin,
    )  # fmt: skip
    row = {"scored": scored, "parts_scored_images": counted, "parts": flops}
    row["steps"] = print_table(flops, "GFLOP", step_totals(flops, spec.taesd, scored / counted))
    if 0 < scored < 1:  # a scoring step scores one image: say what that step costs
        print(
            f"share {args.share} x batch {batch}: {scored:g} images scored per step on average, "
            "one image on that share of the steps. A step that scores one image:\n"
        )
        row["steps_one_scored"] = print_table(flops, "GFLOP", step_totals(flops, spec.taesd))
    if args.time:
        device = torch.device(args.device)
        seconds = parts(
            batch,
            counted,
            args.latent,
            args.head_size,
            args.device,
            timer(args.repeats, device),
            spec.name,
            args.scale,
            args.crop_margin,
        )
        machine = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else (f"{cpu_name()}, {torch.get_num_threads()} threads")
        )
        print(f"seconds on {machine} (gradient checkpointing on):\n")
        totals = step_totals(seconds, spec.taesd, scored / counted)
        row["seconds"] = {
            "machine": machine,
            "parts": seconds,
            "steps": print_table(seconds, "s", totals),
        }
    return row


if __name__ == "__main__":
    main()
