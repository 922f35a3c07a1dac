"""topk_sparse (SEA-style sparse attention): exactness at full k, the selection against a slow dense top-k,
exact attention over exactly the kept blocks, rows with nothing kept, planner errors, the CLI row."""
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import assert_close

import attngen
from attngen.approx import topk_sparse as sparse
from attngen.approx.topk_sparse import execute as torch_sparse
from attngen.cli import main
from attngen.naive import attention_matrix, reference
from attngen.pipeline import plan as build_plan

SOFTMAX = {"name": "sp", "similarity": "exp(dot(q, k)/sqrt(d))", "normalize": "rowsum"}
ALIBI = {"name": "sp_alibi", "similarity": "exp(dot(q, k)/sqrt(d))", "reweight": "exp(-slope * abs(i - j))",
         "normalize": "rowsum", "parameters": {"slope": {"shape": ["H"], "init": "2**(-8*(h + 1)/H)"}}}
ESTIMATORS = ("cosformer", "linear_elu", "relu_linear", "based")


def sparse_spec(base=SOFTMAX, causal=True, k=2, block=16, estimator="cosformer", diagonal=True, first=1):
    approx = {"kind": "topk_sparse", "estimator": estimator, "k": k, "block": block,
              "always_keep": {"diagonal": diagonal, "first": first}}
    return attngen.load_spec({**base, "causal": causal, "approx": approx})


