"""Specs with several terms (docs/specs.md, `terms`): each term's own spec on its slice of the head dim, combined
with coefficients, each normalised on its own or over a shared row sum. The references are checked against the
variants written here directly in torch (SDPA for the softmax terms); the ops against the references on output and
every gradient, on both backends."""
import math
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import attngen
from attngen.build import generate
from attngen.frontend.spec import shared_exp_terms
from attngen.naive import reference
from attngen.runtime.terms import batches, slices
from attngen.verify import rel_rms, run_case, verify_case, verify_cases

D = 32


def inputs(t=20, h=2, seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, t, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def grads(out, leaves, seed=5):
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * do).sum(), leaves)


@pytest.mark.parametrize("causal", [True, False])
def test_diff_attention_reference_is_two_sdpa_calls(causal):
    q, k, v = inputs()
    lam = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    half = D // 2
    want = F.scaled_dot_product_attention(q[..., :half], k[..., :half], v, is_causal=causal) \
        - lam.view(1, 2, 1, 1) * F.scaled_dot_product_attention(q[..., half:], k[..., half:], v, is_causal=causal)
    got = reference(attngen.load_spec("diff_attention", causal=causal))(q, k, v, lam=lam)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(got, [q, k, v, lam]), grads(want, [q, k, v, lam])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_based_hybrid_reference_is_window_softmax_plus_taylor_linear():
    q, k, v = inputs(t=90)
    i = torch.arange(90)
    window = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 64)
    soft = F.scaled_dot_product_attention(q, k, v, attn_mask=window)
    s = q[..., :16] @ k[..., :16].transpose(-1, -2) / 4
    a = (1 + s + s * s / 2) * (i[:, None] >= i[None, :])
    want = soft + (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    got = reference(attngen.load_spec("based_hybrid"))(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


SHARED = {"name": "shared", "normalize": {"kind": "rowsum", "eps": 1e-6},
          "terms": [{"similarity": "dot(elu(q) + 1, elu(k) + 1)"},
                    {"similarity": "dot(relu(q), relu(k))", "reweight": "gamma**abs(i - j)", "coefficient": "c",
                     "slice": [0, "d/2"]}],
          "constants": {"gamma": 0.9}, "parameters": {"c": {"shape": [], "init": 0.5}}}


@pytest.mark.parametrize("causal", [True, False])
def test_shared_normaliser_reference_is_its_formula(causal):
    q, k, v = inputs()
    c = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    i = torch.arange(20, dtype=torch.float64)  # 0.9 ** an int64 tensor would be float32
    a1 = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    a2 = (F.relu(q[..., :16]) @ F.relu(k[..., :16]).transpose(-1, -2)) * 0.9 ** (i[:, None] - i[None, :]).abs()
    a = a1 + c * a2
    if causal:
        a = a * (i[:, None] >= i[None, :])
    want = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    got = reference(attngen.load_spec(SHARED, causal=causal))(q, k, v, c=c)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for x, y in zip(grads(got, [q, k, v, c]), grads(want, [q, k, v, c])):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("source", ["diff_attention", "based_hybrid", SHARED])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_fwd_and_every_gradient(source, causal):
    spec = attngen.load_spec(source, causal=causal)
    assert attngen.load_spec(spec.to_yaml()).hash == spec.hash
    for t in (7, 90):
        for dtype in (torch.float64, torch.float32):
            r = verify_case(attngen.compile(spec, backend="torch"), spec, dtype, t=t, dk=D)
            assert {f"d{p.name}" for p in spec.parameters if p.learnable} <= set(r.errors)
            assert r.passed, (t, dtype, r.errors)


def test_terms_plan_separately_and_build_one_module_per_term():
    op = attngen.compile("based_hybrid", backend="torch")
    assert len(op.ops) == 2 and "window" in op.plan.explain() and "linear" in op.plan.describe()
    module = generate(attngen.load_spec("based_hybrid"))
    assert module.source is None and not module.reason
    assert [m.spec.name for m in module.parts] == ["based_hybrid_t0", "based_hybrid_t1"]
    assert all(m.source is not None for m in module.parts)
    with pytest.raises(attngen.PlanError, match="has 2 terms, each planned on its own"):
        attngen.pipeline.plan(attngen.load_spec("diff_attention"))


@pytest.mark.parametrize("change,key,match", [
    ({"terms": "x"}, "terms", "expected a list of 1 .. 8 mappings"),
    ({"terms": []}, "terms", "expected a list of 1 .. 8 mappings"),
    ({"similarity": "dot(q, k)"}, "similarity", "similarity beside terms"),
    ({"terms": [{"similarity": "dot(q, k)", "weight": 2}]}, "terms[0]", "unknown key"),
    ({"terms": [{"similarity": "dot(q, k)", "normalize": "rowsum"}]}, "terms[0].normalize",
     "a term's normalize beside the shared one"),
    ({"terms": [{"similarity": "1 + exp(dot(q, k))"}]}, "terms[0].similarity", r"holds exp\(\) but is not exp\(score"),
    ({"terms": [{"similarity": "2 * exp(dot(q, k))"}]}, "terms[0].similarity", r"holds exp\(\) but is not exp\(score"),
    ({"terms": [{"similarity": "dot(q, k)", "slice": [0]}]}, "terms[0].slice", r"expected \[lo, hi\]"),
    ({"terms": [{"similarity": "dot(q, k)", "coefficient": "dot(q, k)"}]}, "terms[0].coefficient",
     r"dot\(\) is not allowed here"),
    ({"terms": [{"similarity": "dot(q, x)"}]}, "terms[0].similarity", "unknown symbol 'x'"),
    ({"normalize": "softmax"}, "normalize", "a shared softmax normaliser"),
])
def test_term_errors_name_the_key(change, key, match):
    with pytest.raises(attngen.SpecError, match=match) as info:
        attngen.load_spec({**SHARED, **change})
    assert info.value.key == key


def test_slice_outside_the_head_dim_and_states_are_refused():
    spec = attngen.load_spec({"name": "s", "terms": [{"similarity": "dot(q, k)", "slice": [0, 16]}]})
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(attngen.InputError, match=r"terms\[0\].slice \[0, 16\] is \[0, 16\] at head dim 8"):
        attngen.compile(spec)(q, q, q)
    op = attngen.compile("diff_attention")
    q = torch.randn(1, 2, 5, D)
    with pytest.raises(attngen.InputError, match="no single recurrent state"):
        op(q, q, q, return_state=True)


# ---------------------------------------------------------------------------------------------
# exp(score) terms under the shared row sum: O = sum_t c_t N_t / (sum_t c_t Z_t + eps), each exp term run as a
# softmax returning its log row sum lse_t, combined with one shift per row (attngen.runtime.terms)
# ---------------------------------------------------------------------------------------------
SOFTLIN = {"name": "softlin", "normalize": {"kind": "rowsum", "eps": 1e-6},
           "terms": [{"similarity": "exp(dot(q, k) / sqrt(d))", "window": 8},
                     {"similarity": "1 + dot(q, k) / sqrt(d)", "coefficient": "c"}],
           "parameters": {"c": {"shape": [], "init": 0.5}}}
TWOEXP = {"name": "twoexp", "normalize": "rowsum",
          "terms": [{"similarity": "exp(dot(q, k) / sqrt(d))", "slice": [0, "d/2"]},
                    {"similarity": "exp(dot(q, k) / sqrt(d))", "reweight": "exp(-slope * abs(i - j))",
                     "slice": ["d/2", "d"], "coefficient": "c"}],
          "parameters": {"c": {"shape": [], "init": 0.5}, "slope": {"shape": ["H"], "init": 0.1}}}
FP32_EXP = math.log(torch.finfo(torch.float32).max)  # 88.72: exp of a larger score overflows float32


def shared_case(source, causal, scale=1.0, t=70, d=16, h=2, seed=1):
    """The spec, float64 q (times ``scale``), k, v, the upstream gradient and parameters near their defaults."""
    spec = attngen.load_spec(source, causal=causal)
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, h, t, d, generator=g, dtype=torch.float64) for _ in range(4))
    params = {p.name: torch.full((h,) if p.per_head else (), float(p.init), dtype=torch.float64)
              + 0.1 * torch.rand((h,) if p.per_head else (), generator=g, dtype=torch.float64)
              for p in spec.parameters}
    return spec, (q * scale, k, v), do, params


