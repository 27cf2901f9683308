#!/usr/bin/env bash
# One prepared GPU check: the step-cost benchmark on a full-size SD-1.5 UNet + VAE, 512 px
# (64x64 latents), batch 4, bf16 autocast, gradient checkpointing, and a ResNet-50 quality head at
# 224 px (about MANIQA's cost). Runs in about 5 minutes on one H100-class GPU.
#   bash benchmarks/gpu_check.sh            # writes outputs/bench_gpu/step_cost.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" benchmarks/step_cost.py --full --batch 4 --bf16 --steps 5 --warmup 2 \
    --out outputs/bench_gpu "$@"
