"""Packed sequences (cu_seqlens) on the torch backend as one padded batch instead of a loop over sequences.

Sequence n of the packed [1, H, T, D] inputs becomes row n of a right-padded [N, H, T_max, D] batch. In causal
mode a real row never reads a later (padded) one, so the batch's outputs are the sequences' outputs; with a
recurrent state the padded rows are removed from the state by zeroing their keys' features and values
(``valid``), which is exact without a decay (with one, the state would decay over the padding: those specs loop).
Not batched (``batchable`` says why): bidirectional mode (keys would see the padding), formulas in n_q / n_k
(each sequence has its own), approximations, or padding that would more than double the work.
"""
from __future__ import annotations

import torch

from attngen.frontend.expr import N_K, N_Q
from attngen.ir import Ordering

EXACT = (Ordering.LINEAR, Ordering.QUADRATIC, Ordering.RECURRENT, Ordering.FFT)
MAX_PADDING = 2.0  # batch when N * T_max <= MAX_PADDING * T


def batchable(plan, lengths: list, stateful: bool, ordering_for) -> bool:
    """Whether the packed sequences of ``lengths`` run as one padded batch (see the module docstring)."""
    if not plan.spec.causal or len(lengths) < 2:
        return False
    if plan.similarity.expr.has(N_Q, N_K) or plan.reweight.expr.has(N_Q, N_K):
        return False
    if stateful and plan.reweight.decay is not None:
        return False
    if any(ordering_for(n) not in EXACT for n in set(lengths)):
        return False
    return len(lengths) * max(lengths) <= MAX_PADDING * sum(lengths)


def pad(x: torch.Tensor, bounds: list) -> tuple:
    """[1, H, T, D] packed -> ([N, H, T_max, D] right-padded with zeros, valid [N, T_max] bool)."""
    starts = torch.tensor(bounds[:-1], device=x.device)
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=x.device)
    t_max = int(lengths.max())
    local = torch.arange(t_max, device=x.device)
    valid = local[None, :] < lengths[:, None]  # [N, T_max]
    index = torch.where(valid, starts[:, None] + local[None, :], 0)  # padded rows read row 0, then zeroed
    out = x[0][:, index]  # [H, N, T_max, D]
    out = out * valid[None, :, :, None].to(out.dtype)
    return out.transpose(0, 1), valid


def unpad(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, H, T_max, E] -> [1, H, T, E]: the valid rows of each sequence, in packing order."""
    return x.transpose(0, 1)[:, valid].unsqueeze(0)