def outputs_and_grads(fn, qkv, do, params, dtype, device="cpu", **kw):
    """{o, dq, dk, dv, d<param>...} of fn on copies of the inputs in ``dtype`` (parameters in float32 at least)."""
    xs = [x.detach().to(dtype=dtype, device=device, copy=True).requires_grad_() for x in qkv]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    ps = {n: p.detach().to(dtype=pdtype, device=device, copy=True).requires_grad_() for n, p in params.items()}
    out = fn(*xs, **ps, **kw)
    out.backward(do.to(dtype=dtype, device=device))
    return {"o": out.detach()} | {f"d{n}": x.grad for n, x in zip("qkv", xs)} | {f"d{n}": p.grad for n, p in ps.items()}


def assert_all_close(got: dict, want: dict, tol: float, param_tol: float | None = None):
    """Every output and gradient finite and within ``tol`` relative RMS error of the reference's (``param_tol`` for
    the parameters' gradients: each a sum over every row, see test_shared_exp_large_scores)."""
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None and torch.isfinite(got[name]).all(), name
        err = rel_rms(got[name], want[name])
        limit = param_tol if param_tol is not None and name[1:] not in ("q", "k", "v", "") else tol
        assert err <= limit, (name, err, limit)


def written_shared(q, k, v, c, causal, window=8):
    """SOFTLIN written out: (exp(s) on |i - j| < 8 + c (1 + s)) V / row sum + 1e-6, s = q k^T / sqrt(d)."""
    t, d = q.shape[2], q.shape[3]
    i = torch.arange(t)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    near = (i[:, None] - i[None, :]).abs() < window
    every = torch.ones(t, t, dtype=torch.bool)
    if causal:
        near, every = near & (i[:, None] >= i[None, :]), every & (i[:, None] >= i[None, :])
    a = torch.exp(s) * near + c * (1 + s) * every
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("causal", [True, False])
def test_shared_exp_reference_is_its_formula(causal, scale):
    """The naive reference of exp terms under a shared row sum (every A_t materialised, one shift per row) equals the
    formula written out in float64, output and every gradient, also where exp(score) passes float32's range."""
    spec, (q, k, v), do, params = shared_case(SOFTLIN, causal, scale, t=20)
    want = outputs_and_grads(lambda q, k, v, c: written_shared(q, k, v, c, causal), (q, k, v), do, params,
                             torch.float64)
    got = outputs_and_grads(reference(spec), (q, k, v), do, params, torch.float64)
    assert_all_close(got, want, 1e-12)


