"""Shared pytest set-up.

Without a CUDA GPU, Triton kernels can only run under the interpreter, which must be chosen before triton
is imported: so it is set here, once, for the whole session. On a GPU machine nothing is set and every
Triton test runs natively (scripts/gpu_check.sh)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces alone."""
    torch.manual_seed(0)
