"""Shared pytest set-up.

Without a CUDA GPU, Triton kernels can only run under the interpreter, which must be chosen before triton
is imported: so it is set here, once, for the whole session. On a GPU machine nothing is set and every
Triton test runs natively (scripts/gpu_check.sh)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the tests marked slow (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes on 2 cores: inductor on every spec, opcheck on every module) are skipped unless
    asked for, with --run-slow or a -m expression naming them: CI runs the plain `pytest -q -n auto`."""
    if config.getoption("--run-slow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (or -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces alone."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Generated modules go to a per-session temporary cache, never to the user's ~/.cache/attngen."""
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attngen-cache"))


def assert_close(name, out, ref, tol):
    """Shape, finiteness (an unwritten NaN-poisoned buffer fails) and relative RMS error within ``tol``."""
    from attngen.verify import rel_rms
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (a buffer the kernel did not write?)"
    err = rel_rms(out, ref)
    assert err <= tol, f"{name}: relative RMS error {err:.3g} > {tol:g}"