def test_exp_terms_under_a_shared_normaliser_are_softmaxes_returning_lse():
    spec = attngen.load_spec(TWOEXP)
    assert [t.spec.normalize.kind for t in spec.terms] == ["rowsum", "rowsum"]
    assert all(t.spec.normalize.eps == 0 for t in spec.terms)
    assert shared_exp_terms(spec) == (0, 1) and shared_exp_terms(attngen.load_spec(SOFTLIN)) == (0,)
    assert shared_exp_terms(attngen.load_spec(SHARED)) == ()
    assert attngen.load_spec(spec.to_yaml()).hash == spec.hash
    assert "normalize" not in spec.to_yaml().split("terms:")[1]  # the terms' softmax is implied, not written
    assert "log row sums" in attngen.compile(spec, backend="torch").plan.explain(n=64, head_dim=16)


def test_exp_term_that_cannot_return_lse_is_refused():
    """exp(-norm(q - k)) has no separable score: its ordering keeps no running max, so no log row sum."""
    spec = attngen.load_spec({**SOFTLIN, "terms": [{"similarity": "exp(-norm(q - k))"},
                                                   {"similarity": "dot(elu(q) + 1, elu(k) + 1)"}]})
    with pytest.raises(attngen.PlanError, match=r"terms\[0\]: an exp term under the shared normaliser .* general"):
        attngen.compile(spec, backend="torch")


def test_return_lse_refusals():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(attngen.PlanError, match="return_lse needs a softmax"):
        attngen.compile("linear_elu", backend="torch")(q, q, q, return_lse=True)
    with pytest.raises(attngen.InputError, match="return_lse with initial_state / return_state"):
        attngen.compile("linear_elu", backend="torch")(q, q, q, return_lse=True, return_state=True)


@pytest.mark.parametrize("source", [SOFTLIN, TWOEXP])
def test_shared_exp_forward_without_autograd(source):
    """Under no_grad the torch backend's tiles take their other paths (_query_tile, the window's preallocated
    output): the same log row sums."""
    for causal in (True, False):
        spec, (q, k, v), _, params = shared_case(source, causal)
        with torch.no_grad():
            got = attngen.compile(spec, backend="torch")(q, k, v, **params)
        torch.testing.assert_close(got, reference(spec)(q, k, v, **params), rtol=1e-12, atol=1e-12)


