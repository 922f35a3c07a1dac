"""Gates, rotary positions, grouped KV heads and the per-call scale on the torch backend: every new built-in
against attngen's naive float64 reference and, where fla-core has the operator, fla's pure-PyTorch reference;
states, decoding and packed sequences; the long-sequence stability of the chunk-local form; the errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import attngen
from attngen import pipeline
from attngen.verify import rel_rms

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}
B, H, D = 2, 3, 16
GATED = ("simple_gla", "gla", "forgetting")


def gate_for(spec, b, h, t, d, dtype=torch.float64, layout="bhtd", seed=0, shift=2.0):
    """Log gates <= 0 (around log 0.88 with the default shift), in the layout's order."""
    g = torch.Generator().manual_seed(seed)
    dims = (b, h, t) if layout == "bhtd" else (b, t, h)
    dims += (d,) if spec.gate.per == "key_dim" else ()
    return F.logsigmoid(shift + torch.randn(dims, generator=g, dtype=torch.float64)).to(dtype)


def inputs(b, h, t, d, hkv=None, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    return (torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64).to(dtype))


def run(fn, leaves: dict, do):
    """Output and the gradient of every leaf (q, k, v, the gate, ...) of sum(out * do)."""
    xs = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    out = fn(**xs)
    return out, torch.autograd.grad((out.float() * do.float()).sum(), list(xs.values())) \
        if out.dtype == torch.float16 else torch.autograd.grad((out * do.to(out.dtype)).sum(), list(xs.values()))


def compare(spec, op_fn, ref_fn, leaves: dict, do, tol):
    out, grads = run(op_fn, leaves, do)
    ref_leaves = {n: x.double() for n, x in leaves.items()}
    ref_out, ref_grads = run(ref_fn, ref_leaves, do.double())
    errors = {"o": rel_rms(out.double(), ref_out)}
    errors |= {f"d{n}": rel_rms(a.double(), b) for n, a, b in zip(leaves, grads, ref_grads)}
    bad = {n: f"{e:.1e}" for n, e in errors.items() if not e <= tol}
    assert not bad, f"{spec.name}: {bad} (tol {tol:.0e})"
    return errors


# ---------------------------------------------------------------------------------------------------------------
# every new built-in, every legal ordering, against the naive reference: output and every gradient
# ---------------------------------------------------------------------------------------------------------------
ORDERINGS = {"simple_gla": (None, "linear", "quadratic", "recurrent"), "gla": (None, "linear", "recurrent"),
             "forgetting": (None,), "llama": (None,)}
CASES = [pytest.param(n, p, t, dt, id=f"{n}-{p or 'auto'}-T{t}-{str(dt)[6:]}") for n, ps in ORDERINGS.items()
         for p in ps for t in (1, 63, 200) for dt in (torch.float64, torch.float32, torch.float16)]


@pytest.mark.parametrize("name,plan,t,dtype", CASES)
def test_builtin_against_reference(name, plan, t, dtype):
    spec = attngen.load_spec(name)
    op = attngen.compile(spec, backend="torch", plan=plan, chunk=16)
    q, k, v = inputs(B, H, t, D)
    leaves = {"q": q, "k": k, "v": v}
    if spec.gate is not None:
        leaves["g"] = gate_for(spec, B, H, t, D)
    leaves = {n: x.to(dtype) if n in "qkv" else x.float() if dtype == torch.float16 else x.to(dtype)
              for n, x in leaves.items()}
    do = torch.randn(B, H, t, D, dtype=torch.float64)
    ref = attngen.reference(spec)
    compare(spec, lambda **kw: op(**kw), lambda **kw: ref(**kw), leaves, do, TOL[dtype])


