"""torch.compile and torch.library.opcheck (docs/api.md, "torch.compile").

Every built-in spec, in each of its modes, compiles with ``fullgraph=True`` on the torch backend through
AOTAutograd (backend="aot_eager": dynamo traces the op, AOTAutograd traces its forward and backward with fake
tensors; a graph break or a fake-tensor problem is an error). A handful also compile with the default inductor
backend (all of them: slow). The compiled op's output and every gradient (q, k, v, the learnable parameters, the
gates) are compared with the same op run eagerly. Lengths are dynamic: the SDPA delegation and the bidirectional
linear ordering (loop-free), the causal and two-sided scans, the gated scan and the tiles with and without a window
(their loops inside the torch backend's custom ops) compile once for lengths 64, 96, 128 (and 100, a multiple of no
chunk or tile), and those custom ops (attngen::torch_scan, torch_chunk_states, torch_tiles and their _bwd) pass
torch.library.opcheck.

The generated modules' custom ops (attngen::<module>_fwd / _bwd / _qfwd / _qbwd) go through
torch.library.opcheck with CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without a GPU), and the triton backend compiles with fullgraph=True through aot_eager (the custom ops are opaque
to the graph; their fake kernels give the shapes).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from conftest import assert_close
from torch._dynamo.testing import CompileCounterWithBackend

import attngen
from attngen.errors import InputError
from attngen.runtime.inputs import default_parameters
from attngen.runtime.torch import backend as torch_backend
from attngen.runtime.torch import gated, quadratic, scan
from attngen.runtime.triton import host

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CASES = [(name, causal) for name in attngen.builtin_names() for causal in attngen.spec_modes(name)]


def _ids(cases):
    return [f"{n}-{'causal' if c else 'bidirectional'}" for n, c in cases]



# inductor compiles slowly on 2 cores (10-35 s a spec, fresh cache): three in CI, one per runtime path (SDPA, the
# tiled quadratic ordering with its checkpointed tiles and RowNormalize, the gated chunked scan); all of them: slow
INDUCTOR = [("softmax", True), ("linear_elu", True), ("gla", True)]
TOL = {"aot_eager": 1e-6, "inductor": 2e-5}  # relative RMS against the eager op (inductor fuses and reorders sums)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no graph of an earlier test is reused, the counters start at 0)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _case(name, causal=True, t=32, h=2, d=16, seed=0):
    """(spec, [q, k, v], parameters near their defaults, gates, the learnable parameters' names, dO)."""
    spec = attngen.load_spec(name, causal=causal)
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(1, h, t, d, generator=g) for _ in range(3)]
    params = {n: p + 0.1 * torch.randn(p.shape, generator=g)
              for n, p in default_parameters(spec, h, head_dim=d).items()}
    gates = {gate.name: torch.nn.functional.logsigmoid(
        2.2 + torch.randn((1, h, t) + ((d,) if gate.per == "key_dim" else ()), generator=g))
        for gate in spec.gates}
    return spec, qkv, params, gates, {p.name for p in spec.parameters if p.learnable}, torch.randn(1, h, t, d,
                                                                                                    generator=g)


def _run(fn, qkv, params, gates, learnable, do) -> dict:
    """The output and the gradient of every input that takes one."""
    xs = [x.clone().requires_grad_() for x in qkv]
    ps = {n: p.clone().requires_grad_(n in learnable) for n, p in params.items()}
    gs = {n: x.clone().requires_grad_() for n, x in gates.items()}
    o = fn(*xs, **ps, **gs)
    o.backward(do)
    out = {"o": o.detach()} | {f"d{n}": x.grad for n, x in zip("qkv", xs)}
    return out | {f"d{n}": x.grad for n, x in (ps | gs).items() if x.requires_grad}


def _compare(got: dict, want: dict, tol: float, what: str) -> None:
    assert got.keys() == want.keys()
    for key, ref in want.items():
        assert ref is not None and got[key] is not None, f"{what}: no gradient {key}"
        assert_close(f"{what} {key}", got[key], ref, tol)


