#!/usr/bin/env bash
# The GPU acceptance suite and benchmark, on one machine with 1-8 NVIDIA GPUs (README, "Running on GPUs").
#
#   bash scripts/gpu-check.sh            # uses ./.venv (a CUDA build of torch; see README) or $PYTHON
#
# Runs tests/gpu (marker gpu: CUDA step vs CPU step, 2-GPU NCCL latent-parallel ZeRO-3 vs 1 GPU, the main job on CUDA,
# a model split over 2 GPUs by device_map vs the CPU, 200 bf16 steps) and tests/bench/bench_gpu.py
# (our step vs the dense reference and the encoder-product floor; harvest vs a plain forward), in
# about 5 minutes. Results: bench-results/gpu.json, gpu-profile.txt (where our step's time goes) and the
# pytest summary. Exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 THP_MEM_ALLOC_ENABLE=1
"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu-check: no CUDA device visible to torch {torch.__version__}: the GPU check needs one "
             "(a CUDA build of torch on a machine with a GPU; README, Running on GPUs)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
PY
timeout 420 "$PYTHON" -m pytest -q -m gpu tests/gpu -rs
mkdir -p bench-results
timeout 300 "$PYTHON" tests/bench/bench_gpu.py --out bench-results/gpu.json --profile bench-results/gpu-profile.txt