@pytest.mark.parametrize("name", ["simple_gla", "gla"])
def test_initial_state_gradient_and_final_state(name):
    """A prefill continued from a state equals the whole sequence; gradients reach the initial state (against
    autograd through the float64 recurrent ordering on the whole sequence)."""
    spec = attngen.load_spec(name)
    t0, t1 = 37, 29
    q, k, v = inputs(B, H, t0 + t1, D)
    g = gate_for(spec, B, H, t0 + t1, D)
    op = attngen.compile(spec, backend="torch", chunk=8)
    whole = attngen.compile(spec, backend="torch", plan="recurrent")
    o_all, s_all = whole(q, k, v, g=g, return_state=True)
    _, s_mid = whole(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], g=g[:, :, :t0], return_state=True)
    s0 = s_mid.S.detach().clone().requires_grad_()
    start = attngen.runtime.state.State(s0, None, s_mid.pos, s_mid.spec_hash)
    o2, s2 = op(q[:, :, t0:], k[:, :, t0:], v[:, :, t0:], g=g[:, :, t0:], initial_state=start, return_state=True)
    assert rel_rms(o2, o_all[:, :, t0:]) < 1e-12 and rel_rms(s2.S, s_all.S) < 1e-12
    # dS_0 against the recurrent ordering from the same state
    ds_end = torch.randn_like(s2.S)
    do = torch.randn_like(o2)
    (gs0,) = torch.autograd.grad((o2 * do).sum() + (s2.S * ds_end).sum(), s0)
    s0r = s_mid.S.detach().clone().requires_grad_()
    rec = attngen.compile(spec, backend="torch", plan="recurrent")
    o3, s3 = rec(q[:, :, t0:], k[:, :, t0:], v[:, :, t0:], g=g[:, :, t0:], return_state=True,
                 initial_state=attngen.runtime.state.State(s0r, None, s_mid.pos, s_mid.spec_hash))
    (gs0r,) = torch.autograd.grad((o3 * do).sum() + (s3.S * ds_end).sum(), s0r)
    assert rel_rms(gs0, gs0r) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# fla-core's pure-PyTorch references: a second, external oracle (bthd layout, as fla takes it)
# ---------------------------------------------------------------------------------------------------------------
fla_simple = pytest.importorskip("fla.ops.simple_gla.naive", reason="fla-core is a test extra")


def fla_case(name, t, dtype=torch.float32, scale=None):
    from fla.ops.forgetting_attn.naive import naive_forgetting_attn
    from fla.ops.gla.naive import naive_recurrent_gla
    spec = attngen.load_spec(name)
    q, k, v = (x.transpose(1, 2).contiguous() for x in inputs(B, H, t, D, seed=5))
    g = gate_for(spec, B, H, t, D, layout="bthd", seed=6)
    leaves = {"q": q, "k": k, "v": v, "g": g}
    leaves = {n: x.to(dtype) for n, x in leaves.items()}
    do = torch.randn(B, t, H, D, dtype=torch.float64)
    op = attngen.compile(spec, backend="torch", layout="bthd")
    extra = {} if scale is None else {"scale": scale}
    if name == "simple_gla":
        def theirs(q, k, v, g):
            out = fla_simple.naive_chunk_simple_gla(q, k, v, g, scale=scale)
            return out[0] if isinstance(out, tuple) else out
    elif name == "gla":
        def theirs(q, k, v, g):
            return naive_recurrent_gla(q, k, v, g)[0]  # scale fixed at 1/sqrt(d)
    else:
        def theirs(q, k, v, g):
            return naive_forgetting_attn(q, k, v, g, scale=scale)
    return spec, (lambda **kw: op(**kw, **extra)), (lambda **kw: theirs(**kw)), leaves, do


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("t", [1, 63, 200])
def test_against_fla_naive(name, t):
    spec, mine, theirs, leaves, do = fla_case(name, t)
    out, grads = run(mine, leaves, do)
    ref_out, ref_grads = run(theirs, leaves, do)  # fla computes in float32: compare at float32's level
    assert rel_rms(out, ref_out.to(out.dtype)) < 2e-6
    for n, a, b in zip(leaves, grads, ref_grads):
        assert rel_rms(a, b) < 5e-6, n


def test_per_call_scale_against_fla():
    spec, mine, theirs, leaves, do = fla_case("simple_gla", 63, scale=0.37)
    out, _ = run(mine, leaves, do)
    ref_out, _ = run(theirs, leaves, do)
    assert rel_rms(out, ref_out) < 2e-6


# ---------------------------------------------------------------------------------------------------------------
# decoding: op.step after a prefill equals the full forward
# ---------------------------------------------------------------------------------------------------------------
ROPE_LINEAR = {"name": "rope_retention", "similarity": "dot(q, k) / sqrt(d)", "reweight": "gamma**(i - j)",
               "rotary": {"theta": 10000}, "normalize": "none", "constants": {"gamma": "1 - 2**(-5 - h)"}}
