"""The cost model: FLOPs and bytes of each candidate ordering as sympy expressions, the choice and the
crossover length.

Symbols: N the sequence length (query = key length), D the head dim (Dv = D), F the feature width of
the linear plan (a sympy expression in D), C the chunk size, B_Q the query tile of the quadratic plan.
Costs are for one head, fp32 (4 bytes per element). An ordering's cost is FLOPs + BALANCE * bytes:
BALANCE is the machine's FLOPs per byte, about 20 for fp32 CUDA-core work on an H100 (67 TFLOP/s over
3.35 TB/s). The model ranks orderings; it does not predict times.
"""
from __future__ import annotations

import sympy

from attngen.frontend.expr import D
from attngen.ir import C, Candidate, Choice, N, Ordering, ReweightClass, SimilarityClass

BYTES = 4
B_Q = 64  # query tile of the quadratic plan: K and V are re-read once per tile
ELEMENTWISE = 8  # FLOPs per score for the reweighting, mask and elementwise maps


def _quadratic(causal):
    frac = sympy.Rational(1, 2) if causal else 1
    flops = frac * N**2 * (4 * D + ELEMENTWISE)
    data = BYTES * (4 * N * D + frac * N**2 / B_Q * 2 * D)
    return flops, data


def window_pairs(causal: bool, window: int):
    """The pairs (i, j) of a length-N sequence with |i - j| < window (and j <= i when causal), m = min(window, N):
    causal N m - m (m - 1) / 2, bidirectional N (2m - 1) - m (m - 1); about N * window, not N**2."""
    m = sympy.Min(window, N)
    if causal:
        return N * m - m * (m - 1) / 2
    return N * (2 * m - 1) - m * (m - 1)


def windowed_quadratic(causal: bool, window: int):
    """The quadratic ordering visiting only the key tiles a window intersects: the pairs of window_pairs, and K, V
    re-read once per query tile over those pairs."""
    pairs = window_pairs(causal, window)
    return pairs * (4 * D + ELEMENTWISE), BYTES * (4 * N * D + pairs / B_Q * 2 * D)


def _linear(causal, width):
    if causal:  # intra-chunk tiles + state update + inter-chunk products; states written per chunk
        flops = 4 * N * width * D + N * C * (width + D) + 2 * N * width
        data = BYTES * (4 * N * D + 2 * N / C * width * D)
    else:  # S = K'^T V once, O = Q' S
        flops = 4 * N * width * D + 2 * N * width
        data = BYTES * (4 * N * D + width * D)
    return flops, data


def _recurrent(width):
    return 4 * N * width * D, BYTES * (4 * N * D + 2 * N * width * D)  # the state round-trips per token


def _fft(width):
    log_n = sympy.log(2 * N, 2)
    flops = width * D * 3 * 5 * 2 * N * log_n + 4 * N * width * D
    data = BYTES * (4 * N * D + 3 * 2 * N * width * D)
    return flops, data


def _conv_basis(a):
    """k FFT causal convolutions of [V | 1] (length 2N) plus the basis search: O(k p d log n) probes."""
    log_n = sympy.log(2 * N, 2)
    search = a.k * a.probe * D * 2 * log_n if a.search == "binary" else N * a.probe * D * 2
    flops = a.k * (D + 1) * 3 * 5 * 2 * N * log_n + search + a.k * N * 4
    data = BYTES * (4 * N * D + a.k * 2 * N * (D + 1) * 2)
    return flops, data


def _topk_sparse(a, estimator_width):
    """Pooled estimator features, block scores (N/block)^2 x F, then exact softmax on the kept blocks."""
    kept = a.k + int(a.always_keep.diagonal) + a.always_keep.first
    nb = N / a.block
    flops = 2 * N * estimator_width * D + 2 * nb**2 * estimator_width + N * kept * a.block * (4 * D + ELEMENTWISE)
    data = BYTES * (4 * N * D + 2 * nb * estimator_width + nb * kept * a.block * 2 * D)
    return flops, data


