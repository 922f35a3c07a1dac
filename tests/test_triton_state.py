"""Recurrent states of the generated Triton modules (causal mode): prefill with return_state, the decode
step, initial_state, gradients of the initial and the returned state, packed sequences (cu_seqlens), and
the errors (bidirectional modules, cosFormer with M = max(n_q, n_k), malformed inputs).

Under the interpreter on CPU (tests/conftest.py), natively on a GPU. The float64 oracle of a state
continuation is `recurrent64` below: the recurrent convention of docs/derivations.md section 4 written out in
torch (feature maps from the torch backend, positions pos + local index); it is itself checked against the
naive reference. fp32 only: bf16 is checked on a GPU (test_triton_interp.py says why).
"""
import os

import pytest
import torch
from conftest import assert_close

from attngen.verify import rel_rms

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton backend cannot be tested")

from attngen import load_spec  # noqa: E402
from attngen.errors import InputError  # noqa: E402
from attngen.frontend.expr import KE, QE, I, J  # noqa: E402
from attngen.ir import Ordering  # noqa: E402
from attngen.naive import reference  # noqa: E402
from attngen.pipeline import plan as build_plan  # noqa: E402
from attngen.runtime.torch import backend as torch_backend  # noqa: E402
from attngen.runtime.torch.common import _side, log_decay, row_evaluator, symbol_env  # noqa: E402
from attngen.runtime.triton import loader as triton_backend  # noqa: E402
from attngen.verify import FUDGE  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
LEARNED_GAMMA = {"name": "retention_learned", "similarity": "dot(q, k) / sqrt(d)", "reweight": "g**abs(i - j)",
                 "normalize": "none", "parameters": {"g": {"shape": ["H"], "init": 0.9}}}
SPECS = {
    "linear_elu": lambda: load_spec("linear_elu"),
    "relu_linear": lambda: load_spec("relu_linear"),
    "cottention": lambda: load_spec("cottention"),
    "retention": lambda: load_spec("retention"),
    "retention_learned": lambda: load_spec(LEARNED_GAMMA),
    "cosformer_M4096": lambda: load_spec("cosformer", M=4096),
    "based": lambda: load_spec("based"),
    "polynomial2": lambda: load_spec("polynomial2"),
}
D = 16  # the tensor-power specs (based, polynomial2) are generated up to head dim 16




def module(key):
    spec = SPECS[key]()
    mod = triton_backend.load_module(build_plan(spec, force="linear"))
    return spec, mod, getattr(mod, f"{spec.name}_attention"), getattr(mod, f"{spec.name}_step")


def poisoned(mod, monkeypatch):
    """Every buffer the module allocates starts as NaN, so an element a kernel does not write fails."""
    def empty(shape, like, dtype=None):
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    monkeypatch.setattr(mod.host, "_empty", empty)  # the shared host runtime allocates every buffer


def params_of(spec, h, g):
    # learnable parameters drawn so a decay gamma stays in [0.8, 0.99] and Cottention's m in [0.8, 0.99]
    return {p.name: torch.rand((h,) if p.shape else (), generator=g, dtype=torch.float64) * 0.19 + 0.8
            for p in spec.parameters}


def zeros_state(mod, b, h, dk, dv):
    f = mod.MODULE.feature_width(dk)
    z = torch.zeros(b, h, f, device=DEVICE) if mod.MODULE.normalised else None
    return torch.zeros(b, h, f, dv, device=DEVICE), z, torch.zeros(b, dtype=torch.int64, device=DEVICE)


