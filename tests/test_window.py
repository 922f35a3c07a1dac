"""The window key (`window: N`, the attended pairs |i - j| < N; with causal 0 <= i - j < N).

The naive reference is checked against attention built here in float64 from explicit masks (loops over (i, j),
nothing from attngen); the torch backend and the generated Triton kernels (under the interpreter) against the
naive reference, output and every gradient; block skipping on both backends (NaN outside the window must never
be read, and the torch tiles count the key columns they visit); the planner's refusals and costs; spec errors and
the hashes of specs without the key."""
import importlib.util
import math
import os

import pytest
import torch
from conftest import assert_close

import attngen
from attngen import load_spec
from attngen.errors import InputError, PlanError, SpecError
from attngen.ir import N, Ordering
from attngen.naive import reference
from attngen.passes.cost import window_pairs
from attngen.pipeline import plan as build_plan
from attngen.verify import verify_case

SOFTMAX = {"name": "win_softmax", "similarity": "exp(dot(q, k) * scale)", "normalize": "rowsum"}
RELU = {"name": "win_relu", "similarity": "dot(relu(q), relu(k))",
        "normalize": {"kind": "rowsum", "eps": 1.0e-6, "eps_mode": "add"}}


def windowed(base: dict, window, causal=True, **extra):
    return load_spec({**base, "window": window, **extra}, causal=causal)


def explicit_mask(t: int, s: int, window: int, causal: bool) -> torch.Tensor:
    """[T, S] bool built pair by pair: j <= i when causal, |i - j| < window."""
    m = torch.zeros(t, s, dtype=torch.bool)
    for i in range(t):
        for j in range(s):
            m[i, j] = abs(i - j) < window and (j <= i or not causal)
    return m