def _check(name, causal, backend, t=32, **compile_kwargs):
    spec, qkv, params, gates, learnable, do = _case(name, causal, t=t)
    op = attngen.compile(spec, backend="torch")  # planned inside the first (compiled) call, as a user's op is
    compiled = torch.compile(op, fullgraph=True, backend=backend, **compile_kwargs)
    got = _run(compiled, qkv, params, gates, learnable, do)
    want = _run(op, qkv, params, gates, learnable, do)
    _compare(got, want, TOL["inductor" if backend == "inductor" else "aot_eager"], f"{name} {spec.mode} T{t}")


# ---------------------------------------------------------------------------------------------
# the torch backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,causal", CASES, ids=_ids(CASES))
def test_fullgraph_aot_eager(name, causal):
    """Every built-in and mode: one graph for the forward, AOTAutograd's for the backward, equal to the eager op."""
    _check(name, causal, "aot_eager")


LINEAR_CAUSAL = ["linear_elu", "retention", pytest.param("cosformer", marks=pytest.mark.slow),
                 pytest.param("hedgehog", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", LINEAR_CAUSAL)
def test_fullgraph_causal_scan(name):
    """The causal linear ordering (the chunked scan, a torch.autograd.Function) at T = 40: two groups of the scan
    (a chunk of 32 and a short last one)."""
    spec, qkv, params, gates, learnable, do = _case(name, True, t=40)
    op = attngen.compile(spec, backend="torch", plan="linear")
    got = _run(torch.compile(op, fullgraph=True, backend="aot_eager"), qkv, params, gates, learnable, do)
    _compare(got, _run(op, qkv, params, gates, learnable, do), TOL["aot_eager"], f"{name} linear")


@pytest.mark.parametrize("name", ["alibi", "t5_bias", "diff_attention",
                                  pytest.param("hedgehog", marks=pytest.mark.slow),
                                  pytest.param("cosformer", marks=pytest.mark.slow)])
def test_fullgraph_parameter_defaults(name):
    """Parameters left to their defaults: evaluated outside the trace, once per size."""
    spec, qkv, _, _, _, do = _case(name, True)
    op = attngen.compile(spec, backend="torch")
    got = _run(torch.compile(op, fullgraph=True, backend="aot_eager"), qkv, {}, {}, set(), do)
    _compare(got, _run(op, qkv, {}, {}, set(), do), TOL["aot_eager"], f"{name} defaults")


@pytest.mark.parametrize("name,causal", INDUCTOR, ids=_ids(INDUCTOR))
def test_fullgraph_inductor(name, causal):
    """The default backend (inductor, C++ on a CPU) on one spec of each runtime path."""
    _check(name, causal, "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("name,causal", CASES, ids=_ids(CASES))
def test_fullgraph_inductor_all(name, causal):
    _check(name, causal, "inductor")


DYNAMIC = [("softmax", True), ("alibi", False), ("linear_elu", False), ("cosformer", False),
           ("cottention", False)]  # cottention: n**x of the symbolic length (not float(n): a guard per length)


@pytest.mark.parametrize("name,causal", DYNAMIC, ids=_ids(DYNAMIC))
def test_dynamic_lengths_compile_once(name, causal):
    """dynamic=True: lengths 64, 96 and 128 (one side of the crossover) run one graph, each equal to the eager op."""
    counter = CompileCounterWithBackend("aot_eager")
    spec = attngen.load_spec(name, causal=causal)
    op = attngen.compile(spec, backend="torch")
    compiled = torch.compile(op, fullgraph=True, backend=counter, dynamic=True)
    orderings, graphs = set(), []
    for t in (64, 96, 128):
        _, qkv, _, _, _, do = _case(name, causal, t=t, seed=t)
        _compare(_run(compiled, qkv, {}, {}, set(), do), _run(op, qkv, {}, {}, set(), do), TOL["aot_eager"],
                 f"{name} T{t}")
        orderings.add(op.ordering_for(16, t))
        graphs.append((torch._dynamo.utils.counters["stats"]["unique_graphs"], counter.frame_count))
    assert len(orderings) == 1, orderings
    assert graphs[0][0] == 1 and graphs[1:] == graphs[:1] * 2, f"recompiled: (unique graphs, frames) {graphs}"


LEARNED_DECAY = {"name": "retention_learned", "similarity": "dot(q, k)/sqrt(d)", "reweight": "gamma**(i - j)",
                 "normalize": "none", "parameters": {"gamma": {"shape": ["H"], "init": 0.9}}}
SLIDING = {"name": "sliding_window", "causal": True, "similarity": "exp(dot(q, k) * scale)", "normalize": "rowsum",
           "window": 48}
# the orderings that loop in Python over chunks or tiles (a count that depends on T) run them inside custom ops
# (attngen::torch_scan, torch_chunk_states, torch_tiles and their _bwd): one graph for every length. 100 is a
# multiple of neither the scan's chunk (32), the gated chunk (16) nor the tile (64)
LOOPS = [("linear_elu", True, "linear"),  # the causal chunked scan
         ("retention", True, "linear"),  # the scan with a decay
         ("retention", False, "linear"),  # the two-sided decay: a causal and a reversed strict scan
         ("gla", True, "linear"),  # the gated scan, gates per key dimension
         ("alibi", True, "quadratic"),  # the tiles (a learnable slope: not SDPA), RowNormalize's rows
         ("t5_bias", False, "quadratic"),  # the tiles, a table parameter
         (SLIDING, True, None),  # a window's tiles
         ("based_hybrid", True, None)]  # terms: a window's softmax plus Taylor linear attention (the scan)


def _loop_id(case):
    name, causal, plan = case
    return f"{name if isinstance(name, str) else name['name']}-{'causal' if causal else 'bidirectional'}-{plan}"


def _dynamic_once(name, causal, plan, backend, lengths=(64, 96, 128, 100)):
    """The op compiled once with dynamic=True runs every length in one graph: output and every gradient (q, k, v,
    learnable parameters, gates) equal to the eager op at each length, the counts of graphs and frames unchanged
    after the first length."""
    counter = CompileCounterWithBackend(backend)
    spec = attngen.load_spec(name, causal=causal)
    op = attngen.compile(spec, backend="torch", plan=plan)
    compiled = torch.compile(op, fullgraph=True, backend=counter, dynamic=True)
    counts = []
    for t in lengths:
        _, qkv, params, gates, learnable, do = _case(name, causal, t=t, seed=t)
        _compare(_run(compiled, qkv, params, gates, learnable, do), _run(op, qkv, params, gates, learnable, do),
                 TOL["inductor" if backend == "inductor" else "aot_eager"], f"{spec.name} T{t}")
        counts.append((torch._dynamo.utils.counters["stats"]["unique_graphs"], counter.frame_count))
    assert counts[0][0] == 1 and counts[1:] == counts[:1] * (len(lengths) - 1), f"recompiled: {counts}"


@pytest.mark.parametrize("name,causal,plan", LOOPS, ids=[_loop_id(c) for c in LOOPS])
def test_dynamic_lengths_loops_compile_once(name, causal, plan):
    """The chunked scans, the two-sided decay, the gated scan and the tiles (with and without a window) compile once
    for lengths 64, 96, 128 and 100 (aot_eager)."""
    _dynamic_once(name, causal, plan, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name,causal,plan", LOOPS, ids=[_loop_id(c) for c in LOOPS])
def test_dynamic_lengths_loops_compile_once_inductor(name, causal, plan):
    _dynamic_once(name, causal, plan, "inductor")


TORCH_OPS = [(scan, "scan_op", "scan_bwd_op"), (gated, "chunk_states", "chunk_states_bwd"),
             (quadratic, "tiles_op", "tiles_bwd_op")]


def _torch_op_calls(monkeypatch, name, causal=True, plan=None, t=72) -> dict:
    """{attribute: (custom op, args of its first call)} over a forward and backward of ``name`` on the torch backend
    (eagerly: the scans' ops run as they are; the tiles' ops, which only a compiled op runs, through
    quadratic.compiled_tiles on the inputs backend.run gives them)."""
    calls = {}
    for module, *names in TORCH_OPS:
        for attr in names:
            real = getattr(module, attr)

            def run(*args, _real=real, _attr=attr):
                calls.setdefault(_attr, (_real, args))
                return _real(*args)
            monkeypatch.setattr(module, attr, run)
    spec, qkv, params, gates, learnable, do = _case(name, causal, t=t)
    op = attngen.compile(spec, backend="torch", plan=plan)
    _run(op, qkv, params, gates, learnable, do)
    if plan == "quadratic":
        xs = [x.clone().requires_grad_() for x in qkv]
        ps = {n: p.clone().requires_grad_(n in learnable) for n, p in params.items()}
        q, k, v, _ = torch_backend.prepare(op.plan, *xs, ps)
        big = next((g.clone().requires_grad_().cumsum(2) for g in gates.values()), None)
        quadratic.compiled_tiles(op.plan, q, k, v, ps, causal, big).backward(do)
    return calls


OPCHECK_TORCH = [("linear_elu", True, "linear", ("scan_op", "scan_bwd_op")),
                 ("retention", False, "linear", ("scan_op", "scan_bwd_op")),  # a decay, two scans
                 (LEARNED_DECAY, True, "linear", ("scan_op", "scan_bwd_op")),  # dlog(gamma): the weighted sweep
                 ("gla", True, "linear", ("chunk_states", "chunk_states_bwd")),
                 ("simple_gla", True, "linear", ("chunk_states", "chunk_states_bwd")),  # a gate per head
                 ("alibi", True, "quadratic", ("tiles_op", "tiles_bwd_op")),  # a learnable slope, row sums
                 ("forgetting", True, "quadratic", ("tiles_op", "tiles_bwd_op"))]  # a gate, softmax's running max


@pytest.mark.parametrize("name,causal,plan,expect", OPCHECK_TORCH, ids=[_loop_id(c[:3]) for c in OPCHECK_TORCH])
def test_opcheck_torch_backend_ops(monkeypatch, name, causal, plan, expect):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch with dynamic shapes) on the
    torch backend's custom ops as a forward and backward call them: the forward ops with the inputs that require
    grad (their autograd formula is checked), the backward ops on detached inputs."""
    calls = _torch_op_calls(monkeypatch, name, causal, plan)
    assert sorted(calls) == sorted(expect), sorted(calls)
    for attr, (custom_op, args) in calls.items():
        if "_bwd" in attr:
            args = tuple(_detached(a) for a in args)
        result = torch.library.opcheck(custom_op, args)
        assert set(result.values()) == {"SUCCESS"}, (attr, result)


def test_dynamic_crossover_dispatch():
    """A symbolic length is compared with the crossover (a guard): each side of it runs its own ordering in its own
    graph, equal to the eager op, and a second length above the crossover reuses the linear ordering's graph."""
    spec = attngen.load_spec("polynomial2", causal=False)
    op = attngen.compile(spec, backend="torch")
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager", dynamic=True)
    graphs = []
    for t in (64, 192, 224):
        _, qkv, _, _, _, do = _case("polynomial2", False, t=t, seed=t)
        _compare(_run(compiled, qkv, {}, {}, set(), do), _run(op, qkv, {}, {}, set(), do), TOL["aot_eager"],
                 f"polynomial2 T{t}")
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert [op.ordering_for(16, t).value for t in (64, 192, 224)] == ["quadratic", "linear", "linear"]
    assert graphs == [1, 2, 2], graphs


def test_value_checks_under_compile():
    """The gate's value check (g <= 0, finite) is an assertion in the compiled graph: a positive gate raises
    (RuntimeError from torch._assert_async, the InputError's message) instead of passing silently."""
    spec, qkv, _, gates, _, _ = _case("simple_gla")
    op = attngen.compile(spec, backend="torch")
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*qkv, **gates), op(*qkv, **gates))
    bad = {"g": gates["g"].clone().index_fill_(2, torch.tensor([5]), 0.5)}
    with pytest.raises(InputError, match="values > 0"):
        op(*qkv, **bad)
    with pytest.raises(RuntimeError, match="gate 'g' holds values > 0"):
        compiled(*qkv, **bad)


def test_decay_check_under_compile():
    """A learnable decay rate outside (0, 1]: an assertion in the graph, like the eager InputError."""
    spec = attngen.load_spec(LEARNED_DECAY)
    op = attngen.compile(spec, backend="torch", plan="linear")
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    _, qkv, _, _, _, _ = _case("retention")
    good, bad = torch.tensor([0.9, 0.5]), torch.tensor([0.9, 1.5])
    torch.testing.assert_close(compiled(*qkv, gamma=good), op(*qkv, gamma=good))
    with pytest.raises(InputError, match="must lie in"):
        op(*qkv, gamma=bad)
    with pytest.raises(RuntimeError, match="must lie in"):
        compiled(*qkv, gamma=bad)


def test_states_refused_under_compile():
    """initial_state / return_state / cu_seqlens and op.step are eager-only: under compile the op says so (dynamo
    wraps the InputError raised while tracing in its Unsupported error, the message kept)."""
    _, qkv, _, _, _, _ = _case("linear_elu", t=40)
    op = attngen.compile("linear_elu", backend="torch")
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    for call in ({"return_state": True}, {"cu_seqlens": torch.tensor([0, 10, 40])}):
        with pytest.raises(Exception, match="not supported under torch.compile"):
            compiled(*qkv, **call)
        op(*qkv, **call)  # eagerly they run
    state = op.init_state(1, 2, 16, 16)
    token = [x[:, :, :1] for x in qkv]
    with pytest.raises(Exception, match="not supported under torch.compile"):
        torch.compile(op.step, fullgraph=True, backend="aot_eager")(*token, state)
    op.step(*token, state)


# ---------------------------------------------------------------------------------------------
# the triton backend's custom ops (under the interpreter on a CPU)
# ---------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                  reason="the generated kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _recorded_calls(name, plans=("linear", "quadratic"), **call):
    """{custom op name: (op, args of its first call)} over a forward and backward of ``name``'s triton op with
    each forced ordering (the _fwd / _qfwd ops called by the generated module, the _bwd / _qbwd ops by their
    autograd formulas)."""
    calls = {}

    def recorder(key, custom_op):
        def run(*args):
            calls.setdefault(key, (custom_op, args))
            return custom_op(*args)
        return run

    for plan in plans:
        spec, qkv, params, gates, learnable, do = _case(name, True)
        op = attngen.compile(spec, backend="triton", plan=plan)
        xs = [x.to(DEVICE) for x in qkv]
        _run(op, xs, {n: p.to(DEVICE) for n, p in params.items()}, {n: g.to(DEVICE) for n, g in gates.items()},
             learnable, do.to(DEVICE))  # the module's ops now exist
        real = dict(host._OPS)
        host._OPS.update({key: recorder(key, custom_op) for key, custom_op in real.items()})
        try:
            args = [x.clone().requires_grad_() for x in xs]
            out = op(*args, **{n: p.to(DEVICE) for n, p in params.items()},
                     **{n: g.to(DEVICE) for n, g in gates.items()}, **call)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        finally:
            host._OPS.update(real)
    return calls


def _opcheck(calls: dict, expect: tuple) -> None:
    """opcheck on every recorded op: the forward ops as called (inputs that require grad: their autograd formula
    is checked), the backward ops on detached inputs (they have no second-order formula)."""
    assert sorted(key.rsplit("_", 1)[1] for key in calls) == sorted(expect), sorted(calls)
    for key, (custom_op, args) in calls.items():
        if key.endswith("bwd"):
            args = tuple(_detached(a) for a in args)
        result = torch.library.opcheck(custom_op, args)
        assert set(result.values()) == {"SUCCESS"}, (key, result)


def _detached(a):
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, (list, tuple)):
        return type(a)(_detached(x) for x in a)
    return a