def test_shared_exp_terms_of_one_computation_stack_with_grouped_heads():
    """Two exp terms of one computation (halves of the head dim) under a shared row sum run as one call returning
    both log row sums (stacked along the head axis), with grouped KV heads and layout bthd."""
    spec = attngen.load_spec({"name": "halves", "normalize": "rowsum",
                              "parameters": {"c": {"shape": ["H"], "init": 0.5}},
                              "terms": [{"similarity": "exp(dot(q, k) / sqrt(d))", "slice": [0, "d/2"]},
                                        {"similarity": "exp(dot(q, k) / sqrt(d))", "slice": ["d/2", "d"],
                                         "coefficient": "c"}]})
    op = attngen.compile(spec, backend="torch", layout="bthd")
    assert "one call" in op.plan.explain(n=64, head_dim=D)
    q, k, v = inputs(t=33, h=4)
    k, v = k[:, :2], v[:, :2]  # 2 kv heads for 4 query heads
    q, k, v = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    c = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64, requires_grad=True)
    out = op(q, k, v, c=c)
    assert op._groups[D] == [[0, 1]]
    ref = reference(spec, layout="bthd")(q, k, v, c=c)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(out, [q, k, v, c]), grads(ref, [q, k, v, c])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.parametrize("source,causal", [("diff_attention", True), ("diff_attention", False),
                                           ("based_hybrid", True), (SHARED, True)])
def test_triton_fwd_and_every_gradient(source, causal):
    spec = attngen.load_spec(source, causal=causal)
    for case in verify_cases([spec], "triton", dtypes=("float32",), lengths=(7, 70), head_dim=D):
        r = run_case(case, device=DEVICE)
        assert r.passed, (r.shape, r.errors)


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_terms_of_one_computation_run_as_one_call(layout):
    """diff_attention's two softmax halves are one call on their slices stacked along the head axis (2H heads),
    with GQA too; the result and every gradient equal the naive reference, which runs each term alone."""
    op = attngen.compile("diff_attention", backend="torch", layout=layout)
    calls = []
    call = type(op.ops[0]).__call__

    def spy(self, q, k, v, **kw):
        calls.append((self, q.shape))
        return call(self, q, k, v, **kw)
    q, k, v = inputs(t=33, h=4)
    k, v = (k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_())  # 2 kv heads for 4 query heads
    if layout == "bthd":
        q, k, v = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    lam = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=torch.float64, requires_grad=True)
    with mock.patch.object(type(op.ops[0]), "__call__", spy):
        out = op(q, k, v, lam=lam)
    axis = 1 if layout == "bhtd" else 2
    assert len(calls) == 1 and calls[0][0] is op.ops[0]
    assert calls[0][1][axis] == 8 and calls[0][1][-1] == D // 2
    ref = reference("diff_attention", layout=layout)(q, k, v, lam=lam)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(grads(out, [q, k, v, lam]), grads(ref, [q, k, v, lam])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert "one call" in op.plan.explain()


def test_terms_with_head_dependent_expressions_are_not_stacked():
    spec = attngen.load_spec({"name": "twoalibi", "causal": True, "terms": [
        {"similarity": "exp(dot(q, k) / sqrt(d))", "reweight": "exp(-(h + 1) * (i - j) / H)", "normalize": "rowsum",
         "slice": [0, "d/2"]},
        {"similarity": "exp(dot(q, k) / sqrt(d))", "reweight": "exp(-(h + 1) * (i - j) / H)", "normalize": "rowsum",
         "slice": ["d/2", "d"]}]})
    assert batches(spec, slices(spec, 32)) == [[0], [1]]
    assert batches(attngen.load_spec("diff_attention"), slices(attngen.load_spec("diff_attention"), 32)) == [[0, 1]]


# ---------------------------------------------------------------------------------------------
# exp terms under the shared row sum on both backends (the Triton kernels under the interpreter on a CPU)
# ---------------------------------------------------------------------------------------------
BACKENDS = [("torch", torch.float64, 1e-10), ("torch", torch.float32, 1e-5), ("triton", torch.float32, 1e-4)]


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=["torch-fp64", "torch-fp32", "triton-fp32"])
@pytest.mark.parametrize("source", [SOFTLIN, TWOEXP], ids=["softmax+linear", "two-exp"])
@pytest.mark.parametrize("causal", [True, False])
def test_shared_exp_fwd_and_every_gradient(source, causal, backend, dtype, tol):
    """Output and the gradients of q, k, v and every parameter (coefficients, ALiBi's slope inside an exp term)
    against the float64 reference, at T = 70 (two query tiles)."""
    spec, qkv, do, params = shared_case(source, causal)
    device = DEVICE if backend == "triton" else "cpu"
    want = outputs_and_grads(reference(spec), qkv, do, params, torch.float64)
    got = outputs_and_grads(attngen.compile(spec, backend=backend), qkv, do, params, dtype, device)
    assert_all_close(got, want, tol)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                           ("triton", torch.float32)], ids=["torch-fp64", "torch-fp32", "triton-fp32"])
