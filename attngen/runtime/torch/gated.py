"""Gated scans in PyTorch: a data-dependent decay per token (and per key dimension), docs/derivations.md
section 9. Autograd differentiates them, so gradients reach the gate.

    out, final = gated_scan(qf, kf, v, lg, chunk, initial=None)
    out, final = gated_recurrent(qf, kf, v, lg, initial=None)

qf, kf [B, H, T, F], v [B, H, T, E], lg [B, H, T] (per head) or [B, H, T, F] (per feature column) the log decay of
each token (<= 0: the gate, plus log(gamma) of a constant decay), initial [B, H, F, E] or None.
out_i = sum_{j <= i} (Q'_i exp(L_i - L_j) . K'_j) V_j + Q'_i exp(L_i) S_0 with L the inclusive cumulative sum of
lg; final = the state after the last token, S_T = exp(L_T) S_0 + sum_j exp(L_T - L_j) K'_j^T V_j.

The chunked form never exponentiates a cumulative sum on its own: inside a chunk b is the cumulative sum from the
chunk's first token, and the factors exp(b_i) (queries against the state before the chunk), exp(b_last - b_j)
(keys into the state after it), exp(b_i - b_j) for j <= i (the chunk's own pairs) and exp(b_last) (the state's
decay over the chunk) all have exponents <= 0, whatever the length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIM_CHUNK = 16  # the chunk of a per-dimension gate: its in-chunk pairs are a [C, C, F] tensor per chunk


def gated_scan(qf, kf, v, lg, chunk: int, initial=None):
    """(out [B, H, T, E], the state after the last token [B, H, F, E]); see the module docstring."""
    b, h, t, f = qf.shape
    e = v.shape[-1]
    per_dim = lg.dim() == 4
    c = max(1, min(chunk, DIM_CHUNK if per_dim else chunk, t))
    n = -(-t // c)
    pad = n * c - t
    if pad:  # zero keys and values, no decay: the padded rows change neither the outputs nor the final state
        qf, kf, v = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, v))
        lg = F.pad(lg, (0, 0, 0, pad) if per_dim else (0, pad))
    q = qf.reshape(b, h, n, c, f)
    k = kf.reshape(b, h, n, c, f)
    vals = v.reshape(b, h, n, c, e)
    cum = lg.reshape(b, h, n, c, *((f,) if per_dim else ())).cumsum(3)  # chunk-local b_i (<= 0)
    last = cum[:, :, :, -1:]  # [B, H, N, 1(, F)]
    allowed = torch.ones(c, c, dtype=torch.bool, device=qf.device).tril()
    if per_dim:
        q_in, k_out = q * torch.exp(cum), k * torch.exp(last - cum)
        diff = cum[:, :, :, :, None, :] - cum[:, :, :, None, :, :]  # [B, H, N, C, C, F]
        weight = torch.exp(diff.masked_fill(~allowed[:, :, None], float("-inf")))
        pairs = (q[:, :, :, :, None, :] * k[:, :, :, None, :, :] * weight).sum(-1)
        decay = torch.exp(last).transpose(-1, -2)  # [B, H, N, F, 1]: row by row
    else:
        q_in, k_out = q * torch.exp(cum)[..., None], k * torch.exp(last - cum)[..., None]
        diff = cum[..., :, None] - cum[..., None, :]  # [B, H, N, C, C]
        pairs = (q @ k.transpose(-1, -2)) * torch.exp(diff.masked_fill(~allowed, float("-inf")))
        decay = torch.exp(last)[..., None]  # [B, H, N, 1, 1]
    intra = pairs @ vals  # [B, H, N, C, E]
    sums = k_out.transpose(-1, -2) @ vals  # [B, H, N, F, E]: each chunk's keys into the state after it
    state = qf.new_zeros(b, h, f, e) if initial is None else initial
    before = []
    for i in range(n):
        before.append(state)
        state = decay[:, :, i] * state + sums[:, :, i]
    inter = q_in @ torch.stack(before, 2)  # [B, H, N, C, E]
    out = (intra + inter).reshape(b, h, n * c, e)[:, :, :t]
    return out, state


def gated_recurrent(qf, kf, v, lg, initial=None):
    """The recurrent ordering with a per-token decay: S_t = exp(lg_t) S_(t-1) + K'_t^T V_t, o_t = Q'_t S_t."""
    b, h, t, f = qf.shape
    state = qf.new_zeros(b, h, f, v.shape[-1]) if initial is None else initial
    outs = []
    for i in range(t):
        state = decay_factor(lg[:, :, i]) * state + kf[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append((qf[:, :, i, None, :] @ state).squeeze(-2))
    return torch.stack(outs, 2), state


def decay_factor(lg_t: torch.Tensor) -> torch.Tensor:
    """exp(lg_t) of one token shaped against a state [B, H, F, E]: lg_t [B, H] -> [B, H, 1, 1], [B, H, F] ->
    [B, H, F, 1]."""
    return torch.exp(lg_t)[..., None, None] if lg_t.dim() == 2 else torch.exp(lg_t)[..., None]
