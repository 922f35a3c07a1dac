"""The generated Triton modules of gated specs: simple_gla (a per-head gate, the chunk-parallel scan with the
chunk-local weights of docs/derivations.md section 9) and forgetting (the flash kernels with the score bias
G_i - G_j). Output and every gradient (q, k, v, the gate, the initial state, from the returned state) against the
float64 torch backend's recurrent ordering or the naive reference (themselves checked in tests/test_gates.py),
packed sequences, decoding, fla's references, the errors.

Under the interpreter on CPU (tests/conftest.py), natively on a GPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")

import attngen  # noqa: E402
from attngen.pipeline import plan as build_plan  # noqa: E402
from attngen.runtime.state import State  # noqa: E402
from attngen.runtime.triton import loader  # noqa: E402
from attngen.verify import rel_rms  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
D = 16


LINEAR = ("simple_gla", "gla")  # a gate per head; per head and key dimension


def module(name="simple_gla"):
    spec = attngen.load_spec(name)
    mod = loader.load_module(build_plan(spec, target="triton"))
    return spec, mod, getattr(mod, f"{name}_attention"), getattr(mod, f"{name}_step")


def gate_of(spec, g, *shape, shift=2.0):
    """A gate for q of ``shape`` (the layout's first three dims, + Dk for a per-dimension gate)."""
    return gate(g, *shape, *((D,) if spec.gate.per == "key_dim" else ()), shift=shift)


def poisoned(mod, monkeypatch):
    """Every buffer the host allocates with _empty starts as NaN: an element no kernel writes fails."""
    def empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    monkeypatch.setattr(mod.host, "_empty", empty)


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def gate(g, *shape, shift=2.0):
    return F.logsigmoid(shift + torch.randn(*shape, generator=g, dtype=torch.float64))


def gold(name, q, k, v, g, s0=None, pos=None):
    """float64 oracle: the torch backend's recurrent ordering (the definition, token by token)."""
    op = attngen.compile(name, backend="torch", plan="recurrent")
    if s0 is None:
        return op(q, k, v, g=g, return_state=True)
    return op(q, k, v, g=g, return_state=True, initial_state=State(s0, None, pos, op.spec.hash))


def test_the_module_holds_the_linear_ordering_only_and_names_the_gate():
    spec, mod, fn, step = module()
    assert mod.MODULE.gate == "g" and mod.MODULE.quadratic is None and mod.MODULE.linear.fwd is None
    assert "generated: triton: not the quadratic ordering" in build_plan(spec, target="triton").explain()
    assert "g: the gate, log decays <= 0" in fn.__doc__


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("t", [1, 63, 200])
def test_forward_and_every_gradient_with_states(name, t, monkeypatch):
    spec, mod, fn, _ = module(name)
    poisoned(mod, monkeypatch)
    b, h = 2, 2
    g = torch.Generator().manual_seed(t)
    q, k, v = (rand(g, b, h, t, D) for _ in range(3))
    gt = gate_of(spec, g, b, h, t)
    s0 = 0.3 * rand(g, b, h, D, D)
    pos0 = torch.tensor([3, 11])
    leaves = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v, gt, s0)]
    o, (st, zt, pos) = fn(*leaves[:3], g=leaves[3], initial_state=(leaves[4], None, pos0.to(DEVICE)),
                          return_state=True)
    assert zt is None and pos.tolist() == [3 + t, 11 + t]
    gl = [x.clone().requires_grad_() for x in (q, k, v, gt, s0)]
    go, gs = gold(name, *gl[:4], s0=gl[4], pos=pos0)
    assert_close("o", o, go, 1e-4)
    assert_close("final S", st, gs.S, 1e-4)
    do, dst = rand(g, *go.shape), rand(g, *gs.S.shape)
    got = torch.autograd.grad((o * do.float().to(DEVICE)).sum() + (st * dst.float().to(DEVICE)).sum(), leaves)
    want = torch.autograd.grad((go * do).sum() + (gs.S * dst).sum(), gl)
    for name, a, w in zip(["dq", "dk", "dv", "dg", "dS0"], got, want):
        assert_close(name, a, w, 1e-4)


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_packed_sequences_equal_each_alone(name, layout, monkeypatch):
    """cu_seqlens: G restarts with each sequence, and so does the reverse cumulative sum of dg."""
    spec, mod, fn, _ = module(name)
    poisoned(mod, monkeypatch)
    lengths = (1, 5, 64, 70)
    h, total = 2, sum(lengths)
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    axis = 1 if layout == "bthd" else 2
    shape = (1, total, h, D) if layout == "bthd" else (1, h, total, D)
    xs = [rand(g, *shape).float().to(DEVICE).requires_grad_() for _ in range(3)]
    gt = gate_of(spec, g, *shape[:3]).float().to(DEVICE).requires_grad_()
    s0 = (0.2 * rand(g, len(lengths), h, D, D)).float().to(DEVICE).requires_grad_()
    pos0 = torch.tensor([0, 7, 3, 100], device=DEVICE)
    o, (st, _, _) = fn(*xs, g=gt, initial_state=(s0, None, pos0), return_state=True, cu_seqlens=cu, layout=layout)
    do, dst = rand(g, *o.shape).float().to(DEVICE), rand(g, *st.shape).float().to(DEVICE)
    got = torch.autograd.grad((o * do).sum() + (st * dst).sum(), [*xs, gt, s0])
    outs, states, alone = [], [], [torch.zeros_like(x) for x in (*xs, gt, s0)]
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        def cut(x):
            return x.detach()[:, a:b] if layout == "bthd" else x.detach()[:, :, a:b]
        xi = [cut(x).clone().requires_grad_() for x in (*xs, gt)]
        si = s0.detach()[i:i + 1].clone().requires_grad_()
        oi, (sti, _, _) = fn(*xi[:3], g=xi[3], initial_state=(si, None, pos0[i:i + 1]), return_state=True,
                             layout=layout)
        outs.append(oi)
        states.append(sti)
        doi = do[:, a:b] if layout == "bthd" else do[:, :, a:b]
        gi = torch.autograd.grad((oi * doi).sum() + (sti * dst[i:i + 1]).sum(), [*xi, si])
        for j in range(4):
            (alone[j][:, a:b] if layout == "bthd" else alone[j][:, :, a:b]).copy_(gi[j])
        alone[4][i:i + 1] = gi[4]
    assert_close("o", o, torch.cat(outs, axis), 1e-5)
    assert_close("final S", st, torch.cat(states), 1e-5)
    for name, a, w in zip(["dq", "dk", "dv", "dg", "dS0"], got, alone):
        assert_close(name, a, w, 1e-5)