def recurrent64(spec, q, k, v, S0, z0, pos0, params):
    """float64 oracle: o [B, H, T, Dv] and the final (S, z) from the state (S0, z0) at positions pos0 + t:
    S_t = gamma S_{t-1} + K'_t^T V_t, z_t = gamma z_{t-1} + K'_t, o_t = Q'_t S_t / den'(Q'_t z_t)."""
    plan = build_plan(spec, force="linear")
    b, h, t, d = q.shape
    env = symbol_env(plan, t, t, h, d, params, torch.float64, q.device)
    pos = (pos0.view(b, 1, 1, 1) + torch.arange(t).view(1, 1, t, 1)).double()
    qev = row_evaluator(env, QE, q, I, pos, spec.where)
    kev = row_evaluator(env, KE, k, J, pos, spec.where)
    qf = torch.cat([_side(qev, (lt.position.coeff, lt.position.f_i, lt.feature.coeff, lt.feature.q_scale),
                          lt.feature.q_factors, q) for lt in plan.linear_terms], -1)
    kf = torch.cat([_side(kev, (lt.position.g_j, lt.feature.k_scale), lt.feature.k_factors, k)
                    for lt in plan.linear_terms], -1)
    gamma = torch.exp(log_decay(plan, env, h, q)).view(1, h, 1, 1) if plan.reweight.decay is not None else 1.0
    S, z, outs = S0, z0, []
    norm = plan.normalize
    for i in range(t):
        S = gamma * S + kf[:, :, i, :, None] * v[:, :, i, None, :]
        o = (qf[:, :, i, None, :] @ S)[:, :, 0]  # [B, H, Dv]
        if norm.kind == "rowsum":
            z = gamma[..., 0] * z + kf[:, :, i] if isinstance(gamma, torch.Tensor) else z + kf[:, :, i]
            den = (qf[:, :, i] * z).sum(-1, keepdim=True)
            den = den.clamp_min(norm.eps) if norm.eps_mode == "clamp" else den + norm.eps
            o = o / den
        outs.append(o)
    return torch.stack(outs, 2), S, z


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# prefill + decode steps, and a chunked continuation, equal one long run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t2", [1, 17], ids=lambda t: f"T2-{t}")
@pytest.mark.parametrize("t1", [0, 1, 63], ids=lambda t: f"T1-{t}")
@pytest.mark.parametrize("key", sorted(SPECS))
def test_prefill_then_steps_equals_full_forward(key, t1, t2, monkeypatch):
    spec, mod, fn, step = module(key)
    poisoned(mod, monkeypatch)
    b, h = 2, 1
    g = torch.Generator().manual_seed(t1 * 100 + t2)
    q, k, v = (rand(g, b, h, t1 + t2, D) for _ in range(3))
    params = params_of(spec, h, g)
    p32 = {n: p.float().to(DEVICE) for n, p in params.items()}
    x32 = [x.float().to(DEVICE) for x in (q, k, v)]
    full, (s_full, z_full, pos_full) = fn(*x32, return_state=True, **p32)
    gold = reference(spec)(q, k, v, **params)
    assert_close("full forward vs float64 reference", full, gold, 1e-4)
    if t1 == 0:
        state = zeros_state(mod, b, h, D, D)
    else:
        prefix, state = fn(*(x[:, :, :t1] for x in x32), return_state=True, **p32)
        assert_close("prefill", prefix, full[:, :, :t1], 1e-5)
        assert state[2].tolist() == [t1] * b
    start = state
    outs = []
    for i in range(t1, t1 + t2):
        o, S, z, pos = step(*(x[:, :, i:i + 1] for x in x32), *state, **p32)
        state = (S, z, pos)
        outs.append(o)
    steps = torch.cat(outs, 2)
    # attngen.verify's rule: a case also passes within FUDGE x the error of the same computation in fp32 (the
    # torch backend's recurrent ordering); it binds only where fp32 itself cannot meet the tolerance
    # (polynomial2 at T = 1: one key, the row sum (q.k)**2 + eps cancels in float32)
    same = torch_backend.run(build_plan(spec, force="recurrent"), Ordering.RECURRENT, q.float(), k.float(), v.float(),
                             {n: p.float() for n, p in params.items()})
    floor = FUDGE * rel_rms(same[:, :, t1:], gold[:, :, t1:])
    assert_close("decode steps vs the module's full forward", steps, full[:, :, t1:], max(1e-5, floor))
    assert_close("decode steps vs float64 reference", steps, gold[:, :, t1:], max(1e-4, floor))
    assert state[2].tolist() == pos_full.tolist() == [t1 + t2] * b
    assert_close("state S after the steps", state[0], s_full, 1e-5)
    if mod.MODULE.normalised:
        assert_close("state z after the steps", state[1], z_full, 1e-5)
    else:
        assert state[1] is None and z_full is None
    rest = fn(*(x[:, :, t1:] for x in x32), initial_state=start, **p32)
    assert_close("chunked run from initial_state", rest, full[:, :, t1:], 1e-5)