def inputs(t, s=None, b=2, h=3, d=16, dtype=torch.float64, scale=1.0):
    s = s or t
    q = torch.randn(b, h, t, d, dtype=dtype) * scale
    k = torch.randn(b, h, s, d, dtype=dtype) * scale
    v = torch.randn(b, h, s, d, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def grads(out, xs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, xs, g)


def masked_reference(spec, q, k, v, mask, params):
    """Exact attention restricted to ``mask`` [B, H, T, S] (bool), from the naive dense attention matrix;
    rows with nothing kept give 0."""
    a = attention_matrix(spec, q, k, params) * mask
    den = a.sum(-1, keepdim=True)
    return (a @ v) / torch.where(den > 0, den, torch.ones_like(den))


# ---------------------------------------------------------------------------------------------
# k covering every candidate: exact softmax attention
# ---------------------------------------------------------------------------------------------
FULL = [(base, causal, t, s) for base in (SOFTMAX, ALIBI) for causal in (True, False)
        for t, s in ((7, 7), (63, 63), (100, 100))] + [(SOFTMAX, False, 40, 90), (ALIBI, False, 90, 33)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("base,causal,t,s", FULL, ids=[
    f"{b['name']}-{'causal' if c else 'bidir'}-T{t}-S{s}" for b, c, t, s in FULL])
def test_full_k_equals_exact_softmax(base, causal, t, s, dtype, tol):
    spec = sparse_spec(base, causal, k=7, block=16)  # 7 blocks of 16 cover every key of S <= 112
    q, k, v = inputs(t, s)
    params = {"slope": torch.tensor([0.5, 0.1, 0.02], dtype=torch.float64, requires_grad=True)} \
        if base is ALIBI else {}
    ref = reference(spec)(q, k, v, **params)
    xs = (q, k, v, *params.values())
    ref_grads = grads(ref, xs)
    op = attngen.compile(spec, backend="torch")
    cast = [x.detach().to(dtype).requires_grad_() for x in xs]
    out = op(*cast[:3], **dict(zip(params, cast[3:])))
    assert out.dtype == dtype
    assert_close("o", out, ref, tol)
    for name, g, r in zip(("dq", "dk", "dv", "dslope"), grads(out, cast), ref_grads):
        assert_close(name, g, r, tol)
    sel = op.last_selection
    assert int(sel.counts.min()) >= 1 and sel.density() == 1.0


def test_short_sequence_with_default_block_is_exact():
    """T = 150 with blocks of 64: three key blocks, no more than k = 4, so nothing is dropped."""
    spec = sparse_spec(causal=True, k=4, block=64)
    q, k, v = inputs(150, b=1, h=2, d=32, dtype=torch.float32)
    out = attngen.compile(spec, backend="torch")(q, k, v)
    ref = reference(spec)(*(x.double() for x in (q, k, v)))
    assert_close("o", out, ref, 1e-4)


# ---------------------------------------------------------------------------------------------
# the selection: always-kept + top-k of the dense block scores, computed the slow way
# ---------------------------------------------------------------------------------------------
def slow_selection(est_spec, q, k, block, kk, causal, diagonal, first):
    """Per (b, h, I): the estimator's dense T x S similarity (mask-free), summed per block pair; the always-kept
    blocks plus the kk best allowed candidates (ties to the lower index), as sorted lists."""
    dense = attention_matrix(attngen.load_spec(est_spec, causal=False), q, k, {})  # [B, H, T, S]
    t, s = q.shape[2], k.shape[2]
    nqb, nkb = -(-t // block), -(-s // block)
    scores = torch.zeros(*dense.shape[:2], nqb, nkb, dtype=dense.dtype)
    for bi in range(nqb):
        for bj in range(nkb):
            scores[:, :, bi, bj] = dense[:, :, bi * block:(bi + 1) * block, bj * block:(bj + 1) * block].sum((-1, -2))
    kept = {}
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for bi in range(nqb):
                last_i = min((bi + 1) * block, t) - 1
                allowed = [bj for bj in range(nkb) if not causal or bj * block <= last_i]
                always = [bj for bj in allowed if bj < first or (diagonal and bj == bi)]
                cands = sorted((bj for bj in allowed if bj not in always),
                               key=lambda bj: (-float(scores[b, h, bi, bj]), bj))
                kept[b, h, bi] = sorted(always + cands[:kk])
    return scores, kept


SELECT = [("cosformer", True, True, 1), ("cosformer", False, True, 1), ("linear_elu", True, False, 0),
          ("relu_linear", False, True, 2), ("based", True, True, 2), ("linear_elu", False, False, 1)]


@pytest.mark.parametrize("estimator,causal,diagonal,first", SELECT, ids=[
    f"{e}-{'causal' if c else 'bidir'}-diag{int(dg)}-first{f}" for e, c, dg, f in SELECT])
def test_selection_is_always_kept_plus_dense_topk(estimator, causal, diagonal, first, monkeypatch):
    monkeypatch.setattr(sparse.selection, "SELECT_ELEMENTS", 2 * 2 * 10 * 3)  # chunks of 3 query blocks
    # feature maps pooled 32 rows at a time (positions offset), or one block at a time when 8 < block
    monkeypatch.setattr(sparse.selection, "POOL_ROWS", 32 if diagonal else 8)
    spec = sparse_spec(causal=causal, k=3, block=16, estimator=estimator, diagonal=diagonal, first=first)
    q, k, v = inputs(150, b=2, h=2, d=8)  # 10 blocks, the last one partial
    op = attngen.compile(spec, backend="torch")
    op(q, k, v)
    sel = op.last_selection
    scores, kept = slow_selection(estimator, q.detach(), k.detach(), 16, 3, causal, diagonal, first)
    torch.testing.assert_close(sel.scores, scores, rtol=1e-9, atol=1e-9)
    got = {key: [x for x in sel.kv_blocks[key].tolist() if x >= 0] for key in kept}
    assert got == kept
    assert sel.kv_blocks.dtype == torch.int64 and sel.counts.tolist() == [
        [[len(kept[b, h, i]) for i in range(sel.kv_blocks.shape[2])] for h in range(2)] for b in range(2)]
    assert max(map(len, kept.values())) < 10  # k smaller than the candidates: something was dropped


def test_inline_estimator_with_parameters():
    """An inline estimator's parameters take their init in the op; block_scores takes other (trained) values."""
    estimator = {"similarity": "exp(t) * dot(elu(q * s) + 1, elu(k * s) + 1)", "normalize": "rowsum",
                 "parameters": {"s": {"shape": ["H"], "init": "0.5 + 0.25 * h"}, "t": {"shape": [], "init": 0.0}}}
    spec = sparse_spec(causal=True, k=2, block=16, estimator=estimator)
    q, k, v = inputs(100, b=1, h=2, d=8)
    op = attngen.compile(spec, backend="torch")
    op(q, k, v)
    init = {"s": torch.tensor([0.5, 0.75], dtype=torch.float64), "t": torch.tensor(0.0, dtype=torch.float64)}
    scores = sparse.block_scores(op.plan.estimator, q, k, 16, init)
    torch.testing.assert_close(op.last_selection.scores, scores)
    trained = sparse.block_scores(op.plan.estimator, q, k, 16, {"s": torch.tensor([2.0, 0.1], dtype=torch.float64)})
    assert not torch.allclose(trained, scores)
    with pytest.raises(attngen.InputError, match="parameter 't': expected shape"):
        sparse.block_scores(op.plan.estimator, q, k, 16, {"t": torch.ones(2)})


def test_ties_go_to_the_lower_block_index():
    approx = sparse_spec(causal=False, k=2, block=16, first=0, diagonal=False).approximation
    scores = torch.tensor([[[[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0]]]])
    sel = sparse.select_blocks(scores, approx, False, 32, 64)
    assert sel.kv_blocks.tolist() == [[[[1, 2], [0, 1]]]]


# ---------------------------------------------------------------------------------------------
# small k: exact attention over exactly the kept blocks
# ---------------------------------------------------------------------------------------------
MASKED = [(SOFTMAX, True, 1), (SOFTMAX, False, 2), (ALIBI, True, 2), (ALIBI, False, 1)]


@pytest.mark.parametrize("base,causal,kk", MASKED, ids=[
    f"{b['name']}-{'causal' if c else 'bidir'}-k{kk}" for b, c, kk in MASKED])
def test_small_k_equals_dense_reference_masked_to_the_kept_blocks(base, causal, kk, monkeypatch):
    monkeypatch.setattr(torch_sparse, "GROUP_SCORES", 2 * 3 * 16 * 16 * 4 * 3)  # groups of about 3 query blocks
    spec = sparse_spec(base, causal, k=kk, block=16, first=1)
    q, k, v = inputs(120, d=16)
    params = {"slope": torch.tensor([0.3, 0.05, 0.01], dtype=torch.float64, requires_grad=True)} \
        if base is ALIBI else {}
    op = attngen.compile(spec, backend="torch")
    out = op(q, k, v, **params)
    sel = op.last_selection
    assert sel.density() < 1.0
    ref = masked_reference(spec, q, k, v, sel.dense_mask(), params)
    assert_close("o", out, ref, 1e-10)
    xs = (q, k, v, *params.values())
    for name, g, r in zip(("dq", "dk", "dv", "dslope"), grads(out, xs), grads(ref, xs)):
        assert_close(name, g, r, 1e-10)
    with torch.no_grad():  # without autograd the groups write into one output tensor
        assert_close("o (no_grad)", op(q, k, v, **params), ref, 1e-10)
    exact = reference(spec)(q, k, v, **params)
    assert float((out - exact).detach().abs().max()) > 1e-3  # the blocks left out do change the output


def test_rows_with_nothing_kept_give_zero_without_nan():
    spec = sparse_spec(causal=False, k=1, block=16)
    plan = build_plan(spec, head_dim=16)
    q, k, v = inputs(48, d=16)
    kv = torch.full((2, 3, 3, 2), -1, dtype=torch.int64)
    kv[:, :, 0] = torch.tensor([0, 2])
    kv[:, :, 2, 0] = 1  # query block 1: nothing
    out = sparse.attend(plan, q, k, v, kv)
    assert torch.equal(out[:, :, 16:32], torch.zeros_like(out[:, :, 16:32]))
    mask = sparse.selection_from_blocks(kv, 16, 48, 48, False).dense_mask()
    assert_close("o", out, masked_reference(spec, q, k, v, mask, {}), 1e-10)
    dq, dk, dv = grads(out, (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, 16:32], torch.zeros(2, 3, 16, 16, dtype=torch.float64))


def test_selection_is_not_differentiated_and_large_scores_stay_finite():
    spec = sparse_spec(causal=True, k=1, block=16)
    q, k, v = inputs(64, d=16, scale=30.0)  # scores of several hundred: the running max must hold
    op = attngen.compile(spec, backend="torch")
    out = op(q, k, v)
    assert not op.last_selection.scores.requires_grad
    assert all(torch.isfinite(g).all() for g in grads(out, (q, k, v)))


# ---------------------------------------------------------------------------------------------
# errors and the CLI
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base,estimator,match", [
    ({"name": "cf", "similarity": "dot(relu(q), relu(k))", "normalize": "rowsum"}, "cosformer",
     "topk_sparse computes exact softmax attention on the kept blocks"),
    (SOFTMAX, "softmax", "the estimator softmax must be separable"),
    (SOFTMAX, "retention", "the estimator retention has a decay reweighting"),
], ids=["non-softmax-spec", "estimator-softmax", "estimator-retention"])
def test_planner_errors(base, estimator, match):
    with pytest.raises(attngen.PlanError, match=match):
        attngen.compile(sparse_spec(base, True, estimator=estimator), backend="torch")


def test_selection_input_errors():
    approx = sparse_spec(causal=False).approximation
    with pytest.raises(attngen.InputError, match=r"expected \[B, H, 2, 4\]"):
        sparse.select_blocks(torch.zeros(1, 1, 3, 4), approx, False, 32, 64)
    with pytest.raises(attngen.InputError, match="key-block indices 0 .. 3"):
        sparse.selection_from_blocks(torch.tensor([[[[4], [0]]]]), 16, 32, 64, False)


def test_attend_errors():
    plan = build_plan(sparse_spec(causal=True, k=1, block=16), head_dim=16)
    q, k, v = inputs(48, b=1, h=2, d=16)
    sel = sparse.selection_from_blocks(torch.zeros(1, 2, 3, 1, dtype=torch.int64), 16, 48, 48, True)
    with pytest.raises(attngen.InputError, match="n_q = 48, n_k = 48, causal = True; the call has B, H = .1, 2., "
                                                 "n_q = 32"):
        sparse.attend(plan, q[:, :, :32], k[:, :, :32], v[:, :, :32], sel)
    cosformer = build_plan(attngen.load_spec("cosformer"), head_dim=16)
    with pytest.raises(attngen.PlanError, match="not of the softmax family"):
        sparse.attend(cosformer, q, k, v, sel)


def test_cli_plan_shows_the_topk_sparse_row(tmp_path):
    path = tmp_path / "sp.yaml"
    path.write_text(yaml.safe_dump({**SOFTMAX, "causal": True, "approx": {
        "kind": "topk_sparse", "estimator": "cosformer", "k": 4, "block": 64}}, sort_keys=False))
    result = CliRunner().invoke(main, ["plan", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("topk_sparse"))
    assert "yes" in row and "estimator cosformer, block 64, k = 4" in row
    assert "chosen: topk_sparse" in result.output


# ---------------------------------------------------------------------------------------------
# Triton (under the interpreter on a CPU): the generated block-sparse kernels over the same blocks
# ---------------------------------------------------------------------------------------------
TRITON = [(SOFTMAX, True, 2), (SOFTMAX, False, 8), (ALIBI, True, 8), (ALIBI, False, 1)]


@pytest.mark.parametrize("base,causal,kk", TRITON, ids=[
    f"{b['name']}-{'causal' if c else 'bidir'}-k{kk}" for b, c, kk in TRITON])
def test_triton_kernels_equal_the_torch_path_on_the_same_blocks(base, causal, kk):
    pytest.importorskip("triton")
    spec = sparse_spec(base, causal, k=kk, block=16)
    plan = build_plan(spec, head_dim=16)
    q, k, v = inputs(100, b=1, h=2, d=16, dtype=torch.float32)
    params = {"slope": torch.tensor([0.3, 0.05], requires_grad=True)} if base is ALIBI else {}
    info = {}
    out = sparse.run_triton(plan, q, k, v, params, info)
    sel = info["selection"]
    ref = sparse.attend(plan, q, k, v, sel, params)  # torch, same blocks
    assert_close("o", out, ref, 1e-4)
    xs = (q, k, v, *params.values())
    out_grads = grads(out, xs)
    for name, g, r in zip(("dq", "dk", "dv", "dslope"), out_grads, grads(ref, xs)):
        assert_close(name, g, r, 1e-4)
    if kk == 8:  # 7 key blocks: every candidate kept, so exact softmax attention (output and gradients)
        golden = [x.detach().double().requires_grad_() for x in xs]
        exact = reference(spec)(*golden[:3], **dict(zip(params, golden[3:])))
        assert sel.density() == 1.0
        assert_close("o vs exact", out, exact, 1e-4)
        for name, g, r in zip(("dq", "dk", "dv", "dslope"), out_grads, grads(exact, golden)):
            assert_close(name + " vs exact", g, r, 1e-4)


def test_triton_rows_with_nothing_kept_give_zero():
    pytest.importorskip("triton")
    plan = build_plan(sparse_spec(causal=False, k=1, block=16), head_dim=16)
    q, k, v = inputs(48, b=1, h=1, d=16, dtype=torch.float32)
    kv = torch.tensor([[[[0, 2], [-1, -1], [1, -1]]]])
    out = sparse.attend(plan, q, k, v, kv, backend="triton")
    assert torch.equal(out[:, :, 16:32], torch.zeros_like(out[:, :, 16:32]))
    assert_close("o", out, sparse.attend(plan, q, k, v, kv), 1e-4)
    assert all(torch.isfinite(g).all() for g in grads(out, (q, k, v)))


def test_triton_backend_runs_topk_sparse_through_the_op():
    pytest.importorskip("triton")
    spec = sparse_spec(causal=True, k=2, block=16)
    q, k, v = inputs(100, b=1, h=2, d=16, dtype=torch.float32)
    op_t, op_c = attngen.compile(spec, backend="triton"), attngen.compile(spec, backend="torch")
    out = op_t(q, k, v)
    assert_close("o", out, op_c(q, k, v), 1e-4)
    assert torch.equal(op_t.last_selection.kv_blocks, op_c.last_selection.kv_blocks)


def test_triton_backend_refuses_blocks_above_its_tile():
    pytest.importorskip("triton")
    with pytest.raises(attngen.PlanError,
                       match="approx.block = 256: the Triton block-sparse kernels take blocks of 16 .. 128"):
        attngen.compile(sparse_spec(causal=True, k=2, block=256), backend="triton")