ROPE_ELU = {"name": "rope_elu", "similarity": "dot(elu(q) + 1, elu(k) + 1)", "rotary": True,
            "normalize": {"kind": "rowsum", "eps": 1e-6}}


@pytest.mark.parametrize("source", ["simple_gla", "gla", ROPE_LINEAR, ROPE_ELU], ids=["simple_gla", "gla",
                                                                                     "rope_retention", "rope_elu"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_step_after_prefill_equals_forward(source, layout):
    spec = attngen.load_spec(source)
    t, n0 = 40, 29
    q, k, v = inputs(B, H, t, D, seed=7)
    extra = {"g": gate_for(spec, B, H, t, D, layout=layout, seed=8)} if spec.gate is not None else {}
    if layout == "bthd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    op = attngen.compile(spec, backend="torch", layout=layout)
    full = op(q, k, v, **extra)

    def cut(x, a, b):
        return x[:, :, a:b] if layout == "bhtd" else x[:, a:b]
    o, state = op(cut(q, 0, n0), cut(k, 0, n0), cut(v, 0, n0), return_state=True,
                  **{n: cut(x, 0, n0) for n, x in extra.items()})
    outs = [o]
    for j in range(n0, t):
        o, state = op.step(cut(q, j, j + 1), cut(k, j, j + 1), cut(v, j, j + 1), state,
                           **{n: cut(x, j, j + 1) for n, x in extra.items()})
        outs.append(o)
    got = torch.cat(outs, 2 if layout == "bhtd" else 1)
    assert rel_rms(got, full) < 1e-12
    assert rel_rms(full, attngen.reference(spec, layout=layout)(q, k, v, **extra)) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# packed sequences: each sequence's gate cumsum and rotary positions restart
# ---------------------------------------------------------------------------------------------------------------
PACKED = [pytest.param(src, stateful, id=f"{name}-{'state' if stateful else 'plain'}")
          for name, src in (("simple_gla", "simple_gla"), ("gla", "gla"), ("forgetting", "forgetting"),
                            ("llama", "llama"), ("rope_retention", ROPE_LINEAR))
          for stateful in (False, True) if not stateful or name not in ("forgetting", "llama")]  # softmax: no state


@pytest.mark.parametrize("source,stateful", PACKED)
def test_cu_seqlens_equals_each_sequence_alone(source, stateful):
    spec = attngen.load_spec(source)
    lengths = [13, 1, 40, 22]
    t = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = inputs(1, H, t, D, seed=9)
    extra = {"g": gate_for(spec, 1, H, t, D, seed=10)} if spec.gate is not None else {}
    op = attngen.compile(spec, backend="torch")
    leaves = {"q": q, "k": k, "v": v, **extra}
    do = torch.randn(1, H, t, D, dtype=torch.float64)
    out, grads = run(lambda **kw: op(**kw, cu_seqlens=cu, return_state=stateful)[0] if stateful
                     else op(**kw, cu_seqlens=cu), leaves, do)
    ref = attngen.reference(spec)
    pieces = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pieces.append(ref(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **{n: x[:, :, a:b] for n, x in extra.items()}))
    assert rel_rms(out, torch.cat(pieces, 2)) < 1e-12

    def whole(**kw):
        return torch.cat([ref(**{n: x[:, :, a:b] for n, x in kw.items()})
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 2)
    _, ref_grads = run(whole, leaves, do)
    for n, a, b in zip(leaves, grads, ref_grads):
        assert rel_rms(a, b) < 1e-11, n


# ---------------------------------------------------------------------------------------------------------------
# grouped KV heads
# ---------------------------------------------------------------------------------------------------------------
def rotate_half_rope(x, theta=10000.0):
    """RoPE as transformers' Llama applies it (rotate_half, cos and sin of cat(freqs, freqs))."""
    t, d = x.shape[2], x.shape[3]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_llama_gqa_equals_sdpa_enable_gqa_on_rotated_inputs(dtype):
    t = 70
    q, k, v = inputs(2, 8, t, D, hkv=2, seed=11, dtype=dtype)
    do = torch.randn(2, 8, t, D, dtype=dtype)
    op = attngen.compile("llama", backend="torch")

    def theirs(q, k, v):
        return F.scaled_dot_product_attention(rotate_half_rope(q), rotate_half_rope(k), v, is_causal=True,
                                              enable_gqa=True)
    leaves = {"q": q, "k": k, "v": v}
    out, grads = run(lambda **kw: op(**kw), leaves, do)
    ref_out, ref_grads = run(lambda **kw: theirs(**kw), leaves, do)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_rms(out, ref_out) < tol
    for n, a, b in zip("qkv", grads, ref_grads):
        assert a.shape == b.shape and rel_rms(a, b) < tol, n
    assert grads[1].shape == (2, 2, t, D)  # dk, dv per kv head: summed over each group


@pytest.mark.parametrize("name", ["simple_gla", "gla", "forgetting", "linear_elu", "cosformer", "retention"])
def test_gqa_equals_repeated_kv_heads(name):
    """Every ordering family with H_kv = H / 3: the same as k and v repeated per group (the definition)."""
    spec = attngen.load_spec(name)
    q, k, v = inputs(2, 6, 50, D, hkv=2, seed=12)
    extra = {"g": gate_for(spec, 2, 6, 50, D, seed=13)} if spec.gate is not None else {}
    op = attngen.compile(spec, backend="torch")
    leaves = {"q": q, "k": k, "v": v, **extra}
    do = torch.randn(2, 6, 50, D, dtype=torch.float64)
    out, grads = run(lambda **kw: op(**kw), leaves, do)

    def repeated(q, k, v, **kw):
        return attngen.reference(spec)(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), **kw)
    ref_out, ref_grads = run(repeated, leaves, do)
    assert rel_rms(out, ref_out) < 1e-12
    for n, a, b in zip(leaves, grads, ref_grads):
        assert rel_rms(a, b) < 1e-11, n


def test_gqa_decoding_keeps_states_per_query_head():
    op = attngen.compile("simple_gla", backend="torch")
    q, k, v = inputs(1, 4, 10, D, hkv=2, seed=14)
    g = gate_for(op.spec, 1, 4, 10, D)
    o, state = op(q, k, v, g=g, return_state=True)
    assert state.S.shape == (1, 4, D, D)
    o1, state = op.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state, g=g[:, :, :1])
    assert o1.shape == (1, 4, 1, D)


# ---------------------------------------------------------------------------------------------------------------
# long sequences: the chunk-local form never overflows
# ---------------------------------------------------------------------------------------------------------------
def test_simple_gla_16k_fp32_is_finite_and_matches_float64():
    t = 16384
    spec = attngen.load_spec("simple_gla")
    q, k, v = inputs(1, 1, t, D, seed=15)
    g = torch.full((1, 1, t), math.log(0.95), dtype=torch.float64)
    g = g + 0.01 * torch.randn(1, 1, t, dtype=torch.float64).clamp(max=0)
    op = attngen.compile(spec, backend="torch")
    leaves = {"q": q.float(), "k": k.float(), "v": v.float(), "g": g.float()}
    do = torch.randn(1, 1, t, D)
    out, grads = run(lambda **kw: op(**kw), leaves, do)
    assert all(bool(torch.isfinite(x).all()) for x in (out, *grads))
    # float64 oracle: the recurrent ordering, the definition token by token (T x T in float64 is 2 GB)
    rec = attngen.compile(spec, backend="torch", plan="recurrent")
    with torch.no_grad():
        ref = rec(q, k, v, g=g)
    assert rel_rms(out.double(), ref) < 1e-5
    # the caller-side folding the gate replaces: exp(-G_j) is past float32's range well before the end
    assert not bool(torch.isfinite(torch.exp(-g.float().cumsum(-1))).all())


# ---------------------------------------------------------------------------------------------------------------
# plans, errors
# ---------------------------------------------------------------------------------------------------------------
def test_plan_explains_where_the_gate_and_rotation_enter():
    text = pipeline.plan("simple_gla").explain()
    assert "gates: g [B, H, T] per head" in text and "decays the state by exp(g_t) per token" in text
    assert "quadratic ordering multiplies W by exp(G_i - G_j)" in text
    text = pipeline.plan("gla").explain()
    assert "per key dimension" in text and "there is no T x S score matrix" in text
    assert "fft          no" in text and "quadratic    no" in text
    assert "softmax score gains G_i - G_j" in pipeline.plan("forgetting").explain()
    text = pipeline.plan("llama").explain()
    assert "rotary: q and k rotated by their positions" in text and "scaled_dot_product_attention" in text


def test_gate_errors():
    op = attngen.compile("simple_gla", backend="torch")
    q, k, v = inputs(1, 2, 5, 8)
    with pytest.raises(attngen.InputError, match=r"missing the gate g= \(a tensor \[B, H, T\] of log gates"):
        op(q, k, v)
    with pytest.raises(attngen.InputError, match=r"gate 'g': expected shape \[B, H, T\] = \[1, 2, 5\].*\[1, 5, 2\]"):
        op(q, k, v, g=torch.zeros(1, 5, 2, dtype=torch.float64))
    with pytest.raises(attngen.InputError, match=r"values > 0 or not finite.*logsigmoid"):
        op(q, k, v, g=torch.full((1, 2, 5), 0.1, dtype=torch.float64))
    with pytest.raises(attngen.InputError, match=r"values > 0 or not finite"):
        op(q, k, v, g=torch.full((1, 2, 5), float("nan"), dtype=torch.float64))
    with pytest.raises(attngen.InputError, match=r"unknown keyword\(s\) \['h'\]"):
        op(q, k, v, g=torch.zeros(1, 2, 5, dtype=torch.float64), h=torch.zeros(1, 2, 5))


def test_gqa_head_errors():
    op = attngen.compile("llama", backend="torch")
    q = torch.randn(1, 6, 5, 8)
    with pytest.raises(attngen.InputError, match=r"heads: q has H = 6, k 4, v 4.*H_kv dividing H"):
        op(q, torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8))
    with pytest.raises(attngen.InputError, match=r"heads: q has H = 6, k 2, v 3"):
        op(q, torch.randn(1, 2, 5, 8), torch.randn(1, 3, 5, 8))