def test_oracle_continues_the_reference():
    """recurrent64 from the state of a prefix equals the naive reference over the whole sequence."""
    spec = SPECS["cosformer_M4096"]()
    g = torch.Generator().manual_seed(1)
    q, k, v = (rand(g, 2, 2, 30, 8) for _ in range(3))
    f = build_plan(spec, force="linear").feature_width(8)
    zero = (torch.zeros(2, 2, f, 8, dtype=torch.float64), torch.zeros(2, 2, f, dtype=torch.float64))
    start = torch.zeros(2, dtype=torch.int64)
    head, S, z = recurrent64(spec, q[:, :, :11], k[:, :, :11], v[:, :, :11], *zero, start, {})
    tail, _, _ = recurrent64(spec, q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], S, z, torch.full((2,), 11), {})
    gold = reference(spec)(q, k, v)
    assert_close("oracle", torch.cat([head, tail], 2), gold, 1e-12)


# ---------------------------------------------------------------------------------------------
# gradients through the initial state (and from the returned state), per-sequence positions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", ["fused", "parallel"])
@pytest.mark.parametrize("key", sorted(SPECS))
def test_state_gradients_match_float64(key, scan, monkeypatch):
    """Both causal scans (host.SCAN) against the float64 recurrent oracle: outputs, the final state and every
    gradient (inputs, the initial state, parameters: a learned decay's through dL/dlog(gamma))."""
    spec, mod, fn, _ = module(key)
    monkeypatch.setattr(mod.host, "SCAN", scan)
    b, h, t = 2, 1, 70  # a full chunk of 64 and a short one
    g = torch.Generator().manual_seed(7)
    q, k, v, pq, pk, pv = (rand(g, b, h, n, D) for n in (t, t, t, 9, 9, 9))
    params = params_of(spec, h, g)
    p32 = {n: p.float().to(DEVICE) for n, p in params.items()}
    # a realistic initial state: the module's own state after 9 tokens, put at positions 5 and 40
    _, (s0, z0, _) = fn(*(x.float().to(DEVICE) for x in (pq, pk, pv)), return_state=True, **p32)
    pos0 = torch.tensor([5, 40], device=DEVICE)
    poisoned(mod, monkeypatch)
    leaves = [*(x.float().to(DEVICE).requires_grad_() for x in (q, k, v)), s0.detach().clone().requires_grad_()]
    z_leaf = z0.detach().clone().requires_grad_() if z0 is not None else None
    p_leaf = {n: p.clone().requires_grad_() for n, p in p32.items()}
    o, (st, zt, pos) = fn(*leaves[:3], initial_state=(leaves[3], z_leaf, pos0), return_state=True, **p_leaf)
    assert pos.tolist() == [5 + t, 40 + t]

    gold_leaves = [x.clone().requires_grad_() for x in (q, k, v, s0.double().cpu())]
    gz_leaf = z0.double().cpu().requires_grad_() if z0 is not None else None
    gp_leaf = {n: p.clone().requires_grad_() for n, p in params.items()}
    go, gst, gzt = recurrent64(spec, *gold_leaves, gz_leaf, pos0.cpu(), gp_leaf)
    assert_close("o", o, go, 1e-4)
    assert_close("final S", st, gst, 1e-4)
    do, dst = rand(g, *go.shape), rand(g, *gst.shape)
    loss = (o * do.float().to(DEVICE)).sum() + (st * dst.float().to(DEVICE)).sum()
    gold_loss = (go * do).sum() + (gst * dst).sum()
    if z0 is not None:
        dzt = rand(g, *gzt.shape)
        assert_close("final z", zt, gzt, 1e-4)
        loss, gold_loss = loss + (zt * dzt.float().to(DEVICE)).sum(), gold_loss + (gzt * dzt).sum()
    ours = [*leaves, *([z_leaf] if z_leaf is not None else []), *p_leaf.values()]
    gold = [*gold_leaves, *([gz_leaf] if gz_leaf is not None else []), *gp_leaf.values()]
    names = ["dq", "dk", "dv", "dS0", *(["dz0"] if z0 is not None else []), *("d" + n for n in p_leaf)]
    got = torch.autograd.grad(loss, ours)
    want = torch.autograd.grad(gold_loss, gold)
    for name, a, w in zip(names, got, want):
        assert_close(name, a, w, 1e-4)


