"""Matrix feature maps fused into the linear Triton kernels (docs/derivations.md section 11): q' and k' of a feature
prologue whose vectors are matmul(W, x), softmax and row reductions (hedgehog, performer, and any spec of that form)
computed in the kernels from the raw q / k blocks, dq, dk and dW chained back there; the torch prologue stays where
the kernels cannot form them, with the reason in the plan.

Each case runs the generated module under the planner's own plan and is compared by attngen.verify with the
float64 naive reference on the output and every gradient (dW of a learnable W included); the torch prologue is
replaced by a function that fails, so a case that passes ran the fused kernels."""
import os

import pytest
import torch

import attngen
from attngen import pipeline
from attngen.verify import compile_op, verify_case, verify_step

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# not a built-in: a learnable temperature per head on a matmul, a row norm of the raw row, W [F, Dk] learnable
CUSTOM = {"name": "tempered", "similarity": "dot(exp(t * matmul(W, q) - norm(q)), exp(t * matmul(W, k) - norm(k)))",
          "normalize": {"kind": "rowsum", "eps": 1e-6}, "constants": {"F": 16},
          "parameters": {"W": {"shape": ["F", "Dk"], "init": "normal(0.3)", "seed": 1},
                         "t": {"shape": ["H"], "init": 0.5}}}


def load(name, causal=True):
    return attngen.load_spec(CUSTOM if name == "tempered" else name, causal=causal)


@pytest.fixture
def no_torch_prologue(monkeypatch):
    """The op's torch prologue fails if called: the kernels must form the feature rows."""
    import attngen.op

    def fail(*args, **kwargs):
        raise AssertionError("the torch feature prologue ran")

    monkeypatch.setattr(attngen.op.prologue, "features", fail)


@pytest.mark.parametrize("name", ["hedgehog", "performer", "tempered"])
def test_matmul_feature_maps_are_fused_and_say_so(name):
    spec = load(name)
    plan = pipeline.plan(spec, target="triton")
    assert plan.prologue is not None and plan.prologue.fused and not plan.prologue.unfused
    assert [o.value for o in plan.capabilities.kernels] == ["linear"]  # the fused maps live in the linear kernels
    assert "fused into the linear kernels" in plan.explain()
    source = pipeline.lower(plan)
    assert "Feature prologue" not in source and "# Fused feature maps" in source
    assert "tl.dot(b_qvx0, tl.trans(b_par_W)" in source and "tl.dot(b_kvx0, tl.trans(b_par_W)" in source
    learnable = {p.name for p in spec.parameters if p.learnable}
    assert ("b_dpar_W += tl.dot(" in source) == ("W" in learnable)  # a fixed W (performer) gets no gradient code
    assert ("tl.store(dpar_W" in source) == ("W" in learnable)


@pytest.mark.parametrize("name,causal,scan,dtype", [
    ("hedgehog", True, "fused", torch.float32), ("hedgehog", True, "parallel", torch.float32),
    ("hedgehog", False, "auto", torch.float32), ("hedgehog", True, "fused", torch.float16),
    ("performer", True, "fused", torch.float32), ("performer", True, "parallel", torch.float32),
    ("performer", False, "auto", torch.float32), ("performer", True, "parallel", torch.float16),
    ("tempered", True, "fused", torch.float32), ("tempered", False, "auto", torch.float16),
])
def test_fused_matmul_fwd_and_every_gradient(name, causal, scan, dtype, monkeypatch, no_torch_prologue):
    from attngen.runtime.triton import host

    monkeypatch.setattr(host, "SCAN", scan)
    spec = load(name, causal)
    op = compile_op(spec, backend="triton")
    for t in (33, 64) if (name, scan, dtype) == ("hedgehog", "fused", torch.float32) else (40,):  # a partial chunk
        r = verify_case(op, spec, dtype=dtype, t=t, seed=t, device=DEVICE)
        assert r.ordering == "linear", r.ordering
        assert {"o", "dq", "dk", "dv"} | {f"d{p.name}" for p in spec.parameters if p.learnable} <= set(r.errors)
        assert r.passed, (name, causal, scan, dtype, t, r.errors)


@pytest.mark.parametrize("name", ["hedgehog", "performer"])
def test_fused_matmul_decode_steps(name, no_torch_prologue):
    spec = load(name)
    r = verify_step(compile_op(spec, backend="triton"), spec, t=12, device=DEVICE)
    assert r.passed, r.errors