@pytest.mark.parametrize("name", LINEAR)
def test_prefill_then_steps_equal_the_forward(name):
    spec, mod, fn, step = module(name)
    g = torch.Generator().manual_seed(9)
    b, h, t, n0 = 2, 2, 40, 29
    q, k, v = (rand(g, b, h, t, D).float().to(DEVICE) for _ in range(3))
    gt = gate_of(spec, g, b, h, t).float().to(DEVICE)
    full = fn(q, k, v, g=gt)
    o, (S, z, pos) = fn(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], g=gt[:, :, :n0], return_state=True)
    outs = [o]
    for j in range(n0, t):
        o, S, z, pos = step(q[:, :, j:j + 1], k[:, :, j:j + 1], v[:, :, j:j + 1], S, z, pos, g=gt[:, :, j:j + 1])
        outs.append(o)
    assert_close("steps", torch.cat(outs, 2), full, 1e-5)
    # and through attngen.compile's op.step
    op = attngen.compile(name, backend="triton")
    o, state = op(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], g=gt[:, :, :n0], return_state=True)
    outs = [o]
    for j in range(n0, t):
        o, state = op.step(q[:, :, j:j + 1], k[:, :, j:j + 1], v[:, :, j:j + 1], state, g=gt[:, :, j:j + 1])
        outs.append(o)
    assert_close("op.step", torch.cat(outs, 2), full, 1e-5)


def test_per_call_scale_and_its_gradient():
    g = torch.Generator().manual_seed(10)
    q, k, v = (rand(g, 1, 2, 50, D).float().to(DEVICE) for _ in range(3))
    gt = gate(g, 1, 2, 50).float().to(DEVICE)
    op = attngen.compile("simple_gla", backend="triton")
    ref = attngen.reference("simple_gla")
    scale = torch.tensor(0.37, device=DEVICE, requires_grad=True)
    o = op(q, k, v, g=gt, scale=scale)
    (ds,) = torch.autograd.grad(o.sum(), scale)
    rs = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    ro = ref(*(x.double().cpu() for x in (q, k, v)), g=gt.double().cpu(), scale=rs)
    (rds,) = torch.autograd.grad(ro.sum(), rs)
    assert rel_rms(o.double().cpu(), ro) < 1e-5 and abs(float(ds) - float(rds)) < 1e-4 * abs(float(rds))


def test_gate_errors_in_the_module():
    spec, mod, fn, step = module()
    q = torch.randn(1, 2, 5, D, device=DEVICE)
    with pytest.raises(attngen.InputError, match=r"missing the gate g="):
        fn(q, q, q)
    with pytest.raises(attngen.InputError, match=r"gate 'g': expected shape \[B, T, H\] = \[1, 2, 5\].*\[1, 5, 2\]"):
        fn(q, q, q, g=torch.zeros(1, 5, 2, device=DEVICE), layout="bthd")
    with pytest.raises(attngen.InputError, match=r"values > 0"):
        fn(q, q, q, g=torch.ones(1, 2, 5, device=DEVICE))


