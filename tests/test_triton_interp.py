"""The generated Triton kernels under the interpreter, against the naive float64 reference.

On CPU they run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); on a GPU machine natively. bf16 is not run here: Triton 3.9's
interpreter computes tl.dot on bf16 operands wrongly, so bf16 is checked on a GPU only.

The full matrix: every spec x mode x T in {1, 63, 130} x D in {16, 48, 64} x {fp32, fp16}, B*H = 2;
bidirectional cases use a key length S != T (cross attention); layouts, Dk != Dv, several V blocks
and strided inputs are covered by the dedicated tests below.
"""
import math
import os
import warnings

import pytest  # noqa: E402
import sympy  # noqa: E402
import torch  # noqa: E402
from conftest import assert_close  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")

import attngen  # noqa: E402
from attngen import load_spec  # noqa: E402
from attngen.codegen.printer import print_triton  # noqa: E402
from attngen.codegen.render import template_hash  # noqa: E402
from attngen.errors import InputError, PlanError  # noqa: E402
from attngen.frontend.expr import KE, QE, Elu, I, J, Norm, Relu, Sigmoid  # noqa: E402
from attngen.naive import reference  # noqa: E402
from attngen.pipeline import lower as render  # noqa: E402
from attngen.pipeline import plan as build_plan  # noqa: E402
from attngen.runtime.evaluate import Evaluator  # noqa: E402
from attngen.runtime.triton import loader as triton_backend  # noqa: E402
from attngen.verify import verify_case  # noqa: E402

# CPU tensors under the interpreter, CUDA tensors when the kernels run natively on a GPU
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
SPECS = ("linear_elu", "relu_linear", "cosformer", "cottention")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}




def poisoned(module, monkeypatch):
    """Make every buffer the module allocates start as NaN, so an unwritten element fails the test."""
    def empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    monkeypatch.setattr(module.host, "_empty", empty)  # the shared host runtime allocates every buffer


def check(name, causal, t, s, dk, dv, dtype, monkeypatch, layout="bhtd", b=1, h=2, seed=0, param_range=(-1, 1)):
    spec = load_spec(name, causal=causal)
    name = spec.name
    plan = build_plan(spec, force="linear")
    module = triton_backend.load_module(plan)
    poisoned(module, monkeypatch)
    fn = getattr(module, f"{name}_attention")
    g = torch.Generator().manual_seed(seed)

    def rand(length, d):
        x = torch.randn(b, h, length, d, generator=g, dtype=torch.float64)
        return x.transpose(1, 2).contiguous() if layout == "bthd" else x

    q, k, v = rand(t, dk), rand(s, dk), rand(s, dv)
    lo, hi = param_range
    params = {p.name: (torch.rand((h,) if p.shape else (), generator=g, dtype=torch.float64) * (hi - lo) + lo)
              for p in spec.parameters}
    ours = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    ours_p = {n: p.to(DEVICE, torch.float32).requires_grad_() for n, p in params.items()}
    gold = [x.clone().requires_grad_() for x in (q, k, v)]
    gold_p = {n: p.clone().requires_grad_() for n, p in params.items()}

    o = fn(*ours, layout=layout, **ours_p)
    ref = reference(spec, layout=layout)(*gold, **gold_p)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    o.backward(do.to(DEVICE, dtype))
    ref.backward(do)
    tol = TOL[dtype]
    assert o.dtype == dtype
    assert_close("o", o, ref, tol)
    for n, x, y in zip("qkv", ours, gold):
        assert_close("d" + n, x.grad, y.grad, tol)
    for n in params:
        assert_close("d" + n, ours_p[n].grad, gold_p[n].grad, tol)


CASES = [(t, d, dtype) for dtype in (torch.float32, torch.float16) for t in (1, 63, 130) for d in (16, 48, 64)]


def _id(case):
    t, d, dtype = case
    return f"T{t}-D{d}-{'fp32' if dtype == torch.float32 else 'fp16'}"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("name", SPECS)