def test_rotary_needs_an_even_head_dim():
    op = attngen.compile("llama", backend="torch")
    with pytest.raises(attngen.InputError, match=r"head dim of q and k must be even, found 7"):
        op(*(torch.randn(1, 2, 5, 7) for _ in range(3)))


def test_spec_errors_for_the_new_keys():
    base = {"name": "x", "similarity": "dot(q, k) * scale"}
    cases = [({"gates": {"g": "row"}}, r"gates.g: found 'row'; expected head .* or key_dim"),
             ({"gates": {"g": "head", "f": "head"}}, r"gates: 2 gates; expected at most 1"),
             ({"gates": {"g": "head"}, "causal": False}, r"gates: a gate on a bidirectional spec"),
             ({"gates": {"q": "head"}}, r"gates.q: 'q' is a reserved name"),
             ({"gates": {"m": "head"}, "parameters": {"m": 0.5}}, r"'m' is both a gate and a constant or param"),
             ({"rotary": {"theta": 0.5}}, r"rotary.theta: theta 0.5; expected a number in \(1, 1e12\)"),
             ({"rotary": {"base": 10}}, r"rotary: unknown key\(s\) \['base'\]"),
             ({"rotary": "yes"}, r"rotary: found 'yes'"),
             ({"constants": {"scale": "1/n_q"}}, r"constants.scale: the scale uses \['n_q'\]"),
             ({"constants": {"scale": "1/d", "c": "scale * 2"}}, r"the constant\(s\) \['c'\] use the scale")]
    for extra, pattern in cases:
        with pytest.raises(attngen.SpecError, match=pattern):
            attngen.load_spec({**base, **extra})
    with pytest.raises(attngen.SpecError, match=r"per-key-dimension gate needs a separable similarity whose"):
        pipeline.plan({**base, "similarity": "(dot(q, k))**2", "gates": {"g": "key_dim"}})


