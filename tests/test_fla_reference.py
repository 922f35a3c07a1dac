"""A second, independent reference: fla-core's pure-PyTorch naive functions (they run on a CPU) for the operators
attngen shares with fla. Causal linear attention `dot(q, k)/sqrt(d)` without normalisation against
`naive_chunk_linear_attn`, and retention (the decay class, gamma per head) against `naive_chunk_simple_gla` with
g = log(gamma) per token, including an initial state, the final state and every gradient; on the torch backend
and on the generated Triton kernels (both causal scans; the interpreter on a CPU)."""
import os

import pytest
import torch
from conftest import assert_close

import attngen

fla_linear = pytest.importorskip("fla.ops.linear_attn.naive", reason="fla-core is not installed (pip install fla-core)")
fla_gla = pytest.importorskip("fla.ops.simple_gla.naive")

LINEAR = {"name": "linear_dot", "causal": True, "similarity": "dot(q, k) / sqrt(d)", "normalize": "none"}
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
B, H, D = 2, 3, 16


def _inputs(t, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, t, D, generator=g) for _ in range(4)]  # q, k, v, dO


def _op(spec, backend, monkeypatch):
    """The op of ``backend``: "torch", or "triton-fused" / "triton-parallel" (the host's causal scan forced)."""
    if backend == "torch":
        return attngen.compile(spec, backend="torch", plan="linear")
    pytest.importorskip("triton")
    from attngen.runtime.triton import host
    monkeypatch.setattr(host, "SCAN", backend.split("-")[1])
    return attngen.compile(spec, backend="triton", plan="linear")


@pytest.mark.parametrize("backend", ["torch", "triton-fused", "triton-parallel"])
def test_linear_attention_equals_fla_naive(backend, monkeypatch):
    op = _op(LINEAR, backend, monkeypatch)
    q, k, v, do = _inputs(128, 0)  # fla's naive function needs T a multiple of its chunk (64)
    ours = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    theirs = [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    o = op(*ours)
    ref = fla_linear.naive_chunk_linear_attn(*theirs).transpose(1, 2)
    assert_close("o", o.cpu(), ref, 1e-5)
    got = torch.autograd.grad((o * do.to(DEVICE)).sum(), ours)
    want = torch.autograd.grad((ref * do).sum(), theirs)
    for n, a, w in zip("qkv", got, want):
        assert_close("d" + n, a.cpu(), w.transpose(1, 2), 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton-fused", "triton-parallel"])
def test_retention_equals_fla_naive_simple_gla(backend, monkeypatch):
    op = _op(attngen.load_spec("retention"), backend, monkeypatch)
    t = 100  # a short last chunk on both sides
    q, k, v, do = _inputs(t, 1)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))
    g = torch.log(gamma).expand(B, t, H).contiguous()
    s0 = torch.randn(B, H, D, D, generator=torch.Generator().manual_seed(2)) * 0.1
    ds_end = torch.randn(B, H, D, D, generator=torch.Generator().manual_seed(3))
    ours = [x.to(DEVICE).requires_grad_() for x in (q, k, v, s0)]
    state = op.init_state(B, H, D, D, device=DEVICE)
    state.S = ours[3]
    o, st = op(*ours[:3], initial_state=state, return_state=True)
    theirs = [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)] + [s0.clone().requires_grad_()]
    ref, ref_st = fla_gla.naive_chunk_simple_gla(*theirs[:3], g, initial_state=theirs[3], output_final_state=True)
    ref = ref.transpose(1, 2)
    assert_close("o", o.cpu(), ref, 1e-5)
    assert_close("final state", st.S.cpu(), ref_st, 1e-5)
    got = torch.autograd.grad((o * do.to(DEVICE)).sum() + (st.S * ds_end.to(DEVICE)).sum(), ours)
    want = torch.autograd.grad((ref * do).sum() + (ref_st * ds_end).sum(), theirs)
    for n, a, w in zip(["dq", "dk", "dv", "dS0"], got, want):
        w = w if n == "dS0" else w.transpose(1, 2)
        assert_close(n, a.cpu(), w, 1e-5)
