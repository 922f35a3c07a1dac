"""The generated Triton kernels natively on a GPU, bf16 included, at larger sizes than the interpreter allows.

Skipped on machines without CUDA (every CPU machine and CI): the interpreter tests in test_triton_interp.py and
test_triton_quadratic.py cover fp32/fp16 there, and Triton 3.9's interpreter computes bf16 tl.dot wrongly, so
bf16 is checked here only.
Run with scripts/gpu_check.sh.
"""
import pytest
import torch

from attngen import load_spec
from attngen.naive import reference
from attngen.pipeline import plan as build_plan

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
    from attngen.runtime.triton import loader as triton_backend
    spec = load_spec(name, causal=causal)
    fn = getattr(triton_backend.load_module(build_plan(spec, force="linear")), f"{spec.name}_attention")
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scan", ["fused", "parallel"])
@pytest.mark.parametrize("name", ["relu_linear", "cosformer", "cottention", "based", "retention"])
def test_native_scans_match_reference(name, scan, dtype, monkeypatch):
    """Both causal scans natively (the host's SCAN forced), bf16 included, 1000 tokens in chunks."""
    from attngen.runtime.triton import loader as triton_backend
    spec = load_spec(name, causal=True)
    mod = triton_backend.load_module(build_plan(spec, force="linear"))
    monkeypatch.setattr(mod.host, "SCAN", scan)
    g = torch.Generator(device="cpu").manual_seed(3)
    dk = 16 if name == "based" else 64
    q, k = (torch.randn(2, 4, 1000, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v, do = (torch.randn(2, 4, 1000, 64, generator=g, dtype=torch.float64) for _ in range(2))
    ours = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v)]
    gold = [x.cuda().requires_grad_() for x in (q, k, v)]
    o = getattr(mod, f"{spec.name}_attention")(*ours)
    ref = reference(spec)(*gold)
    o.backward(do.to("cuda", dtype))
    ref.backward(do.cuda())
    for n, x, y in [("o", o, ref)] + [("d" + c, a.grad, r.grad) for c, a, r in zip("qkv", ours, gold)]:
        err = rel_rms(x, y)
        assert err <= TOL[dtype], f"{n}: relative RMS {err:.3g} > {TOL[dtype]:g}"


# ---------------------------------------------------------------------------------------------
# the quadratic ordering (flash-style softmax family, a general similarity, block-sparse), natively
# ---------------------------------------------------------------------------------------------
SIGMOID = {"name": "sigmoid_attn", "similarity": "sigmoid(dot(q, k)/sqrt(d) - b)", "normalize": "none",
           "parameters": {"b": {"shape": [], "init": 1.0}}}


def _quadratic_case(spec, t, s, d, dtype, seed, block=None):
    """Errors of o and every gradient (q, k, v, parameters) of the quadratic module against the float64
    reference (block-sparse: every key block listed, so the reference is the dense one)."""
    from attngen.runtime.inputs import default_parameters
    from attngen.runtime.triton import loader as triton_backend
    module = triton_backend.load_module(build_plan(spec, force="quadratic"))
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h = 2, 4
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    params = default_parameters(spec, h, torch.float64)
    ours = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v)]
    ours_p = {n: p.to("cuda", torch.float32).requires_grad_() for n, p in params.items()}
    gold = [x.cuda().requires_grad_() for x in (q, k, v)]
    gold_p = {n: p.cuda().requires_grad_() for n, p in params.items()}
    if block is None:
        o = getattr(module, f"{spec.name}_attention")(*ours, **ours_p)
    else:
        nqb, nkb = -(-t // block), -(-s // block)
        every = torch.arange(nkb, device="cuda").flip(0).expand(b, h, nqb, nkb).contiguous()
        o = getattr(module, f"{spec.name}_attention_block_sparse")(*ours, every, block, **ours_p)
    ref = reference(spec)(*gold, **gold_p)
    o.backward(do.to("cuda", dtype))
    ref.backward(do.cuda())
    pairs = [("o", o, ref)] + [("d" + c, a.grad, r.grad) for c, a, r in zip("qkv", ours, gold)]
    pairs += [("d" + n, ours_p[n].grad, gold_p[n].grad) for n in params]
    return {n: rel_rms(x, y) for n, x, y in pairs}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t,d", [(1, 64), (255, 64), (1000, 128), (777, 80)], ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["softmax", "alibi", "sigmoid"])
def test_quadratic_native_matches_reference(name, causal, t, d, dtype):
    spec = load_spec({**SIGMOID, "causal": causal} if name == "sigmoid" else name, causal=causal)
    s = t if causal else max(1, t // 2 + 7)  # cross attention when bidirectional
    for n, err in _quadratic_case(spec, t, s, d, dtype, seed=t).items():
        assert err <= TOL[dtype], f"{n}: relative RMS {err:.3g} > {TOL[dtype]:g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("block", [16, 64, 128])
@pytest.mark.parametrize("name,causal", [("softmax", True), ("alibi", False)], ids=["softmax-causal", "alibi-bidir"])
def test_block_sparse_native_every_block_matches_reference(name, causal, block, dtype):
    spec = load_spec(name, causal=causal)
    for n, err in _quadratic_case(spec, 700, 700 if causal else 333, 64, dtype, seed=block, block=block).items():
        assert err <= TOL[dtype], f"{n}: relative RMS {err:.3g} > {TOL[dtype]:g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["cosformer", "cottention", "retention", "polynomial2"])
def test_quadratic_native_separable_specs(name, causal, dtype):
    """The quadratic kernels of the separable specs (what their modules run below the crossover), forced."""
    spec = load_spec(name, causal=causal)
    for n, err in _quadratic_case(spec, 255, 255 if causal else 130, 64, dtype, seed=3).items():
        assert err <= TOL[dtype], f"{n}: relative RMS {err:.3g} > {TOL[dtype]:g}"