def test_scale_default_declared_and_per_call():
    spec = attngen.load_spec("simple_gla")
    (p,) = spec.parameters
    assert (p.name, p.shape, p.init, p.learnable) == ("scale", (), "1/sqrt(d)", False)
    spec = attngen.load_spec({"name": "x", "similarity": "exp(dot(q, k) * scale)", "normalize": "rowsum",
                              "constants": {"scale": "1/d"}})
    assert spec.parameters[0].init == "1/d" and not spec.constants
    op = attngen.compile(spec, backend="torch")
    q, k, v = inputs(1, 2, 9, 8)
    assert rel_rms(op(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / 8)) < 1e-13
    assert rel_rms(op(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)) < 1e-13
    assert attngen.load_spec(spec.to_yaml()) == spec
    # a spec that does not use scale has no such keyword
    with pytest.raises(attngen.InputError, match=r"unknown keyword\(s\) \['scale'\]"):
        attngen.compile("softmax", backend="torch")(q, k, v, scale=0.3)


def test_triton_refuses_rotary_in_the_bidirectional_linear_kernels_with_a_reason():
    with pytest.raises(attngen.PlanError, match=r"rotary positions are applied by the quadratic and the causal"):
        attngen.compile(attngen.load_spec(ROPE_ELU, causal=False), backend="triton", plan="linear")


