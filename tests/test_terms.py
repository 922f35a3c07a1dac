"""Specs with several terms (docs/specs.md, `terms`): each term's own spec on its slice of the head dim, combined
with coefficients, each normalised on its own or over a shared row sum. The references are checked against the
variants written here directly in torch (SDPA for the softmax terms); the ops against the references on output and
every gradient, on both backends."""
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import attngen
from attngen.build import generate
from attngen.naive import reference
from attngen.runtime.terms import batches, slices
from attngen.verify import run_case, verify_case, verify_cases

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
    ({"terms": [{"similarity": "exp(dot(q, k))"}]}, "terms[0].similarity", "an exp similarity under a shared"),
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
