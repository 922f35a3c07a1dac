#!/usr/bin/env bash
# The ahead-of-time compile check (attngen aot): every built-in module's kernels compiled for sm_90 (H100 / H200)
# without a GPU, in bfloat16 (the dtype of training runs, and the one whose tile sizes and tensor-core path the
# interpreter cannot check). Writes bench/results/aot-sm90.json (not committed); exits 1 when a configuration needs
# more shared memory than sm_90 has or fails to compile.
#
#   bash scripts/aot_check.sh            head dims 64 and 128: run it before committing a kernel or template change
#   bash scripts/aot_check.sh --ci       head dim 128 only (the largest tiles of most kernels): what .ci/run runs,
#                                        to keep CI within its time on 2 cores (the full check takes ~11 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
dims=64,128
if [ "${1:-}" = "--ci" ]; then
    dims=128
fi
mkdir -p bench/results
.venv/bin/attngen aot --all --arch sm_90 --head-dim "$dims" --dtype bfloat16 --json bench/results/aot-sm90.json