def direct_softmax(q, k, v, mask, scale):
    """softmax(scale q k^T) V over the allowed pairs; a row with no allowed key gives 0."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top) * mask
    den = p.sum(-1, keepdim=True)
    return (p @ v) / torch.where(den > 0, den, torch.ones_like(den))


def direct_relu(q, k, v, mask, eps):
    a = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * mask
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------
# the spec key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,found", [(0, "found 0"), (-1, "found -1"), (1.5, "found 1.5"),
                                       ("abc", "'abc' is not a declared numeric constant"), (True, "found True"),
                                       (2**31, "found 2147483648"), ([4], r"found \[4\]"),
                                       ("M", "the constant 'M' is .*not a number")])
def test_bad_windows_are_spec_errors_naming_the_key_and_a_fix(bad, found):
    expected = r"expected an integer in 1 .. 2147483647.*Fix: "
    with pytest.raises(SpecError, match=rf"<dict>: window: {found}; {expected}") as e:
        load_spec({**SOFTMAX, "window": bad, "constants": {"M": "max(n_q, n_k)"}})
    assert e.value.key == "window"


def test_window_forms_modes_constants_and_overrides():
    assert windowed(SOFTMAX, 8).window == 8
    per_mode = {"causal": 256, "bidirectional": 128}
    assert windowed(SOFTMAX, per_mode).window == 256
    assert windowed(SOFTMAX, per_mode, causal=False).window == 128
    assert windowed(SOFTMAX, "W", constants={"W": "2**5"}).window == 32
    assert load_spec({**SOFTMAX, "window": "W", "constants": {"W": 16}}, W=24).window == 24
    assert load_spec("softmax", window=7).window == 7
    assert load_spec("softmax").window is None
    with pytest.raises(SpecError, match="window: no branch for the bidirectional mode"):
        windowed(SOFTMAX, {"causal": 4}, causal=False)


def test_window_is_hashed_and_round_trips_through_yaml():
    a, b = windowed(SOFTMAX, 16), windowed(SOFTMAX, 17)
    plain = load_spec(SOFTMAX)
    assert len({a.hash, b.hash, plain.hash}) == 3
    for spec in (a, windowed(RELU, 5, causal=False), plain):
        back = load_spec(spec.to_yaml())
        assert back == spec and back.hash == spec.hash and back.window == spec.window
    assert "window: 16" in a.to_yaml() and "window" not in plain.to_yaml()


def test_specs_without_the_key_keep_their_hashes():
    """The hashes of the generated modules committed before the window key existed (generated/*.py, SPEC_HASH)."""
    before = {("softmax", True): "425d5e3c1b9ea6c0", ("cosformer", False): "4af60330d176e3a7",
              ("forgetting", True): "f0687c707611ad57", ("llama", True): "a95cb820145ad94e"}
    for (name, causal), h in before.items():
        assert load_spec(name, causal=causal).hash == h


def test_window_refuses_a_key_dim_gate_and_approximations():
    with pytest.raises(SpecError, match="window: a window with a per-key-dimension gate.*Fix: "):
        load_spec({"name": "g", "similarity": "dot(q, k) * scale", "gates": {"g": "key_dim"}, "window": 8})
    with pytest.raises(SpecError, match=r"window: a window with approx \(conv_basis\).*Fix: remove approx"):
        windowed(SOFTMAX, 8, approx={"kind": "conv_basis", "k": 4})


# ---------------------------------------------------------------------------------------------
# the naive reference against explicit masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,t,s", [(True, 9, 9), (False, 9, 9), (False, 7, 12), (False, 12, 5)])
@pytest.mark.parametrize("window", [1, 3, 4, 40])
def test_reference_matches_explicit_masks(causal, t, s, window):
    """(a causal spec takes T == S, the validator's rule with or without a window)"""
    g = torch.Generator().manual_seed(window * 100 + t)
    q, k = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (t, s))
    v = torch.randn(2, 3, s, 5, generator=g, dtype=torch.float64)
    mask = explicit_mask(t, s, window, causal)
    out = reference(windowed(SOFTMAX, window, causal))(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, direct_softmax(q, k, v, mask, 1 / math.sqrt(8)), rtol=1e-12, atol=1e-12)
    out = reference(windowed(RELU, window, causal))(q, k, v)
    torch.testing.assert_close(out, direct_relu(q, k, v, mask, 1e-6), rtol=1e-12, atol=1e-12)


def test_reference_rows_without_an_allowed_key_are_zero_with_finite_gradients():
    """Cross attention T = 12, S = 4, window 3: rows i >= S + 2 see no key; they give 0 and no NaN gradient (a causal
    spec takes T == S, where the diagonal is always in the window)."""
    for base in (SOFTMAX, RELU):
        spec = windowed(base, 3, causal=False)
        q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, requires_grad=True) for n in (12, 4, 4))
        out = reference(spec)(q, k, v)
        assert torch.equal(out[:, :, 6:], torch.zeros_like(out[:, :, 6:]))
        assert out[:, :, :6].abs().sum() > 0
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


# ---------------------------------------------------------------------------------------------
# the planner
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [SOFTMAX, RELU])
@pytest.mark.parametrize("causal", [True, False])
def test_windowed_specs_plan_the_quadratic_ordering_only(base, causal):
    spec = windowed(base, 64, causal)
    for target in ("torch", "triton"):
        p = build_plan(spec, target=target)
        assert p.choice.below is p.choice.above is Ordering.QUADRATIC and p.choice.crossover is None
        assert not p.linear_terms and p.sdpa is None and not p.capabilities.decodable
        reasons = {c.ordering: c.reason for c in p.candidates if not c.legal}
        for o in (Ordering.LINEAR, Ordering.RECURRENT, Ordering.FFT):
            assert "window" in reasons[o] and "64" in reasons[o]
    text = build_plan(spec).explain()
    assert "window: A(i, j) is masked to" in text and "not separable" in text
    with pytest.raises(PlanError, match="plan='linear' is not legal.*window mask"):
        build_plan(spec, force="linear")


def test_cost_counts_the_pairs_in_the_window():
    """The quadratic ordering's cost grows linearly in N with a window, and its pair count is that of the masks."""
    for causal in (True, False):
        for window, n in ((1, 9), (4, 9), (9, 9), (40, 9), (5, 30)):
            assert int(window_pairs(causal, window).subs(N, n)) == int(explicit_mask(n, n, window, causal).sum())
        specs = {256: windowed(SOFTMAX, 256, causal), None: load_spec(SOFTMAX, causal=causal)}
        quad = {w: next(c for c in build_plan(s).candidates if c.ordering is Ordering.QUADRATIC)
                for w, s in specs.items()}
        flops = {w: [c.evaluate(n, 64, 64)[0] for n in (4096, 32768)] for w, c in quad.items()}
        assert flops[256][1] / flops[256][0] <= 9
        assert flops[None][1] / flops[None][0] >= 60


def test_windowed_specs_have_no_state():
    op = attngen.compile(windowed(SOFTMAX, 8), backend="torch")
    q = torch.randn(1, 2, 5, 8)
    for call in (lambda: op(q, q, q, return_state=True), lambda: op.init_state(1, 2, 8, 8)):
        with pytest.raises(InputError, match="has a window of 8 keys: the mask is not separable"):
            call()


# ---------------------------------------------------------------------------------------------
# the torch backend
# ---------------------------------------------------------------------------------------------
GATED = {"name": "win_forget", "similarity": "exp(dot(q, k) * scale)", "normalize": "rowsum", "gates": {"g": "head"}}
ROTARY = {"name": "win_rope", "similarity": "exp(dot(q, k) * scale)", "normalize": "rowsum", "rotary": True}
ALIBI = {"name": "win_alibi", "similarity": "exp(dot(q, k)/sqrt(d))", "reweight": "exp(-slope * abs(i - j))",
         "normalize": "rowsum", "parameters": {"slope": {"shape": ["H"], "init": "2**(-8*(h + 1)/H)"}}}
DECAY = {"name": "win_decay", "similarity": "dot(relu(q), relu(k))", "reweight": "gamma**abs(i - j)",
         "normalize": "none", "constants": {"gamma": 0.9}}
SIGMOID = {"name": "win_sigmoid", "similarity": "sigmoid(dot(q, k)/sqrt(d) - b)", "normalize": "none",
           "parameters": {"b": {"shape": [], "init": 1.0}}}


def check(result):
    """Every quantity (o and each gradient) within the dtype's tolerance of the float64 reference."""
    assert result.passed, {n: (result.errors[n], result.ref_errors[n]) for n in result.errors}


TORCH_CASES = [  # (spec, causal, window, t, s)
    (SOFTMAX, True, 1, 130, 130), (SOFTMAX, True, 37, 130, 130), (SOFTMAX, True, 64, 129, 129),
    (SOFTMAX, True, 500, 70, 70), (SOFTMAX, False, 1, 100, 100), (SOFTMAX, False, 37, 130, 70),
    (SOFTMAX, False, 20, 130, 40), (SOFTMAX, False, 200, 40, 90),
    (RELU, True, 1, 100, 100), (RELU, True, 37, 130, 130), (RELU, False, 37, 130, 70), (RELU, False, 20, 130, 40),
    (RELU, False, 500, 50, 50), (ALIBI, True, 33, 130, 130), (ALIBI, False, 45, 100, 130),
    (DECAY, False, 29, 130, 130), (SIGMOID, True, 70, 130, 130), (SIGMOID, False, 10, 90, 60),
    (GATED, True, 40, 130, 130), (ROTARY, True, 40, 130, 130), (ROTARY, False, 40, 100, 100),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("base,causal,window,t,s", TORCH_CASES)
def test_torch_backend_matches_the_reference(base, causal, window, t, s, dtype):
    spec = windowed(base, window, causal)
    op = attngen.compile(spec, backend="torch")
    assert op.ordering_for(16, s) is Ordering.QUADRATIC
    check(verify_case(op, spec, dtype=dtype, b=1, h=2, t=t, s=s, dk=16, dv=8))


def grads_of(fn, q, k, v, do, **params):
    """o and the gradients of q, k, v and the parameters (float64 leaves) of fn."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ps = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    o = fn(*leaves, **ps)
    o.backward(do)
    return {"o": o} | {f"d{n}": x.grad for n, x in zip("qkv", leaves)} | {f"d{n}": p.grad for n, p in ps.items()}


@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_grouped_kv_heads(causal):
    spec = windowed(ALIBI, 21, causal)
    q, do = torch.randn(2, 4, 90, 16, dtype=torch.float64), torch.randn(2, 4, 90, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 90, 16, dtype=torch.float64), torch.randn(2, 2, 90, 16, dtype=torch.float64)
    slope = torch.rand(4, dtype=torch.float64) * 0.2
    got = grads_of(attngen.compile(spec, backend="torch"), q, k, v, do, slope=slope)
    ref = grads_of(reference(spec), q, k, v, do, slope=slope)
    for name in ref:
        assert_close(name, got[name], ref[name], 1e-10)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))])
def test_packed_sequences_restart_the_positions(backend):
    """cu_seqlens: each packed sequence's window is in its own positions (the reference run on each alone)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    for base in (SOFTMAX, RELU, ROTARY):
        spec = windowed(base, 9, True)
        op = attngen.compile(spec, backend=backend)
        cu = torch.tensor([0, 30, 31, 77, 100])
        q, k, v = (torch.randn(1, 2, 100, 16, dtype=torch.float64) for _ in range(3))
        out = op(*(x.to(dtype) for x in (q, k, v)), cu_seqlens=cu)
        ref = torch.cat([reference(spec)(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in zip(cu[:-1], cu[1:])], 2)
        assert_close("o", out.double(), ref, 1e-10 if backend == "torch" else 1e-4)


def test_torch_tiles_visit_only_the_key_tiles_in_the_window(monkeypatch):
    """The key columns the tiles score, counted: ~T * (window + BLOCK_Q) with a window, ~T**2 / 2 without."""
    from attngen.runtime.torch import quadratic as torch_quadratic
    seen = []
    original = torch_quadratic.pair_values

    def counted(expr, env5, q_tile, k_tile, where):
        seen.append(q_tile.shape[2] * k_tile.shape[2])
        return original(expr, env5, q_tile, k_tile, where)

    monkeypatch.setattr(torch_quadratic, "pair_values", counted)
    t, window, block = 2048, 64, torch_quadratic.BLOCK_Q
    q, k, v = (torch.randn(1, 1, t, 16) for _ in range(3))
    for causal in (True, False):
        for grad in (False, True):
            seen.clear()
            xs = [x.clone().requires_grad_(grad) for x in (q, k, v)]
            o = attngen.compile(windowed(RELU, window, causal), backend="torch")(*xs)
            if grad:
                o.sum().backward()
            reach = window + block - 1 if causal else 2 * window + block - 2  # keys of one query tile
            # (without skipping, a causal forward alone scores t * t / 2 = 16 x that bound's t * block * reach)
            assert t * window / 2 <= sum(seen) <= (2 if grad else 1) * (t // block) * block * reach


@pytest.mark.parametrize("base", [SOFTMAX, RELU])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_tiles_never_read_keys_outside_the_window(base, causal):
    """NaN in the values and keys of every position more than window + 64 behind the last query tile: the outputs
    and gradients of that tile stay finite (0 * NaN would be NaN if a skipped tile were read)."""
    t, window = 512, 40
    q, k, v = (torch.randn(1, 2, t, 16) for _ in range(3))
    far = t - 64 - window - 64
    k[:, :, :far], v[:, :, :far] = float("nan"), float("nan")
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = attngen.compile(windowed(base, window, causal), backend="torch")(*xs)
    assert torch.isfinite(o[:, :, -64:]).all()
    o[:, :, -64:].sum().backward()
    assert torch.isfinite(xs[0].grad[:, :, -64:]).all()


# ---------------------------------------------------------------------------------------------
# the torch backend's windowed autograd (WindowTiles: inputs saved, each tile recomputed in backward)
# ---------------------------------------------------------------------------------------------
TILE_CASES = [  # (spec, causal, window, t, s, dtypes): several query tiles of 64, a partial last one, windows not
    # multiples of 64 (the first key of a tile inside a key block), cross attention with a tile past the last key
    (SOFTMAX, True, 100, 200, 200, True), (SOFTMAX, False, 70, 200, 200, False), (SOFTMAX, False, 50, 250, 100, False),
    (RELU, True, 90, 200, 200, True), (RELU, False, 30, 200, 250, False), (SIGMOID, True, 100, 200, 200, False),
    (ALIBI, False, 80, 200, 200, False), (ALIBI, True, 129, 200, 200, True), (DECAY, True, 65, 200, 200, False),
    (GATED, True, 100, 200, 200, True),
]


@pytest.mark.parametrize("base,causal,window,t,s,dtype", [
    (*case[:5], dtype) for case in TILE_CASES for dtype in ((torch.float64, torch.float32) if case[5] else
                                                              (torch.float64,))])
def test_window_tiles_output_and_every_gradient_match_the_reference(base, causal, window, t, s, dtype):
    """float64 for every case, float32 (the dtype's tolerance against the reference) for four of them"""
    spec = windowed(base, window, causal)
    result = verify_case(attngen.compile(spec, backend="torch"), spec, dtype=dtype, b=1, h=2, t=t, s=s, dk=16, dv=8)
    learnable = {f"d{p.name}" for p in spec.parameters if p.learnable} | {f"d{g.name}" for g in spec.gates}
    assert set(result.errors) == {"o", "dq", "dk", "dv"} | learnable
    check(result)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_based_hybrid_window_term_matches_the_reference(dtype):
    spec = load_spec("based_hybrid")
    check(verify_case(attngen.compile(spec, backend="torch"), spec, dtype=dtype, b=1, h=2, t=200, dk=16, dv=8))


@pytest.mark.parametrize("wanted", ["q", "k", "v", "b"])
def test_window_tiles_differentiate_any_subset_of_the_inputs(wanted):
    """Only one of q, k, v and the parameter b needs a gradient: that one matches the reference, float64."""
    spec = windowed(SIGMOID, 45, False)
    op, ref = attngen.compile(spec, backend="torch"), reference(spec)
    x = {n: torch.randn(1, 2, 150, 16, dtype=torch.float64) for n in "qkv"} | {"b": torch.tensor(0.3).double()}
    do = torch.randn(1, 2, 150, 16, dtype=torch.float64)
    grads = []
    for fn in (op, ref):
        leaves = {n: t.clone().requires_grad_(n == wanted) for n, t in x.items()}
        fn(leaves["q"], leaves["k"], leaves["v"], b=leaves["b"]).backward(do)
        assert all(leaves[n].grad is None for n in leaves if n != wanted)
        grads.append(leaves[wanted].grad)
    assert_close(f"d{wanted}", grads[0], grads[1], 1e-10)


@pytest.mark.parametrize("base,causal", [(ALIBI, True), (SIGMOID, False), (GATED, True)])
def test_window_tiles_second_derivatives_match_the_reference(base, causal):
    """create_graph=True: the gradients of <dq, w> + <dk, w'> (+ the parameter's) with respect to q, k, v, do and
    the parameters or the gate, float64, against the reference's."""
    spec = windowed(base, 37, causal)
    g = torch.Generator().manual_seed(3)
    x = {n: torch.randn(1, 2, 140, 8, generator=g, dtype=torch.float64) for n in ("q", "k", "v", "do", "wq", "wk")}
    params = {p.name: torch.full((2,), 0.3, dtype=torch.float64) if p.shape else torch.tensor(0.3).double()
              for p in spec.parameters}
    params |= {gate.name: -torch.rand(1, 2, 140, generator=g, dtype=torch.float64) * 0.2 for gate in spec.gates}
    results = []
    for fn in (attngen.compile(spec, backend="torch"), reference(spec)):
        leaves = {n: t.clone().requires_grad_() for n, t in [*x.items(), *params.items()] if n not in ("wq", "wk")}
        o = fn(leaves["q"], leaves["k"], leaves["v"], **{n: leaves[n] for n in params})
        firsts = torch.autograd.grad(o, [leaves["q"], leaves["k"], *(leaves[n] for n in params)], leaves["do"],
                                     create_graph=True)
        penalty = (firsts[0] * x["wq"]).sum() + (firsts[1] * x["wk"]).sum() + sum(f.sum() for f in firsts[2:])
        results.append(dict(zip(leaves, torch.autograd.grad(penalty, list(leaves.values())))))
    assert set(results[0]) == {"q", "k", "v", "do"} | set(params)
    for name in results[1]:
        assert_close(f"d2 {name}", results[0][name], results[1][name], 1e-9)


@pytest.mark.parametrize("base", [SOFTMAX, ALIBI])
def test_window_tiles_keep_a_graph_of_constant_size(base):
    """The autograd graph of a windowed op holds the same nodes at T = 256 and T = 1024 (its inputs' preparation and
    one node for every tile), and that node saves only the inputs: nothing per tile, so memory is linear in T."""
    spec = windowed(base, 100, True)
    op = attngen.compile(spec, backend="torch")
    sizes = []
    for t in (256, 1024):
        xs = [torch.randn(1, 2, t, 16, requires_grad=True) for _ in range(3)]
        o = op(*xs)
        nodes = _walk(o.grad_fn)
        sizes.append(len(nodes))
        tiles = [n for n in nodes if type(n).__name__ == "WindowTilesBackward"]
        assert len(tiles) == 1
        saved = [x for x in tiles[0].saved_tensors if x is not None]
        assert sum(x.numel() for x in saved) <= 3 * 2 * t * 17 + 2 * 8  # q, k, [V | 1] (and a per-head slope)
    assert sizes[0] == sizes[1]


def _walk(node):
    seen, todo = [], [node]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.append(n)
        todo += [m for m, _ in n.next_functions]
    return seen


# ---------------------------------------------------------------------------------------------
# the generated Triton kernels (under the interpreter on a CPU)
# ---------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TRITON_CASES = [  # (spec, causal, window, t, s): blocks of 64 at T > 64; windows of 1, not multiples of 64, > T
    (SOFTMAX, True, 1, 130, 130), (SOFTMAX, True, 37, 130, 130), (SOFTMAX, True, 100, 129, 129),
    (SOFTMAX, True, 500, 70, 70), (SOFTMAX, False, 37, 130, 70), (SOFTMAX, False, 20, 130, 40),
    (RELU, True, 1, 100, 100), (RELU, True, 70, 130, 130), (RELU, False, 20, 130, 40), (RELU, False, 300, 60, 90),
    (ALIBI, True, 33, 130, 130), (SIGMOID, False, 10, 90, 60), (GATED, True, 40, 130, 130),
    (ROTARY, True, 40, 130, 130),
]


@needs_triton
@pytest.mark.parametrize("base,causal,window,t,s", TRITON_CASES)
def test_triton_kernels_match_the_reference(base, causal, window, t, s):
    spec = windowed(base, window, causal)
    op = attngen.compile(spec, backend="triton")
    check(verify_case(op, spec, dtype=torch.float32, b=1, h=2, t=t, s=s, dk=16, dv=16, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("base", [ROTARY, RELU])
def test_triton_kernels_grouped_kv_heads(base):
    spec = windowed(base, 45, True)
    q, do = torch.randn(1, 4, 100, 16, dtype=torch.float64), torch.randn(1, 4, 100, 16, dtype=torch.float64)
    k, v = torch.randn(1, 2, 100, 16, dtype=torch.float64), torch.randn(1, 2, 100, 16, dtype=torch.float64)
    op = attngen.compile(spec, backend="triton")
    got = grads_of(lambda *xs: op(*(x.to(DEVICE, torch.float32) for x in xs)).double().cpu(), q, k, v, do)
    ref = grads_of(reference(spec), q, k, v, do)
    for name in ref:
        assert_close(name, got[name], ref[name], 1e-4)


def _module_fn(spec):
    from attngen.runtime.triton import loader
    return getattr(loader.load_module(build_plan(spec, target="triton")), f"{spec.name}_attention")


@needs_triton
@pytest.mark.parametrize("base", [SOFTMAX, RELU])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_kernels_skip_the_blocks_outside_the_window(base, causal):
    """T = 256, blocks of 64, window 64. Query block 3 (rows 192 ..) attends keys from 129: NaN in the keys and
    values of blocks 0 and 1 would reach its outputs and dQ if the forward or the dq programs visited them. Key
    block 0 (keys .. 63) is attended by rows up to 126: NaN in the queries and output gradients of block 3 would
    reach its dK, dV if the dk/dv program visited query block 3 (0 * NaN is NaN in the products)."""
    fn = _module_fn(windowed(base, 64, causal))
    q, k, v = (torch.randn(1, 2, 256, 16, device=DEVICE) for _ in range(3))
    k[:, :, :128], v[:, :, :128] = float("nan"), float("nan")
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = fn(*xs)
    assert torch.isfinite(o[:, :, 192:]).all()
    o[:, :, 192:].sum().backward()
    assert torch.isfinite(xs[0].grad[:, :, 192:]).all()
    q, k, v = (torch.randn(1, 2, 256, 16, device=DEVICE) for _ in range(3))
    q[:, :, 192:] = float("nan")
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = fn(*xs)
    assert torch.isfinite(o[:, :, :128]).all()
    grad = torch.ones_like(o)
    grad[:, :, 192:] = float("nan")
    o.backward(grad)
    assert torch.isfinite(xs[1].grad[:, :, :64]).all() and torch.isfinite(xs[2].grad[:, :, :64]).all()


@needs_triton
def test_triton_window_is_a_literal_of_the_loop_bounds():
    from attngen.pipeline import lower
    for causal in (True, False):
        text = lower(build_plan(windowed(SOFTMAX, 100, causal), target="triton"))
        assert text.count("lo_j = tl.maximum(i_m * BM - 99, 0) // BN") == 2  # the forward and the dq kernel
        assert text.count("for i_j in range(lo_j, n_j):") == 2
        assert "n_i = tl.cdiv(tl.minimum(T, (i_n + 1) * BN + 99), BM) - lo" in text  # the dk/dv kernel
        assert "def win_softmax_step" not in text  # no recurrent state, no decode step
    plain = lower(build_plan(load_spec(SOFTMAX), target="triton"))
    assert "lo_j" not in plain and "window" not in plain


@pytest.mark.parametrize("causal", [True, False])
def test_compiled_window_tiles_equal_eager(causal):
    """torch.compile(fullgraph=True) of a window spec over several tiles (window 20, T 150: the tiles start past key
    0) runs the checkpointed tile loop on the window's keys; output and gradients equal eager WindowTiles' and the
    reference."""
    spec = attngen.load_spec({"name": "w20", "causal": causal, "similarity": "exp(dot(q, k) / sqrt(d))",
                              "normalize": "rowsum", "window": 20})
    op = attngen.compile(spec, backend="torch")
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    eager, ref = op(q, k, v), attngen.reference(spec)(q, k, v)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)),
                    torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