OPCHECK = [("linear_elu", ("fwd", "bwd", "qfwd", "qbwd")),  # linear chunked scan, quadratic tiles (row sums)
           ("retention", ("fwd", "bwd", "qfwd", "qbwd")),  # the decay class
           ("simple_gla", ("fwd", "bwd")),  # a gate in the linear scan (its quadratic kernels are softmax's only)
           ("gla", ("fwd", "bwd")),  # a gate per key dimension (its gradient computed transposed)
           ("forgetting", ("qfwd", "qbwd")),  # a gate in the flash kernels
           ("t5_bias", ("qfwd", "qbwd")),  # a table parameter (its gradient by atomic adds)
           ("softmax", ("qfwd", "qbwd"))]  # the flash kernels (softmax has no linear ordering)


@needs_triton
@pytest.mark.parametrize("name,expect", OPCHECK, ids=[n for n, _ in OPCHECK])
def test_opcheck_custom_ops(name, expect):
    plans = tuple(p for p, kind in (("linear", "fwd"), ("quadratic", "qfwd")) if kind in expect)
    _opcheck(_recorded_calls(name, plans), expect)


@needs_triton
def test_opcheck_states():
    """The linear forward op with a returned state (four outputs: o, the row sums, S and z)."""
    _opcheck(_recorded_calls("linear_elu", ("linear",), return_state=True), ("fwd", "bwd"))


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("name", attngen.builtin_names())
def test_opcheck_all(name):
    spec = attngen.load_spec(name)
    plans = [p for p in ("linear", "quadratic") if _legal_triton(spec, p)]
    calls = _recorded_calls(name, plans)
    _opcheck(calls, tuple(key.rsplit("_", 1)[1] for key in calls))


