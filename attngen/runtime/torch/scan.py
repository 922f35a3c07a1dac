"""The causal linear scan on a CPU (or any torch device) with a hand-derived backward: docs/derivations.md
sections 3, 4 and 8 in batched torch matmuls.

    out, final = causal_scan(qf, kf, v, chunk, lg=None, strict=False, initial=None)

qf, kf [B, H, T, F], v [B, H, T, E], lg = log(gamma) [1, H, 1, 1] (<= 0) or None, initial [B, H, F, E] or None.
out [B, H, T, E] = sum_{j <= i} gamma**(i-j) (Q'_i . K'_j) V_j (+ gamma**(i+1) Q'_i S_0), final = the state after
the last token. ``strict`` drops the diagonal (j < i; the anti-causal half of a two-sided decay).

The sequence runs in groups of GROUP_TOKENS tokens (chunks of ``chunk`` rows, all chunks of a group and every
batch element and head in one batched matmul each), the state carried from group to group: temporaries are
the size of a group at every length. A short last chunk runs as a group of its own with its own chunk size, so
every power of gamma has an exponent in [0, GROUP_TOKENS] (never gamma**-j). The forward and the backward are
torch.library custom ops (attngen::torch_scan, attngen::torch_scan_bwd; one opaque node each under torch.compile,
whatever the length). The backward recomputes each group from the state before it (kept per group bound:
[groups + 1, B, H, F, E]) and carries the state gradient backwards, so autograd never records the chunk loop: time
and memory are linear in T.
dL/dlog(gamma) (a learnable gamma) comes from one more forward sweep with the distance-weighted state of
derivations section 4.
"""
from __future__ import annotations

from typing import Optional

import torch

GROUP_TOKENS = 256  # tokens per group: the chunks of a group run in one batched matmul; a group's tiles stay
# in a core's L2 cache (1024 ran 10-30% slower forward and backward at T = 4k and 16k on this project's CPU)


def causal_scan(qf, kf, v, chunk: int, lg=None, strict: bool = False, initial=None, scale: float = 1.0):
    """(out [B, H, T, E], the state after the last token [B, H, F, E]); see the module docstring. ``scale``: a
    number the query features are multiplied by (dot(q, k)/sqrt(d) passes q as it is and 1/sqrt(d) here): applied
    inside each group's products, so no pass over the whole of q, forward or backward. A chunk longer than T runs
    as one short chunk of T rows."""
    out, final, _ = scan_op(qf, kf, v, lg, initial, int(chunk), bool(strict), float(scale))
    return out, final


# The scan as two torch.library custom ops: under torch.compile each is one opaque node whose fake kernel gives
# shapes symbolic in T, so the Python loops over groups of chunks are never traced and one graph serves every
# length; eagerly the same ops run (autograd through register_autograd, the backward op the hand-derived one).
@torch.library.custom_op("attngen::torch_scan", mutates_args=())
def scan_op(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, lg: Optional[torch.Tensor],
            initial: Optional[torch.Tensor], chunk: int, strict: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, final state, the states at the groups' bounds [groups + 1, B, H, F, E]: before each group (what the
    backward recomputes from), then the final state again. One row more than the groups: a symbolic length whose
    count could be 1 would be guarded on (size-1 dims are special to contiguity), so one graph per count."""
    return _scan_forward(qf, kf, v, lg, initial, chunk, strict, scale)


@scan_op.register_fake
def _(qf, kf, v, lg, initial, chunk, strict, scale):
    b, h, t, f = qf.shape
    e = v.shape[-1]
    return qf.new_empty(b, h, t, e), qf.new_empty(b, h, f, e), qf.new_empty(group_count(t, chunk) + 1, b, h, f, e)


@torch.library.custom_op("attngen::torch_scan_bwd", mutates_args=())
def scan_bwd_op(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor, lg: Optional[torch.Tensor],
                initial: Optional[torch.Tensor], starts: torch.Tensor, dout: torch.Tensor,
                dfinal: Optional[torch.Tensor], chunk: int, strict: bool, scale: float,
                need_lg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq', dk', dv, dlog(gamma) (an empty tensor unless ``need_lg`` and a decay), d initial state [B, H, F, E] in
    the initial state's dtype (q's without one))."""
    return _scan_backward(qf, kf, v, lg, initial, starts, dout, dfinal, chunk, strict, scale, need_lg)


