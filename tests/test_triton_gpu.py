"""The generated Triton kernels natively on a GPU, bf16 included, at larger sizes than the interpreter allows.

Skipped on machines without CUDA (every CPU machine and CI): the interpreter tests in test_triton_interp.py
cover fp32/fp16 there, and Triton 3.9's interpreter computes bf16 tl.dot wrongly, so bf16 is checked here only.
Run with scripts/gpu_check.sh.
"""
import pytest
import torch

from attngen import load_spec
from attngen.plan import build_plan
from attngen.naive import reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 and native kernels)")]

SPECS = ("linear_elu", "relu_linear", "cosformer", "cottention", "retention")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_rms(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-2)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,d", [(1, 64), (255, 64), (1000, 128), (777, 80)], ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", SPECS)
def test_native_matches_reference(name, causal, t, d, dtype):
    from attngen import triton_backend
    spec = load_spec(name, causal=causal)
    fn = getattr(triton_backend.load_module(build_plan(spec, plan="linear")), f"{spec.name}_attention")
    g = torch.Generator(device="cpu").manual_seed(t)
    b, h = 2, 4
    q, k, v, do = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(4))
    ours = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v)]
    gold = [x.cuda().requires_grad_() for x in (q, k, v)]
    o = fn(*ours)
    ref = reference(spec)(*gold)
    o.backward(do.to("cuda", dtype))
    ref.backward(do.cuda())
    for n, x, y in [("o", o, ref)] + [("d" + c, a.grad, r.grad) for c, a, r in zip("qkv", ours, gold)]:
        err = rel_rms(x, y)
        assert err <= TOL[dtype], f"{n}: relative RMS {err:.3g} > {TOL[dtype]:g}"
