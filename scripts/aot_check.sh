#!/usr/bin/env bash
# The ahead-of-time compile check CI runs (.ci/run): every built-in module's kernels compiled for sm_90 (H100 / H200)
# at head dims 64 and 128, without a GPU (attngen aot; bfloat16: the dtype of training runs, and the one whose tile
# sizes and tensor-core path the interpreter cannot check). Writes bench/results/aot-sm90.json (not committed);
# exits 1 when a configuration needs more shared memory than sm_90 has or fails to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
.venv/bin/attngen aot --all --arch sm_90 --head-dim 64,128 --dtype bfloat16 --json bench/results/aot-sm90.json
