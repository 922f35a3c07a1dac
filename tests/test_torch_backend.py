"""The torch backend against the naive reference: output and the gradients of q, k, v and every
parameter, by relative RMS error (float64 within 1e-10; float32 against the float64 reference within 1e-5).

Every built-in spec, causal and bidirectional, at T in {1, 7, 63, 200}: the planner's own choice and
every forced ordering that is legal; FFT for Toeplitz reweightings; cross attention; both layouts;
Dk != Dv; a learnable decay; and the errors a caller can cause.
"""
import pytest
import torch
import torch.nn.functional as F

import attngen
from attngen import InputError, PlanError
from attngen.ir import Ordering
from attngen.op import resolve_backend
from attngen.pipeline import plan as build_plan
from attngen.runtime.inputs import default_parameters
from attngen.verify import rel_rms

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SPECS = attngen.builtin_names()
MODES = ("causal", "bidirectional")
PAIRS = [(s.name, s.mode) for s in attngen.builtin_specs()]  # a gated spec is causal only
LENGTHS = (1, 7, 63, 200)
H = 2


def load(name, mode, **kw):
    return attngen.load_spec(name, causal=mode == "causal", **kw)


def legal(name, mode, ordering):
    # forcing quadratic (legal unless a gate per key dimension rules it out) skips the crossover solve; the cost
    # table is the same
    spec = load(name, mode)
    if spec.terms:  # each term has its own plan (tests/test_terms.py); no ordering is forced on the whole
        return False
    force = "linear" if spec.gate is not None and spec.gate.per == "key_dim" else "quadratic"
    return build_plan(spec, head_dim=16, force=force).legal(Ordering(ordering))


def check(spec, dtype=torch.float64, *, b=2, t=63, s=None, dk=16, dv=None, layout="bhtd", params=None,
          fudge=None, **compile_kw):
    """Run op and reference on the same standard-normal inputs; assert output and gradients agree.

    With ``fudge`` (FlexAttention's three-way rule) the bound for each quantity is
    max(TOL, fudge * error of the reference run in ``dtype``): for cases where the dtype itself cannot
    reach TOL, the op must be about as good as the naive computation in that dtype."""
    s, dv = s or t, dv or dk
    shape = (lambda n, d: (b, n, H, d)) if layout == "bthd" else (lambda n, d: (b, H, n, d))
    leaves = {"q": torch.randn(shape(t, dk), dtype=torch.float64), "k": torch.randn(shape(s, dk), dtype=torch.float64),
              "v": torch.randn(shape(s, dv), dtype=torch.float64)}
    leaves |= params if params is not None else default_parameters(spec, H, torch.float64, head_dim=dk)
    for gate in spec.gates:  # log gates <= 0 in the layout's order
        dims = (b, t, H) if layout == "bthd" else (b, H, t)
        leaves[gate.name] = F.logsigmoid(2 + torch.randn(dims + ((dk,) if gate.per == "key_dim" else ()),
                                                         dtype=torch.float64))
    golden = {n: x.clone().requires_grad_() for n, x in leaves.items()}
    mine = {n: x.to(dtype).requires_grad_() for n, x in leaves.items()}

    def run(fn, xs):
        out = fn(xs["q"], xs["k"], xs["v"], **{n: x for n, x in xs.items() if n not in "qkv"})
        return out, torch.autograd.grad((out * upstream.to(out.dtype)).sum(), list(xs.values()), allow_unused=True)

    ref = attngen.reference(spec, layout=layout)
    op = attngen.compile(spec, backend="torch", layout=layout, **compile_kw)
    upstream = torch.randn(shape(t, dv), dtype=torch.float64)  # random, not .sum(): every output weighs differently
    out_ref, grads_ref = run(ref, golden)
    out, grads = run(op, mine)
    assert out.dtype == dtype and out.shape == out_ref.shape
    bound = dict.fromkeys(["o"] + ["d" + n for n in leaves], TOL[dtype])
    if fudge is not None:
        out_low, grads_low = run(ref, {n: x.to(dtype).requires_grad_() for n, x in leaves.items()})
        for name, a, a_ref in zip(bound, (out_low, *grads_low), (out_ref, *grads_ref)):
            bound[name] = max(TOL[dtype], fudge * rel_rms(a, a_ref))
    errors = {"o": rel_rms(out, out_ref)}
    for name, g, g_ref in zip(leaves, grads, grads_ref):
        assert g is not None and g_ref is not None, f"no gradient for {name}"
        errors["d" + name] = rel_rms(g, g_ref)
    bad = {n: f"{e:.1e} > {bound[n]:.1e}" for n, e in errors.items() if not e <= bound[n]}
    assert not bad, f"{spec.name} {spec.mode} {op.plan.choice.describe()}: {bad}"
    return op


