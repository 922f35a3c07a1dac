"""Vector and matrix parameters, matmul / mean / sum / softmax in the similarity, fixed seeded tensors, and the
Triton feature prologue (attngen/passes/prologue.py).

The naive reference is checked against each variant's formula written here directly in torch float64 (not through
attngen's evaluator); the backends are checked against the naive reference on output and every gradient (learnable
parameters included) by attngen.verify."""
import os

import pytest
import torch

import attngen
from attngen import pipeline
from attngen.naive import reference
from attngen.runtime.inputs import default_parameters
from attngen.verify import run_case, verify_cases

D = 16


def inputs(t=9, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, t, D, generator=g, dtype=torch.float64) for _ in range(3)]


def linear_attention(fq, fk, v, causal, eps):
    """sum_j (fq_i . fk_j) v_j / (sum_j fq_i . fk_j + eps) with an explicit causal mask."""
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=a.dtype).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("causal", [True, False])
def test_hedgehog_reference_is_its_formula(causal):
    q, k, v = inputs()
    w = torch.randn(2, 32, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def phi(x):  # [softmax(W x), softmax(-W x)] per head
        z = torch.einsum("bhtd,hfd->bhtf", x, w)
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)
    want = linear_attention(phi(q), phi(k), v, causal, 1e-6)
    got = reference(attngen.load_spec("hedgehog", causal=causal))(q, k, v, W=w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_rebased_reference_is_its_formula(causal):
    q, k, v = inputs()
    gamma, beta = torch.rand(D, dtype=torch.float64) + 0.5, torch.randn(D, dtype=torch.float64)

    def phi(x):
        return torch.nn.functional.layer_norm(x, (D,), eps=1e-5) * gamma + beta
    a = (phi(q) @ phi(k).transpose(-1, -2)) ** 2
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=a.dtype).tril()
    want = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    got = reference(attngen.load_spec("rebased", causal=causal))(q, k, v, gamma=gamma, beta=beta)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_performer_reference_is_its_formula():
    q, k, v = (x * 0.5 for x in inputs(t=40))
    spec = attngen.load_spec("performer", causal=False)
    w = default_parameters(spec, 2, torch.float64, head_dim=D)["W"]
    assert w.shape == (64, D)
    g = torch.Generator().manual_seed(0)  # the spec's seed: N(0, 1) in float64 from a CPU generator
    torch.testing.assert_close(w, torch.randn(64, D, generator=g, dtype=torch.float64))

    def phi(x):
        x = x / D ** 0.25
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2)
    a = phi(q) @ phi(k).transpose(-1, -2) / 64
    want = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    got = reference(spec)(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["hedgehog", "rebased", "performer"])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_every_ordering_fwd_and_every_gradient(name, causal):
    spec = attngen.load_spec(name, causal=causal)
    legal = [c.ordering.value for c in pipeline.plan(spec, target="torch").candidates if c.legal]
    assert "linear" in legal and "quadratic" in legal
    for force in legal:
        for case in verify_cases([spec], "torch", force=force, dtypes=("float64",), lengths=(7, 40)):
            r = run_case(case)
            if "dq" in r.errors:  # a forward case (a decode step case checks o)
                learnable = {f"d{p.name}" for p in spec.parameters if p.learnable}
                assert learnable <= set(r.errors), r.errors  # the parameters' gradients are checked
            assert r.passed, (force, r.shape, r.errors)