def test_causal_matches_reference(name, case, monkeypatch):
    t, d, dtype = case
    check(name, True, t, t, d, d, dtype, monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("name", SPECS)
def test_bidirectional_cross_matches_reference(name, case, monkeypatch):
    t, d, dtype = case
    s = {1: 1, 63: 130, 130: 63}[t]  # key length differs from the query length
    check(name, False, t, s, d, d, dtype, monkeypatch)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["cosformer", "cottention"])
def test_bthd_layout_and_distinct_value_dim(name, causal, monkeypatch):
    # Dk=48 and Dv=80: padded K block, two V blocks in the forward (BV=64), B*H = 2 with B = 2
    check(name, causal, 70, 70 if causal else 33, 48, 80, torch.float32, monkeypatch, layout="bthd", b=2, h=1)


@pytest.mark.parametrize("d", [96, 256], ids=lambda d: f"D{d}")
def test_large_and_odd_head_dims(d, monkeypatch):
    # the ends of the supported range (16 .. 256) and a non-power of two, on a short sequence
    check("cosformer", True, 20, 20, d, d, torch.float32, monkeypatch, h=1)


CONSTANT_FEATURE = {"name": "const_relu", "similarity": "2 + dot(relu(q), relu(k)) / d",
                    "reweight": "exp(-s) + 1", "normalize": "none",
                    "parameters": {"s": {"shape": [], "init": 0.1}}}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_constant_feature_and_scalar_parameter(causal, monkeypatch):
    # a width-1 constant feature (the 2), a coefficient 1/d, a scalar learnable parameter in a coefficient
    check({**CONSTANT_FEATURE, "causal": causal}, causal, 70, 70 if causal else 45, 48, 32, torch.float32,
          monkeypatch)


def test_strided_inputs_need_no_copy(monkeypatch):
    """A [B,T,H,D] tensor viewed as [B,H,T,D] (non-contiguous) gives the same result as a contiguous one."""
    plan = build_plan(load_spec("linear_elu"), force="linear")
    fn = triton_backend.function(plan)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 32, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    a = fn(q, k, v)
    b = fn(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(a, b)


def test_module_text_is_deterministic_and_has_header():
    plan = build_plan(load_spec("cosformer"), force="linear")
    a, b = render(plan), render(build_plan(load_spec("cosformer"), force="linear"))
    assert a == b
    assert f"spec hash: {plan.spec.hash}" in a and f"template hash: {template_hash()}" in a
    assert ("def cosformer_attention(q, k, v, *, initial_state=None, return_state=False, cu_seqlens=None, "
            "layout=\"bhtd\")") in a
    assert "def cosformer_step(q_t, k_t, v_t, S, z, pos, *, layout=\"bhtd\")" in a
    assert "\n\n\n\n" not in a


# what the causal kernels store besides o / den and the gradients: the recurrent states (final state,
# initial state's gradient, the decode step's new state), never a feature map
# recurrent states (F x Dv per sequence, or per chunk in the chunk-parallel scan: h, hz, g, gz), never features
STATE_STORES = ["ds0", "p_dz0", "s_out", "st", "z_out", "zt", "h", "hz", "g", "p_gz"]


def test_feature_maps_are_fused_not_stored():
    """phi(q), phi(k) never reach memory: the only stores are o / den, the gradients and the states."""
    text = render(build_plan(load_spec("cosformer"), force="linear"))
    stored = sorted({line.split("tl.store(")[1].split(" ")[0] for line in text.splitlines() if "tl.store(" in line})
    assert stored == sorted(["den", "p_dk", "p_dq", "p_dv", "p_o", *STATE_STORES])


def test_input_errors(monkeypatch):
    fn = triton_backend.function(build_plan(load_spec("cottention"), force="linear"))
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(InputError, match="causal"):
        fn(x, torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 9, 16, device=DEVICE))
    with pytest.raises(InputError, match="parameter 'm'"):
        fn(x, x, x, m=torch.zeros(3, device=DEVICE))
    with pytest.raises(InputError, match="layout"):
        fn(x, x, x, layout="thd")
    with pytest.raises(InputError, match="float64"):
        fn(x.double(), x.double(), x.double())