def case_id(*parts):
    return "-".join(str(p).replace("torch.float", "fp") for p in parts)


# ---------------------------------------------------------------------------------------------
# every built-in spec: the planner's choice, then each forced ordering
# ---------------------------------------------------------------------------------------------
AUTO = [pytest.param(n, m, t, dt, id=case_id(n, m, f"T{t}", dt)) for n, m in PAIRS
        for dt in (torch.float64, torch.float32) for t in LENGTHS if t > 1 or dt == torch.float64]


@pytest.mark.parametrize("name,mode,t,dtype", AUTO)
def test_builtin_auto_plan(name, mode, t, dtype):
    op = check(load(name, mode), dtype, b=2 if t < 200 else 1, t=t)
    assert op.plan.head_dim == 16  # the plan of the call's head dim, not the default 64


# T = 1 in float32 by the three-way rule: with one key a row-sum output is v_0 * s / (s + eps), whose q and k
# gradients are O(eps); the naive reference itself, run in float32, misses them by 1e-5 .. 1e-4 (rel. RMS with
# the 1e-2 floor), so no float32 implementation reaches 1e-5 there. T = 1 is held to 1e-10 in float64 above.
# hedgehog and performer (feature maps of width 64 at d = 16, their products ~1/F each) take the linear ordering at
# T = 1 bidirectional: there num and den are sums of 64 products rounded apart, and the O(eps) gradients come out
# with absolute errors of ~1e-6 (relative 1e-4 on the 1e-2 floor): held to 1e-10 in float64 at T = 1 above and to
# the fp32 bound at every longer length.
WIDE_FEATURES = {"hedgehog", "performer"}


@pytest.mark.parametrize("name,mode", [pytest.param(n, m, id=case_id(n, m, "T1-fp32")) for n, m in PAIRS
                                       if not (n in WIDE_FEATURES and m == "bidirectional")])
def test_builtin_auto_plan_single_token_fp32(name, mode):
    check(load(name, mode), torch.float32, t=1, fudge=2.0)


def forced(ordering, lengths, dtypes=(torch.float64,)):
    modes = ("causal",) if ordering == "recurrent" else MODES
    return [pytest.param(n, m, t, dt, id=case_id(n, m, ordering, f"T{t}", dt))
            for n, m in PAIRS if m in modes and legal(n, m, ordering) for t in lengths for dt in dtypes]


# float32 leaves out T = 1 (see above); worse, with one key polynomial2's denominator (q.k)**2/d + eps is a sum
# of d**2 feature products that cancel when q.k is near 0, so the linear ordering's fp32 rounding of num and den
# (computed apart) is amplified by 1/den (an output error of 1e-3 for a den of 1e-5, where the naive fp32
# computation of (q.k)**2 is exact to 1e-7): the linear ordering is ill-conditioned there, by construction.
@pytest.mark.parametrize("name,mode,t,dtype", forced("linear", LENGTHS)
                         + forced("linear", (7, 200), (torch.float32,)))
def test_builtin_forced_linear(name, mode, t, dtype):
    op = check(load(name, mode), dtype, b=2 if t < 200 else 1, t=t, plan="linear")
    assert op.plan.choice.below is Ordering.LINEAR


def test_forced_linear_covers_every_separable_builtin():
    covered = {p.values[0] for p in forced("linear", (7,))}
    assert covered == set(SPECS) - {"softmax", "alibi", "forgetting", "llama", "t5_bias", "diff_attention",
                                    "based_hybrid"}


