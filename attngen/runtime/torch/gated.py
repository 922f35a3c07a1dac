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
    c = max(1, min(chunk, DIM_CHUNK) if per_dim else chunk)  # not min(.., T): a guard on a symbolic T
    n = -(-t // c)
    pad = n * c - t
    # zero keys and values, no decay: the padded rows change neither the outputs nor the final state. A symbolic
    # length (torch.compile) pads always, 0 rows when T is a multiple of c: no guard on T % c
    if torch.compiler.is_compiling() or pad:
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
    before, state = chunk_states(decay, sums, qf.new_zeros(b, h, f, e) if initial is None else initial)
    inter = q_in @ before  # [B, H, N, C, E]
    out = (intra + inter).reshape(b, h, n * c, e)
    # the first T rows; a symbolic length takes them by index (a new tensor): a slice, a view of the padded rows,
    # would make AOTAutograd ask whether it is contiguous, a guard on T % c (one graph per side of it)
    out = out.index_select(2, torch.arange(t, device=out.device)) if torch.compiler.is_compiling() else out[:, :, :t]
    return out, state


# The chunk-to-chunk recurrence as two torch.library custom ops: under torch.compile one opaque node each (shapes
# symbolic in the number of chunks, so one graph for every length); autograd never records the loop, whose
# per-chunk indexing recorded a select per chunk, each backward a zero tensor of the whole [B, H, N, F, E]:
# quadratic in T (gla fwd + bwd at B1 H4 D32: 3.3x the time per doubling of T from 4k to 8k).
@torch.library.custom_op("attngen::torch_chunk_states", mutates_args=())
def chunk_states(decay: torch.Tensor, sums: torch.Tensor, initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The states before each chunk [B, H, N, F, E] and after the last [B, H, F, E] of the recurrence
    S_(n+1) = decay_n S_n + sums_n, S_0 = ``initial``: decay [B, H, N, F or 1, 1], sums [B, H, N, F, E]."""
    before = torch.empty_like(sums)
    state = initial
    for i in range(sums.shape[2]):
        before[:, :, i] = state
        state = torch.addcmul(sums[:, :, i], decay[:, :, i], state)
    return before, state.clone() if state is initial else state  # an output never aliases an input


@chunk_states.register_fake
def _(decay, sums, initial):
    return torch.empty_like(sums), torch.empty_like(initial)


@torch.library.custom_op("attngen::torch_chunk_states_bwd", mutates_args=())
def chunk_states_bwd(decay: torch.Tensor, before: torch.Tensor, dbefore: torch.Tensor,
                     dfinal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d decay, d sums, d initial) of chunk_states, the recurrence run backwards: G_N = dfinal, d sums_n =
    G_(n+1), d decay_n = G_(n+1) S_n summed to decay's shape, G_n = decay_n G_(n+1) + d before_n."""
    dsums = torch.empty_like(before)
    ddecay = torch.empty_like(decay)
    grad = dfinal.clone()
    for i in reversed(range(before.shape[2])):
        dsums[:, :, i] = grad
        ddecay[:, :, i] = (grad * before[:, :, i]).sum_to_size(ddecay[:, :, i].shape)
        grad = torch.addcmul(dbefore[:, :, i], decay[:, :, i], grad)
    return ddecay, dsums, grad


@chunk_states_bwd.register_fake
def _(decay, before, dbefore, dfinal):
    return torch.empty_like(decay), torch.empty_like(before), torch.empty_like(dfinal)


def _states_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _states_grad(ctx, dbefore, dfinal):
    decay, before = ctx.saved_tensors
    dbefore = torch.zeros_like(before) if dbefore is None else dbefore
    dfinal = before.new_zeros(before.shape[:2] + before.shape[3:]) if dfinal is None else dfinal
    return chunk_states_bwd(decay, before, dbefore, dfinal)


chunk_states.register_autograd(_states_grad, setup_context=_states_setup)


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