def test_unsupported_plans_are_refused():
    decay_rowsum = {**LEARNED_GAMMA, "normalize": "rowsum"}
    with pytest.raises(PlanError, match="decay reweighting .* normalisation 'rowsum'"):
        render(build_plan(load_spec(decay_rowsum), force="linear"))
    cube = {"name": "cube", "similarity": "(dot(q, k) / sqrt(d))**3", "normalize": "none"}
    with pytest.raises(PlanError, match=r"tensor power \(width d\*\*3\)"):
        render(build_plan(load_spec(cube), force="linear"))


# ---------------------------------------------------------------------------------------------
# the printer
# ---------------------------------------------------------------------------------------------
class _TL:
    """Just enough of triton.language, on torch tensors, to evaluate printed expressions."""
    exp, log, sin, cos, sqrt, abs = torch.exp, torch.log, torch.sin, torch.cos, torch.sqrt, torch.abs

    @staticmethod
    def maximum(a, b):
        return torch.maximum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))

    @staticmethod
    def minimum(a, b):
        return torch.minimum(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))

    @staticmethod
    def where(c, a, b):
        return torch.where(c, torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


M = sympy.Symbol("m", real=True)
PRINTED = [Elu(QE) + 1, Relu(QE), Sigmoid(QE) ** 2, sympy.tanh(QE), sympy.exp(-QE) * sympy.cos(QE),
           (J + 1) ** (-Sigmoid(M)), sympy.sqrt(J + 2) / (J + 1) ** 3, sympy.Max(QE, 0.5 * QE, -1),
           sympy.Min(QE, 1) + sympy.Abs(QE), sympy.cos(sympy.pi * J / 7) * sympy.Rational(3, 4)]


@pytest.mark.parametrize("expr", PRINTED + [sympy.diff(e, QE) for e in PRINTED[:5]] + [sympy.diff(PRINTED[5], M)],
                         ids=lambda e: sympy.sstr(e)[:40])
def test_printed_code_equals_the_expression(expr):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)  # q elements, includes 0
    pos = torch.arange(13, dtype=torch.float64)
    m = torch.tensor(0.3, dtype=torch.float64)
    code = print_triton(expr, {QE: "x", J: "pos", M: "m"})
    got = eval(code, {"tl": _TL, "x": x, "pos": pos, "m": m})  # noqa: S307 (our own printer's output)
    want = Evaluator({QE: x, J: pos, M: m})(expr)
    got = torch.as_tensor(got, dtype=torch.float64).expand(13)
    want = torch.as_tensor(want, dtype=torch.float64).expand(13)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), f"{code}: {got} != {want}"


def test_printer_is_strict():
    with pytest.raises(PlanError, match=r"specs/x.yaml.*gamma\(q_e\)"):
        print_triton(sympy.gamma(QE), {QE: "b_q"}, where="specs/x.yaml")
    with pytest.raises(PlanError, match="unknown symbol"):
        print_triton(QE + KE, {QE: "b_q"})
    with pytest.raises(PlanError, match="Norm"):
        print_triton(Norm(QE), {QE: "b_q"})
    with pytest.raises(PlanError, match="integer power"):
        print_triton(QE ** 40, {QE: "b_q"})


def test_printer_never_emits_integer_division():
    code = print_triton(I / 2 + sympy.Rational(1, 3), {I: "i"})
    assert "/ 2)" not in code and "0.5" in code and repr(1 / 3) in code
    assert math.isclose(eval(code, {"i": 3}), 3 / 2 + 1 / 3)  # noqa: S307