# ---------------------------------------------------------------------------------------------------------------
# grouped KV heads and recurrent states: one state per kv head where the heads of a group hold equal states
# ---------------------------------------------------------------------------------------------------------------
def shared_state_case(source, backend, device="cpu"):
    """A prefill from an initial state with grouped heads (H = 4, H_kv = 2), then decode steps; against the same op
    on k, v (and the initial state) repeated per group, outputs, states and the initial state's gradient."""
    spec = attngen.load_spec(source)
    g = torch.Generator().manual_seed(80)
    q, k, v = inputs(2, 4, 30, 16, hkv=2, seed=81)
    shared = pipeline.plan(spec).capabilities.shared_state
    heads = 2 if shared else 4
    extra = {"g": gate_for(spec, 2, 4, 32, 16, seed=82)} if spec.gate is not None else {}
    op = attngen.compile(spec, backend=backend)
    start = op.init_state(2, heads, 16, 16, dtype=torch.float32, device=device)
    s0 = (0.3 * torch.randn(start.S.shape, generator=g)).to(device).requires_grad_()
    start = attngen.runtime.state.State(s0, start.z, torch.tensor([3, 9], device=device), start.spec_hash)
    xs = [x.float().to(device) for x in (q, k, v)]
    ex = {n: x.float().to(device) for n, x in extra.items()}
    o, state = op(*xs, initial_state=start, return_state=True, **{n: x[:, :, :30] for n, x in ex.items()})
    assert state.S.shape[1] == heads
    steps = []
    for j in range(2):
        qt, kt, vt = (torch.randn(2, h, 1, 16, generator=g).to(device) for h in (4, 2, 2))
        ot, state = op.step(qt, kt, vt, state, **{n: x[:, :, 30 + j:31 + j] for n, x in ex.items()})
        steps.append((qt, kt, vt, ot))
    (ds0,) = torch.autograd.grad(o.sum(), s0)
    # the definition: every query head with its own copy of k, v and of the state
    s0r = s0.detach().clone().requires_grad_()
    rep = s0r.repeat_interleave(4 // heads, 1)
    z = None if start.z is None else start.z.repeat_interleave(4 // heads, 1)
    full = attngen.runtime.state.State(rep, z, torch.tensor([3, 9], device=device), start.spec_hash)
    o2, state2 = op(xs[0], *(x.repeat_interleave(2, 1) for x in xs[1:]), initial_state=full, return_state=True,
                    **{n: x[:, :, :30] for n, x in ex.items()})
    (ds0r,) = torch.autograd.grad(o2.sum(), s0r)
    assert rel_rms(o, o2) < 1e-5 and rel_rms(ds0, ds0r) < 1e-5
    for j, (qt, kt, vt, ot) in enumerate(steps):
        ot2, state2 = op.step(qt, kt.repeat_interleave(2, 1), vt.repeat_interleave(2, 1), state2,
                              **{n: x[:, :, 30 + j:31 + j] for n, x in ex.items()})
        assert rel_rms(ot, ot2) < 1e-5
    assert rel_rms(state.S.repeat_interleave(4 // heads, 1), state2.S) < 1e-5
    return heads


@pytest.mark.parametrize("source,heads", [("linear_elu", 2), ("cosformer_M", 2), ("simple_gla", 4),
                                          ("retention", 4)])
def test_states_per_kv_head_where_the_algebra_allows(source, heads):
    spec_source = attngen.load_spec("cosformer", M=4096) if source == "cosformer_M" else source
    assert shared_state_case(spec_source, "torch") == heads


def test_plan_says_whether_states_are_shared():
    assert "with grouped KV heads one state per kv head" in pipeline.plan("linear_elu").explain()
    assert "states per query head (the gate is per query head)" in pipeline.plan("simple_gla").explain()
    assert "states per query head (the key side or the decay depends on the head)" in \
        pipeline.plan("retention").explain()
