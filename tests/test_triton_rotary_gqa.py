"""Rotary positions and grouped KV heads in the generated quadratic kernels: RoPE applied in registers (the halves
of each q and k row split apart and rotated by the host's float64-formed cos / sin tables; the gradients rotated
back before they are stored), k and v read at kv head h // (H / H_kv) with no copy, dk and dv summed over each
group. llama against SDPA(enable_gqa=True) on inputs rotated by transformers' rotate_half convention; other
quadratic specs with grouped heads against the same spec on repeated k and v; the refusals.

Under the interpreter on CPU (tests/conftest.py), natively on a GPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")

import attngen  # noqa: E402
from attngen import pipeline  # noqa: E402
from attngen.ir import Ordering  # noqa: E402
from attngen.runtime.inputs import default_parameters  # noqa: E402
from attngen.runtime.triton import loader  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def rotate_half_rope(x, theta=10000.0):
    """RoPE as transformers' Llama applies it: x cos + rotate_half(x) sin with cos, sin of cat(freqs, freqs)."""
    t, d = x.shape[2], x.shape[3]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([torch.outer(torch.arange(t, dtype=torch.float64), inv_freq)] * 2, -1)
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


def grads(fn, leaves, do):
    xs = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*xs)
    return out, torch.autograd.grad((out * do.to(out.dtype)).sum(), xs)


@pytest.mark.parametrize("h,hkv,t,d,causal", [(8, 2, 70, 16, True), (8, 2, 1, 16, True), (4, 4, 33, 32, True),
                                               (6, 3, 50, 64, False), (8, 1, 130, 16, True)])
def test_llama_equals_sdpa_enable_gqa_on_rotated_inputs(h, hkv, t, d, causal):
    g = torch.Generator().manual_seed(t + d)
    q = torch.randn(2, h, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(2, h, t, d, generator=g, dtype=torch.float64)
    op = attngen.compile(attngen.load_spec("llama", causal=causal), backend="triton")

    def theirs(q, k, v):
        return F.scaled_dot_product_attention(rotate_half_rope(q), rotate_half_rope(k), v, is_causal=causal,
                                              enable_gqa=True)
    out, got = grads(op, [x.float().to(DEVICE) for x in (q, k, v)], do.float().to(DEVICE))
    ref, want = grads(theirs, [q, k, v], do)
    assert_close("o", out, ref, 1e-4)
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == w.shape
        assert_close(name, a, w, 1e-4)


def test_llama_per_call_scale_and_bthd_layout():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 40, 4, 32, generator=g)
    k, v = (torch.randn(1, 40, 2, 32, generator=g) for _ in range(2))
    op = attngen.compile("llama", backend="triton", layout="bthd")
    out = op(*(x.to(DEVICE) for x in (q, k, v)), scale=0.05)
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(rotate_half_rope(qh), rotate_half_rope(kh), vh, is_causal=True,
                                         enable_gqa=True, scale=0.05).transpose(1, 2)
    assert_close("o", out, ref, 1e-4)


@pytest.mark.parametrize("name", ["softmax", "alibi", "forgetting"])
def test_grouped_heads_equal_repeated_kv_heads(name):
    spec = attngen.load_spec(name)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 45, 16, generator=g)
    k, v = (torch.randn(2, 2, 45, 16, generator=g) for _ in range(2))
    extra = {"g": F.logsigmoid(torch.randn(2, 6, 45, generator=g)).to(DEVICE)} if spec.gates else {}
    extra |= {n: p.float().to(DEVICE) for n, p in default_parameters(spec, 6, torch.float64, head_dim=16).items()}
    mod = loader.load_module(pipeline.plan(spec, target="triton", force="quadratic"))
    fn = getattr(mod, f"{name}_attention")
    do = torch.randn(2, 6, 45, 16, generator=g).to(DEVICE)
    out, got = grads(lambda q, k, v: fn(q, k, v, **extra), [x.to(DEVICE) for x in (q, k, v)], do)
    ref, want = grads(lambda q, k, v: fn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), **extra),
                      [x.to(DEVICE) for x in (q, k, v)], do)
    assert_close("o", out, ref, 1e-5)
    for nm, a, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(nm, a, w, 1e-5)


