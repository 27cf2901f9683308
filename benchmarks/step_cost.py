"""Step cost of ACPO against plain LoRA fine-tuning and the peers' ways, side by side.

Each variant runs in its own fresh process on the same seeded models and batch: wall time per
optimizer step (median after warm-up), the FLOPs of a step (``flop_counter``: torch's
``FlopCounterMode``, with CPU attention counted) and peak memory: the bytes of the models' tensors
plus the growth of the peak over the process's state after the models were built (CUDA:
``max_memory_allocated``; CPU: the peak resident set, reset on Linux once the models are built),
so the runtime's own memory (about 1 GiB of imported libraries on the CPU, the CUDA context)
is left out on both. Results print as a table of ratios against plain LoRA (added when
``--variants`` leaves it out) and go to ``outputs/bench/step_cost.json``.

    python benchmarks/step_cost.py               # SD-1.5 widths at 256 px (CPU, about 25 minutes)
    python benchmarks/step_cost.py --full        # SD-1.5 at 512 px (GPU), see gpu_check.sh
    python benchmarks/step_cost.py --quick       # 1/10 of every width at 128 px (a smoke run, 1 min)

The default runs the real SD-1.5 widths (UNet, VAE, TAESD) at 256 px instead of 512 px so that a
CPU step takes seconds, not minutes: the proportions of the parts stay those of the real model
(``component_flops.py --latent 32`` against ``--latent 64``: the ACPO/plain FLOPs ratios differ by
under 0.05). ``--quick`` shrinks every width, which changes the proportions (the VAE and the
ResNet-50 head weigh more against a 1/10-width UNet), so its ratios overstate ACPO's cost.

``--backbone sdxl|sd35m|flux`` times the big backbones (``backbones.py``; SD3.5-Medium and
FLUX.1-dev on cached prompt embeddings, no text encoder) by running a step's parts directly
(``RAW_VARIANTS``: plain LoRA, ACPO with the VAE decoder, ACPO with the TAESD of that latent
space), at ``--scale`` of their width and ``--latent`` for CPU timings, or ``--full`` (1024 px, real
widths) on a GPU; the FLOP count of each variant's step says how far the reduced proportions are
from ``component_flops.py --backbone ...`` at full size.

    python benchmarks/step_cost.py --backbone flux --scale 0.125 --latent 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

#: the variant every "x plain" ratio divides by (both tables: ``VARIANTS`` and ``RAW_VARIANTS``)
REFERENCE = "plain_lora"

VARIANTS = {
    # measure_drift off: a plain LoRA step runs no anchor (ACPOModule measures the drift at weight 0)
    "plain_lora": dict(w_anchor=0.0, w_perc=0.0, perceptual_share=0.0, measure_drift=False),
    "acpo_toggle_share0.25": dict(w_anchor=1.0, w_perc=0.1, perceptual_share=0.25),
    "acpo_toggle_share1.0": dict(w_anchor=1.0, w_perc=0.1, perceptual_share=1.0),
    "acpo_toggle_share0.25_taesd": dict(
        w_anchor=1.0, w_perc=0.1, perceptual_share=0.25, taesd=True
    ),
    # before issue 18: the whole image decoded, the decoder checkpointed one up-block at a time
    "acpo_toggle_share0.25_block_ckpt": dict(
        w_anchor=1.0, w_perc=0.1, perceptual_share=0.25, block_ckpt=True
    ),
    # a head-sized crop at native resolution (``--crop``), only its latent window decoded
    "acpo_toggle_share0.25_crop": dict(w_anchor=1.0, w_perc=0.1, perceptual_share=0.25, crop=True),
    "acpo_toggle_share0.25_taesd_crop": dict(
        w_anchor=1.0, w_perc=0.1, perceptual_share=0.25, taesd=True, crop=True
    ),
    # latents cached by `acpo cache-latents`: batches carry the VAE posterior, not the pixels
    "plain_lora_cached": dict(
        w_anchor=0.0, w_perc=0.0, perceptual_share=0.0, measure_drift=False, cached=True
    ),
    "acpo_toggle_share0.25_taesd_cached": dict(
        w_anchor=1.0, w_perc=0.1, perceptual_share=0.25, taesd=True, cached=True
    ),
    "acpo_separate_anchor_share0.25": dict(
        w_anchor=1.0, w_perc=0.1, perceptual_share=0.25, separate=True
    ),
    "acpo_rollout_k1": dict(
        w_anchor=1.0, w_perc=0.1, objective="rollout", rollout_steps=10, k_late=3
    ),
    "draft_k1_chain": dict(draft=True),
}
#: variants of ``--backbone sdxl|sd35m|flux``: the step's parts run directly (see ``raw_step``)
RAW_VARIANTS = {
    "plain_lora": dict(anchor=False, decoder=None),
    "acpo": dict(anchor=True, decoder="vae"),
    "acpo_taesd": dict(anchor=True, decoder="taesd"),
    "acpo_crop": dict(anchor=True, decoder="vae", crop=True),
}


def sd15_unet(scale: float, sample_size: int) -> nn.Module:
    """Stable Diffusion 1.5's UNet layout; ``scale`` multiplies every width (1.0 = the real model)."""
    from diffusers import UNet2DConditionModel

    widths = tuple(max(32, int(c * scale) // 32 * 32) for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=widths,
        layers_per_block=2,
        cross_attention_dim=max(32, int(768 * scale) // 8 * 8),
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def sd15_vae(scale: float) -> nn.Module:
    """Stable Diffusion's KL autoencoder layout (8x downsampling) at ``scale`` of its width."""
    from diffusers import AutoencoderKL

    widths = tuple(max(32, int(c * scale) // 32 * 32) for c in (128, 256, 512, 512))
    return AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
    )


def taesd(scale: float) -> nn.Module:
    """TAESD's layout (diffusers ``AutoencoderTiny``, 8x) at ``scale`` of its 64-channel width."""
    from diffusers import AutoencoderTiny

    width = max(16, int(64 * scale) // 8 * 8)
    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4
    )


def iqa_sized_head(native_size: int) -> nn.Module:
    """A ResNet-50 quality head (about MANIQA's cost per image), random weights, frozen."""
    from torchvision.models import resnet50

    from acpo_lightning.quality import QualityHead

    class ResNetHead(QualityHead):
        higher_is_better, score_range = True, (0.0, 1.0)

        def __init__(self) -> None:
            super().__init__()
            self.native_size = native_size
            self.net = resnet50(weights=None, num_classes=1)
            self.freeze()

        def score(self, images, prompts=None):
            return torch.sigmoid(self.net(images).squeeze(1))

    return ResNetHead()


def build(args: argparse.Namespace, spec: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from acpo_lightning import ACPOModule
    from acpo_lightning.crops import PerceptualCrop
    from acpo_lightning.models import add_lora
    from acpo_lightning.testing import tiny_scheduler, write_tiny_tokenizer

    torch.manual_seed(0)
    # frozen weights in bf16 with --bf16 (as configs/acpo.yaml loads them); LoRA weights stay fp32
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    unet = add_lora(sd15_unet(args.scale, args.latent).to(dtype), rank=16)
    anchor = sd15_unet(args.scale, args.latent).to(dtype) if spec.get("separate") else None
    dim = unet.config.cross_attention_dim
    encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tiny_tokenizer(Path(args.out) / "tokenizer"))
    )
    flags = {"separate", "draft", "taesd", "cached", "crop", "block_ckpt"}
    knobs = {k: v for k, v in spec.items() if k not in flags}
    if spec.get("taesd"):
        knobs["perceptual_decoder"] = taesd(args.scale).to(dtype)
    if spec.get("crop"):
        knobs["perceptual_crop"] = PerceptualCrop(args.crop, margin=args.crop_margin)
    module = ACPOModule(
        unet=unet,
        anchor_unet=anchor,
        quality_head=iqa_sized_head(args.head_size),
        noise_scheduler=tiny_scheduler(),
        vae=sd15_vae(args.scale).to(dtype),
        text_encoder=encoder,
        tokenizer=tokenizer,
        gradient_checkpointing=args.checkpointing,
        **knobs,
    ).to(args.device)
    if args.checkpointing:
        module.enable_gradient_checkpointing()
        if spec.get("block_ckpt"):  # diffusers' own: one checkpoint per up-block
            module.vae.enable_gradient_checkpointing()
    return module


def draft_k1_loss(module, batch: dict, steps: int) -> torch.Tensor:
    """DRaFT-K (K=1): sample the whole chain without grad, the last step with grad, score the image."""
    from acpo_lightning import losses
    from acpo_lightning.sampling import denoise

    cond = module.encode_prompts(batch["prompts"])
    size = cond.shape[0]
    noise = torch.randn(size, *module.denoiser.latent_shape(), device=module.device)
    unet_fn = module.denoiser.policy
    with torch.no_grad():
        latents, run = denoise(
            unet_fn, module.sample_scheduler, noise, cond, None, 1.0, steps, stop_after=steps - 1
        )
    last_t = run.timestep
    pred = unet_fn(latents, last_t, cond)
    x0 = module.process.predicted_original(latents, pred, last_t.expand(size))
    scores = module.quality_head(module.decode(x0))
    return -losses.normalize_score(scores, True, (0.0, 1.0)).mean()


def run_variant(name: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    from acpo_lightning.in_trainer import step_result

    torch.set_num_threads(args.threads)
    spec = VARIANTS[name]
    module = build(args, spec)
    module.train()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5)
    image = args.latent * module.codec.scale_factor
    batch = {
        "pixel_values": torch.rand(
            args.batch, 3, image, image, generator=torch.Generator().manual_seed(1)
        )
        * 2
        - 1,
        "prompts": [f"a photo number {i}" for i in range(args.batch)],
    }
    if spec.get("cached"):  # what `acpo cache-latents` stores: the VAE posterior's parameters
        with torch.no_grad():
            pixels = batch.pop("pixel_values").to(module.device, module.vae.dtype)
            batch["latent_moments"] = module.vae.encode(pixels).latent_dist.parameters.float()
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> None:
        with autocast:
            if spec.get("draft"):
                loss = draft_k1_loss(module, batch, args.chain_steps)
            else:  # the real training step's loss (rollout steps included), without a Trainer
                loss = step_result(module, batch, 0, 0).terms.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measure_steps(name, step, args, queue, models=(module,))


def build_raw(args: argparse.Namespace):
    """The parts of a big backbone's step, built on ``args.device`` with random weights.

    Frozen weights in bf16 with ``--bf16`` (built in that dtype, so FLUX.1-dev never exists in
    fp32 on the GPU); LoRA weights fp32; gradient checkpointing as ``--checkpointing`` says, each
    part as ``ACPOModule.enable_gradient_checkpointing`` does it in training.
    """
    from backbones import BACKBONES

    from acpo_lightning.codec import LatentCodec
    from acpo_lightning.models import add_lora

    spec = BACKBONES[args.backbone]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            net = spec.make_denoiser(args.scale, args.latent)
            vae = spec.make_vae(args.scale).requires_grad_(False)
            tiny = spec.make_tiny_vae(args.scale).requires_grad_(False)
            inputs = spec.make_inputs(args.batch, args.latent, spec.tokens_at(args.latent), net)
    finally:
        torch.set_default_dtype(default_dtype)
    net = add_lora(net, rank=16, target_modules=spec.lora_targets).to(args.device)
    head = iqa_sized_head(args.head_size).to(args.device, dtype)
    if args.checkpointing:  # as training does: the denoiser per block (the denoisers' own), the
        # decoders one ResNet block at a time (LatentCodec's), the head whole (in raw_step)
        net.enable_gradient_checkpointing()
        latent_shape = (spec.latent_channels, args.latent, args.latent)
        LatentCodec(vae, tiny, latent_shape).enable_gradient_checkpointing()
    net.train()
    return spec, net, {"vae": vae, "taesd": tiny}, head, inputs


def whole_scored_count(share: float, batch: int) -> int:
    """The images a raw step scores: ``share x batch``, which must be whole here.

    ACPOModule draws a fractional count per step (``losses.scored_count``); a timed raw step
    scores a fixed number of images, so a fraction is refused rather than rounded.

    Raises:
        SystemExit: ``share x batch`` is not a whole number; the message gives the fix.
    """
    expected = share * batch
    if abs(expected - round(expected)) > 1e-9:
        raise SystemExit(
            f"--share {share} x --batch {batch} = {expected:g} scored images: a raw step scores "
            "a whole number of them. Fix: pick a share and batch whose product is whole (e.g. "
            f"--share {1 / batch:g} for one image at --batch {batch})."
        )
    return round(expected)


def run_raw_variant(name: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    """One big-backbone variant: the parts of a step, run directly (no ``ACPOModule``).

    The step is what ACPO's data objective runs (``objectives/data.py``): the policy's forward
    and one backward for the whole loss; plain LoRA stops at the diffusion loss; ACPO adds the
    anchor's forward (adapters off, no grad) and, for ``share x batch`` samples (whole), the
    decoder and the quality head on the x0 estimate, with gradient back into the policy.
    """
    from torch.utils.checkpoint import checkpoint

    from acpo_lightning.models.lora import adapters_disabled

    torch.set_num_threads(args.threads)
    variant = RAW_VARIANTS[name]
    spec, net, decoders, head, inputs = build_raw(args)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    noisy = inputs["sample" if "sample" in inputs else "hidden_states"]
    target = torch.randn_like(noisy)
    scored = whole_scored_count(args.share, args.batch) if variant["decoder"] else 0
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)

    def score(image: torch.Tensor) -> torch.Tensor:  # as PerceptualScorer: checkpointed head
        if args.checkpointing:
            return checkpoint(head, image, None, use_reentrant=False)
        return head(image)

    def step() -> None:
        with autocast:
            pred = net(**inputs).sample
            loss = (pred.float() - target.float()).pow(2).mean()
            if variant["anchor"]:
                with torch.no_grad(), adapters_disabled(net):
                    anchor = net(**inputs).sample
                loss = loss + (pred.float() - anchor.float()).pow(2).mean()
            if scored:  # an affine x0 estimate costs what the process's own does
                x0 = spec.prediction_latents(noisy[:scored] - pred[:scored], args.latent)
                decoder = decoders[variant["decoder"]]
                if variant.get("crop"):  # a crop's latent window (PerceptualCrop), then the crop
                    side = min(args.latent, args.crop // 8 + 2 * args.crop_margin)
                    x0 = x0[..., :side, :side]
                image = (decoder.decode(x0.to(noisy.dtype)).sample / 2 + 0.5).clamp(0, 1)
                if variant.get("crop"):
                    image = image[..., : args.crop, : args.crop]
                loss = loss - 0.1 * score(image).float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    models = (net, *decoders.values(), head)
    measure_steps(name, step, args, queue, models=models, scored=scored)


def timed_steps(step, cuda: bool, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed ones."""
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


#: torch's FlopCounterMode (2.14) has formulas for the CUDA attention kernels only: on the CPU,
#: ``scaled_dot_product_attention`` runs ``_scaled_dot_product_flash_attention_for_cpu`` and
#: counted 0 FLOPs, while on the meta device it decomposes into counted matmuls. torch's CUDA
#: formulas fit the CPU kernel too (a flash kernel: two matmuls forward; five backward, as it
#: recomputes the scores ``q @ k^T``), so a CPU count is what a GPU count of the step says; the
#: forward equals the meta count and the backward exceeds it by that one recomputed matmul.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode`` (no table printed), counting attention on the CPU too."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def tensor_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules``, each storage counted once."""
    storages = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _resident_kib(field: str) -> int | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in KiB, from Linux's ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_resident() -> bool:
    """Reset this process's peak resident set to its current one (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _resident_kib("VmHWM") is not None


class PeakMemory:
    """This process's peak memory from now on, and its growth over the state now.

    CUDA: ``max_memory_allocated``, its statistics reset now. CPU: the peak resident set, reset
    now on Linux (``/proc/self/clear_refs``), so that a higher peak left earlier (while the
    models were built) cannot hide the step's; elsewhere ``ru_maxrss``, the peak since the
    process began, and the growth over that.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.resettable = sys.platform == "linux" and _reset_peak_resident()
        self.base = self.total() if not self.resettable else _resident_kib("VmRSS") * 1024

    def total(self) -> int:
        """The peak: CUDA memory allocated by torch; CPU the whole process (imports included)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        if self.resettable:
            return _resident_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def growth(self) -> int:
        return max(0, self.total() - self.base)


def measure_steps(
    name: str, step, args: argparse.Namespace, queue: mp.Queue, models=(), **extra
) -> None:
    """Time ``step()`` (median after warm-up), count one more step's FLOPs, report peak memory.

    ``peak_bytes``, the figure the ratios use, is the bytes of ``models`` (built before this is
    called) plus the growth of the peak over the state now (``peak_step_bytes``): what the models
    and the step occupy, without the runtime's own memory. ``peak_total_bytes`` keeps
    ``PeakMemory.total`` (on the CPU, the whole process's peak).
    """
    cuda = args.device.startswith("cuda")
    model_bytes = tensor_bytes(*models)
    memory = PeakMemory(cuda)
    times = timed_steps(step, cuda, args.warmup, args.steps)
    growth, total = memory.growth(), memory.total()
    # FLOPs of one more step: a count, not a timing, so it is the same on a busy machine
    with flop_counter() as counter:
        step()
    queue.put(
        {
            **extra,
            "variant": name,
            "step_s": statistics.median(times),
            "step_times_s": times,
            "model_bytes": model_bytes,
            "peak_step_bytes": growth,
            "peak_bytes": model_bytes + growth,
            "peak_total_bytes": total,
            "flops": counter.get_total_flops(),
        }
    )


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def merge_rounds(rows: list[dict]) -> dict:
    """One variant's rounds as one row: the median of every timed step, the largest peak."""
    merged = dict(rows[0])
    merged["step_times_s"] = [t for row in rows for t in row["step_times_s"]]
    merged["step_s"] = statistics.median(merged["step_times_s"])
    merged["round_medians_s"] = [row["step_s"] for row in rows]
    for key in ("peak_step_bytes", "peak_bytes", "peak_total_bytes"):
        merged[key] = max(row[key] for row in rows)
    return merged


def with_reference(variants: list[str]) -> list[str]:
    """``variants`` with :data:`REFERENCE` (plain LoRA) first when they leave it out."""
    return variants if REFERENCE in variants else [REFERENCE, *variants]


def add_ratios(rows: list[dict]) -> None:
    """Each row's time, FLOPs and peak memory over the plain-LoRA row's (in place)."""
    base = next(row for row in rows if row["variant"] == REFERENCE)
    for row in rows:
        row["time_ratio"] = row["step_s"] / base["step_s"]
        row["flops_ratio"] = row["flops"] / base["flops"]
        row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--full", action="store_true", help="SD-1.5 widths, 64x64 latents (512 px), 224 px head"
    )
    size.add_argument(
        "--quick", action="store_true", help="1/10 widths, 16x16 latents (128 px), 112 px head"
    )
    parser.add_argument(
        "--backbone",
        choices=("sd15", "sdxl", "sd35m", "flux"),
        default="sd15",
        help="sd15: ACPOModule steps; sdxl|sd35m|flux: their parts run directly (RAW_VARIANTS)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="width multiplier of the networks")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side = 8x)")
    parser.add_argument(
        "--share", type=float, default=0.25, help="scored share of the batch (big backbones)"
    )
    parser.add_argument(
        "--head-size", type=int, default=224, help="native input side of the IQA head"
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help="crop side of the *_crop variants (default: the head's 224 px scaled by the image "
        "side over the native one, 512 px or 1024 px for --backbone, so that the crop covers "
        "the share of the image a 224-px crop covers at the native size)",
    )
    parser.add_argument(
        "--crop-margin",
        type=int,
        default=None,
        help="latents decoded around a crop (default: 4, scaled as --crop is)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--chain-steps", type=int, default=10, help="sampler steps of the DRaFT-K baseline"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gradient checkpointing (on, as in configs/acpo.yaml)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", nargs="*", default=None, help="default: all of them")
    parser.add_argument(
        "--rounds", type=int, default=1, help="passes over all variants, interleaved (ABC ABC)"
    )
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    raw = args.backbone != "sd15"
    if args.full:
        args.scale, args.latent, args.head_size = 1.0, 128 if raw else 64, 224
    args.variants = args.variants or list(RAW_VARIANTS if raw else VARIANTS)
    if REFERENCE not in args.variants:
        print(f"{REFERENCE} added to --variants: every 'x plain' ratio is against it", flush=True)
        args.variants = with_reference(args.variants)
    target = run_raw_variant if raw else run_variant
    if args.quick:
        args.scale, args.latent, args.head_size = 0.1, 16, 112
    # a 224-px crop with a 4-latent margin at the native size (512 px; 1024 px for the big
    # backbones), scaled with the image: the crop's window keeps its share of the decoder's work
    native = 128 if raw else 64
    if args.crop is None:
        args.crop = max(8, round(224 * args.latent / native / 8) * 8)
    if args.crop_margin is None:
        args.crop_margin = round(4 * args.latent / native)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    # rounds go through every variant in turn (ABC ABC), so a slow spell of a busy machine hits
    # one round of each variant, not all of one variant
    for round_index in range(args.rounds):
        for name in args.variants:
            queue = context.Queue()
            process = context.Process(target=target, args=(name, args, queue))
            process.start()
            row = queue.get()
            process.join()
            runs[name].append(row)
            print(
                f"round {round_index + 1}, {name}: {row['step_s']:.3f} s / step, "
                f"{row['flops'] / 1e9:.1f} GFLOP",
                flush=True,
            )
    results = [merge_rounds(rows) for rows in runs.values()]
    add_ratios(results)
    # peak MiB: the models' tensors plus the step's growth over them (measure_steps)
    header = ("variant", "step s", "x plain", "GFLOP", "x plain", "peak MiB", "x plain")
    print("{:34s} {:>8s} {:>8s} {:>9s} {:>8s} {:>9s} {:>8s}".format(*header))
    for row in results:
        print(
            f"{row['variant']:34s} {row['step_s']:8.3f} {row['time_ratio']:8.2f} "
            f"{row['flops'] / 1e9:9.1f} {row['flops_ratio']:8.2f} "
            f"{row['peak_bytes'] / 2**20:9.0f} {row['memory_ratio']:8.2f}"
        )
    machine = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{cpu_name()}, {args.threads} threads"
    )
    report = {"machine": machine, "settings": vars(args), "results": results}
    path = Path(args.out) / ("step_cost.json" if not raw else f"step_cost_{args.backbone}.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"written to {path} ({machine})")


if __name__ == "__main__":
    main()