def approximations(spec, exact_legal: str | None, estimator_width=None) -> tuple:
    """The opt-in approximation candidates: legal only when the spec declares them (``exact_legal`` is None
    when the declared one applies to this spec, else why not)."""
    a = spec.approximation
    out = []
    for ordering, kind in ((Ordering.CONV_BASIS, "conv_basis"), (Ordering.TOPK_SPARSE, "topk_sparse")):
        if a is None or a.kind != kind:
            out.append(Candidate(ordering, False, f"opt-in approximation: declare approx: {{kind: {kind}, ...}}"))
        elif exact_legal is not None:
            out.append(Candidate(ordering, False, exact_legal))
        elif kind == "conv_basis":
            out.append(Candidate(ordering, True, f"declared (k = {a.k}, probe = {a.probe}, {a.search} search); "
                                 "approximate", *_conv_basis(a)))
        else:
            out.append(Candidate(ordering, True, f"declared (estimator {a.estimator.name}, block {a.block}, "
                                 f"k = {a.k}); approximate", *_topk_sparse(a, estimator_width)))
    return tuple(out)


def candidates(causal, similarity, reweight, linear_terms) -> tuple:
    width = sum((t.width(D) for t in linear_terms), sympy.Integer(0))
    separable = similarity.kind is SimilarityClass.SEPARABLE
    out = [Candidate(Ordering.QUADRATIC, True, "always legal: A is computed tile by tile", *_quadratic(causal))]
    if linear_terms:
        out.append(Candidate(Ordering.LINEAR, True, f"similarity and reweighting separate (F = {width})",
                             *_linear(causal, width)))
    else:
        why = ("the similarity has no finite separation" if not separable
               else f"the reweighting is {reweight.kind.value}, not separable")
        out.append(Candidate(Ordering.LINEAR, False, why))
    if linear_terms and causal:
        out.append(Candidate(Ordering.RECURRENT, True, "causal and separable: a constant-size state (decode)",
                             *_recurrent(width)))
    else:
        out.append(Candidate(Ordering.RECURRENT, False,
                             "needs a causal spec with a separable similarity and reweighting"))
    if separable and reweight.kind is ReweightClass.TOEPLITZ:
        fw = sum((t.width(D) for t in similarity.terms), sympy.Integer(0))
        out.append(Candidate(Ordering.FFT, True, "W = h(i-j): convolution along the sequence", *_fft(fw)))
    else:
        out.append(Candidate(Ordering.FFT, False, "needs a separable similarity and a Toeplitz reweighting"))
    return tuple(out)


APPROXIMATE = (Ordering.CONV_BASIS, Ordering.TOPK_SPARSE)  # never chosen by cost: only when declared


def crossover(a: Candidate, b: Candidate, head_dim: int, chunk: int):
    """The positive length where a and b cost the same, or None."""
    if not (a.legal and b.legal):
        return None
    diff = a.total(head_dim, chunk) - b.total(head_dim, chunk)
    if diff.is_polynomial(N):
        real = sorted(float(r) for r in sympy.Poly(diff, N).nroots() if r.is_real and r > 1)
        return real[0] if real else None
    return _bisect(lambda n: float(diff.subs(N, n)), 2.0, float(1 << 40))


def _bisect(f, lo, hi, steps=200):
    """A root of f in [lo, hi] by bisection on a log scale (for costs with log N terms), or None."""
    flo, fhi = f(lo), f(hi)
    if flo == 0:
        return lo
    if (flo > 0) == (fhi > 0):
        return None
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        fm = f(mid)
        if (fm > 0) == (flo > 0):
            lo, flo = mid, fm
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return (lo * hi) ** 0.5


def choose(cands: tuple, head_dim: int, chunk: int):
    """Cheapest parallel ordering (recurrent is for decode) at short and at long lengths; if they differ,
    dispatch at the crossover. Returns (Choice, explanation)."""
    legal = [c for c in cands if c.legal and c.ordering not in (Ordering.RECURRENT, *APPROXIMATE)]
    short = min(legal, key=lambda c: c.evaluate(chunk, head_dim, chunk)[2])
    long_n = 1 << 24
    long = min(legal, key=lambda c: c.evaluate(long_n, head_dim, chunk)[2])
    if short is long:
        others = [c.ordering.value for c in legal if c is not short]
        why = f"{short.ordering.value}: cheapest at every length" + (
            f" (vs {', '.join(others)})" if others else " (the only candidate)")
        return Choice(short.ordering, short.ordering, None), why
    n_star = crossover(short, long, head_dim, chunk)
    why = (f"{short.ordering.value} below n* = {n_star:.0f}, {long.ordering.value} above "
           f"(at d = {head_dim}, chunk {chunk}, costs solved equal by sympy)")
    return Choice(short.ordering, long.ordering, n_star), why