@pytest.mark.parametrize("key", ["linear_elu", "retention", "cottention"])
def test_sequences_at_different_positions_decode_together(key):
    """Serving: two sequences with prefixes of 3 and 40 tokens, stacked into one state, step together."""
    spec, mod, fn, step = module(key)
    g = torch.Generator().manual_seed(11)
    params = {n: p.float().to(DEVICE) for n, p in params_of(spec, 2, g).items()}
    seqs = [[rand(g, 1, 2, n, D).float().to(DEVICE) for _ in range(3)] for n in (3 + 5, 40 + 5)]
    states, fulls = [], []
    for (q, k, v), n in zip(seqs, (3, 40)):
        fulls.append(fn(q, k, v, **params)[:, :, n:])
        states.append(fn(q[:, :, :n], k[:, :, :n], v[:, :, :n], return_state=True, **params)[1])
    state = tuple(torch.cat([s[i] for s in states]) if states[0][i] is not None else None for i in range(3))
    assert state[2].tolist() == [3, 40]
    outs = []
    for i in range(5):
        tok = [torch.cat([s[x][:, :, n + i:n + i + 1] for s, n in zip(seqs, (3, 40))]) for x in range(3)]
        o, S, z, pos = step(*tok, *state, **params)
        state = (S, z, pos)
        outs.append(o)
    got = torch.cat(outs, 2)
    assert_close("sequence at position 3", got[:1], fulls[0], 1e-5)
    assert_close("sequence at position 40", got[1:], fulls[1], 1e-5)
    assert state[2].tolist() == [8, 45]