def test_parameter_shapes_and_errors():
    spec = attngen.load_spec("""
name: shapes
similarity: dot(a * q + b, k) + dot(matmul(W, q), matmul(V, k))
constants: {F: 16}
parameters:
  a: {shape: [Dk], init: 1}
  b: {shape: [H, Dk], init: 0.1 * h}
  W: {shape: [F, Dk], init: eye}
  V: {shape: [H, 16, Dk], init: normal(1/sqrt(d)), seed: 7}
""")
    kinds = {p.name: (p.kind, p.shape) for p in spec.parameters}
    assert kinds == {"a": ("vector", ("Dk",)), "b": ("vector", ("H", "Dk")), "W": ("matrix", (16, "Dk")),
                     "V": ("matrix", ("H", 16, "Dk"))}
    values = default_parameters(spec, 3, torch.float64, head_dim=D)
    assert values["b"].shape == (3, D) and torch.equal(values["b"][2], torch.full((D,), 0.2, dtype=torch.float64))
    assert torch.equal(values["W"], torch.eye(16, D, dtype=torch.float64))
    assert abs(float(values["V"].std()) - D ** -0.5) < 0.05
    assert torch.equal(values["V"], default_parameters(spec, 3, torch.float64, head_dim=D)["V"])  # the seed
    assert attngen.load_spec(spec.to_yaml()).hash == spec.hash
    q, k, v = inputs(h=3)
    with pytest.raises(attngen.InputError, match=r"parameter 'V': expected shape \[3, 16, 16\]"):
        reference(spec)(q, k, v, V=torch.zeros(16, D))


@pytest.mark.parametrize("body,match", [
    ({"shape": ["Dk", "H"], "init": 1}, r"expected \[\], \[H\], \[Dk\]"),
    ({"shape": [0, "Dk"], "init": 1}, r"rows 0; expected an integer in \[1, 1024\]"),
    ({"shape": ["G", "Dk"], "init": 1}, r"rows 'G'"),
    ({"shape": ["Dk"], "init": "eye"}, "init eye needs a matrix parameter"),
    ({"shape": [], "init": "normal(1)"}, "a random init needs a vector or matrix parameter"),
    ({"shape": ["Dk"], "init": 1, "seed": 3}, "a seed without a random init"),
    ({"shape": ["Dk"], "init": "normal(1)", "seed": -1}, r"seed -1; expected an integer in \[0, 2\*\*63\)"),
    ({"shape": ["Dk"], "init": 1, "learnable": "no"}, "learnable: found 'no'"),
])
def test_parameter_declaration_errors(body, match):
    with pytest.raises(attngen.SpecError, match=match):
        attngen.load_spec({"name": "x", "similarity": "dot(p * q, k)", "parameters": {"p": body}})


@pytest.mark.parametrize("similarity,match", [
    ("dot(matmul(W, q), k)", "combines vectors of different widths: F = 8 and d"),
    ("dot(matmul(q, W), k)", r"matmul\(\) takes a matrix parameter first"),
    ("dot(matmul(W, matmul(W, q)), k)", "matmul() of a vector of width F = 8"),
    ("dot(W, k)", "'W' is a matrix"),
    ("mean(q) + dot(q, k) + sum(1)", r"sum\(\) got a scalar argument"),
    ("softmax(q)", "is a vector; expected a scalar"),
])
def test_vector_expression_errors(similarity, match):
    with pytest.raises(attngen.SpecError, match=match.replace("(", r"\(").replace(")", r"\)")
                       if "\\" not in match else match):
        attngen.load_spec({"name": "x", "similarity": similarity,
                           "parameters": {"W": {"shape": [8, "Dk"], "init": 1}}})


def test_vector_parameters_are_refused_outside_the_similarity():
    with pytest.raises(attngen.SpecError, match="vector parameter 'g' is not allowed here"):
        attngen.load_spec({"name": "x", "similarity": "dot(q, k)", "reweight": "g",
                           "parameters": {"g": {"shape": ["Dk"], "init": 1}}})