@pytest.mark.parametrize("name,mode,t,dtype", forced("quadratic", LENGTHS)
                         + forced("quadratic", (200,), (torch.float32,)))
def test_builtin_forced_quadratic(name, mode, t, dtype):
    check(load(name, mode), dtype, b=2 if t < 200 else 1, t=t, plan="quadratic")


@pytest.mark.parametrize("name,mode,t,dtype", forced("recurrent", (1, 7, 40))
                         + forced("recurrent", (40,), (torch.float32,)))
def test_builtin_forced_recurrent(name, mode, t, dtype):
    check(load(name, mode), dtype, b=1, t=t, plan="recurrent")


@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("name", ["retention", "cosformer", "based"])
def test_causal_linear_chunk_sizes(name, chunk):
    """Many chunks and a partial last chunk (T = 63 is not a multiple of 5 or 16)."""
    check(load(name, "causal"), t=63, plan="linear", chunk=chunk)


# ---------------------------------------------------------------------------------------------
# Toeplitz reweighting by FFT
# ---------------------------------------------------------------------------------------------
KERNELS = {"inverse": "1/(1 + abs(i - j))", "gauss": "exp(-(i - j)**2/s)"}
SIMILARITIES = {"relu": ("dot(relu(q), relu(k))", {"kind": "rowsum", "eps": 1e-6, "eps_mode": "add"}),
                "dot": ("dot(q, k)", "none")}


def toeplitz_spec(kernel, sim, mode):
    similarity, normalize = SIMILARITIES[sim]
    return attngen.load_spec({"name": f"toeplitz_{kernel}_{sim}", "causal": mode == "causal", "similarity": similarity,
                              "reweight": KERNELS[kernel], "normalize": normalize, "constants": {"s": 10.0}})


@pytest.mark.parametrize("t", LENGTHS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sim", SIMILARITIES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_fft_toeplitz(kernel, sim, mode, t):
    op = check(toeplitz_spec(kernel, sim, mode), t=t, plan="fft")
    assert op.plan.choice.below is Ordering.FFT


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_toeplitz_auto_plan(kernel, mode):
    """The planner's own choice for a Toeplitz spec (quadratic at this length, by the cost model)."""
    op = check(toeplitz_spec(kernel, "relu", mode), t=63)
    assert op.plan.choice.ordering_for(63) in (Ordering.QUADRATIC, Ordering.FFT)


@pytest.mark.parametrize("mode", MODES)
def test_fft_learnable_kernel(mode):
    """A per-head learnable width inside h(t): its gradient flows through the FFT of the kernel."""
    spec = attngen.load_spec({"name": "gauss_learned", "causal": mode == "causal", "similarity": "dot(q, k)",
                              "reweight": "exp(-(i - j)**2/s)", "normalize": "none",
                              "parameters": {"s": {"shape": ["H"], "init": "10*(h + 1)"}}})
    check(spec, t=50, plan="fft", params={"s": torch.tensor([3.0, 30.0], dtype=torch.float64)})


@pytest.mark.parametrize("kernel", KERNELS)
def test_fft_cross_attention(kernel):
    check(toeplitz_spec(kernel, "relu", "bidirectional"), t=37, s=90, plan="fft")
    check(toeplitz_spec(kernel, "dot", "bidirectional"), t=90, s=37, plan="fft")


# ---------------------------------------------------------------------------------------------
# shapes and layouts
# ---------------------------------------------------------------------------------------------
CROSS = [("cosformer", "linear"), ("linear_elu", "linear"), ("retention", "linear"), ("cottention", "linear"),
         ("based", "linear"), ("softmax", "quadratic"), ("alibi", "quadratic"), ("cosformer", "quadratic"),
         ("retention", "quadratic")]


@pytest.mark.parametrize("ts", [(37, 90), (90, 37), (1, 65)], ids=lambda ts: f"T{ts[0]}-S{ts[1]}")
@pytest.mark.parametrize("name,plan", CROSS, ids=[case_id(*c) for c in CROSS])
def test_cross_attention(name, plan, ts):
    check(load(name, "bidirectional"), t=ts[0], s=ts[1], plan=plan)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,plan", [("cosformer", None), ("retention", "linear"), ("softmax", None),
                                       ("cottention", "quadratic")], ids=["cosformer-auto", "retention-linear",
                                                                           "softmax-auto", "cottention-quadratic"])