# ---------------------------------------------------------------------------------------------
# packed variable-length batches
# ---------------------------------------------------------------------------------------------
LENGTHS = (1, 5, 64, 70)


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("key", ["linear_elu", "cottention", "retention_learned", "based"])
def test_packed_sequences_equal_each_alone(key, layout, monkeypatch):
    spec, mod, fn, _ = module(key)
    poisoned(mod, monkeypatch)
    h = 2
    g = torch.Generator().manual_seed(3)
    params = {n: p.float().to(DEVICE) for n, p in params_of(spec, h, g).items()}
    total = sum(LENGTHS)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    shape = (1, total, h, D) if layout == "bthd" else (1, h, total, D)
    axis = 1 if layout == "bthd" else 2
    x = [rand(g, *shape).float().to(DEVICE).requires_grad_() for _ in range(3)]
    n = len(LENGTHS)
    f = mod.MODULE.feature_width(D)
    s0 = (0.1 * rand(g, n, h, f, D)).abs().float().to(DEVICE).requires_grad_()
    z0 = (0.1 * rand(g, n, h, f)).abs().float().to(DEVICE).requires_grad_() if mod.MODULE.normalised else None
    pos0 = torch.tensor([0, 7, 3, 100], device=DEVICE)
    p_leaf = {k_: p.clone().requires_grad_() for k_, p in params.items()}
    o, (st, zt, pos) = fn(*x, initial_state=(s0, z0, pos0), return_state=True, cu_seqlens=cu, layout=layout,
                          **p_leaf)
    assert pos.tolist() == [p + n_ for p, n_ in zip(pos0.tolist(), LENGTHS)]
    do = rand(g, *o.shape).float().to(DEVICE)
    dst = rand(g, *st.shape).float().to(DEVICE)
    leaves = [*x, s0, *([z0] if z0 is not None else []), *p_leaf.values()]
    got = torch.autograd.grad((o * do).sum() + (st * dst).sum(), leaves)

    outs, states = [], []
    alone = [torch.zeros_like(a) for a in leaves]
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        xi = [xx.detach()[:, a:b] if layout == "bthd" else xx.detach()[:, :, a:b] for xx in x]
        xi = [xx.clone().requires_grad_() for xx in xi]
        si = s0.detach()[i:i + 1].clone().requires_grad_()
        zi = z0.detach()[i:i + 1].clone().requires_grad_() if z0 is not None else None
        pi = {k_: p.clone().requires_grad_() for k_, p in params.items()}
        oi, (sti, zti, posi) = fn(*xi, initial_state=(si, zi, pos0[i:i + 1]), return_state=True, layout=layout,
                                  **pi)
        assert posi.tolist() == [pos.tolist()[i]]
        outs.append(oi)
        states.append((sti, zti))
        doi = do[:, a:b] if layout == "bthd" else do[:, :, a:b]
        li = [*xi, si, *([zi] if zi is not None else []), *pi.values()]
        gi = torch.autograd.grad((oi * doi).sum() + (sti * dst[i:i + 1]).sum(), li)
        for j in range(3):
            (alone[j][:, a:b] if layout == "bthd" else alone[j][:, :, a:b]).copy_(gi[j])
        alone[3][i:i + 1] = gi[3]
        if z0 is not None:
            alone[4][i:i + 1] = gi[4]
        for j in range(len(pi)):
            alone[-len(pi) + j] += gi[-len(pi) + j]
    assert_close("o", o, torch.cat(outs, axis), 1e-5)
    assert_close("final S", st, torch.cat([s for s, _ in states]), 1e-5)
    if z0 is not None:
        assert_close("final z", zt, torch.cat([z for _, z in states]), 1e-5)
    names = ["dq", "dk", "dv", "dS0", *(["dz0"] if z0 is not None else []), *("d" + k_ for k_ in params)]
    for name, a, b in zip(names, got, alone):
        assert_close(name, a, b, 1e-5)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_bidirectional_modules_refuse_states():
    spec = load_spec("linear_elu", causal=False)
    mod = triton_backend.load_module(build_plan(spec, force="linear"))
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    fn = mod.linear_elu_attention
    assert not hasattr(mod, "linear_elu_step")  # a bidirectional module has no decode step; the host refuses one
    for kwargs in (dict(return_state=True), dict(cu_seqlens=torch.tensor([0, 8], device=DEVICE)),
                   dict(initial_state=zeros_state(mod, 1, 2, 16, 16))):
        with pytest.raises(InputError, match="bidirectional.*causal=True"):
            fn(x, x, x, **kwargs)
    with pytest.raises(InputError, match="bidirectional"):
        mod.host.step(mod.MODULE, x[:, :, :1], x[:, :, :1], x[:, :, :1], *zeros_state(mod, 1, 2, 16, 16))
    assert isinstance(InputError("x"), ValueError)


