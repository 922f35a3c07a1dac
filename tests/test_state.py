"""Recurrent states on the torch backend: prefill + decode equals one full forward, state passing between
chunked calls, packed variable-length batches, gradients through the initial state, serving a batch whose
sequences are at different positions, constant state size, and the errors a caller can cause.

Errors are relative RMS (attngen.verify.rel_rms): float32 within 1e-5, float64 within 1e-10."""
import types

import pytest
import torch

import attngen
from attngen import InputError, PlanError
from attngen.runtime.inputs import default_parameters
from attngen.runtime.state import State, cat
from attngen.verify import rel_rms

H, D = 2, 16
FIXED = {"cosformer": {"M": 4096}}  # cosFormer decodes only with M fixed (docs/specs.md)
DECODABLE = ["cosformer", "linear_elu", "relu_linear", "cottention", "retention", "based", "polynomial2"]
ROWSUM = {"cosformer", "linear_elu", "relu_linear", "based", "polynomial2"}


def spec_of(name, **kw):
    return attngen.load_spec(name, causal=True, **FIXED.get(name, {}), **kw)


def op_of(name, **kw):
    return attngen.compile(spec_of(name), backend="torch", **kw)


def qkv(b, t, dtype=torch.float32, d=D, requires_grad=False):
    return [torch.randn(b, H, t, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def sl(xs, a, b):
    return [x[:, :, a:b] for x in xs]


def random_state(op, batch, d=D, dtype=torch.float64, pos=None, requires_grad=False):
    """A state with random S, z (z > 0, as a sum of non-negative features would be) and positions."""
    s = op.init_state(batch, H, d, d, dtype=dtype)
    S = torch.randn_like(s.S).requires_grad_(requires_grad)
    z = None if s.z is None else (torch.rand_like(s.z) + 0.5).requires_grad_(requires_grad)
    pos = torch.tensor(pos if pos is not None else [3 * i + 2 for i in range(batch)], dtype=torch.int64)
    return State(S, z, pos, s.spec_hash)


# ---------------------------------------------------------------------------------------------
# prefill with return_state, then step(): equal to one forward over the whole sequence
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t2", [1, 17], ids=lambda t: f"T2-{t}")
@pytest.mark.parametrize("t1", [0, 1, 63], ids=lambda t: f"T1-{t}")
@pytest.mark.parametrize("name", DECODABLE)
def test_prefill_then_decode_equals_full_forward(name, t1, t2):
    op = op_of(name)
    x = qkv(2, t1 + t2)
    full = op(*x)  # the planner's own ordering at this length
    if t1 == 0:
        state, outs = op.init_state(2, H, D, D), []
    else:
        o, state = op(*sl(x, 0, t1), return_state=True)
        outs = [o]
    for t in range(t1, t1 + t2):
        o, state = op.step(*sl(x, t, t + 1), state)
        outs.append(o)
    err = rel_rms(torch.cat(outs, 2), full)
    assert err <= 1e-5, f"{name}: prefill {t1} + {t2} steps vs full forward: {err:.1e}"
    assert state.pos.tolist() == [t1 + t2] * 2
    _, whole = op(*x, return_state=True)
    assert rel_rms(state.S, whole.S) <= 1e-5
    if name in ROWSUM:
        assert rel_rms(state.z, whole.z) <= 1e-5
    else:
        assert state.z is None and whole.z is None


@pytest.mark.parametrize("name", DECODABLE)
def test_return_state_output_matches_reference_float64(name):
    """With return_state the op runs the linear ordering even where the planner picks quadratic (T = 20)."""
    op = op_of(name)
    x = qkv(2, 20, torch.float64)
    o, state = op(*x, return_state=True)
    assert op.ordering_for(D, 20).value == "quadratic"
    assert rel_rms(o, attngen.reference(op.spec)(*x)) <= 1e-10
    assert state.S.dtype == torch.float64 and state.pos.tolist() == [20, 20]


@pytest.mark.parametrize("plan", [None, "linear", "recurrent"])
@pytest.mark.parametrize("name", DECODABLE)
def test_chunked_calls_with_initial_state_equal_one_long_run(name, plan):
    """Three calls carrying the state (pieces not aligned to the chunk of 16) equal one call over all."""
    chunked = op_of(name, plan=plan, chunk=16)
    x = qkv(2, 150)
    whole = op_of(name)(*x)
    state, outs = None, []
    for a, b in ((0, 37), (37, 100), (100, 150)):
        o, state = chunked(*sl(x, a, b), initial_state=state, return_state=True)
        outs.append(o)
    assert rel_rms(torch.cat(outs, 2), whole) <= 1e-5
    _, final = op_of(name, plan="linear", chunk=16)(*x, return_state=True)
    assert rel_rms(state.S, final.S) <= 1e-5
    assert state.pos.tolist() == [150, 150]


# ---------------------------------------------------------------------------------------------
# Cottention: the paper's RNN form (docs/variants.md), the recurrent ordering and the parallel form agree
# ---------------------------------------------------------------------------------------------
def cottention_rnn_seed(q, k, v, m):
    """Cottention's RNN form: S_t = S_{t-1} + k_hat_t v'_t^T, o_t = S_t^T q_hat_t,
    v'_j = v_j / max((j+1)**sigmoid(m), 1)."""
    qh, kh = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    c = torch.arange(1, q.shape[2] + 1, dtype=q.dtype).view(1, 1, -1, 1)
    vs = v / torch.clamp(c ** torch.sigmoid(m).view(1, -1, 1, 1), min=1)
    S = torch.zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=q.dtype)
    outs = []
    for t in range(q.shape[2]):
        S = S + kh[:, :, t, :, None] * vs[:, :, t, None, :]
        outs.append((S.transpose(-1, -2) @ qh[:, :, t, :, None])[..., 0])
    return torch.stack(outs, 2)


def test_cottention_recurrent_equals_parallel_and_seed():
    op = op_of("cottention")
    x = qkv(2, 70, torch.float64)
    m = torch.tensor([0.5, -1.3], dtype=torch.float64)
    seed = cottention_rnn_seed(*x, m)
    state, steps = op.init_state(2, H, D, D, dtype=torch.float64), []
    for t in range(70):
        o, state = op.step(*sl(x, t, t + 1), state, m=m)
        steps.append(o)
    steps = torch.cat(steps, 2)
    for name, out in (("step", steps), ("recurrent", op_of("cottention", plan="recurrent")(*x, m=m)),
                      ("parallel (quadratic)", op_of("cottention", plan="quadratic")(*x, m=m)),
                      ("parallel (linear)", op_of("cottention", plan="linear")(*x, m=m))):
        assert rel_rms(out, seed) <= 1e-10, f"{name} vs the seed RNN: {rel_rms(out, seed):.1e}"
    assert rel_rms(op_of("cottention", plan="quadratic")(*x), seed) > 1e-3  # m is used


# ---------------------------------------------------------------------------------------------
# gradients through the initial state
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["linear", "recurrent"])
@pytest.mark.parametrize("name", ["linear_elu", "retention", "cottention", "cosformer"])
def test_gradcheck_initial_state(name, plan):
    d = 3
    op = op_of(name, plan=plan, chunk=2)
    x = qkv(2, 5, torch.float64, d=d)
    start = random_state(op, 2, d=d, pos=[0, 6])
    leaves = [start.S.requires_grad_()] + ([start.z.requires_grad_()] if start.z is not None else [])

    def fn(*tensors):
        z = tensors[1] if start.z is not None else None
        o, s = op(*x, initial_state=State(tensors[0], z, start.pos, start.spec_hash), return_state=True)
        return (o, s.S) if z is None else (o, s.S, s.z)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)
    o = op(*x, initial_state=start)
    assert rel_rms(o, op(*x, initial_state=State(start.S * 0, None if start.z is None else start.z * 0,
                                                start.pos, start.spec_hash))) > 1e-3  # the state is used


