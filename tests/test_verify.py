"""attngen.verify's pass rule: a non-finite error or a non-finite yardstick never passes (S4)."""
import math

import torch

import attngen
from attngen.verify import CaseResult, verify_case


def _case(err, ref, absolute=1.0):
    res = CaseResult("x", "causal", "torch", "linear", "float16", "B1", tolerance=5e-3, noise=1e-3)
    res.errors, res.ref_errors, res.abs_errors = {"o": err}, {"o": ref}, {"o": absolute}
    return res


def test_an_overflowing_yardstick_excuses_nothing():
    assert _case(1e-4, 1e-4).passed
    assert _case(0.5, 0.3).passed  # within FUDGE x a finite yardstick's error
    assert not _case(0.5, math.inf).passed  # the old rule passed this: 0.5 <= 2 * inf
    assert not _case(1e-4, math.nan).passed
    assert not _case(math.inf, math.inf).passed
    assert not _case(math.nan, 1e-4).passed


def test_a_scale_that_overflows_float16_fails_verification():
    """dot(q, k) * 1000 overflows in float16 (dv reaches inf in the op and in the yardstick): no pass."""
    spec = attngen.load_spec({"name": "big", "similarity": "dot(q, k) * 1000"})
    res = verify_case(attngen.compile(spec, backend="torch"), spec, dtype=torch.float16, t=16, dk=16)
    assert not math.isfinite(res.ref_errors["dv"]) and not math.isfinite(res.errors["dv"])
    assert not res.quantity_passed("dv") and not res.passed


def test_an_op_returning_zeros_fails_even_when_the_yardstick_overflows():
    spec = attngen.load_spec({"name": "big", "similarity": "dot(q, k) * 1000"})

    def zeros(q, k, v):
        return (q[..., :1] * 0).expand(*q.shape[:-1], v.shape[-1]) + 0 * v.sum() + 0 * k.sum()

    res = verify_case(zeros, spec, dtype=torch.float16, t=16, dk=16)
    # its dv (zero) is wrong by 100 % against the float64 reference, while the float16 yardstick's dv is inf
    assert res.errors["dv"] == 1.0 and not math.isfinite(res.ref_errors["dv"])
    assert not res.quantity_passed("dv") and not res.passed


def test_a_parameter_on_another_device_is_an_input_error():
    """A parameter tensor on another device than q, k, v: one InputError naming it (was a raw NotImplementedError)."""
    import pytest
    spec = attngen.load_spec("cottention")
    q = k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(attngen.InputError, match="parameter 'm' is on meta, the inputs on cpu"):
        attngen.compile(spec, backend="torch")(q, k, v, m=torch.zeros(2, device="meta"))


def test_a_cache_folder_that_is_a_file_is_an_input_error(tmp_path, monkeypatch):
    import pytest

    from attngen.runtime.triton import loader
    blocker = tmp_path / "cache"
    blocker.write_text("")
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(blocker))
    with pytest.raises(attngen.InputError, match="expected a folder"):
        loader._write("x", "text")