@scan_bwd_op.register_fake
def _(qf, kf, v, lg, initial, starts, dout, dfinal, chunk, strict, scale, need_lg):
    b, h, _, f = qf.shape
    dlg = torch.empty_like(lg) if need_lg and lg is not None else qf.new_empty(0)
    dinit = qf.new_empty(b, h, f, v.shape[-1], dtype=qf.dtype if initial is None else initial.dtype)
    return torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v), dlg, dinit


def _scan_setup(ctx, inputs, output):
    qf, kf, v, lg, initial, chunk, strict, scale = inputs
    ctx.save_for_backward(qf, kf, v, lg, initial, output[2])
    ctx.chunk, ctx.strict, ctx.scale = chunk, strict, scale


def _scan_grad(ctx, dout, dfinal, _dstarts):
    qf, kf, v, lg, initial, starts = ctx.saved_tensors
    dout = torch.zeros_like(v) if dout is None else dout  # groups are made contiguous one at a time
    need_lg = lg is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dlg, dinit = scan_bwd_op(qf, kf, v, lg, initial, starts, dout, dfinal, ctx.chunk, ctx.strict,
                                         ctx.scale, need_lg)
    return (dq, dk, dv, dlg if need_lg else None, dinit if initial is not None and ctx.needs_input_grad[4] else None,
            None, None, None)


scan_op.register_autograd(_scan_grad, setup_context=_scan_setup)