@pytest.mark.parametrize("source", [SOFTLIN, TWOEXP], ids=["softmax+linear", "two-exp"])
@pytest.mark.parametrize("causal", [True, False])
def test_shared_exp_large_scores(source, causal, backend, dtype):
    """q scaled 30x: scores up to ~110, whose exp overflows float32 (and whose row sums dwarf the linear term's). The
    log row sums and the shared shift keep every value finite; float64 stays exact (1e-10). In float32 a score of
    ~100 carries a rounding of ~6e-6, so every weight exp(s) does: the outputs, dq, dk, dv are held to 1e-4 and the
    parameters' gradients, sums over all rows that cancel to a few percent of their terms' size, to 1e-3 (measured:
    up to 3e-4 for twoexp's coefficient, bidirectional, where the float32 naive reference is itself 1e-4 off)."""
    spec, qkv, do, params = shared_case(source, causal, scale=30.0)
    w = qkv[0].shape[3] if source is SOFTLIN else qkv[0].shape[3] // 2  # the first term's width
    assert (qkv[0][..., :w] @ qkv[1][..., :w].transpose(-1, -2)).max() / math.sqrt(w) > FP32_EXP
    device = DEVICE if backend == "triton" else "cpu"
    want = outputs_and_grads(reference(spec), qkv, do, params, torch.float64)
    got = outputs_and_grads(attngen.compile(spec, backend=backend), qkv, do, params, dtype, device)
    if dtype == torch.float64:
        assert_all_close(got, want, 1e-10)
    else:
        assert_all_close(got, want, 1e-4, param_tol=1e-3)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=["torch-fp64", "torch-fp32", "triton-fp32"])
def test_shared_exp_rows_no_term_attends_give_zero(backend, dtype, tol):
    """Cross attention (T 20, S 6) with two windowed exp terms and no eps: rows 9 .. 19 attend no key in either term
    (every lse -inf): they give 0 and zero gradients, the others match the reference."""
    spec = attngen.load_spec({"name": "twowin", "causal": False, "normalize": "rowsum",
                              "terms": [{"similarity": "exp(dot(q, k) / sqrt(d))", "window": 4},
                                        {"similarity": "exp(dot(q, k) / sqrt(d))", "window": 2, "slice": [0, "d/2"],
                                         "coefficient": 0.5}]})
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 2, 20, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 2, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    device = DEVICE if backend == "triton" else "cpu"
    want = outputs_and_grads(reference(spec), (q, k, v), do, {}, torch.float64)
    got = outputs_and_grads(attngen.compile(spec, backend=backend), (q, k, v), do, {}, dtype, device)
    assert_all_close(got, want, tol)
    assert (got["o"][:, :, 9:] == 0).all() and (got["dq"][:, :, 9:] == 0).all()
    assert (want["o"][:, :, :9].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=["torch-fp64", "torch-fp32", "triton-fp32"])
def test_shared_exp_packed_sequences(backend, dtype, tol):
    """cu_seqlens: every exp term's softmax and log row sum per sequence."""
    spec, (q, k, v), do, params = shared_case(SOFTLIN, True, t=30)
    cu = torch.tensor([0, 11, 30])
    device = DEVICE if backend == "triton" else "cpu"
    got = outputs_and_grads(attngen.compile(spec, backend=backend), (q, k, v), do, params, dtype, device,
                            cu_seqlens=cu.to(device))

    def apart(q, k, v, c):
        return torch.cat([reference(spec)(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], c=c)
                          for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 2)
    assert_all_close(got, outputs_and_grads(apart, (q, k, v), do, params, torch.float64), tol)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS, ids=["torch-fp64", "torch-fp32", "triton-fp32"])
