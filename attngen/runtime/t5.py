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
max_exact + the number of thresholds n reaches (attngen.frontend.t5.thresholds, the same arithmetic in plain
Python for the code generator, which runs without torch), printed as integer literals.
"""
from __future__ import annotations

import math

import torch


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