def test_refusals_with_reasons():
    q = torch.randn(1, 4, 20, 24, device=DEVICE)
    op = attngen.compile("llama", backend="triton")
    with pytest.raises(attngen.InputError, match=r"head dim that is a power of two >= 16 \(found 24\)"):
        op(q, q, q)
    lin = attngen.compile(attngen.load_spec("linear_elu", causal=False), backend="triton", plan="linear")
    with pytest.raises(attngen.InputError, match=r"grouped KV heads .* not by the bidirectional linear ones"):
        lin(torch.randn(1, 4, 20, 16, device=DEVICE), *(torch.randn(1, 2, 20, 16, device=DEVICE) for _ in range(2)))
    mod = loader.load_module(pipeline.plan("llama", target="triton"))
    assert mod.MODULE.quadratic.sparse_max_block == 64  # cos / sin rows per tile: blocks of 128 would spill
    with pytest.raises(attngen.InputError, match=r"block"):
        mod.llama_attention_block_sparse(q[..., :16], q[..., :16], q[..., :16],
                                         torch.zeros(1, 4, 1, 1, dtype=torch.int32, device=DEVICE), 128)
    rope_bidirectional = {"name": "rr", "similarity": "dot(q, k) / sqrt(d)", "reweight": "gamma**abs(i - j)",
                          "rotary": True, "constants": {"gamma": "0.9"}, "causal": False}
    plan = pipeline.plan(rope_bidirectional, target="triton")
    assert plan.capabilities.kernels == (Ordering.QUADRATIC,)
    assert "not the linear ordering (rotary positions are applied by the quadratic and the causal" in plan.explain()


@pytest.mark.parametrize("name", ["llama", "forgetting"])
def test_packed_sequences_of_quadratic_modules_run_one_by_one(name):
    """cu_seqlens through attngen.compile: each sequence from position 0 (rotary) with its own G (gates)."""
    spec = attngen.load_spec(name)
    lengths = [13, 1, 40]
    cu = torch.tensor([0, 13, 14, 54])
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 4, 54, 16, generator=g) for _ in range(3))
    extra = {"g": F.logsigmoid(torch.randn(1, 4, 54, generator=g))} if spec.gates else {}
    op = attngen.compile(spec, backend="triton")
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, *extra.values())]
    out = op(*leaves[:3], cu_seqlens=cu.to(DEVICE), **dict(zip(extra, leaves[3:])))
    do = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad((out * do.to(DEVICE)).sum(), leaves)
    ref = attngen.reference(spec)
    gold = [x.double().requires_grad_() for x in (q, k, v, *extra.values())]
    pieces = [ref(*(x[:, :, a:b] for x in gold[:3]), **{n: x[:, :, a:b] for n, x in zip(extra, gold[3:])})
              for a, b in zip(cu[:-1], cu[1:])]
    want = torch.autograd.grad((torch.cat(pieces, 2) * do.double()).sum(), gold)
    assert sum(lengths) == 54
    assert_close("o", out, torch.cat(pieces, 2), 1e-4)
    for name_, a, w in zip(["dq", "dk", "dv", "dg"], got, want):
        assert_close(name_, a, w, 1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the causal linear kernels (chunk-parallel): rotary positions from each sequence's start or state, grouped heads
# ---------------------------------------------------------------------------------------------------------------
ROPE_RETENTION = {"name": "rope_retention", "similarity": "dot(q, k) / sqrt(d)", "reweight": "gamma**(i - j)",
                  "rotary": {"theta": 10000}, "normalize": "none", "constants": {"gamma": "1 - 2**(-5 - h)"}}
ROPE_ELU = {"name": "rope_elu", "similarity": "dot(elu(q) + 1, elu(k) + 1)", "rotary": True,
            "normalize": {"kind": "rowsum", "eps": 1e-6}}
LINEAR_CASES = {"rope_retention": (ROPE_RETENTION, 4), "rope_elu": (ROPE_ELU, 4), "linear_elu_gqa": ("linear_elu", 2),
                "retention_gqa": ("retention", 2), "simple_gla_gqa": ("simple_gla", 2), "gla_gqa": ("gla", 1),
                "rope_elu_gqa": (ROPE_ELU, 2)}


def linear_inputs(spec, hkv, t, g, b=2, h=4, d=16):
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    extra = {}
    if spec.gate is not None:
        shape = (b, h, t) + ((d,) if spec.gate.per == "key_dim" else ())
        extra["g"] = F.logsigmoid(2 + torch.randn(shape, generator=g, dtype=torch.float64))
    return q, k, v, extra


def repeated(spec, groups):
    ref = attngen.reference(spec)
    return lambda q, k, v, **kw: ref(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), **kw)


