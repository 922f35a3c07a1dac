#!/usr/bin/env bash
# On a GPU machine (the device tool; carry=["wheels"] after `bash scripts/gpu_wheels.sh` here): fla-core from
# the carried wheels, the whole test suite natively (no interpreter; the GPU-marked tests and bf16 included), then
# the GPU benchmark against fla-core and SDPA. Logs to bench/results/<date>-gpu-check.log; the benchmark writes its
# own table (bench/results/<date>-<gpu>-gpu.md). QUICK=1: the benchmark's short run only.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
mkdir -p bench/results
log="bench/results/$(date +%F)-gpu-check.log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    if [ -d wheels ]; then python -m pip install -q --no-index --find-links wheels fla-core einops; fi
    python -m pytest -q -rs -p no:cacheprovider tests/
    python -m benchmarks gpu ${QUICK:+--quick}
} 2>&1 | tee "$log"