def test_other_gates_are_refused_by_the_triton_templates_with_a_reason():
    two_blocks = {"name": "x", "similarity": "dot(q, k)", "reweight": "cos(i - j)", "gates": {"g": "key_dim"}}
    for source, pattern in ((two_blocks, r"a per-key-dimension gate over several feature blocks is not generated"),
                            # the linear kernels refuse these first; then the quadratic ones say why not either
                            ({"name": "x", "similarity": "dot(q, k)", "gates": {"g": "head"},
                              "normalize": "rowsum"}, r"add a per-head gate's G_i - G_j to a softmax score only"),
                            ({"name": "x", "similarity": "dot(q, k)", "gates": {"g": "head"},
                              "reweight": "0.9**(i - j)"}, r"add a per-head gate's G_i - G_j to a softmax score only")):
        with pytest.raises(attngen.PlanError, match=pattern):
            attngen.compile(source, backend="triton")
    with pytest.raises(attngen.PlanError, match=r"a gate with a row-sum normalisation is not generated"):
        attngen.compile({"name": "x", "similarity": "dot(q, k)", "gates": {"g": "head"}, "normalize": "rowsum"},
                        backend="triton", plan="linear")


# ---------------------------------------------------------------------------------------------------------------
# forgetting: the flash kernels add G_i - G_j to each tile's scores; dL/dG from row and column sums of dS
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 63, 200])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_forgetting_against_the_reference(t, layout, monkeypatch):
    spec = attngen.load_spec("forgetting")
    mod = loader.load_module(build_plan(spec, target="triton"))
    assert mod.MODULE.gate == "g" and mod.MODULE.linear is None and mod.MODULE.quadratic.flash
    poisoned(mod, monkeypatch)
    g = torch.Generator().manual_seed(20 + t)
    shape = (2, 3, t, D) if layout == "bhtd" else (2, t, 3, D)
    q, k, v = (rand(g, *shape) for _ in range(3))
    gt = gate(g, *shape[:3], shift=0.0)
    leaves = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v, gt)]
    o = mod.forgetting_attention(*leaves[:3], g=leaves[3], layout=layout)
    do = rand(g, *o.shape)
    got = torch.autograd.grad((o * do.float().to(DEVICE)).sum(), leaves)
    gl = [x.clone().requires_grad_() for x in (q, k, v, gt)]
    ro = attngen.reference(spec, layout=layout)(*gl[:3], g=gl[3])
    want = torch.autograd.grad((ro * do).sum(), gl)
    assert_close("o", o, ro, 1e-4)
    for name, a, w in zip(["dq", "dk", "dv", "dg"], got, want):
        assert_close(name, a, w, 1e-4)


@pytest.mark.parametrize("name", [*LINEAR, "forgetting", "llama"])
@pytest.mark.parametrize("t", [1, 63, 200])
def test_fp16_against_the_reference(name, t):
    """fp16 inputs (fp32 states and sums inside): output and every gradient within 5e-3 of the float64 reference
    (relative RMS), as the main job holds fp16 kernels (attngen.verify.TRITON_TOLERANCE)."""
    spec = attngen.load_spec(name)
    g = torch.Generator().manual_seed(40 + t)
    q, k, v = (rand(g, 2, 2, t, D) for _ in range(3))
    gates = [gate_of(spec, g, 2, 2, t, shift=0.0 if name == "forgetting" else 2.0)] if spec.gates else []
    op = attngen.compile(spec, backend="triton")
    leaves = [*(x.half().to(DEVICE).requires_grad_() for x in (q, k, v)),
              *(x.float().to(DEVICE).requires_grad_() for x in gates)]
    o = op(*leaves[:3], **dict(zip(spec.gate_names, leaves[3:])))
    do = rand(g, *o.shape)
    got = torch.autograd.grad((o.float() * do.float().to(DEVICE)).sum(), leaves)
    gl = [x.clone().requires_grad_() for x in (q, k, v, *gates)]
    ro = attngen.reference(spec)(*gl[:3], **dict(zip(spec.gate_names, gl[3:])))
    want = torch.autograd.grad((ro * do).sum(), gl)
    assert rel_rms(o.double().cpu(), ro) < 5e-3
    for name_, a, w in zip(["dq", "dk", "dv", "dg"], got, want):
        assert rel_rms(a.double().cpu(), w) < 5e-3, name_