def test_cosformer_with_length_dependent_M_refuses_states():
    spec = load_spec("cosformer")
    plan = build_plan(spec, force="linear")
    mod = triton_backend.load_module(plan)
    assert mod.MODULE.linear.length_terms and not mod.MODULE.stateful
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    for kwargs in (dict(return_state=True), dict(initial_state=zeros_state(mod, 1, 2, 16, 16)),
                   dict(cu_seqlens=torch.tensor([0, 3, 8], device=DEVICE))):
        with pytest.raises(InputError, match=r"final sequence length.*load_spec\(\"cosformer\", M=4096\)"):
            mod.cosformer_attention(x, x, x, **kwargs)
    with pytest.raises(InputError, match=r"M=4096"):
        mod.cosformer_step(x[:, :, :1], x[:, :, :1], x[:, :, :1], *zeros_state(mod, 1, 2, 16, 16))
    with pytest.raises(InputError, match=r"M=4096"):
        triton_backend.step(plan, x[:, :, :1], x[:, :, :1], x[:, :, :1], zeros_state(mod, 1, 2, 16, 16))
    assert mod.cosformer_attention(x, x, x).shape == x.shape  # the stateless call still works


@pytest.mark.parametrize("cu, match", [
    ([1, 4, 8], "must start at 0"), ([0, 5, 3, 8], "strictly increasing"), ([0, 4, 7], "must end at T = 8"),
    ([0, 4, 4, 8], "strictly increasing"), ([0.0, 8.0], "int32/int64"), ([[0, 8]], "1-D"),
], ids=["not-from-0", "decreasing", "not-ending-at-T", "empty-sequence", "float", "2-d"])
def test_malformed_cu_seqlens(cu, match):
    _, mod, fn, _ = module("linear_elu")
    x = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(InputError, match=match):
        fn(x, x, x, cu_seqlens=torch.tensor(cu, device=DEVICE))
    x2 = torch.randn(2, 2, 8, 16, device=DEVICE)
    with pytest.raises(InputError, match="batch size 1"):
        fn(x2, x2, x2, cu_seqlens=torch.tensor([0, 8], device=DEVICE))


def test_malformed_states():
    _, mod, fn, step = module("linear_elu")
    _, mod_r, fn_r, _ = module("retention")
    x = torch.randn(2, 2, 8, 16, device=DEVICE)
    S, z, pos = zeros_state(mod, 2, 2, 16, 16)
    with pytest.raises(InputError, match=r"S must be .* \[2, 2, 16, 16\]"):
        fn(x, x, x, initial_state=(S[:1], z, pos))
    with pytest.raises(InputError, match="S must be"):
        fn(x, x, x, initial_state=(S.half(), z, pos))
    with pytest.raises(InputError, match="z must be"):
        fn(x, x, x, initial_state=(S, None, pos))
    with pytest.raises(InputError, match="pos must be an int64"):
        fn(x, x, x, initial_state=(S, z, pos.int()))
    with pytest.raises(InputError, match="tuple"):
        fn(x, x, x, initial_state=S)
    with pytest.raises(InputError, match="z must be None"):
        fn_r(x, x, x, initial_state=(S, z, pos))
    with pytest.raises(InputError, match="one token"):
        step(x[:, :, :2], x[:, :, :2], x[:, :, :2], S, z, pos)


# ---------------------------------------------------------------------------------------------
# programs split over value blocks: partial dq, dk summed on the host, the normaliser's gradient and z once
# ---------------------------------------------------------------------------------------------
def _everything(fn, spec, mod, causal, g, dv=48, t=70):
    """o, the final state and every gradient (q, k, v, parameters; S0, z0 when causal) of one run."""
    b, h = 2, 1
    q, k = (rand(g, b, h, t, D).float().to(DEVICE).requires_grad_() for _ in range(2))
    v = rand(g, b, h, t, dv).float().to(DEVICE).requires_grad_()
    params = {n: p.float().to(DEVICE).requires_grad_() for n, p in params_of(spec, h, g).items()}
    leaves = [q, k, v, *params.values()]
    if causal:
        f = mod.MODULE.feature_width(D)
        s0 = (0.1 * rand(g, b, h, f, dv)).abs().float().to(DEVICE).requires_grad_()
        z0 = (0.1 * rand(g, b, h, f)).abs().float().to(DEVICE).requires_grad_() if mod.MODULE.normalised else None
        leaves += [s0, *([z0] if z0 is not None else [])]
        o, (st, zt, _) = fn(q, k, v, initial_state=(s0, z0, torch.tensor([3, 50], device=DEVICE)),
                            return_state=True, **params)
        outs = [o, st, *([zt] if zt is not None else [])]
    else:
        outs = [fn(q, k, v, **params)]
    loss = sum((x * rand(g, *x.shape).float().to(DEVICE)).sum() for x in outs)
    return [x.detach() for x in outs], torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("key", ["relu_linear", "cottention", "retention_learned", "based"])
