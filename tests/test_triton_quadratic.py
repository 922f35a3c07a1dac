"""The quadratic ordering's generated kernels (attngen/codegen/templates/quadratic*.j2) under the interpreter, against
the naive float64 reference: the output and every gradient (q, k, v, parameters), relative RMS error.

Covered: the softmax family (softmax; alibi, whose exp reweighting folds into the score and whose slope is
learnable; an exp similarity times a non-exp reweighting with a learnable parameter), general similarities
(sigmoid with a learnable bias, exp(-norm(q - k)**2 / d) with a clamped row sum), a separable spec forced
quadratic (cottention: row reductions and a learnable reweighting), causal and bidirectional with cross
attention (S != T), the block-sparse entry point, the modules that dispatch between the linear and the
quadratic ordering, and causal block skipping. bf16 is not run here: Triton 3.9's interpreter computes
tl.dot on bf16 operands wrongly, so bf16 is checked on a GPU only: tests/test_triton_gpu.py runs bf16 and fp16 there.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")

import attngen  # noqa: E402
from attngen import load_spec  # noqa: E402
from attngen.errors import InputError, PlanError  # noqa: E402
from attngen.naive import attention_matrix, reference  # noqa: E402
from attngen.pipeline import lower as render  # noqa: E402
from attngen.pipeline import plan as build_plan  # noqa: E402
from attngen.runtime.inputs import default_parameters  # noqa: E402
from attngen.runtime.triton import loader as triton_backend  # noqa: E402
from attngen.verify import rel_rms  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}
SIGMOID = {"name": "sigmoid_attn", "similarity": "sigmoid(dot(q, k)/sqrt(d) - b)", "normalize": "none",
           "parameters": {"b": {"shape": [], "init": 1.0}}}
RBF = {"name": "rbf", "similarity": "exp(-norm(q - k)**2 / d)",
       "normalize": {"kind": "rowsum", "eps": 1.0e-6, "eps_mode": "clamp"}}
WEIGHTED_SOFTMAX = {"name": "soft_window", "similarity": "exp(dot(q, k)/sqrt(d))",
                    "reweight": "sigmoid(w - abs(i - j)/16)", "normalize": "rowsum",
                    "parameters": {"w": {"shape": ["H"], "init": 1.0}}}


def spec_of(name, causal):
    return load_spec({**name, "causal": causal} if isinstance(name, dict) else name, causal=causal)


def module_of(spec):
    return triton_backend.load_module(build_plan(spec, force="quadratic"))


def poisoned(module, monkeypatch):
    """Every buffer the module allocates starts as NaN, so an unwritten element fails the test."""
    def empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    monkeypatch.setattr(module.host, "_empty", empty)  # the shared host runtime allocates every buffer


def inputs(spec, b, h, t, s, dk, dv, seed, layout="bhtd"):
    """q, k, v, dO in float64 (layout), and the parameters: their init plus noise (float64)."""
    g = torch.Generator().manual_seed(seed)

    def rand(n, d):
        x = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
        return x.transpose(1, 2).contiguous() if layout == "bthd" else x

    q, k, v, do = rand(t, dk), rand(s, dk), rand(s, dv), rand(t, dv)
    params = {n: p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
              for n, p in default_parameters(spec, h, torch.float64).items()}
    return q, k, v, do, params


def run(fn, q, k, v, do, params, dtype, *extra, **kw):
    """o and the gradients {"o", "dq", "dk", "dv", "d<param>"} of fn in ``dtype`` (parameters fp32)."""
    xs = [x.detach().to(device=DEVICE, dtype=dtype, copy=True).requires_grad_() for x in (q, k, v)]
    pdtype = torch.float32 if dtype != torch.float64 else dtype
    ps = {n: p.detach().to(device=DEVICE, dtype=pdtype, copy=True).requires_grad_() for n, p in params.items()}
    o = fn(*xs, *extra, **kw, **ps)
    o.backward(do.to(DEVICE, o.dtype))
    out = {"o": o} | {f"d{n}": x.grad for n, x in zip("qkv", xs)} | {f"d{n}": p.grad for n, p in ps.items()}
    return out


def check(spec, t, s, dk, dv, dtype, monkeypatch, b=1, h=2, layout="bhtd", seed=0):
    module = module_of(spec)
    poisoned(module, monkeypatch)
    fn = getattr(module, f"{spec.name}_attention")
    q, k, v, do, params = inputs(spec, b, h, t, s, dk, dv, seed, layout)
    ours = run(fn, q, k, v, do, params, dtype, layout=layout)
    gold = run(reference(spec, layout=layout), q, k, v, do, params, torch.float64)
    assert ours["o"].dtype == dtype
    for name, ref in gold.items():
        assert_close(name, ours[name], ref, TOL[dtype])
    return ours, gold


# every T in {1, 63, 200} with every head dim in {16, 64, 80}; bidirectional runs use another key length
CASES = [(t, d) for t in (1, 63, 200) for d in (16, 64, 80)]
CROSS = {1: 63, 63: 130, 200: 63}  # S for T (S = 1 would leave o = v and dq = 0: nothing to measure)


def _id(case):
    return f"T{case[0]}-D{case[1]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["softmax", "alibi", "sigmoid"])
def test_matches_reference(name, causal, case, dtype, monkeypatch):
    t, d = case
    spec = spec_of(SIGMOID if name == "sigmoid" else name, causal)
    check(spec, t, t if causal else CROSS[t], d, d, dtype, monkeypatch)


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 is checked on a GPU only: Triton 3.9's interpreter computes "
                                            "tl.dot on bf16 operands wrongly (errors of 1e9 seen); see "
                                            "tests/test_triton_gpu.py")
@pytest.mark.parametrize("name", ["softmax", "alibi"])
def test_bf16_matches_reference(name, monkeypatch):
    spec = spec_of(name, True)
    module = module_of(spec)
    q, k, v, do, params = inputs(spec, 1, 2, 200, 200, 64, 64, 0)
    ours = run(getattr(module, f"{spec.name}_attention"), q, k, v, do, params, torch.bfloat16)
    gold = run(reference(spec), q, k, v, do, params, torch.float64)
    for n, ref in gold.items():
        assert_close(n, ours[n], ref, 3e-2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["rbf", "weighted_softmax", "cottention"])
def test_more_similarities_and_reweightings(name, causal, monkeypatch):
    """exp(-norm(q - k)**2 / d) (a general similarity: the mixed norm expands into dot products) with a clamped
    row sum; an exp similarity times a non-exp reweighting with a learnable per-head parameter (it multiplies
    P, its gradient comes from the weights); cottention forced quadratic (row reductions in the similarity,
    a learnable reweighting)."""
    spec = spec_of({"rbf": RBF, "weighted_softmax": WEIGHTED_SOFTMAX}.get(name, name), causal)
    check(spec, 70, 70 if causal else 45, 32, 32, torch.float32, monkeypatch)


def test_layout_distinct_value_dim_and_batch(monkeypatch):
    # bthd, Dk = 48 (padded K block) != Dv = 80, B = 2, cross attention with S < T
    check(spec_of("alibi", False), 70, 33, 48, 80, torch.float32, monkeypatch, b=2, h=3, layout="bthd")


@pytest.mark.parametrize("causal,t,s", [(True, 100, 100), (False, 100, 77)], ids=["causal", "cross-T100-S77"])
def test_softmax_matches_sdpa(causal, t, s):
    spec = spec_of("softmax", causal)
    q, k, v, do, _ = inputs(spec, 2, 2, t, s, 64, 64, seed=4)
    ours = run(getattr(module_of(spec), "softmax_attention"), q, k, v, do, {}, torch.float32)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = F.scaled_dot_product_attention(*xs, is_causal=causal)  # float64, on the CPU
    o.backward(do)
    gold = {"o": o} | {f"d{n}": x.grad for n, x in zip("qkv", xs)}
    for name, ref in gold.items():
        assert_close(name, ours[name], ref, TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# block-sparse: exact softmax over the listed key blocks only
# ---------------------------------------------------------------------------------------------
def random_blocks(b, h, nqb, nkb, g, density=0.5):
    """kv_blocks [B, H, NQB, NKB + 2] int64: a random subset of key blocks per query block, in random order
    with -1 padding interleaved; query block 0 of batch 0, head 0 lists nothing. Returns (kv_blocks, keep)."""
    keep = torch.rand(b, h, nqb, nkb, generator=g) < density
    keep[0, 0, 0] = False
    width = nkb + 2
    cols = torch.where(keep, torch.arange(nkb), -1)
    cols = torch.cat([cols, torch.full((b, h, nqb, 2), -1)], -1)
    order = torch.rand(b, h, nqb, width, generator=g).argsort(-1)
    return cols.gather(-1, order), keep


def masked_reference(spec, keep, block, q, k, v, params):
    """Dense float64 softmax of the spec with A restricted to the kept blocks (rows with none give 0)."""
    t, s = q.shape[2], k.shape[2]
    a = attention_matrix(spec, q, k, params)  # causal mask included
    a = a * keep.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :t, :s]
    den = a.sum(-1, keepdim=True)
    return (a @ v) / torch.where(den > 0, den, torch.ones_like(den))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,causal,t,s,block", [("softmax", True, 200, 200, 32), ("alibi", True, 130, 130, 64),
                                                  ("alibi", False, 100, 150, 16), ("softmax", False, 63, 40, 16)],
                         ids=["softmax-causal-T200-B32", "alibi-causal-T130-B64", "alibi-cross-T100-S150-B16",
                              "softmax-cross-T63-S40-B16"])
def test_block_sparse_matches_masked_reference(name, causal, t, s, block, dtype, monkeypatch):
    spec = spec_of(name, causal)
    module = module_of(spec)
    poisoned(module, monkeypatch)
    b, h, d = 2, 2, 32
    q, k, v, do, params = inputs(spec, b, h, t, s, d, d, seed=7)
    g = torch.Generator().manual_seed(8)
    kv_blocks, keep = random_blocks(b, h, -(-t // block), -(-s // block), g)
    fn = getattr(module, f"{name}_attention_block_sparse")
    ours = run(fn, q, k, v, do, params, dtype, kv_blocks.to(DEVICE), block)
    gold = run(lambda *x, **p: masked_reference(spec, keep, block, *x, p), q, k, v, do, params, torch.float64)
    for key, ref in gold.items():
        assert_close(key, ours[key], ref, TOL[dtype])
    # query block 0 of (batch 0, head 0) lists no key: output 0 and no gradient, not NaN
    assert torch.equal(ours["o"][0, 0, :block].float().cpu(), torch.zeros(block, d))
    assert torch.equal(ours["dq"][0, 0, :block].float().cpu(), torch.zeros(block, d))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_block_sparse_listing_every_block_is_the_dense_kernel(causal, monkeypatch):
    spec = spec_of("alibi", causal)
    module = module_of(spec)
    t, s, block = 150, (150 if causal else 90), 32
    q, k, v, do, params = inputs(spec, 1, 2, t, s, 48, 48, seed=9)
    nqb, nkb = -(-t // block), -(-s // block)
    g = torch.Generator().manual_seed(10)
    every = torch.arange(nkb).expand(1, 2, nqb, nkb)  # every key block (causal: the mask still applies per element)
    every = every.gather(-1, torch.rand(1, 2, nqb, nkb, generator=g).argsort(-1))  # in any order
    sparse = run(getattr(module, "alibi_attention_block_sparse"), q, k, v, do, params, torch.float32,
                 every.to(DEVICE, torch.int32), block)
    dense = run(getattr(module, "alibi_attention"), q, k, v, do, params, torch.float32)
    for key in dense:
        assert rel_rms(sparse[key], dense[key]) <= 1e-5, key  # other tiles and order: fp32 rounding only


def test_block_sparse_input_errors():
    fn = getattr(module_of(spec_of("softmax", True)), "softmax_attention_block_sparse")
    x = torch.randn(1, 2, 40, 16, device=DEVICE)
    ok = torch.zeros(1, 2, 3, 1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(InputError, match="power of two"):
        fn(x, x, x, ok, 24)
    with pytest.raises(InputError, match=r"\[1, 2, 3, MAXK\]"):
        fn(x, x, x, ok[:, :, :2], 16)
    with pytest.raises(InputError, match="int32/int64"):
        fn(x, x, x, ok.float(), 16)
    with pytest.raises(InputError, match=r"0\.\.2"):
        fn(x, x, x, ok + 3, 16)
    with pytest.raises(InputError, match="twice"):
        fn(x, x, x, torch.cat([ok, ok], -1), 16)
    empty = fn(x, x, x, ok[..., :0], 16)  # no key listed anywhere: zeros
    assert torch.equal(empty, torch.zeros_like(empty))


# ---------------------------------------------------------------------------------------------
# structure: causal block skipping, what is stored, refusals
# ---------------------------------------------------------------------------------------------
def test_causal_key_blocks_above_the_diagonal_are_not_visited():
    """With T = 128 the tiles are 64 x 64. NaN in the keys' values of block 1 would reach the outputs and dQ of
    query block 0 if its programs visited key block 1; NaN in the queries of block 0 would reach dK, dV of key
    block 1 if its program visited query block 0 (0 * NaN is NaN in the products)."""
    fn = getattr(module_of(spec_of("softmax", True)), "softmax_attention")
    q, k, v = (torch.randn(1, 1, 128, 16, device=DEVICE) for _ in range(3))
    v[:, :, 64:] = float("nan")
    q1, k1, v1 = (x.clone().requires_grad_() for x in (q, k, v))
    fn(q1, k1, v1)[:, :, :64].sum().backward()
    assert torch.isfinite(q1.grad[:, :, :64]).all()
    v[:, :, 64:] = 1.0
    q[:, :, :64] = float("nan")
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    o = fn(q2, k2, v2)
    assert torch.isfinite(o[:, :, 64:]).all()
    o[:, :, 64:].sum().backward()
    assert torch.isfinite(k2.grad[:, :, 64:]).all() and torch.isfinite(v2.grad[:, :, 64:]).all()


def test_kernels_store_no_n_by_n_tensor_and_use_no_atomics():
    for spec in (spec_of("alibi", True), spec_of(SIGMOID, False)):
        text = render(build_plan(spec, force="quadratic"))
        stored = sorted({line.split("tl.store(")[1].split(" ")[0] for line in text.splitlines() if "tl.store(" in line})
        stats = ["lse"] if spec.name == "alibi" else []
        params = [f"dpar_{p.name}" for p in spec.parameters]
        assert stored == sorted(["p_o", "p_dq", "p_dk", "p_dv", *stats, *params])
        assert "tl.atomic" not in text
        assert ("def alibi_attention_block_sparse(" in text) == (spec.name == "alibi")


def test_quadratic_module_refuses_states():
    fn = getattr(module_of(spec_of("softmax", True)), "softmax_attention")
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    for kw in ({"return_state": True}, {"cu_seqlens": torch.tensor([0, 8], device=DEVICE)}):
        with pytest.raises(InputError, match="quadratic ordering only"):
            fn(x, x, x, **kw)
    with pytest.raises(InputError, match="causal"):
        fn(x, torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 9, 16, device=DEVICE))


def test_unsupported_quadratic_plans_are_plan_errors():
    clamp = {"name": "exp_clamp", "similarity": "exp(dot(q, k))", "normalize": {"kind": "rowsum", "eps": 1e-3,
                                                                              "eps_mode": "clamp"}}
    with pytest.raises(PlanError, match="clamped row sum"):
        render(build_plan(load_spec(clamp), force="quadratic"))
    with pytest.raises(PlanError, match="mixes elements of q and k"):
        render(build_plan(load_spec({"name": "mixed", "similarity": "norm(q * k)"}), force="quadratic"))


def test_printer_prints_sign_the_derivative_of_abs():
    import sympy

    from attngen.codegen.printer import print_triton
    from attngen.frontend.expr import QE

    class TL:  # just enough of triton.language on torch tensors
        where = staticmethod(lambda c, a, b: torch.where(c, torch.as_tensor(a), torch.as_tensor(b)))
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    code = print_triton(sympy.diff(sympy.Abs(sympy.Symbol("x", real=True)), sympy.Symbol("x", real=True)),
                        {sympy.Symbol("x", real=True): "x"})
    assert torch.equal(eval(code, {"tl": TL, "x": x}).double(), torch.tensor([-1.0, 0.0, 1.0],  # noqa: S307
                                                                              dtype=torch.float64))
    assert print_triton(sympy.sign(QE), {QE: "b_q"}).startswith("tl.where(")


def test_torch_compile_fullgraph_traces_the_quadratic_ops():
    fn = getattr(module_of(spec_of("alibi", True)), "alibi_attention")
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, 2, 40, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    xs.append(torch.tensor([0.2, 0.05], device=DEVICE, requires_grad=True))

    def loss(q, k, v, slope):
        return fn(q, k, v, slope=slope).square().sum()

    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*xs)
    want = loss(*xs)
    assert torch.allclose(got, want)
    for a, b in zip(torch.autograd.grad(got, xs), torch.autograd.grad(want, xs)):
        assert torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# modules with both orderings: the planner's dispatch at the crossover
# ---------------------------------------------------------------------------------------------
def test_dispatching_module_runs_each_ordering_at_its_lengths(monkeypatch):
    """polynomial2 (quadratic below the crossover, linear above): one module, both kernels; crossover= picks."""
    spec = spec_of("polynomial2", True)
    module = triton_backend.load_module(build_plan(spec, target="triton"))
    assert module.CROSSOVER > 100
    ran = []
    for host in ("_qfwd", "_fwd"):  # the launch drivers of the shared host runtime
        real = getattr(module.host, host)
        monkeypatch.setattr(module.host, host, lambda *a, _real=real, _h=host: ran.append(_h) or _real(*a))
    q, k, v, do, _ = inputs(spec, 1, 2, 50, 50, 16, 16, seed=11)
    gold = run(reference(spec), q, k, v, do, {}, torch.float64)
    for crossover, host in ((float("inf"), "_qfwd"), (0.0, "_fwd")):
        ran.clear()
        ours = run(module.polynomial2_attention, q, k, v, do, {}, torch.float32, crossover=crossover)
        assert ran == [host]
        for key, ref in gold.items():
            assert_close(key, ours[key], ref, 1e-4)


def test_compiled_op_dispatches_by_the_plan_of_the_call():
    """attngen.compile(backend="triton"): polynomial2 at head dim 32 runs the quadratic kernels at T = 50 (its
    linear kernels stop at head dim 16), and a state (linear ordering only) is refused with that reason."""
    op = attngen.compile(spec_of("polynomial2", True), backend="triton")
    q, k, v, _, _ = inputs(op.spec, 1, 2, 50, 50, 32, 32, seed=12)
    x = [y.float().to(DEVICE) for y in (q, k, v)]
    assert op.ordering_for(32, 50, DEVICE).value == "quadratic"
    assert rel_rms(op(*x).cpu(), reference(op.spec)(q, k, v)) <= 1e-4
    with pytest.raises(InputError, match="head dims up to 16"):
        op(*x, return_state=True)
