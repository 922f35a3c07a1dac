#!/usr/bin/env bash
# The checks for a lent GPU machine, in one run (a machine's start costs minutes):
#   - the main job natively: `attngen build --all` (every built-in, both backends, Triton kernels compiled for the GPU)
#   - every built-in on the triton backend in bfloat16 at head dim 64 (the interpreter cannot check bf16)
#   - the test suite natively (no interpreter; the GPU-marked tests included)
# the three at once (Triton's compiles are CPU-bound and the machine has many cores), then the GPU benchmark against
# fla-core and SDPA alone on the GPU. Logs and the benchmark's table go to $OUT (or bench/results/gpu-<date>).
# Carry wheels/ (`bash scripts/gpu_wheels.sh` here) for fla-core. Each step has a time limit (seconds): T_JOBS for
# the three, T_BENCH for the benchmark; a step cut short says so in its log.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
out="${OUT:-bench/results/gpu-$(date +%F)}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls wheels/fla_core-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/fla_core-*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__)"
    python3 -c "import transformers; print('transformers', transformers.__version__)"
    python3 -c "import fla; print('fla-core', fla.__version__)"
} > "$out/env.txt" 2>&1
jobs_limit="${T_JOBS:-270}"
start=$(date +%s)
timeout "$jobs_limit" python3 -m attngen build --all --out /tmp/attngen-generated > "$out/mainjob.log" 2>&1 &
timeout "$jobs_limit" python3 -m attngen verify --all --backend triton --dtype bfloat16 --head-dim 64 \
    --seq-len 100,300 > "$out/bf16.log" 2>&1 &
timeout "$jobs_limit" python3 -m pytest -q -rfEs -n "${WORKERS:-12}" -p no:cacheprovider --timeout 200 \
    --junitxml="$out/junit.xml" tests/ > "$out/tests.log" 2>&1 &
wait
echo "three jobs: $(( $(date +%s) - start )) s (limit $jobs_limit s)" >> "$out/env.txt"
timeout "${T_BENCH:-120}" python3 -m benchmarks gpu --quick --repeats 10 --out "$out" > "$out/bench.log" 2>&1
echo "benchmark rc $?" >> "$out/env.txt"
for f in mainjob bf16 tests bench; do echo "== $f"; tail -n 4 "$out/$f.log"; done