def test_layout_bthd(name, plan, mode):
    op = check(load(name, mode), t=63 if mode == "causal" else 40, s=None if mode == "causal" else 70,
               layout="bthd", plan=plan)
    assert op.layout == "bthd"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("plan", ["linear", "quadratic"])
@pytest.mark.parametrize("name", ["cosformer", "retention", "cottention"])
def test_head_dims(name, plan, dtype):
    """A non-power-of-two head dim, and a value head dim that differs from the key head dim."""
    spec = load(name, "causal")
    check(spec, dtype, b=1, t=70, dk=48, plan=plan)
    check(spec, dtype, b=1, t=70, dk=16, dv=24, plan=plan)


# ---------------------------------------------------------------------------------------------
# a learnable decay
# ---------------------------------------------------------------------------------------------
def learned_retention(mode):
    return attngen.load_spec({"name": "retention_learned", "causal": mode == "causal",
                              "similarity": "dot(q, k)/sqrt(d)",
                              "reweight": "gamma**abs(i - j)", "normalize": "none",
                              "parameters": {"gamma": {"shape": ["H"], "init": 0.9}}})


@pytest.mark.parametrize("plan", ["linear", "quadratic", None])
@pytest.mark.parametrize("mode", MODES)
def test_learnable_gamma_gradient(mode, plan):
    gamma = torch.tensor([0.93, 0.2], dtype=torch.float64)
    spec = learned_retention(mode)
    for t in (7, 130):
        check(spec, t=t, params={"gamma": gamma}, plan=plan)
    # 0.2**-63 overflows float32: a masked pair of a diagonal tile evaluated at j > i would put 0 * inf in a gradient
    check(spec, torch.float32, t=200, b=1, params={"gamma": gamma}, plan=plan)
    if mode == "causal" and plan is None:
        check(spec, t=30, params={"gamma": gamma}, plan="recurrent")


@pytest.mark.parametrize("bad", [1.1, 0.0, -0.5])
def test_gamma_out_of_range_is_refused_by_the_scans(bad):
    op = attngen.compile(learned_retention("causal"), backend="torch", plan="linear")
    q = torch.randn(1, H, 9, 16)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        op(q, q, q, gamma=torch.tensor([0.9, bad]))


@pytest.mark.parametrize("bad", [1.1, 0.0, -0.5])
def test_quadratic_evaluates_any_gamma_directly(bad):
    """W = gamma**|i-j| is computed as it stands on the quadratic ordering (alibi's slope may go negative)."""
    check(learned_retention("causal"), t=9, params={"gamma": torch.tensor([0.9, bad], dtype=torch.float64)},
          plan="quadratic")


# ---------------------------------------------------------------------------------------------
# the op object and the errors a caller can cause
# ---------------------------------------------------------------------------------------------
def test_op_attributes_and_defaults():
    op = attngen.compile("cottention", backend="torch")
    assert (op.spec.name, op.backend, op.layout) == ("cottention", "torch", "bhtd")
    assert op.plan.head_dim == 64
    q, k, v = (torch.randn(1, H, 20, 32, dtype=torch.float64) for _ in range(3))
    explicit = op(q, k, v, m=default_parameters(op.spec, H, torch.float64)["m"])
    torch.testing.assert_close(op(q, k, v), explicit, rtol=0, atol=0)  # m defaults to its init
    assert op.plan.head_dim == 32
    other = op(q, k, v, m=torch.tensor([0.1, 2.0], dtype=torch.float64))
    assert rel_rms(other, explicit) > 1e-3  # the parameter is used