def test_prologue_plan_and_refusals():
    plan = pipeline.plan("hedgehog", target="triton", head_dim=D)
    assert plan.prologue is not None and plan.spec.similarity == "dot(q, k)"
    assert plan.prologue.width(D) == 64 and "prologue" in plan.explain()
    square = {"name": "x", "similarity": "dot(softmax(q), softmax(k))**2"}
    assert pipeline.plan(square, target="triton").spec.similarity == "dot(q, k)**2"
    rebased = pipeline.plan("rebased", target="triton")  # its layer norm and affine map are fused: no prologue
    assert rebased.prologue is None and rebased.spec.similarity == attngen.load_spec("rebased").similarity
    assert pipeline.plan("cosformer", target="triton").prologue is None  # printable feature maps stay fused
    with pytest.raises(attngen.PlanError, match="q or k also appear outside those dots"):
        pipeline.plan({"name": "x", "similarity": "dot(softmax(g * q), k) + dot(q, k)",
                       "parameters": {"g": {"shape": ["Dk"], "init": 1}}}, target="triton")
    with pytest.raises(attngen.PlanError, match="rotary positions"):
        pipeline.plan({"name": "x", "similarity": "dot(softmax(g * q), k)", "rotary": True,
                       "parameters": {"g": {"shape": ["Dk"], "init": 1}}}, target="triton")


triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.mark.parametrize("name,causal", [("hedgehog", True), ("hedgehog", False), ("rebased", True),
                                         ("performer", False)])
def test_triton_prologue_fwd_and_every_gradient(name, causal):
    spec = attngen.load_spec(name, causal=causal)
    for case in verify_cases([spec], "triton", dtypes=("float32",), lengths=(7, 40)):
        r = run_case(case, device=DEVICE)
        assert r.passed, (r.ordering, r.shape, r.errors)
        if "dq" in r.errors:
            assert {f"d{p.name}" for p in spec.parameters if p.learnable} <= set(r.errors)


def test_triton_prologue_with_grouped_heads_and_a_state():
    spec = attngen.load_spec("hedgehog")
    op = attngen.compile(spec, backend="triton")
    ref = attngen.compile(spec, backend="torch")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 20, D, generator=g)
    k, v = (torch.randn(1, 2, 20, D, generator=g) for _ in range(2))
    w = torch.randn(4, 32, D, generator=g) * 0.3
    x = [t.to(DEVICE) for t in (q, k, v, w)]
    o, state = op(x[0][:, :, :12], x[1][:, :, :12], x[2][:, :, :12], W=x[3], return_state=True)
    o2 = op(x[0][:, :, 12:], x[1][:, :, 12:], x[2][:, :, 12:], W=x[3], initial_state=state)
    want = ref(q, k, v, W=w)
    torch.testing.assert_close(torch.cat([o, o2], 2).cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_degree_three_tensor_power_gets_a_quadratic_only_module(causal):
    spec = attngen.load_spec({"name": "taylor3", "causal": causal, "normalize": {"kind": "rowsum", "eps": 1e-6},
                              "similarity": "1 + dot(q, k)/4 + (dot(q, k)/4)**2/2 + (dot(q, k)/4)**3/6"})
    plan = pipeline.plan(spec, target="triton")
    assert [o.value for o in plan.capabilities.kernels] == ["quadratic"]
    assert any("not the linear ordering" in s.detail and "d**3" in s.detail for s in plan.derivation)
    assert not plan.capabilities.decodable
    for case in verify_cases([spec], "triton", dtypes=("float32",), lengths=(7, 40)):
        r = run_case(case, device=DEVICE)
        assert r.passed and r.ordering == "quadratic", (r.shape, r.errors)


def test_tensor_power_module_runs_quadratic_past_its_linear_head_dims():
    from attngen.runtime.triton import host, loader

    spec = attngen.load_spec("based")
    plan = pipeline.plan(spec, target="triton", head_dim=64)
    m = loader.load_module(plan).MODULE
    assert m.linear is not None and m.quadratic is not None and m.linear.max_power_dim < 64
    q, k, v = (torch.randn(1, 2, 24, 64, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in range(3))
    got = host.attention(m, q, k, v, crossover=0)  # the linear ordering would be chosen: its head dim is too wide
    want = reference(spec)(*(x.cpu().double() for x in (q, k, v)))
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)