def test_simple_gla_16k_fp32_is_finite_and_matches_float64():
    """T = 16384 with g ~ log(0.95): the chunk-local weights keep every exponent <= 0 (exp(-G_j) alone would be
    e**840); against the float64 recurrent ordering of the torch backend."""
    t = 16384
    g = torch.Generator().manual_seed(50)
    q, k, v = (rand(g, 1, 1, t, D) for _ in range(3))
    gt = (torch.full((1, 1, t), -0.0513, dtype=torch.float64) - 0.01 * torch.rand(1, 1, t, generator=g,
                                                                                  dtype=torch.float64))
    op = attngen.compile("simple_gla", backend="triton")
    leaves = [x.float().to(DEVICE).requires_grad_() for x in (q, k, v, gt)]
    o = op(*leaves[:3], g=leaves[3])
    got = torch.autograd.grad(o.sum(), leaves)
    assert all(bool(torch.isfinite(x).all()) for x in (o, *got))
    with torch.no_grad():
        ref = attngen.compile("simple_gla", backend="torch", plan="recurrent")(q, k, v, g=gt)
    assert rel_rms(o.double().cpu(), ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["simple_gla", "gla", "forgetting", "llama"])
def test_the_per_call_scale_gradient(name, backend):
    """The per-call scale passed as a tensor that requires grad: its gradient (fp32) against the reference's, with
    every other gradient, on both backends (grouped heads for llama)."""
    spec = attngen.load_spec(name)
    g = torch.Generator().manual_seed(60)
    hkv = 1 if name == "llama" else 2
    q = rand(g, 1, 2, 50, D)
    k, v = (rand(g, 1, hkv, 50, D) for _ in range(2))
    extra = {"g": gate_of(spec, g, 1, 2, 50, shift=0.0 if name == "forgetting" else 2.0)} if spec.gates else {}
    dev = DEVICE if backend == "triton" else "cpu"
    op = attngen.compile(spec, backend=backend)
    leaves = [x.float().to(dev).requires_grad_() for x in (q, k, v, *extra.values())]
    scale = torch.tensor(0.3, device=dev, requires_grad=True)
    o = op(*leaves[:3], scale=scale, **dict(zip(extra, leaves[3:])))
    do = rand(g, *o.shape)
    got = torch.autograd.grad((o * do.float().to(dev)).sum(), [*leaves, scale])
    gold = [x.clone().requires_grad_() for x in (q, k, v, *extra.values())]
    rs = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ro = attngen.reference(spec)(*gold[:3], scale=rs, **dict(zip(extra, gold[3:])))
    want = torch.autograd.grad((ro * do).sum(), [*gold, rs])
    assert_close("o", o, ro, 1e-4)
    for n_, a, w in zip(["dq", "dk", "dv", *("d" + n for n in extra), "dscale"], got, want):
        assert_close(n_, a.reshape(w.shape), w, 1e-4)


def _fla(name):
    """fla-core's pure-PyTorch reference of a built-in ([B, T, H, ...] inputs, float32 inside)."""
    if name == "simple_gla":
        fla = pytest.importorskip("fla.ops.simple_gla.naive", reason="fla-core is a test extra")

        def run(q, k, v, g):
            out = fla.naive_chunk_simple_gla(q, k, v, g)
            return out[0] if isinstance(out, tuple) else out
        return run
    if name == "gla":
        fla = pytest.importorskip("fla.ops.gla.naive", reason="fla-core is a test extra")
        return lambda q, k, v, g: fla.naive_recurrent_gla(q, k, v, g)[0]
    fla = pytest.importorskip("fla.ops.forgetting_attn.naive", reason="fla-core is a test extra")
    return fla.naive_forgetting_attn


@pytest.mark.parametrize("name,t", [("simple_gla", 63), ("simple_gla", 200), ("gla", 70), ("forgetting", 90)])
def test_against_fla_naive(name, t):
    """The generated module against fla's reference (a second, external oracle), bthd as fla takes it."""
    spec = attngen.load_spec(name)
    theirs_fn = _fla(name)
    g = torch.Generator().manual_seed(t)
    q, k, v = (rand(g, 2, t, 3, D).float() for _ in range(3))
    gt = gate_of(spec, g, 2, t, 3, shift=0.0 if name == "forgetting" else 2.0).float()
    op = attngen.compile(spec, backend="triton", layout="bthd")
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, gt)]
    o = op(*leaves[:3], g=leaves[3])
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum(), leaves)
    theirs = [x.clone().requires_grad_() for x in (q, k, v, gt)]
    ro = theirs_fn(*theirs)
    want = torch.autograd.grad((ro * do.cpu()).sum(), theirs)
    assert rel_rms(o.cpu(), ro) < 1e-5
    for a, w in zip(got, want):
        assert rel_rms(a.cpu(), w) < 2e-5
