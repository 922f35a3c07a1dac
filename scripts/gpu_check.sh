#!/usr/bin/env bash
# On a GPU machine: the whole test suite natively (no interpreter), the GPU-marked tests included (bf16 too),
# then the benchmark. Writes the log to bench/results/<date>-gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
mkdir -p bench/results
log="bench/results/$(date +%F)-gpu-check.log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python -m pytest -q -rs tests/
} 2>&1 | tee "$log"