def _legal_triton(spec, plan) -> bool:
    try:
        attngen.compile(spec, backend="triton", plan=plan)
    except attngen.PlanError:
        return False
    return True


@needs_triton
@pytest.mark.parametrize("name", ["linear_elu", "softmax", "diff_attention"])
def test_fullgraph_triton(name):
    """The triton backend through aot_eager: the generated module's custom ops in one graph, forward and backward,
    equal to the eager op."""
    spec, qkv, params, gates, learnable, do = _case(name, True)
    op = attngen.compile(spec, backend="triton")
    qkv, do = [x.to(DEVICE) for x in qkv], do.to(DEVICE)
    params = {n: p.to(DEVICE) for n, p in params.items()}
    got = _run(torch.compile(op, fullgraph=True, backend="aot_eager"), qkv, params, gates, learnable, do)
    _compare(got, _run(op, qkv, params, gates, learnable, do), TOL["aot_eager"], f"{name} triton")



# on a CPU under the interpreter: one spec of each kernel family (the chunked scan, the gated scan, the flash
# kernels), small; on a GPU: more of them at larger sizes
INDUCTOR_TRITON = (["linear_elu", "gla", "softmax"] if DEVICE == "cpu" else
                   ["linear_elu", "retention", "gla", "softmax", "diff_attention", "t5_bias"])