def group_count(t, chunk: int):
    """len(_segments(t, chunk)) as arithmetic on t (a symbolic length under torch.compile: no guard on its value):
    the groups of full chunks, plus one for a short last chunk."""
    group = max(1, GROUP_TOKENS // chunk) * chunk
    full = t // chunk * chunk
    return (full + group - 1) // group + (t - full + chunk - 1) // chunk


class _Weights:
    """The powers of gamma of one chunk size c and g chunks per group: in-chunk weights w (the causal mask
    without a decay), query and key factors qd, kd and the state's decay over a chunk gc (None without), and
    for the distance-weighted sweep the chunk-to-chunk matrix m [H, g + 1, g] (gamma**(C(i-1-j)) for j < i)
    with head [H, g + 1, 1] = gamma**(C i) (None without a decay)."""

    def __init__(self, lg, c: int, g: int, strict: bool, like: torch.Tensor):
        dtype, device = like.dtype, like.device
        pos = torch.arange(c, device=device)
        diff = pos[:, None] - pos[None, :]
        allowed = diff > 0 if strict else diff >= 0
        if lg is None:
            self.w = allowed.to(dtype)  # [C, C]
            self.qd = self.kd = self.gc = self.m = self.head = None
            return
        blocks = torch.arange(g + 1, device=device)
        lag = blocks[:, None] - 1 - blocks[None, :g]  # i - 1 - j: chunk j's sum reaches the state before chunk i
        lgc = lg.to(dtype).unsqueeze(2)  # [1, H, 1, 1, 1]
        self.w = torch.where(allowed, torch.exp(lgc * diff.clamp_min(0).to(dtype)), 0.0)  # [1, H, 1, C, C]
        self.qd = torch.exp(lgc * (pos + 1).to(dtype)[:, None])  # gamma**(a+1) [1, H, 1, C, 1]
        self.kd = torch.exp(lgc * (c - 1 - pos).to(dtype)[:, None])  # gamma**(C-1-b) [1, H, 1, C, 1]
        self.gc = torch.exp(lg.to(dtype) * c)  # gamma**C [1, H, 1, 1]: the state's decay over a chunk
        lgh = lg.to(dtype).reshape(-1, 1, 1)  # [H, 1, 1]
        self.m = torch.where(lag >= 0, torch.exp(lgh * (c * lag.clamp_min(0)).to(dtype)), 0.0)  # [H, g+1, g]
        self.head = torch.exp(lgh * (c * blocks).to(dtype)[:, None])  # gamma**(C i) [H, g + 1, 1]


def _segments(t: int, c: int):
    """(start, chunk size, chunks) of the groups covering t tokens: groups of full chunks, then the short tail."""
    group = max(1, GROUP_TOKENS // c) * c
    full = t // c * c
    out = [(s, c, (min(full, s + group) - s) // c) for s in range(0, full, group)]
    if t > full:
        out.append((full, t - full, 1))
    return out


def _states(kg, vg, state, w: _Weights, g: int):
    """The states before each of the g chunks of a group [B, H, g, F, E] and after the group, from the state
    before it: S_(c+1) = gamma**C S_c + (gamma**(C-1-b) K'_c)^T V_c, one chunk at a time (g small adds; a cumsum
    along the chunk dim is several times slower on a CPU, a mixing matmul twice as slow)."""
    kv = (kg if w.kd is None else kg * w.kd).transpose(-1, -2) @ vg  # [B, H, g, F, E]: each chunk's sum
    states = torch.empty_like(kv)
    for i in range(g):
        states[:, :, i] = state
        state = state + kv[:, :, i] if w.gc is None else torch.addcmul(kv[:, :, i], state, w.gc)
    return states, state


def _forward_group(qg, kg, vg, state, w: _Weights, g: int, scale: float):
    """One group of g chunks [B, H, g, C, *] from the state before it: (out [B, H, g, C, E], the state after
    the group); the query features are ``scale`` * qg."""
    b, h, _, c, f = qg.shape
    e = vg.shape[-1]
    states, after = _states(kg, vg, state, w, g)
    scores = (qg @ kg.transpose(-1, -2)).mul_(w.w)  # [B, H, g, C, C]
    inter = qg @ states
    if w.qd is not None:
        inter.mul_(w.qd)
    out = torch.baddbmm(inter.view(-1, c, e), scores.view(-1, c, c), vg.reshape(-1, c, e), beta=scale, alpha=scale)
    return out.view(b, h, g, c, e), after


def _chunks(x, t0: int, c: int, g: int):
    """Rows t0 .. t0 + g c of x [B, H, T, D] as g chunks [B, H, g, C, D], contiguous: batched matmuls over a
    slice whose heads are T rows apart run a third slower than over a copy."""
    b, h, _, d = x.shape
    return x[:, :, t0:t0 + g * c].contiguous().view(b, h, g, c, d)


def _memo(make):
    """``make(c, g)`` remembered per (c, g) for one call (a plain dict: torch.compile traces it, not an lru_cache)."""
    cache = {}

    def get(c, g):
        if (c, g) not in cache:
            cache[c, g] = make(c, g)
        return cache[c, g]
    return get


def _scan_forward(qf, kf, v, lg, initial, chunk: int, strict: bool, scale: float):
    """The forward sweep: (out, the state after the last token, the state before each group)."""
    b, h, t, f = qf.shape
    e = v.shape[-1]
    weights = _memo(lambda c, g: _Weights(lg, c, g, strict, qf))
    out = qf.new_empty(b, h, t, e)
    state = qf.new_zeros(b, h, f, e) if initial is None else initial.to(qf.dtype)
    starts = qf.new_empty(group_count(t, chunk) + 1, b, h, f, e)
    for n, (t0, c, g) in enumerate(_segments(t, chunk)):
        starts[n] = state
        o, state = _forward_group(_chunks(qf, t0, c, g), _chunks(kf, t0, c, g), _chunks(v, t0, c, g), state,
                                  weights(c, g), g, scale)
        out[:, :, t0:t0 + g * c] = o.view(b, h, g * c, e)
    starts[-1] = state
    return out, state.clone() if state is initial else state, starts  # an output never aliases an input


def _scan_backward(qf, kf, v, lg, initial, starts, dout, dfinal, chunk: int, strict: bool, scale: float,
                   need_lg: bool):
    """The backward sweep, group by group from the last, each recomputed from the state before it."""
    b, h, t, f = qf.shape
    e = v.shape[-1]
    weights = _memo(lambda c, g: _Weights(lg, c, g, strict, qf))
    grad = qf.new_zeros(b, h, f, e) if dfinal is None else dfinal.to(qf.dtype).clone()
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(v)
    for (t0, c, g), s_in in reversed(list(zip(_segments(t, chunk), starts))):
        w = weights(c, g)
        qg, kg, vg, dg = (_chunks(x, t0, c, g) for x in (qf, kf, v, dout))
        states, _ = _states(kg, vg, s_in, w, g)
        qdo = (qg if w.qd is None else qg * w.qd).transpose(-1, -2) @ dg  # [B, H, g, F, E]
        if scale != 1:
            qdo.mul_(scale)
        # G_j (anchored at chunk j's last row) = G_out and the chunks after j: G_(j-1) = gamma**C G_j + qdo_j
        grads = torch.empty_like(qdo)
        for j in reversed(range(g)):
            grads[:, :, j] = grad
            grad = grad + qdo[:, :, j] if w.gc is None else torch.addcmul(qdo[:, :, j], grad, w.gc)
        scores = (qg @ kg.transpose(-1, -2)).mul_(w.w if scale == 1 else w.w * scale)  # A o W
        da = (dg @ vg.transpose(-1, -2)).mul_(w.w)  # dA o W
        dqg = dg @ states.transpose(-1, -2)
        dkg = vg @ grads.transpose(-1, -2)
        kw = kg if w.kd is None else kg * w.kd
        dvg = kw @ grads
        if w.qd is not None:
            dqg.mul_(w.qd)
            dkg.mul_(w.kd)
        # the raw query's gradient is scale x the features'; the keys meet scale x q
        dqg = torch.baddbmm(dqg.view(-1, c, f), da.view(-1, c, c), kg.reshape(-1, c, f), beta=scale, alpha=scale)
        dkg = torch.baddbmm(dkg.view(-1, c, f), da.view(-1, c, c).transpose(-1, -2), qg.reshape(-1, c, f),
                            alpha=scale)
        dvg = torch.baddbmm(dvg.view(-1, c, e), scores.view(-1, c, c).transpose(-1, -2), dg.reshape(-1, c, e))
        dq[:, :, t0:t0 + g * c] = dqg.view(b, h, g * c, f)
        dk[:, :, t0:t0 + g * c] = dkg.view(b, h, g * c, f)
        dv[:, :, t0:t0 + g * c] = dvg.view(b, h, g * c, e)
    dlg = qf.new_empty(0)
    if need_lg and lg is not None:
        dlg = _dloggamma(qf if scale == 1 else qf * scale, kf, v, dout, lg, initial, dfinal, chunk, weights)
    return dq, dk, dv, dlg, grad if initial is None else grad.to(initial.dtype)


def _dloggamma(qf, kf, v, dout, lg, initial, dfinal, chunk: int, weights):
    """dL/dlog(gamma) [lg's shape] = sum over pairs of (i - j) P(i, j), P = W(i, j) (Q'_i.K'_j)(dO_i.V_j), in one
    forward sweep carrying next to S the distance-weighted state S' = dS/dlog(gamma) (docs/derivations.md
    section 4): the pairs inside a chunk from the [C, C] tiles, the pairs through the state from
    (a + 1) S_c + S'_c, the final state's gradient from <dS_T, S'_T>. Every term is a sum of non-negative
    distances times products: no cancellation between large sums (the pair identity of section 8 loses
    digits in fp32 when gamma is small)."""
    b, h, t, f = qf.shape
    e = v.shape[-1]
    state = qf.new_zeros(b, h, f, e) if initial is None else initial.to(qf.dtype)
    dstate = torch.zeros_like(state)  # S'
    total = qf.new_zeros(h)
    for t0, c, g in _segments(t, chunk):
        w = weights(c, g)
        qg, kg, vg, dg = (_chunks(x, t0, c, g) for x in (qf, kf, v, dout))
        pos = torch.arange(c, device=qf.device, dtype=qf.dtype)
        dist = (pos[:, None] - pos[None, :]).clamp_min(0)  # a - b on the allowed pairs (W is 0 elsewhere)
        pairs = (qg @ kg.transpose(-1, -2)) * w.w * (dg @ vg.transpose(-1, -2))  # P inside each chunk
        total += (pairs * dist).sum((0, 2, 3, 4))
        hm = w.head.shape[0]
        blocks = torch.arange(g + 1, device=qf.device, dtype=qf.dtype)
        kv = (kg * w.kd).transpose(-1, -2) @ vg
        kvd = (kg * w.kd * (c - 1 - pos)[:, None]).transpose(-1, -2) @ vg  # distance-weighted chunk sums
        lag = (blocks[:, None] - 1 - blocks[None, :g]).clamp_min(0)
        mixed = (w.m @ kv.reshape(b, h, g, f * e)).view(b, h, g + 1, f, e)
        mixed += w.head.view(1, hm, g + 1, 1, 1) * state.unsqueeze(2)
        mixed_d = ((w.m * (c * lag)) @ kv.reshape(b, h, g, f * e) + w.m @ kvd.reshape(b, h, g, f * e)).view(
            b, h, g + 1, f, e)
        mixed_d += w.head.view(1, hm, g + 1, 1, 1) * (dstate.unsqueeze(2)
                                                     + (c * blocks).view(1, 1, g + 1, 1, 1) * state.unsqueeze(2))
        states, states_d = mixed[:, :, :g], mixed_d[:, :, :g]
        reach = (qg @ states) * (pos + 1)[:, None] + qg @ states_d  # [B, H, g, C, E]
        total += (reach * w.qd * dg).sum((0, 2, 3, 4))
        state, dstate = mixed[:, :, g], mixed_d[:, :, g]
    if dfinal is not None:
        total += (dfinal.to(qf.dtype) * dstate).sum((0, 2, 3))
    return total.view(lg.shape).to(lg.dtype)
