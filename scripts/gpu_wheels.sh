#!/usr/bin/env bash
# Wheels for an offline GPU machine (Python 3.12, manylinux x86_64): fla-core, the GPU benchmark's peer, and
# its pure-Python dependencies, into wheels/ (ignored by git; the device tool carries it with carry=["wheels"]).
# There: pip install --no-index --find-links wheels fla-core einops
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --implementation cp -d wheels fla-core==0.6.0 einops
ls -l wheels
