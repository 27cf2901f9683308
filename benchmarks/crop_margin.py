"""How far a crop's decoded pixels are from the full decode's, against the window margin.

``PerceptualCrop`` decodes only a window of latents around each crop. The decoder's convolutions
reach a bounded distance (``conv_reach``, printed), but a KL VAE's GroupNorm statistics and its
mid-block attention are taken over the window instead of the whole image, so its crop differs
from the same crop of the full decode by an amount that shrinks as the margin grows. This script
measures that difference (max and mean absolute error, in ``[0, 1]`` pixel units; one 8-bit
level is 1/255 = 0.0039) for:

- ``sd``: SD's VAE decoder layout at its real widths (random weights) on 512-px images, 224-px crops;
- ``demo``: the embedded demo's trained VAE on Fashion-MNIST latents (32-px images, 16-px crops);
- ``taesd``: TAESD's layout (no normalization, no attention): exact once the margin covers its reach.

    python benchmarks/crop_margin.py                 # all three, about 3 minutes on 2 CPU cores
    python benchmarks/crop_margin.py --decoders sd --margins 0 2 4 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from step_cost import sd15_vae, taesd

from acpo_lightning.codec import LatentCodec
from acpo_lightning.crops import PerceptualCrop, conv_reach


def demo_codec_and_latents(count: int) -> tuple[LatentCodec, torch.Tensor]:
    """The demo's trained VAE and the latents of ``count`` Fashion-MNIST test images."""
    from acpo_demo.assets import load_demo_vae
    from acpo_demo.fashion import load_fashion_mnist

    vae = load_demo_vae()
    images = load_fashion_mnist("test")[0][:count]
    codec = LatentCodec(vae, None, (4, 8, 8))
    return codec, codec.encode_images(images, torch.Generator().manual_seed(0))


def errors(codec: LatentCodec, latents: torch.Tensor, size: int, margins: list[int],
           draws: int, seed: int) -> list[dict]:  # fmt: skip
    """Max and mean absolute crop error of ``draws`` crops per image at each margin."""
    with torch.no_grad():
        whole = codec.decode(latents, perceptual=True)
        rows = []
        for margin in margins:
            spec = PerceptualCrop(size, count=draws, margin=margin)
            crops = spec.windows(latents, codec.scale_factor, torch.Generator().manual_seed(seed))
            got = crops.pixels(codec.decode(crops.latents, perceptual=True))
            diff = (got - crops.of_whole(whole)).abs()
            rows.append({
                "margin": margin, "window": list(crops.latents.shape[-2:]),
                "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                "p99_abs": diff.flatten().quantile(0.99).item(),
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decoders", nargs="+", default=["sd", "demo", "taesd"])
    parser.add_argument("--margins", nargs="+", type=int, default=[0, 1, 2, 3, 4, 6, 8, 12, 18])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--draws", type=int, default=3, help="crops per image")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/crop_margin.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name in args.decoders:
        if name == "demo":
            codec, latents = demo_codec_and_latents(args.images * 8)
            size, margins = 16, [m for m in args.margins if m <= 4]
        else:
            vae = (sd15_vae(1.0) if name == "sd" else taesd(1.0)).eval()
            codec = LatentCodec(vae if name == "sd" else None, None, (4, 64, 64))
            if name == "taesd":  # TAESD decodes unscaled latents: the codec's perceptual decoder
                codec = LatentCodec(sd15_vae(0.1), vae, (4, 64, 64))
            latents = torch.randn(
                args.images, 4, 64, 64, generator=torch.Generator().manual_seed(1)
            )
            size, margins = 224, args.margins
        decoder = codec.perceptual_decoder or codec.vae
        reach = conv_reach(decoder, latents[:1, :, :16, :16], decoder.decode)
        rows = errors(codec, latents, size, margins, args.draws, seed=2)
        results[name] = {"conv_reach_latents": reach, "crop": size, "rows": rows}
        print(f"\n{name}: crop {size} px, conv reach {reach:.2f} latents "
              f"(x{codec.scale_factor} px), {latents.shape[0]} images x {args.draws} crops")  # fmt: skip
        print("margin | window | max abs | p99 abs | mean abs  ([0,1] units; 1/255 = 0.0039)")
        for row in rows:
            print(f"{row['margin']:6d} | {row['window'][0]:3d}x{row['window'][1]:<3d}| "
                  f"{row['max_abs']:.5f} | {row['p99_abs']:.5f} | {row['mean_abs']:.6f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