INDUCTOR_TRITON_SIZES = {"cpu": ((96, 112, 128), 16), "cuda": ((512, 700, 1000), 64)}


@needs_triton
@pytest.mark.parametrize("name", INDUCTOR_TRITON)
def test_inductor_triton_dynamic(name):
    """The triton backend under the default backend (inductor), dynamic=True: three lengths on one side of the
    crossover run one graph, each equal to the eager op, forward and every gradient. On a CPU the generated kernels
    run under the interpreter on CPU tensors (inductor's C++ code around the opaque custom ops); on a GPU, inductor's
    Triton code around them."""
    counter = CompileCounterWithBackend("inductor")
    spec = attngen.load_spec(name, causal=True)
    op = attngen.compile(spec, backend="triton")
    compiled = torch.compile(op, fullgraph=True, backend=counter, dynamic=True)
    lengths, d = INDUCTOR_TRITON_SIZES[DEVICE]
    orderings, graphs = set(), []
    for t in lengths:
        _, qkv, params, gates, learnable, do = _case(name, True, t=t, h=2 if DEVICE == "cpu" else 4, d=d, seed=t)
        qkv, do = [x.to(DEVICE) for x in qkv], do.to(DEVICE)
        params = {n: p.to(DEVICE) for n, p in params.items()}
        gates = {n: g.to(DEVICE) for n, g in gates.items()}
        _compare(_run(compiled, qkv, params, gates, learnable, do), _run(op, qkv, params, gates, learnable, do),
                 TOL["inductor"], f"{name} triton inductor T{t}")
        orderings.add(op.ordering_for(d, t))
        graphs.append((torch._dynamo.utils.counters["stats"]["unique_graphs"], counter.frame_count))
    assert len(orderings) == 1, orderings
    assert graphs[1:] == graphs[:1] * 2, f"recompiled: (unique graphs, frames) {graphs}"