def test_fused_matmul_grouped_heads_packed_sequences_and_states(no_torch_prologue):
    """k, v with fewer heads than q (W per query head): two packed sequences in one call, then a sequence split in
    two calls through the returned state; the output, dq, dk, dv and dW against the naive reference."""
    spec = load("hedgehog")
    op = attngen.compile(spec, backend="triton")
    ref = attngen.reference(spec)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 30, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 30, 16, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.eye(32, 16, dtype=torch.float64) + 0.3 * torch.randn(4, 32, 16, generator=g, dtype=torch.float64)
    do = torch.randn(1, 4, 30, 16, generator=g, dtype=torch.float64)

    def packed(x, device):
        return op(*x[:3], W=x[3], cu_seqlens=torch.tensor([0, 11, 30], device=device))

    def carried(x, device):
        o1, state = op(*(t[:, :, :13] for t in x[:3]), W=x[3], return_state=True)
        return torch.cat([o1, op(*(t[:, :, 13:] for t in x[:3]), W=x[3], initial_state=state)], 2)

    def reference(x, bounds):
        kk, vv = (t.repeat_interleave(2, 1) for t in x[1:3])
        return torch.cat([ref(x[0][:, :, a:b], kk[:, :, a:b], vv[:, :, a:b], W=x[3]) for a, b in bounds], 2)

    for run, bounds in ((packed, ((0, 11), (11, 30))), (carried, ((0, 30),))):
        results = []
        for dtype, device in ((torch.float32, DEVICE), (torch.float64, "cpu")):
            x = [t.to(dtype=dtype, device=device).requires_grad_() for t in (q, k, v, w)]
            o = run(x, device) if dtype == torch.float32 else reference(x, bounds)
            grads = torch.autograd.grad((o * do.to(dtype=dtype, device=device)).sum(), x)
            results.append([t.detach().cpu().double() for t in (o, *grads)])
        for name, a, b in zip(["o", "dq", "dk", "dv", "dW"], *results):
            assert torch.isfinite(a).all(), (run.__name__, name)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{run.__name__} {name}")


def test_fixed_matrix_with_requires_grad_is_refused():
    spec = load("performer")
    op = attngen.compile(spec, backend="triton")
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE) for _ in range(3))
    w = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    with pytest.raises(attngen.InputError, match="fixed .learnable: false. and the fused kernels form no gradient"):
        op(q, k, v, W=w)
    assert torch.isfinite(op(q, k, v, W=w.detach())).all()


@pytest.mark.parametrize("similarity,constants,why", [
    ("dot(matmul(W, q), matmul(W, k))", {"F": 24}, "the matmul width F = 24 is not one of"),
    ("dot(softmax(matmul(W, q - mean(q))), softmax(matmul(W, k - mean(k))))", {"F": 16}, "holds a reduction"),
    ("dot(softmax(q), softmax(k))", {"F": 16}, "the raw row outside matmul"),
    ("dot(matmul(W, q), matmul(W, k)) + dot(exp(matmul(W, q)), exp(matmul(W, k))) + dot(relu(matmul(W, q)), "
     "relu(matmul(W, k)))", {"F": 16}, "concatenates 3 vectors"),
])
def test_what_the_kernels_cannot_fuse_keeps_the_prologue_with_a_reason(similarity, constants, why):
    spec = attngen.load_spec({"name": "x", "similarity": similarity, "constants": constants,
                              "parameters": {"W": {"shape": ["F", "Dk"], "init": "eye"}}})
    plan = pipeline.plan(spec, target="triton")
    assert plan.prologue is not None and not plan.prologue.fused
    assert why in plan.prologue.unfused and f"not fused: {plan.prologue.unfused}" in plan.explain()
    assert "Feature prologue" in pipeline.lower(plan)


def test_forcing_the_quadratic_ordering_keeps_the_prologue():
    plan = pipeline.plan("hedgehog", target="triton", force="quadratic")
    assert plan.prologue is not None and not plan.prologue.fused and "forced" in plan.prologue.unfused


@pytest.mark.parametrize("name", ["hedgehog", "performer"])
def test_fused_matmul_launch_options(name, tmp_path):
    """The linear kernels of fused matmul maps launch with chunks of host.VEC_BT rows, 8 warps, 1 stage and
    maxnreg (ptxas otherwise chose 32 registers and spilled KBs: bench/results/2026-11-30-aot-fused-matmul.md); a
    spec without them keeps its own choice and no maxnreg."""
    from attngen import aot
    from attngen.build import generate, write
    from attngen.runtime.triton import host

    for spec, fused in ((load(name), True), (attngen.load_spec("linear_elu", causal=True), False)):
        m = aot._load(str(write(generate(spec), tmp_path))).MODULE
        for d in (64, 128):
            bt, _, _, w = host._blocks(m, 4096, d, d, torch.bfloat16)
            opts = host._warps(m, w)
            if fused:
                want = dict(num_warps=8, num_stages=1, maxnreg=host.MAXNREG)
                assert bt == host.VEC_BT == 16 and opts == want, (d, bt, opts)
            else:
                assert "maxnreg" not in opts and bt == (64 if d == 64 else 32), (d, bt, opts)