def test_torch_compile_fullgraph_traces_the_custom_ops():
    """The custom ops (fake kernels + autograd formula) let dynamo trace the call in one graph."""
    fn = triton_backend.function(build_plan(load_spec("cottention"), force="linear"))
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(1, 2, 40, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    inputs.append(torch.tensor([0.2, -0.1], requires_grad=True))

    def loss(q, k, v, m):
        return fn(q, k, v, m=m).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, inputs)
    want = loss(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    assert torch.allclose(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# the decay class (docs/derivations.md section 4): retention, and a learnable per-head gamma
# ---------------------------------------------------------------------------------------------
LEARNED_GAMMA = {"name": "retention_learned", "similarity": "dot(q, k) / sqrt(d)", "reweight": "g**abs(i - j)",
                 "normalize": "none", "parameters": {"g": {"shape": ["H"], "init": 0.9}}}
DECAY_SPECS = {"retention": "retention", "learned": LEARNED_GAMMA}


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("which", sorted(DECAY_SPECS))
def test_decay_matches_reference(which, causal, case, monkeypatch):
    t, d, dtype = case
    spec = DECAY_SPECS[which]
    spec = {**spec, "causal": causal} if isinstance(spec, dict) else load_spec(spec, causal=causal)
    s = t if causal else {1: 1, 63: 130, 130: 63}[t]
    # gamma in [0.8, 0.99]: decays that reach across chunk boundaries (BT = 64) but stay well above 0
    check(spec, causal, t, s, d, d, dtype, monkeypatch, param_range=(0.8, 0.99))


def test_decay_gamma_out_of_range_is_an_input_error():
    fn = triton_backend.function(build_plan(load_spec({**LEARNED_GAMMA, "causal": True}), force="linear"))
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(InputError, match=r"gamma = g must lie in \(0, 1\]"):
        fn(x, x, x, g=torch.tensor([0.9, 1.5]))
    with pytest.raises(InputError, match="gamma"):
        fn(x, x, x, g=torch.tensor([0.0, 0.5]))
    assert torch.isfinite(fn(x, x, x, g=torch.tensor([1.0, 0.5]))).all()  # gamma = 1 is allowed


def test_decay_is_chunk_local():
    """No gamma**i * gamma**(-j): every power of gamma in the kernels is exp(n * log gamma) with n >= 0."""
    text = render(build_plan(load_spec("retention", causal=False), force="linear"))
    assert "b_lg = tl.log(tl.load(gam + i_h))" in text
    for line in text.splitlines():
        if "* b_lg)" in line:
            assert "-" not in line.split("tl.exp(")[1].split("* b_lg")[0].replace("BT - 1 - l_l", ""), line


# ---------------------------------------------------------------------------------------------
# tensor-power features (docs/derivations.md section 5): the d**2 block is built in registers
# ---------------------------------------------------------------------------------------------
POWER_CASES = [(t, 16, dtype) for dtype in (torch.float32, torch.float16) for t in (1, 63, 130)]


@pytest.mark.parametrize("case", POWER_CASES, ids=_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["polynomial2", "based"])
def test_tensor_power_matches_reference(name, causal, case, monkeypatch):
    t, d, dtype = case
    # S = 1 is avoided here: with the row-sum normaliser and one key, o = v whatever q is, so dq is 0 up to
    # eps (about 1e-5) and its relative error measures only fp32 cancellation of O(1) terms
    s = t if causal else {1: 63, 63: 130, 130: 63}[t]
    check(load_spec(name, causal=causal), causal, t, s, d, d, dtype, monkeypatch)


def test_tensor_power_is_not_stored_and_refuses_large_heads():
    text = render(build_plan(load_spec("based"), force="linear"))
    assert "tl.reshape(" in text
    stored = sorted({line.split("tl.store(")[1].split(" ")[0] for line in text.splitlines() if "tl.store(" in line})
    assert stored == sorted(["den", "p_dk", "p_dq", "p_dv", "p_o", *STATE_STORES])
    fn = triton_backend.function(build_plan(load_spec("polynomial2"), force="linear"))
    x = torch.randn(1, 1, 8, 32, device=DEVICE)
    with pytest.raises(InputError, match="head dims up to 16; found Dk=32"):
        fn(x, x, x)


# masked rows (past the sequence end inside the last block) never divide by their zero row reductions
@pytest.mark.parametrize("plan", ["linear", "quadratic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cosine_masked_rows_make_no_nan(plan, causal):
    """The docs' cosine example: its row scale 1/(norm(q) norm(k)) is 1/0 on padding rows unless the kernels
    mask the reduction; numpy's invalid-value warnings (0 * inf) are errors here, so a NaN made and then
    discarded fails too."""
    spec = load_spec({"name": "cosine", "similarity": "dot(q, k) / (norm(q) * norm(k))", "causal": causal})
    op = attngen.compile(spec, backend="triton", plan=plan)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = verify_case(op, spec, dtype=torch.float32, t=63, dk=16)
    assert res.passed, res.errors
