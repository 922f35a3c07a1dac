"""The separable orderings in PyTorch: linear (bidirectional, causal chunked, decayed, two-sided) and
recurrent (docs/derivations.md sections 3 and 4). All take the feature-mapped Q' [B, H, T, F],
K' [B, H, S, F] and values V [B, H, S, E] (E includes the ones column) and return the unnormalised result
[B, H, T, E].
``lg`` is log(gamma) of a decay as [1, H, 1, 1] (<= 0), or None.
"""
from __future__ import annotations

import torch

from attngen.runtime.torch.scan import causal_scan


def bidirectional(qf: torch.Tensor, kf: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O = Q' (K'^T V): one state S [B, H, F, E]; the query length may differ from the key length."""
    state = kf.transpose(-1, -2) @ v  # [B, H, F, E]
    return qf @ state


def causal_chunked(qf, kf, v, chunk: int, lg: torch.Tensor | None = None, strict: bool = False,
                   initial: torch.Tensor | None = None, return_final: bool = False, scale: float = 1.0):
    """Causal linear attention, chunk by chunk: O_c = Q'_c S_c + tril(Q'_c K'_c^T) V_c (T = S).

    With ``lg`` the decay gamma**(i-j) in the chunk-local form (all exponents >= 0, never gamma**-j);
    ``strict`` excludes the diagonal (j < i), which the anti-causal half of a two-sided decay needs.
    ``initial`` [B, H, F, E] is the state after the tokens before this call (the recurrent convention of
    docs/derivations.md section 4): it enters exactly like a previous chunk's state. With ``return_final``
    the result is (out, the state after the last token [B, H, F, E]). Runs attngen.runtime.torch.scan (groups
    of chunks in batched matmuls, a hand-derived chunked backward); ``scale`` multiplies Q' inside it.
    """
    out, final = causal_scan(qf, kf, v, chunk, lg, strict, initial, scale)  # no min(chunk, T): a guard on T
    return (out, final) if return_final else out


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