def test_value_blocks_split_matches_one_block(key, causal, monkeypatch):
    """Dv = 48 in blocks of 16 (a small STATE_BUDGET) against one block of 64: outputs, final states and
    every gradient, parameters' and the initial state's included."""
    spec = load_spec(SPECS[key]().to_yaml(), causal=causal)
    mod = triton_backend.load_module(build_plan(spec, force="linear"))
    fn = getattr(mod, f"{spec.name}_attention")
    monkeypatch.setattr(mod.host, "STATE_BUDGET", 1 << 20)
    assert mod.host._blocks(mod.MODULE, 70, D, 48)[2] == 64
    whole = _everything(fn, spec, mod, causal, torch.Generator().manual_seed(11))
    poisoned(mod, monkeypatch)
    monkeypatch.setattr(mod.host, "STATE_BUDGET", 256)
    assert mod.host._blocks(mod.MODULE, 70, D, 48)[2] == 16  # three V blocks
    split = _everything(fn, spec, mod, causal, torch.Generator().manual_seed(11))
    for a, b in zip(whole[0] + list(whole[1]), split[0] + list(split[1])):
        assert_close("split", b, a, 1e-5)


# ---------------------------------------------------------------------------------------------
# the chunk-parallel causal scan (states per chunk, every chunk at once) against the fused one
# ---------------------------------------------------------------------------------------------
def _packed(fn, spec, mod, g, lengths=(5, 64, 70, 1)):
    """o, final states and every gradient of packed sequences (cu_seqlens) with initial states."""
    h, dv = 2, 32
    total, n = sum(lengths), len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k = (rand(g, 1, h, total, D).float().to(DEVICE).requires_grad_() for _ in range(2))
    v = rand(g, 1, h, total, dv).float().to(DEVICE).requires_grad_()
    params = {n_: p.float().to(DEVICE).requires_grad_() for n_, p in params_of(spec, h, g).items()}
    f = mod.MODULE.feature_width(D)
    s0 = (0.1 * rand(g, n, h, f, dv)).abs().float().to(DEVICE).requires_grad_()
    z0 = (0.1 * rand(g, n, h, f)).abs().float().to(DEVICE).requires_grad_() if mod.MODULE.normalised else None
    o, (st, zt, _) = fn(q, k, v, initial_state=(s0, z0, torch.tensor([0, 9, 2, 300], device=DEVICE)),
                        return_state=True, cu_seqlens=cu, **params)
    outs = [o, st, *([zt] if zt is not None else [])]
    loss = sum((x * rand(g, *x.shape).float().to(DEVICE)).sum() for x in outs)
    leaves = [q, k, v, *params.values(), s0, *([z0] if z0 is not None else [])]
    return [x.detach() for x in outs], torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