@pytest.mark.parametrize("window", [None, 8])
def test_return_lse_is_the_log_row_sum_and_differentiable(backend, dtype, tol, window):
    """op(..., return_lse=True) of a softmax: lse = logsumexp of the allowed scores, and a loss on o and lse gives
    the gradients of the same written in torch (the lse's gradient enters the kernels' backward as D_i - dlse_i)."""
    source = {"name": "sw", "causal": True, "similarity": "exp(dot(q, k) / sqrt(d))", "normalize": "rowsum"}
    spec = attngen.load_spec(source | ({"window": window} if window else {}))
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, 70, 16, generator=g, dtype=torch.float64) for _ in range(4))
    dl = torch.randn(1, 2, 70, generator=g, dtype=torch.float64)
    i = torch.arange(70)
    allowed = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] < window) if window else True)

    def written(q, k, v):
        s = (q @ k.transpose(-1, -2) / 4).masked_fill(~allowed, float("-inf"))
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    device = DEVICE if backend == "triton" else "cpu"
    op = attngen.compile(spec, backend=backend)
    results = []
    for fn, dt, dev in ((written, torch.float64, "cpu"), (lambda *x: op(*x, return_lse=True), dtype, device)):
        xs = [x.detach().to(dtype=dt, device=dev, copy=True).requires_grad_() for x in (q, k, v)]
        o, lse = fn(*xs)
        assert lse.shape == (1, 2, 70)
        ((o * do.to(dtype=dt, device=dev)).sum() + (lse * dl.to(dtype=lse.dtype, device=dev)).sum()).backward()
        results.append({"o": o.detach(), "lse": lse.detach()} | {f"d{n}": x.grad for n, x in zip("qkv", xs)})
    assert_all_close(results[1], results[0], tol)


def test_opcheck_of_the_flash_ops_with_a_log_row_sum_gradient():
    """The quadratic backward custom op called with the log-sum-exp's gradient (dstat) passes torch.library.opcheck
    (schema, fake tensors, dispatch), as it is called when a loss reads lse."""
    from attngen.runtime.triton import host
    op = attngen.compile("softmax", backend="triton")
    q, k, v = (x.float().to(DEVICE) for x in inputs(t=20, d=16))
    op(q, k, v)  # the module's custom ops exist now
    calls, real = {}, dict(host._OPS)

    def recorder(key, custom_op):
        def run(*args):
            calls.setdefault(key, args)
            return custom_op(*args)
        return run
    host._OPS.update({key: recorder(key, custom_op) for key, custom_op in real.items()})
    try:
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o, lse = op(*xs, return_lse=True)
        (o.sum() + lse.sum()).backward()
    finally:
        host._OPS.update(real)
    (key, args), = [(key, args) for key, args in calls.items() if key.endswith("_qbwd")]
    assert isinstance(args[-1], torch.Tensor) and args[-1].shape == lse.shape  # dstat reached the backward op
    result = torch.library.opcheck(real[key], tuple(a.detach() if isinstance(a, torch.Tensor) else
                                                     [x.detach() for x in a] if isinstance(a, list) else a
                                                     for a in args))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_exp_half_inputs(backend):
    """fp16 inputs: the exp terms hand the combination o in float32 (softmax_lse: the flash kernels' fp32 copy of O,
    whose gradient reaches the kernels' backward), rounded once at the end; every gradient within fp16's 5e-3
    (rounding o_t to fp16 first put the coefficient's gradient 1.2e-2 off on the Triton backend)."""
    spec, qkv, do, params = shared_case(TWOEXP, True, t=40)
    device = DEVICE if backend == "triton" else "cpu"
    op = attngen.compile(spec, backend=backend)
    q, k, v = (x.to(device=device, dtype=torch.float16) for x in qkv)
    o, lse = op.ops[0].softmax_lse(q[..., :8], k[..., :8], v)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert op.ops[0](q[..., :8], k[..., :8], v, return_lse=True)[0].dtype == torch.float16
    want = outputs_and_grads(reference(spec), qkv, do, params, torch.float64)
    got = outputs_and_grads(op, qkv, do, params, torch.float16, device)
    assert got["o"].dtype == torch.float16
    assert_all_close(got, want, 5e-3)
