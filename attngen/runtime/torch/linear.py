"""The separable orderings in PyTorch: linear (bidirectional, causal chunked, decayed, two-sided) and
recurrent (docs/derivations.md sections 3 and 4). All take the feature-mapped Q' [B, H, T, F],
K' [B, H, S, F] and values V [B, H, S, E] (E includes the ones column) and return the unnormalised result
[B, H, T, E].
``lg`` is log(gamma) of a decay as [1, H, 1, 1] (<= 0), or None.
"""
from __future__ import annotations

import torch


def bidirectional(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O = Q' (K'^T V): one state S [B, H, F, E]; the query length may differ from the key length."""
    state = kf.transpose(-1, -2) @ v  # [B, H, F, E]
    return qf @ state


def causal_chunked(qf, kf, v, chunk: int, lg: torch.Tensor | None = None, strict: bool = False,
                   initial: torch.Tensor | None = None, return_final: bool = False):
    """Causal linear attention, chunk by chunk: O_c = Q'_c S_c + tril(Q'_c K'_c^T) V_c (T = S).

    With ``lg`` the decay gamma**(i-j) in the chunk-local form (all exponents >= 0, never gamma**-j);
    ``strict`` excludes the diagonal (j < i), which the anti-causal half of a two-sided decay needs.
    ``initial`` [B, H, F, E] is the state after the tokens before this call (the recurrent convention of
    docs/derivations.md section 4): it enters exactly like a previous chunk's state. With ``return_final``
    the result is (out, the state after the last token [B, H, F, E]).
    """
    b, h, t, f = qf.shape
    e = v.shape[-1]
    c = min(chunk, t)
    n_chunks = -(-t // c)
    pad = n_chunks * c - t
    if pad:  # zero rows after the end: as keys they reach only padded queries, which are dropped
        qf, kf, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qf, kf, v))
    qc = qf.view(b, h, n_chunks, c, f)
    kc = kf.view(b, h, n_chunks, c, f)
    vc = v.view(b, h, n_chunks, c, e)
    pos = torch.arange(c, device=qf.device)
    diff = pos[:, None] - pos[None, :]  # a - b within the chunk
    allowed = diff > 0 if strict else diff >= 0
    if lg is None:
        out, final = _chunk_groups(qc, kc, vc, allowed, initial)
        out = out.reshape(b, h, n_chunks * c, e)[:, :, :t]
        return (out, final) if return_final else out
    scores = qc @ kc.transpose(-1, -2)  # [B, H, n, C, C]
    lgc = lg.unsqueeze(2)  # [1, H, 1, 1, 1]
    # clamp before exp so masked pairs (a < b) give exp(0), never an overflow whose 0 * inf gradient is NaN
    intra = torch.exp(lgc * diff.clamp_min(0).to(lg.dtype))
    scores = scores * torch.where(allowed, intra, torch.zeros_like(intra))
    key_decay = torch.exp(lgc * (c - 1 - pos).to(lg.dtype)[:, None])  # gamma**(C-1-b) [1, H, 1, C, 1]
    kv = (kc * key_decay).transpose(-1, -2) @ vc  # [B, H, n, F, E]
    chunk_decay = torch.exp(lg * c)  # gamma**C [1, H, 1, 1]
    state = torch.zeros_like(kv[:, :, 0]) if initial is None else initial.to(kv.dtype).expand_as(kv[:, :, 0])
    states = []
    for i in range(n_chunks):  # S_{c+1} = gamma**C S_c + sum_b gamma**(C-1-b) K'_b^T V_b
        states.append(state)
        state = chunk_decay * state + kv[:, :, i]
    query_decay = torch.exp(lgc * (pos + 1).to(lg.dtype)[:, None])  # gamma**(a+1) [1, H, 1, C, 1]
    inter = query_decay * (qc @ torch.stack(states, 2))
    out = (scores @ vc + inter).reshape(b, h, n_chunks * c, e)[:, :, :t]  # [B, H, T, E]
    if not return_final:
        return out
    if pad:  # the last chunk holds L = C - pad tokens: S = gamma**L S_last + sum_{b<L} gamma**(L-1-b) K'_b^T V_b
        n_last = c - pad
        decay = torch.exp(lg * (n_last - 1 - pos).clamp_min(0).to(lg.dtype)[:, None])  # [1, H, C, 1]
        state = torch.exp(lg * n_last) * states[-1] + (kc[:, :, -1] * decay).transpose(-1, -2) @ vc[:, :, -1]
    return out, state


GROUP_TOKENS = 1024  # chunks are processed in groups of this many tokens, so temporaries do not grow with T


def _chunk_groups(qc, kc, vc, allowed, initial=None):
    """The undecayed causal scan over [B, H, n, C, *] chunks, a group of chunks at a time with the state
    carried between groups: O_c = Q'_c S_c + tril(Q'_c K'_c^T) V_c, S_c = ``initial`` plus the chunks
    before c. Returns (out [B, H, n, C, E], the state after the last chunk [B, H, F, E])."""
    b, h, n, c, f = qc.shape
    group = max(1, GROUP_TOKENS // c)
    carry = qc.new_zeros(b, h, 1, f, vc.shape[-1])  # the state after the previous groups
    if initial is not None:
        carry = carry + initial.to(qc.dtype).unsqueeze(2)
    parts = []
    for g0 in range(0, n, group):
        qg, kg, vg = qc[:, :, g0:g0 + group], kc[:, :, g0:g0 + group], vc[:, :, g0:g0 + group]
        scores = (qg @ kg.transpose(-1, -2)).masked_fill(~allowed, 0)  # [B, H, g, C, C]
        kv = kg.transpose(-1, -2) @ vg  # [B, H, g, F, E]: each chunk's contribution
        # exclusive prefix sum inside the group, plus the carried state (not inclusive minus own: in fp32 that
        # cancels, errors of 1e-3 in dk for cosFormer at T = 70)
        states = carry + torch.nn.functional.pad(kv[:, :, :-1].cumsum(2), (0, 0, 0, 0, 1, 0))
        parts.append(scores @ vg + qg @ states)
        carry = carry + kv.sum(2, keepdim=True)
    return torch.cat(parts, 2), carry.squeeze(2)


def two_sided(qf, kf, v, chunk: int, lg: torch.Tensor):
    """gamma**abs(i-j), bidirectional: the causal scan (j <= i) plus the strictly anti-causal one (j > i),
    run as a causal scan over the reversed sequence. Cross attention pads both sides to max(T, S)."""
    t, s = qf.shape[2], kf.shape[2]
    n = max(t, s)
    qf = torch.nn.functional.pad(qf, (0, 0, 0, n - t))
    kf, v = (torch.nn.functional.pad(x, (0, 0, 0, n - s)) for x in (kf, v))
    forward = causal_chunked(qf, kf, v, chunk, lg)
    backward = causal_chunked(qf.flip(2), kf.flip(2), v.flip(2), chunk, lg, strict=True).flip(2)
    return (forward + backward)[:, :, :t]


def recurrent_step(state, qf_t, kf_t, v_t, gamma=None):
    """One token: S_t = gamma * S_{t-1} + K'_t^T V_t, o_t = Q'_t S_t.

    state [B, H, F, E]; qf_t, kf_t [B, H, F]; v_t [B, H, E]; gamma [1, H, 1, 1] or None.
    Returns (o_t [B, H, E], new state)."""
    update = kf_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    state = update if state is None else (state if gamma is None else gamma * state) + update
    out = (qf_t.unsqueeze(-2) @ state).squeeze(-2)
    return out, state


def recurrent(qf, kf, v, lg: torch.Tensor | None = None, initial: torch.Tensor | None = None):
    """The recurrent ordering (causal): one token at a time with a constant-size state, starting from
    ``initial`` [B, H, F, E] (None: zero). Returns (out [B, H, T, E], the final state [B, H, F, E])."""
    gamma = None if lg is None else torch.exp(lg)
    state, outs = initial, []
    for i in range(qf.shape[2]):
        o, state = recurrent_step(state, qf[:, :, i], kf[:, :, i], v[:, :, i], gamma)
        outs.append(o)
    return torch.stack(outs, 2), state
