#!/usr/bin/env bash
# One prepared GPU check (one H100/H200-class GPU, random weights, no downloads), each run in its
# own processes, bf16 autocast with bf16 frozen weights, gradient checkpointing, a ResNet-50 quality
# head at 224 px (about MANIQA's cost):
#   1. SD-1.5 at 512 px, batch 4, ACPOModule's real step: plain LoRA, ACPO (VAE decoder, whole
#      image, the decoder checkpointed per up-block as before issue 18, then per ResNet block),
#      ACPO (VAE decoder, 224-px crop), ACPO (TAESD), share 0.25 (one image of four scored)
#   2. SDXL base 1.0 at 1024 px, batch 4, share 0.25 (the step's parts run directly, see
#      step_cost.py RAW_VARIANTS): plain LoRA, ACPO (VAE decoder), ACPO (taesdxl), ACPO (VAE
#      decoder, 224-px crop)
#   3. SD3.5-Medium at 1024 px, batch 4, share 0.25: the same with taesd3
#   4. FLUX.1-dev at 1024 px, batch 1 (12 B parameters: 24 GB of bf16 weights; batch 1 keeps the
#      step inside 80 GB), share 1.0: at batch 1, share 0.25 scores one step in four, which a
#      timed step cannot show, so the one image is scored; the same three variants with taef1
# Written to take a few minutes in all (model building included); a run that fails or passes its
# time limit is reported and the next one still runs.
#   bash benchmarks/gpu_check.sh     # writes outputs/bench_gpu/step_cost*.json, prints the tables
#   DRY=1 bash benchmarks/gpu_check.sh   # the same runs at tiny size on the CPU (a smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT_DIR:-outputs/bench_gpu}
LIMIT=${LIMIT:-150}  # seconds per backbone
if [ "${DRY:-0}" = 1 ]; then
    SIZE=(--scale 0.05 --latent 8 --head-size 32 --device cpu --steps 1 --warmup 0)
    BF16=()
    OUT=${OUT_DIR:-outputs/bench_gpu_dry}
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    SIZE=(--full --steps 3 --warmup 1)
    BF16=(--bf16)
fi
failed=0
run() {  # run <label> <args...>
    local label=$1
    shift
    echo "== $label"
    timeout "$LIMIT" "$PY" benchmarks/step_cost.py "${SIZE[@]}" "${BF16[@]}" --out "$OUT" "$@" \
        || { echo "!! $label failed or timed out (exit $?)"; failed=1; }
}
run "SD-1.5, 512 px, batch 4" --batch 4 \
    --variants plain_lora acpo_toggle_share0.25_block_ckpt acpo_toggle_share0.25 \
    acpo_toggle_share0.25_crop acpo_toggle_share0.25_taesd
run "SDXL base, 1024 px, batch 4" --backbone sdxl --batch 4 --share 0.25
run "SD3.5-Medium, 1024 px, batch 4" --backbone sd35m --batch 4 --share 0.25
run "FLUX.1-dev, 1024 px, batch 1" --backbone flux --batch 1 --share 1.0
exit $failed
