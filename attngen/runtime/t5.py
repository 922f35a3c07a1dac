"""T5's relative-position buckets (Raffel et al. 2020), as transformers' T5Attention._relative_position_bucket
computes them: the reference arithmetic of the spec function t5_bucket(x, num_buckets, max_distance).

    bidirectional: num_buckets //= 2; bucket = num_buckets if x > 0 else 0; n = |x|
    causal:        bucket = 0; n = -min(x, 0)
    max_exact = num_buckets // 2
    bucket += n                                                               if n < max_exact
              min(max_exact + int(log(n / max_exact) / log(max_distance / max_exact) * (num_buckets - max_exact)),
                  num_buckets - 1)                                            otherwise

The log term is formed in float32 exactly as transformers forms it (n.float() / max_exact, torch.log, divided by
the Python float math.log(max_distance / max_exact), times the int, truncated by .to(torch.long)), so a bucket at a
boundary where the real value is an integer (n = 16, 32, 64 at num_buckets 32, max_distance 128, bidirectional)
rounds the way a trained T5 checkpoint saw it.

The generated kernels do not take a float log: the bucket is a non-decreasing step function of n, so it is
max_exact + the number of thresholds n reaches, the thresholds read off this very function (``thresholds``) once
per (num_buckets, max_distance, mode) and printed as integer literals.
"""
from __future__ import annotations

import functools
import math

import torch

from attngen.errors import PlanError


def relative_position_bucket(x, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """The bucket (int64) of each relative position in ``x`` (integers, held in any dtype: rounded first)."""
    x = torch.as_tensor(x)
    rel = (x.round() if x.is_floating_point() else x).to(torch.int64)
    buckets = torch.zeros_like(rel)
    nb = int(num_buckets)
    if bidirectional:
        nb //= 2
        buckets = buckets + (rel > 0).to(torch.int64) * nb
        rel = torch.abs(rel)
    else:
        rel = -torch.minimum(rel, torch.zeros_like(rel))
    max_exact = nb // 2
    small = rel < max_exact
    safe = torch.where(small, torch.full_like(rel, max_exact), rel)  # log(0) never formed (masked anyway)
    large = max_exact + (torch.log(safe.float() / max_exact) / math.log(max_distance / max_exact)
                         * (nb - max_exact)).to(torch.int64)
    large = torch.minimum(large, torch.full_like(large, nb - 1))
    return buckets + torch.where(small, rel, large)


@functools.lru_cache(maxsize=64)
def thresholds(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple:
    """(max_exact, thresholds): for n = |x| (bidirectional) or -min(x, 0) (causal), the bucket without the sign
    offset is n below max_exact, else max_exact + #{t in thresholds : n >= t}. Checked against
    relative_position_bucket on 0 .. 2 max_distance (beyond max_distance the bucket stays at its cap)."""
    nb = num_buckets // 2 if bidirectional else num_buckets
    max_exact = nb // 2
    n = torch.arange(0, 2 * max_distance + 2, dtype=torch.int64)
    sign = 1 if bidirectional else -1  # a non-positive x in the causal mode, a non-negative one (no offset) else
    value = relative_position_bucket(sign * n, num_buckets, max_distance, bidirectional)
    if bidirectional:
        value = value - (n > 0).to(torch.int64) * nb
    found = tuple(int(n[value >= b][0]) for b in range(max_exact + 1, nb) if bool((value >= b).any()))
    steps = torch.as_tensor(found, dtype=torch.int64)
    rebuilt = torch.where(n < max_exact, n, max_exact + (n[:, None] >= steps[None, :]).sum(-1) if found else
                          torch.full_like(n, max_exact))
    if not torch.equal(rebuilt, value) or int(value[-1]) != nb - 1:
        raise PlanError(f"t5_bucket(x, {num_buckets}, {max_distance}): the buckets are not a non-decreasing step "
                        "function of the distance reaching num_buckets - 1 by max_distance; the Triton kernels "
                        "cannot count them (use backend='torch')")
    return max_exact, found
