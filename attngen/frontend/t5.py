"""T5's relative-position buckets as plain Python, for the code generator (which runs without torch): the same
arithmetic as attngen.runtime.t5.relative_position_bucket (transformers' T5Attention._relative_position_bucket),
its float32 steps rounded to float32 here (tests/test_t5_bias.py checks the two agree), and the thresholds the
generated kernels count instead of taking a float log."""
from __future__ import annotations

import functools
import math
import struct

from attngen.errors import PlanError


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def bucket(x: int, num_buckets: int, max_distance: int, bidirectional: bool) -> int:
    """The bucket of the relative position ``x`` (an int)."""
    nb, out = num_buckets, 0
    if bidirectional:
        nb //= 2
        out = nb if x > 0 else 0
        n = abs(x)
    else:
        n = -min(x, 0)
    max_exact = nb // 2
    if n < max_exact:
        return out + n
    ratio = _f32(_f32(float(n)) / max_exact)  # n.float() / max_exact
    value = _f32(_f32(math.log(ratio)) / _f32(math.log(max_distance / max_exact)))  # torch.log, / a Python float
    return out + min(max_exact + int(_f32(value * (nb - max_exact))), nb - 1)  # * an int, .to(torch.long)


@functools.lru_cache(maxsize=64)
def thresholds(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple:
    """(max_exact, thresholds): for n = |x| (bidirectional) or -min(x, 0) (causal), the bucket without the sign
    offset is n below max_exact, else max_exact + #{t in thresholds : n >= t}. Checked against ``bucket`` on
    0 .. 2 max_distance + 1 (beyond max_distance the bucket stays at its cap)."""
    nb = num_buckets // 2 if bidirectional else num_buckets
    max_exact = nb // 2
    sign = 1 if bidirectional else -1  # a non-positive x in the causal mode, a non-negative one (no offset) else
    ns = range(0, 2 * max_distance + 2)
    value = [bucket(sign * n, num_buckets, max_distance, bidirectional) - (nb if bidirectional and n > 0 else 0)
             for n in ns]
    found = tuple(next(n for n, v in zip(ns, value) if v >= b) for b in range(max_exact + 1, nb)
                  if any(v >= b for v in value))
    rebuilt = [n if n < max_exact else max_exact + sum(n >= t for t in found) for n in ns]
    if rebuilt != value or value[-1] != nb - 1:
        raise PlanError(f"t5_bucket(x, {num_buckets}, {max_distance}): the buckets are not a non-decreasing step "
                        "function of the distance reaching num_buckets - 1 by max_distance; the Triton kernels "
                        "cannot count them (use backend='torch')")
    return max_exact, found