@pytest.mark.parametrize("key", sorted(LINEAR_CASES))
@pytest.mark.parametrize("t", [1, 63, 150])
def test_linear_kernels_against_the_reference(key, t):
    source, hkv = LINEAR_CASES[key]
    spec = attngen.load_spec(source)
    g = torch.Generator().manual_seed(t)
    q, k, v, extra = linear_inputs(spec, hkv, t, g)
    op = attngen.compile(spec, backend="triton", plan="linear")
    names = ["q", "k", "v", *extra]
    leaves = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v, *extra.values())]
    o = op(*leaves[:3], **dict(zip(extra, leaves[3:])))
    do = torch.randn(o.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((o * do.float().to(DEVICE)).sum(), leaves)
    gold = [x.clone().requires_grad_() for x in (q, k, v, *extra.values())]
    ro = repeated(spec, 4 // hkv)(*gold[:3], **dict(zip(extra, gold[3:])))
    want = torch.autograd.grad((ro * do).sum(), gold)
    assert_close("o", o, ro, 1e-4)
    for name, a, w in zip(names, got, want):
        assert a.shape == w.shape
        assert_close("d" + name, a, w, 1e-4)


@pytest.mark.parametrize("key", ["rope_retention", "rope_elu", "simple_gla_gqa", "rope_elu_gqa"])
def test_linear_kernels_prefill_packed_states_and_steps(key):
    """A packed prefill with initial states at other positions, then decode steps: rotary positions continue from
    each sequence's pos; against the torch backend (itself checked against the reference) on the same calls."""
    source, hkv = LINEAR_CASES[key]
    spec = attngen.load_spec(source)
    g = torch.Generator().manual_seed(70)
    cu = torch.tensor([0, 5, 45, 68])  # sequences of 5, 40 and 23 tokens
    q, k, v, extra = linear_inputs(spec, hkv, 68, g, b=1)
    ops = {b: attngen.compile(spec, backend=b) for b in ("triton", "torch")}
    dev = {"triton": DEVICE, "torch": "cpu"}
    outs = {}
    shared = pipeline.plan(spec).capabilities.shared_state and hkv < 4  # one state per kv head
    for b, op in ops.items():
        state = op.init_state(3, hkv if shared else 4, 16, 16, device=dev[b])
        state.pos = torch.tensor([0, 7, 100], device=dev[b])
        x = [t.float().to(dev[b]) for t in (q, k, v)]
        ex = {n: t.float().to(dev[b]) for n, t in extra.items()}
        o, state = op(*x, cu_seqlens=cu.to(dev[b]), initial_state=state, return_state=True, **ex)
        steps = []
        for j in range(3):  # one more token per sequence
            qt = torch.randn(3, 4, 1, 16, generator=torch.Generator().manual_seed(j))
            kt, vt = (torch.randn(3, hkv, 1, 16, generator=torch.Generator().manual_seed(10 + j)) for _ in range(2))
            gt = {n: F.logsigmoid(torch.randn(3, 4, 1, *x_.shape[3:], generator=torch.Generator().manual_seed(j)))
                  for n, x_ in extra.items()}
            ot, state = op.step(qt.to(dev[b]), kt.to(dev[b]), vt.to(dev[b]), state,
                                **{n: t.to(dev[b]) for n, t in gt.items()})
            steps.append(ot)
        outs[b] = (o, torch.cat(steps, 2), state.S, state.pos)
    for name, a, w in zip(["o", "steps", "S", "pos"], outs["triton"], outs["torch"]):
        assert_close(name, a.float(), w.float(), 1e-4)


@pytest.mark.parametrize("source,heads", [("linear_elu", 2), ("simple_gla", 4), ("rope_elu", 2)])
def test_states_per_kv_head_where_the_algebra_allows(source, heads):
    from test_gates import shared_state_case
    spec = attngen.load_spec(ROPE_ELU if source == "rope_elu" else source)
    assert shared_state_case(spec, "triton", DEVICE) == heads