@pytest.mark.parametrize("key", ["relu_linear", "cottention", "cosformer_M4096", "based", "retention_learned"])
def test_chunk_parallel_scan_matches_fused(key, packed, monkeypatch):
    """host.SCAN = "parallel" (the fused kernels made to fail) gives the fused scan's outputs, final states and
    gradients: the same products in the same order, so equal up to the order of the partial sums."""
    spec, mod, fn, _ = module(key)
    run = _packed if packed else (lambda *a: _everything(*a[:3], True, a[3], dv=48, t=150))
    monkeypatch.setattr(mod.host, "SCAN", "fused")
    fused = run(fn, spec, mod, torch.Generator().manual_seed(12))
    poisoned(mod, monkeypatch)
    monkeypatch.setattr(mod.host, "SCAN", "parallel")

    def refused(*args, **kwargs):
        raise AssertionError("a fused scan kernel was launched")
    for name in ("fwd", "bwd_dq", "bwd_dkv"):  # kernel[grid](...) calls the instance's run
        if getattr(mod.MODULE.linear, name) is not None:  # tensor-power modules have no fused forward
            monkeypatch.setattr(getattr(mod.MODULE.linear, name).kernel, "run", refused)
    parallel = run(fn, spec, mod, torch.Generator().manual_seed(12))
    for a, b in zip(fused[0] + list(fused[1]), parallel[0] + list(parallel[1])):
        assert_close("parallel", b, a, 1e-5)


def test_tensor_power_modules_have_no_fused_forward():
    """Their fused forward spilled registers on sm_90 (attngen aot); the chunk-parallel forward runs instead."""
    for key in ("based", "polynomial2"):
        spec, mod, fn, _ = module(key)
        assert mod.MODULE.linear.fwd is None and mod.MODULE.linear.chunked is not None
        assert not hasattr(mod, f"_{spec.name}_fwd_kernel") and hasattr(mod, f"_{spec.name}_chunk_o_kernel")
    assert module("relu_linear")[1].MODULE.linear.fwd is not None


def test_auto_scan_goes_parallel_for_long_sequences_and_few_programs():
    _, mod, _, _ = module("relu_linear")
    host = mod.host
    assert host._parallel(mod.MODULE, 16, 4096, 64) and not host._parallel(mod.MODULE, 16, 128, 64)
    assert not host._parallel(mod.MODULE, 1024, 4096, 64)  # enough programs: the fused scan
    _, decay, _, _ = module("retention")  # the causal decay class has the chunk-parallel scan too
    assert decay.MODULE.linear.chunked is not None and host._parallel(decay.MODULE, 16, 4096, 64)
    two_sided = triton_backend.load_module(build_plan(load_spec("retention", causal=False), force="linear"))
    assert two_sided.MODULE.linear.chunked is None and not host._parallel(two_sided.MODULE, 16, 4096, 64)


def test_an_unknown_scan_is_an_input_error(monkeypatch):
    _, mod, fn, _ = module("relu_linear")
    monkeypatch.setattr(mod.host, "SCAN", "parralel")
    x = torch.randn(1, 1, 8, D, device=DEVICE)
    with pytest.raises(InputError, match="SCAN"):
        fn(x, x, x)


def test_fp16_wide_features_take_the_chunk_parallel_forward(monkeypatch):
    """fp16 with feature maps of 256+ columns above head dim 64 (cosFormer at 128) spilled in the fused forward on
    sm_90: the host runs the chunk-parallel forward instead (at any length), still equal to the reference."""
    spec, mod, fn, _ = module("cosformer_M4096")
    host = mod.host
    assert not host._fused_forward_fits(mod.MODULE, 128, torch.float16)
    assert host._fused_forward_fits(mod.MODULE, 128, torch.bfloat16) and host._fused_forward_fits(
        mod.MODULE, 64, torch.float16)

    def refused(*args, **kwargs):
        raise AssertionError("the fused forward was launched")
    monkeypatch.setattr(mod.MODULE.linear.fwd.kernel, "run", refused)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 20, 128, generator=g, dtype=torch.float64) for _ in range(3))
    o = fn(*(x.to(DEVICE, torch.float16) for x in (q, k, v)))
    assert_close("o", o.double().cpu(), reference(spec)(q, k, v), 2e-3)