def test_planner_dispatch_by_length():
    op = attngen.compile("cosformer", backend="torch")
    plan = build_plan(op.spec, head_dim=16)
    assert plan.choice.ordering_for(10) is not plan.choice.ordering_for(10_000)  # causal cosformer dispatches
    assert op.ordering_for(16, 10) is plan.choice.ordering_for(10)
    assert op.ordering_for(16, 10_000) is plan.choice.ordering_for(10_000)


def test_auto_plan_runs_the_ordering_of_the_key_length(monkeypatch):
    from attngen.runtime.torch import backend as torch_backend
    ran = []
    real = torch_backend.run

    def spy(plan, ordering, *args, **kwargs):
        ran.append(ordering)
        return real(plan, ordering, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "run", spy)
    op = attngen.compile("cosformer", backend="torch")
    plan = build_plan(op.spec, head_dim=16)
    for t in (10, 400):
        op(*(torch.randn(1, H, t, 16) for _ in range(3)))
    assert ran == [plan.choice.ordering_for(10), plan.choice.ordering_for(400)]
    assert ran[0] is not ran[1]


def test_backend_choice(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend("torch", torch.device("cuda", 0)) == "torch"
    with pytest.raises(PlanError, match="mixes elements of q and k"):  # no Triton kernel for this similarity
        attngen.compile({"name": "mixed", "similarity": "norm(q * k)", "normalize": "none"}, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="need CUDA tensors"):
        attngen.compile("cosformer", backend="triton")(*(torch.randn(1, 1, 4, 16) for _ in range(3)))
    with pytest.raises(PlanError, match="'torch'"):
        attngen.compile("softmax", backend="cuda")


def test_no_grad_matches_grad_path():
    """Without autograd the quadratic plan skips checkpointing; the numbers must not change."""
    op = attngen.compile("alibi", backend="torch")
    q, k, v = (torch.randn(1, H, 130, 16, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        fast = op(q, k, v)
    slow = op(q.requires_grad_(), k, v)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-13, atol=1e-13)


def _qkv(t=8, s=None, d=16):
    return torch.randn(1, H, t, d), torch.randn(1, H, s or t, d), torch.randn(1, H, s or t, d)


@pytest.mark.parametrize("call,match", [
    (lambda op: op(torch.randn(H, 8, 16), *_qkv()[1:]), "4 dimensions"),
    (lambda op: op(*_qkv()[:2], torch.randn(1, H, 9, 16)), "lengths differ"),
    (lambda op: op(_qkv()[0], torch.randn(1, H, 8, 12), _qkv()[2]), "head dims differ"),
    (lambda op: op(*_qkv(), gamma=torch.ones(H)), "unknown keyword"),
    (lambda op: op(*_qkv(), m=torch.ones(3)), "expected shape"),
    (lambda op: op(*_qkv(), initial_state=object()), "expected a State"),
    (lambda op: op(*_qkv(), initial_state=op.init_state(2, H, 16, 16)), r"expected \[1, 2, 16, 16\]"),
    (lambda op: op.init_state(1, H, 0, 16), "dk=0"),
    (lambda op: op.step(*_qkv(1), state=None), "state is None; expected a State"),
    (lambda op: op.step(*_qkv(2), state=op.init_state(1, H, 16, 16)), "one token"),
    (lambda op: op(*_qkv(), cu_seqlens=torch.tensor([0, 3, 7])), "end at T = 8"),
], ids=["rank", "kv-length", "head-dim", "unknown-kwarg", "param-shape", "initial-state", "state-batch",
        "init-state", "step", "step-length", "cu-seqlens"])
def test_bad_calls_raise_input_error(call, match):
    op = attngen.compile("cottention", backend="torch")
    with pytest.raises(InputError, match=match):
        call(op)


@pytest.mark.parametrize("name,causal,match", [("softmax", True, "no linear"), ("cottention", False, "bidirectional"),
                                               ("cosformer", True, "M=4096")])
def test_specs_without_a_state_refuse_state_passing(name, causal, match):
    op = attngen.compile(load(name, "causal" if causal else "bidirectional"), backend="torch")
    for call in (lambda: op(*_qkv(), return_state=True), lambda: op.init_state(1, H, 16, 16)):
        with pytest.raises(InputError, match=match):
            call()


def test_causal_cross_attention_is_refused():
    op = attngen.compile("cosformer", backend="torch")
    with pytest.raises(InputError, match="causal"):
        op(*_qkv(8, 12))


@pytest.mark.parametrize("kw,error,match", [
    ({"layout": "bhdt"}, InputError, "bhdt"),
    ({"chunk": 0}, InputError, "chunk"),
    ({"plan": "cubic"}, PlanError, "cubic"),
    ({"plan": "linear"}, PlanError, "not legal"),
    ({"plan": "recurrent"}, PlanError, "not legal"),
], ids=["layout", "chunk", "unknown-plan", "illegal-linear", "illegal-recurrent"])
def test_bad_compile_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        attngen.compile("softmax", backend="torch", **kw)


@pytest.mark.parametrize("name", ["gla", "simple_gla", "linear_elu", "retention"])
def test_scan_graph_does_not_grow_with_length(name):
    """The chunked scans (gated or not) keep their chunk loops out of autograd's graph: the graph of a forward holds
    the same nodes at T = 256 and T = 1024 (a loop recorded by autograd adds nodes per chunk, and its per-chunk
    indexing a backward that zero-fills the whole state tensor per chunk: time quadratic in T)."""
    spec = attngen.load_spec(name)
    op = attngen.compile(spec, backend="torch", plan="linear")
    sizes = []
    for t in (256, 1024):
        xs = [torch.randn(1, 2, t, 16, requires_grad=True) for _ in range(3)]
        gates = {g.name: F.logsigmoid(torch.randn((1, 2, t) + ((16,) if g.per == "key_dim" else ()))).requires_grad_()
                 for g in spec.gates}
        o = op(*xs, **gates)
        seen, todo = set(), [o.grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and node not in seen:
                seen.add(node)
                todo += [n for n, _ in node.next_functions]
        sizes.append(len(seen))
    assert sizes[0] == sizes[1], sizes


@pytest.mark.parametrize("name", ["linear_elu", "cosformer", "based", "retention"])
def test_state_carried_across_chunk_groups(name, monkeypatch):
    """The causal scan runs a group of chunks at a time; several groups (and a short last chunk) must give the
    reference's output and gradients."""
    from attngen.runtime.torch import scan
    monkeypatch.setattr(scan, "GROUP_TOKENS", 16)  # chunk 5 -> groups of 3 chunks: 5 groups at T = 63
    check(load(name, "causal"), t=63, plan="linear", chunk=5)
    check(load(name, "causal"), torch.float32, t=200, plan="linear", chunk=16)


@pytest.mark.parametrize("mode", MODES)
def test_sdpa_runs_exactly_sdpas_operator(mode, monkeypatch):
    """softmax and a frozen ALiBi run torch's SDPA (counted), equal to the float64 reference; a learnable slope
    under autograd and a non-softmax spec run the tiles; the plan's derivation says which."""
    from attngen.runtime.torch import sdpa
    calls = []
    real = sdpa.F.scaled_dot_product_attention
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    spec = load("softmax", mode)
    op = check(spec, torch.float32, t=70, plan="quadratic")
    assert calls and "scaled_dot_product_attention" in op.plan.explain()
    calls.clear()
    alibi = load("alibi", mode)
    check(alibi, t=40, plan="quadratic")  # the slope is a leaf with a gradient: tiled
    assert not calls
    q, k, v = (torch.randn(2, H, 50, 16, dtype=torch.float64) for _ in range(3))
    slope = torch.tensor([0.5, 0.25], dtype=torch.float64)
    with torch.no_grad():
        out = attngen.compile(alibi, backend="torch", plan="quadratic")(q, k, v, slope=slope)
    assert calls
    torch.testing.assert_close(out, attngen.reference(alibi)(q, k, v, slope=slope), rtol=1e-10, atol=1e-10)
    calls.clear()
    check(load("cosformer", mode), t=40, plan="quadratic")
    assert not calls