def test_gradcheck_step():
    op = op_of("linear_elu")
    x = qkv(2, 1, torch.float64, d=3)
    start = random_state(op, 2, d=3, pos=[4, 0])

    def fn(S, z, q):
        o, s = op.step(q, x[1], x[2], State(S, z, start.pos, start.spec_hash))
        return o, s.S, s.z

    assert torch.autograd.gradcheck(fn, [start.S.requires_grad_(), start.z.requires_grad_(),
                                         x[0].clone().requires_grad_()], eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# packed variable-length batches
# ---------------------------------------------------------------------------------------------
LENGTHS = (1, 5, 64, 70)  # chunk 64: lengths below, at and above it, and a single token


@pytest.mark.parametrize("lengths", [(1, 5, 64, 150), LENGTHS], ids=["loop", "padded-batch"])
@pytest.mark.parametrize("with_state", [True, False], ids=["initial-state", "fresh"])
@pytest.mark.parametrize("name", ["linear_elu", "retention", "cottention", "cosformer"])
def test_varlen_equals_each_sequence_alone(name, with_state, lengths, monkeypatch):
    """Packed sequences equal each sequence alone; lengths of similar size run as one right-padded batch (no
    loop over sequences) unless the spec needs each sequence apart (a decay's state; cosFormer runs here with a
    fixed M)."""
    from attngen.runtime.torch import packed as packed_lib
    pads = []
    real_pad = packed_lib.pad
    monkeypatch.setattr(packed_lib, "pad", lambda *a: pads.append(1) or real_pad(*a))
    op = op_of(name)
    n = len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = qkv(1, int(cu[-1]), torch.float64, requires_grad=True)
    start = random_state(op, n, pos=[0, 9, 1, 100], requires_grad=True) if with_state else None
    upstream = torch.randn(1, H, int(cu[-1]), D, dtype=torch.float64)

    o, final = op(*packed, cu_seqlens=cu, initial_state=start, return_state=True)
    leaves = packed + ([start.S] + ([start.z] if start.z is not None else []) if with_state else [])
    grads = torch.autograd.grad((o * upstream).sum() + final.S.sum(), leaves)

    alone = [x.detach().clone().requires_grad_() for x in packed]
    first = [x.detach().clone().requires_grad_() for x in leaves[3:]]
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = None
        if with_state:
            init = State(first[0][i:i + 1], first[1][i:i + 1] if len(first) > 1 else None, start.pos[i:i + 1],
                         start.spec_hash)
        oi, si = op(*sl(alone, a, b), initial_state=init, return_state=True)
        outs.append(oi)
        finals.append(si)
    o_ref, final_ref = torch.cat(outs, 2), cat(finals)
    grads_ref = torch.autograd.grad((o_ref * upstream).sum() + final_ref.S.sum(), alone + first)
    assert rel_rms(o, o_ref) <= 1e-12
    assert rel_rms(final.S, final_ref.S) <= 1e-12
    assert final.pos.tolist() == final_ref.pos.tolist() == [p + n for p, n in zip(
        start.pos.tolist() if with_state else [0] * n, lengths)]
    batched = lengths == LENGTHS and name != "retention"  # return_state: a decay's state loops
    assert bool(pads) == batched
    for g, g_ref, leaf in zip(grads, grads_ref, ["q", "k", "v", "S", "z"]):
        assert rel_rms(g, g_ref) <= 1e-12, f"d{leaf}"
    # and each sequence alone is right: against the reference from position 0 (fresh states only)
    if not with_state:
        ref = attngen.reference(op.spec)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert rel_rms(o[:, :, a:b], ref(*sl([x.detach() for x in packed], a, b))) <= 1e-10


@pytest.mark.parametrize("name", ["softmax", "retention", "based", "cosformer"])
def test_varlen_without_state_runs_one_padded_batch(name, monkeypatch):
    """Without a state, similar lengths run as one right-padded batch (causal: the padding is never read), by
    the ordering the planner picks at the longest length; each sequence equals the reference alone. cosFormer's
    default M = max(n_q, n_k) differs per sequence: it loops."""
    from attngen.runtime.torch import packed as packed_lib
    pads = []
    real_pad = packed_lib.pad
    monkeypatch.setattr(packed_lib, "pad", lambda *a: pads.append(1) or real_pad(*a))
    op = attngen.compile(name, backend="torch")
    cu = torch.tensor([0, 30, 71, 96])
    x = qkv(1, 96, torch.float64, requires_grad=True)
    o = op(*x, cu_seqlens=cu)
    assert bool(pads) == (name != "cosformer")
    ref = attngen.reference(op.spec)
    up = torch.randn(o.shape, dtype=torch.float64)
    grads = torch.autograd.grad((o * up).sum(), x)
    for a, b in ((0, 30), (30, 71), (71, 96)):
        alone = [y[:, :, a:b].detach().clone().requires_grad_() for y in x]
        r = ref(*alone)
        assert rel_rms(o[:, :, a:b], r) <= 1e-10
        for g, gr in zip(grads, torch.autograd.grad((r * up[:, :, a:b]).sum(), alone)):
            assert rel_rms(g[:, :, a:b], gr) <= 1e-10


def test_varlen_without_state_any_spec():
    """Packed sequences of a spec without a state (softmax) run each sequence by its own plan."""
    op = attngen.compile("softmax", backend="torch")
    cu = torch.tensor([0, 3, 40, 41])
    x = qkv(1, 41, torch.float64)
    o = op(*x, cu_seqlens=cu)
    ref = attngen.reference(op.spec)
    for a, b in ((0, 3), (3, 40), (40, 41)):
        assert rel_rms(o[:, :, a:b], ref(*sl(x, a, b))) <= 1e-10
    assert rel_rms(o, ref(*x)) > 1e-3  # packing is not one long sequence


# ---------------------------------------------------------------------------------------------
# serving: a batch whose sequences are at different positions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cosformer", "cottention", "retention", "based"])
def test_step_batch_at_different_positions(name):
    op = op_of(name)
    prefix = (0, 5, 23)
    seqs = [qkv(1, p + 4) for p in prefix]
    states = []
    for p, x in zip(prefix, seqs):
        states.append(op.init_state(1, H, D, D) if p == 0 else op(*sl(x, 0, p), return_state=True)[1])
    state = cat(states)
    assert state.pos.tolist() == list(prefix)
    outs = []
    for t in range(4):
        step = [torch.cat([x[i][:, :, p + t:p + t + 1] for x, p in zip(seqs, prefix)]) for i in range(3)]
        o, state = op.step(*step, state)
        outs.append(o)
    outs = torch.cat(outs, 2)  # [3, H, 4, D]
    for n, (p, x) in enumerate(zip(prefix, seqs)):
        full = op(*x)
        assert rel_rms(outs[n:n + 1], full[:, :, p:]) <= 1e-5, f"sequence {n} at position {p}"
    assert state.pos.tolist() == [p + 4 for p in prefix]


def test_state_size_is_constant_in_tokens():
    op = op_of("linear_elu")
    state = op.init_state(1, H, D, D)
    x = qkv(1, 1000)
    sizes = {}
    with torch.no_grad():
        for t in range(1000):
            _, state = op.step(*sl(x, t, t + 1), state)
            if t + 1 in (1, 1000):
                sizes[t + 1] = state.nbytes()
    assert sizes[1] == sizes[1000] == (H * D * D + H * D) * 4 + 8
    assert state.pos.tolist() == [1000]


def test_layout_bthd_step():
    op = attngen.compile(spec_of("retention"), backend="torch", layout="bthd")
    x = [torch.randn(2, 9, H, D) for _ in range(3)]
    o, state = op(*[t[:, :8] for t in x], return_state=True)
    o9, _ = op.step(*[t[:, 8:] for t in x], state)
    assert o9.shape == (2, 1, H, D)
    assert rel_rms(torch.cat([o, o9], 1), op(*x)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# what has no state, and the errors a caller can cause
# ---------------------------------------------------------------------------------------------
def test_cosformer_with_length_dependent_M_says_fix_M():
    op = attngen.compile("cosformer", backend="torch")  # M = max(n_q, n_k)
    x = qkv(1, 8)
    state = op_of("cosformer").init_state(1, H, D, D)
    calls = [lambda: op(*x, return_state=True), lambda: op(*x, initial_state=state),
             lambda: op.init_state(1, H, D, D), lambda: op.step(*sl(x, 0, 1), state)]
    for call in calls:
        with pytest.raises(InputError, match=r"depend on the final sequence length.*M = Max\(n_k, n_q\)"
                                             r".*load_spec\('cosformer', M=4096\)"):
            call()
    op(*x)  # the whole-sequence forward still works


def test_length_dependence_is_found_from_the_plan_not_the_name():
    spec = attngen.load_spec({"name": "my_decay", "causal": True, "similarity": "dot(relu(q), relu(k))",
                              "reweight": "exp(-(i - j) / L)", "normalize": "none", "constants": {"L": "2 * n"}})
    with pytest.raises(InputError, match=r"constant L = 2\*n_k.*load_spec\('my_decay', L=4096\)"):
        attngen.compile(spec, backend="torch").init_state(1, H, D, D)
    fixed = attngen.compile(attngen.load_spec(spec, L=64), backend="torch")
    assert fixed.init_state(1, H, D, D).S.shape == (1, H, D, D)


@pytest.mark.parametrize("name,match", [("softmax", "no linear"), ("alibi", "no linear")])
def test_quadratic_only_specs_have_no_state(name, match):
    op = attngen.compile(name, backend="torch")
    with pytest.raises(InputError, match=match):
        op(*qkv(1, 8), return_state=True)
    with pytest.raises(InputError, match=match):
        op.init_state(1, H, D, D)


def test_bidirectional_has_no_state():
    op = attngen.compile(attngen.load_spec("linear_elu", causal=False), backend="torch")
    x = qkv(1, 8)
    for call in (lambda: op.init_state(1, H, D, D), lambda: op(*x, return_state=True),
                 lambda: op.step(*sl(x, 0, 1), None)):
        with pytest.raises(InputError, match="bidirectional.*causal=True"):
            call()


def _bad_state(what):
    op = op_of("linear_elu")
    good = op.init_state(2, H, D, D)
    return {
        "other-spec": op_of("relu_linear").init_state(2, H, D, D),
        "batch": op.init_state(3, H, D, D),
        "heads": op.init_state(2, H + 1, D, D),
        "dtype": op.init_state(2, H, D, D, dtype=torch.float64),
        "device": State(good.S.to("meta"), good.z.to("meta"), good.pos.to("meta"), good.spec_hash),
        "no-z": State(good.S, None, good.pos, good.spec_hash),
        "not-a-state": {"S": good.S},
    }[what]


BAD_STATES = {"other-spec": "another spec", "batch": r"shape \[3, 2, 16, 16\]; expected \[2, 2, 16, 16\]",
              "heads": "expected", "dtype": "dtype torch.float64; expected torch.float32",
              "device": "on meta; expected cpu", "no-z": "normalises by row sums, so z must be",
              "not-a-state": "expected a State"}


@pytest.mark.parametrize("what", BAD_STATES)
@pytest.mark.parametrize("where", ["initial_state", "step"])
def test_bad_state_raises_input_error(what, where):
    op = op_of("linear_elu")
    x = qkv(2, 6)
    with pytest.raises(InputError, match=BAD_STATES[what]):
        if where == "step":
            op.step(*sl(x, 0, 1), _bad_state(what))
        else:
            op(*x, initial_state=_bad_state(what))


BAD_CU = {"start": ([1, 4, 10], "start at 0"), "not-increasing": ([0, 4, 4, 10], "strictly increasing"),
          "decreasing": ([0, 6, 4, 10], "strictly increasing"), "end": ([0, 4, 9], "end at T = 10"),
          "float": (torch.tensor([0.0, 4.0, 10.0]), "int32/int64 tensor"), "2d": (torch.tensor([[0, 4, 10]]), "1-D"),
          "list": ([0, 4, 10], "int32/int64 tensor"), "one-entry": ([0], "at least 2")}


@pytest.mark.parametrize("what", BAD_CU)
def test_bad_cu_seqlens_raise_input_error(what):
    op = op_of("linear_elu")
    cu, match = BAD_CU[what]
    if isinstance(cu, list) and what != "list":
        cu = torch.tensor(cu)
    with pytest.raises(InputError, match=match):
        op(*qkv(1, 10), cu_seqlens=cu, return_state=True)


def test_cu_seqlens_needs_batch_one_and_a_state_per_sequence():
    op = op_of("linear_elu")
    with pytest.raises(InputError, match="batch size 1"):
        op(*qkv(2, 10), cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(InputError, match=r"shape \[1, 2, 16, 16\]; expected \[2, 2, 16, 16\]"):
        op(*qkv(1, 10), cu_seqlens=torch.tensor([0, 4, 10]), initial_state=op.init_state(1, H, D, D))


def test_step_needs_one_token():
    op = op_of("linear_elu")
    with pytest.raises(InputError, match="one token per sequence"):
        op.step(*qkv(2, 3), op.init_state(2, H, D, D))


def test_triton_step_without_a_generated_step_is_a_plan_error(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    from attngen.runtime.triton import loader as triton_backend
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "load_module", lambda plan: types.SimpleNamespace())
    op = attngen.compile(spec_of("linear_elu"), backend="triton")
    with pytest.raises(PlanError, match="no linear_elu_step"):
        op.step(*qkv(1, 1), op.init_state(1, H, D, D))


@pytest.mark.parametrize("name", ["linear_elu", "retention", "cottention"])
def test_triton_backend_states_through_the_op(name, monkeypatch, tmp_path):
    """The same State API on the generated kernels (interpreter on CPU): prefill, step, continue, packed
    sequences, and the gradient of the initial state against the torch backend (<= 1e-4 fp32)."""
    pytest.importorskip("triton", reason="triton is not installed")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tri, ref = attngen.compile(spec_of(name), backend="triton"), op_of(name)
    x = [t.to(device) for t in qkv(1, 40)]
    o1, s1 = tri(*sl(x, 0, 30), return_state=True)
    o2, s2 = tri.step(*sl(x, 30, 31), s1)
    o3, s3 = tri(*sl(x, 31, 40), initial_state=s2, return_state=True)
    assert isinstance(s3, State) and s3.pos.tolist() == [40]
    full = ref(*[t.cpu() for t in x])
    assert rel_rms(torch.cat([o1, o2, o3], 2).cpu(), full) <= 1e-4
    start = random_state(ref, 1, dtype=torch.float32, pos=[5], requires_grad=True)
    up = torch.randn(1, H, 40, D)
    leaves = [start.S] + ([start.z] if start.z is not None else [])
    on_device = State(*(None if t is None else t.to(device) for t in (start.S, start.z, start.pos)), start.spec_hash)
    g_tri = torch.autograd.grad((tri(*x, initial_state=on_device).cpu() * up).sum(), leaves)
    g_ref = torch.autograd.grad((ref(*[t.cpu() for t in x], initial_state=start) * up).sum(), leaves)
    for a, b in zip(g_tri, g_ref):
        assert rel_rms(a, b) <= 1e-4
    cu = torch.tensor([0, 1, 17, 40], device=device)
    assert rel_rms(tri(*x, cu_seqlens=cu).cpu(), ref(*[t.cpu() for t in x], cu_seqlens=cu.cpu())) <= 1e-4


def test_default_parameters_and_state_dtype_follow_the_inputs():
    op = op_of("cottention")
    m = default_parameters(op.spec, H, torch.float64)["m"]
    x = qkv(1, 5, torch.float64)
    o, s = op(*x, return_state=True, m=m)
    assert s.S.dtype == torch.float64 and s.z is None
    assert rel_rms(o, op(*x)) <= 1e-12  # m defaults to its init (the whole-sequence call runs quadratic)


def test_step_hot_path_rechecks_what_changed(monkeypatch):
    """op.step skips the state check for the State it returned (same input signature), and checks again when the
    state's tensors were replaced, parameters are passed, or the inputs change shape; results stay exact."""
    from attngen.runtime import state as state_lib
    op = attngen.compile("linear_elu", backend="torch")
    checks = []
    real = state_lib.check
    monkeypatch.setattr(state_lib, "check", lambda *a, **kw: checks.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    _, st = op(q[:, :, :4], k[:, :, :4], v[:, :, :4], return_state=True)
    outs = []
    for t in range(4, 12):
        o, st = op.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st)
        outs.append(o)
    assert len(checks) == 1  # the state from return_state=True only
    gold = attngen.reference("linear_elu")(q, k, v)[:, :, 4:]
    torch.testing.assert_close(torch.cat(outs, 2), gold, rtol=1e-10, atol=1e-10)
    st.S = st.S.clone()  # a replaced tensor: checked again
    op.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], st)
    assert len(checks) == 2
    bad = State(st.S[:, :1], st.z, st.pos, st.spec_hash)  # a malformed state never takes the hot path
    bad.checked = st.checked
    with pytest.raises(InputError):
        op.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], bad)
    with pytest.raises(InputError):  # a new input shape is checked in full
        op.step(q[:, :1, :1], k[:, :1, :1], v[:, :1, :1], st)
    with pytest.raises(InputError, match="State"):  # not a State at all, after a hot step: an error, no traceback
        op.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], (st.S, st.z, st.pos))


def test_step_hot_path_checks_positions_past_max_length():
    op = attngen.compile(attngen.load_spec("cosformer", M=6), backend="torch")
    st = op.init_state(1, 2, 8, 8)
    x = torch.randn(1, 2, 1, 8)
    for _ in range(6):
        _, st = op.step(x, x, x, st)
    with pytest.raises(InputError, match="max_length|M"):
        op.step(x, x, x, st)
