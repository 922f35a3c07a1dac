"""The conv_basis ordering: causal softmax attention through a recovered k-conv basis (Gu, Liang, Liu, Shi,
Song and Yin 2024, "Conv-Basis"; docs/variants.md, "Conv-Basis"; docs/conv_basis.md).

    conv_basis(plan, q, k, v, env, info) -> O [B, H, T, Dv]
    recover(qs, k, cfg) -> starts [BH, K]                the basis search (discrete: no gradient)
    apply_basis(qs, k, v, starts) -> (acc, b, shift)     b_r from the probed columns, then
                                                          sum_r conv(e_r, m_r) [V | 1] by FFT; a custom backward
    score_scale(plan, env) -> c                          the score must be c * dot(q, k)

H = mask o (c Q K^T) is never materialised. A column's head h(col) = H[col : col + p, col] costs p dot
products. s_1 = 0; each next start s_r is the first column whose head differs in l1 from the head of
s_{r-1} by at least delta (binary search, or a linear scan), at most k starts. With u_r = b_1 + ... + b_r
(lag-aligned: u_r[t] approximates H[col + t, col] for every column col of element r, s_r <= col < s_{r+1}),
mask o exp(H) ~ sum_r conv(e_r, m_r), e_1 = exp(u_1), e_r = exp(u_r) - exp(u_{r-1}); each conv(e_r, m_r)
applied to [V | 1] is a causal convolution of e_r with the rows j >= s_r of [V | 1], done by FFT.

Shapes inside: batch and heads flattened, BH = B * H; qs = c * q [BH, T, D], k [BH, T, D], v [BH, T, E].
Per (b, h) the starts differ; every step is vectorised over BH; the Python loops run over the basis index
r (<= k), the binary-search steps (<= log2 T) and the probe offsets (p), never over T.

Gradients (_ConvBasis.backward): the exact softmax-attention gradient formula with the basis matrix E~ in
place of mask o exp(H), applied through the same basis by FFT, O(k T D (Dv + 1) log T); exact wherever H is
exactly k-conv. The starts are discrete and get no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from attngen.errors import InputError, PlanError
from attngen.frontend.expr import KE, QE, Dot, I, J, Norm
from attngen.runtime.evaluate import Evaluator
from attngen.runtime.torch.backend import prepare
from attngen.runtime.torch.common import finish

FFT_DTYPE = torch.float64  # the convolutions run in float64 (also for float32 inputs): see _fft_dtype


@dataclass(frozen=True)
class Basis:
    """The basis recovered on one call (detached; records, not part of the autograd graph).

    starts [B, H, K] int64: s_r ascending; where r >= counts[b, h] (no such element) it is T.
    lengths [B, H, K] int64: m_r = T - s_r (0 where absent).
    columns [B, H, K, T]: b_r[t] for t < m_r, zero beyond and for absent elements.
    counts [B, H] int64: k', the number of elements found for each (b, h) (1 <= k' <= the declared k).
    k: the largest k' (= K, the size of the basis dimension).
    shift [B, H]: the global shift M subtracted from every exponent before exp (see apply_basis).
    """
    starts: torch.Tensor
    lengths: torch.Tensor
    columns: torch.Tensor
    counts: torch.Tensor
    k: int
    shift: torch.Tensor


def run(plan, q, k, v, params: dict, info: dict | None = None) -> torch.Tensor:
    """o [B, H, T, Dv] in q's dtype for q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv] with the spec's
    ``params``; what it decided is recorded into ``info``."""
    qc, kc, vc, env = prepare(plan, q, k, v, params)
    return conv_basis(plan, qc, kc, vc, env, info).to(q.dtype)


def conv_basis(plan, q, k, v, env: dict, info: dict | None) -> torch.Tensor:
    """O [B, H, T, Dv] (normalised) for q, k [B, H, T, D] and v [B, H, T, Dv + 1] = [V | 1] in the compute
    dtype; records the Basis in ``info["basis"]`` when ``info`` is a dict."""
    cfg = plan.spec.approximation
    b, h, t, d = q.shape
    if k.shape[2] != t:
        raise InputError(f"{plan.spec.name}: conv_basis needs the key length to equal the query length "
                         f"(found {t} and {k.shape[2]})")
    check_length(cfg, t, plan.spec.name)
    if plan.normalize.kind != "rowsum" or plan.normalize.eps != 0:  # the planner refuses these already
        raise PlanError(f"{plan.spec.where}: conv_basis needs row-sum normalisation without eps")
    scale = score_scale(plan, env)
    if isinstance(scale, torch.Tensor):
        scale = torch.broadcast_to(scale.to(q), (1, h, 1, 1))
    qs = (q * scale).reshape(b * h, t, d)
    kf = k.reshape(b * h, t, d)
    vf = v.reshape(b * h, t, v.shape[-1])
    starts = recover(qs, kf, cfg)
    acc, cols, shift = apply_basis(qs, kf, vf, starts)
    if info is not None:
        counts = (starts < t).sum(1)
        info["basis"] = Basis(starts.view(b, h, -1), (t - starts).view(b, h, -1),
                              cols.detach().view(b, h, -1, t), counts.view(b, h), int(starts.shape[1]),
                              shift.view(b, h))
    return finish(acc.view(b, h, t, -1), plan.normalize)


def check_length(cfg, t: int, name: str = "conv_basis") -> None:
    """InputError when the probe is longer than the sequence. A k larger than T is allowed: k is a cap, and
    at most T - p + 1 columns have a full head, so at most that many elements are found."""
    if cfg.probe > t:
        raise InputError(f"{name}: approx conv_basis probe = {cfg.probe} is longer than the sequence (T = {t}): "
                         f"a column head h(c) = H[c : c + probe, c] needs probe rows on and below the diagonal. "
                         f"Fix: declare probe <= {t}, or call with at least {cfg.probe} tokens")


def score_scale(plan, env: dict):
    """c in score = c * dot(q, k) (a number, or [1, H, 1, 1] for a per-head c); PlanError for any other score:
    the basis search probes the columns of c * Q K^T."""
    score = plan.similarity.score
    dots = score.atoms(Dot) if score is not None else set()
    if len(dots) == 1:
        (dot,) = dots
        if set(dot.args) == {QE, KE}:
            c = sympy.simplify(score / dot)
            if not (c.has(QE, KE, I, J) or c.atoms(Dot, Norm)):
                return Evaluator(env, where=f"{plan.spec.where}: conv_basis score scale")(c)
    raise PlanError(f"{plan.spec.where}: conv_basis needs the score c * dot(q, k) (c free of q, k, i, j), as in "
                    f"softmax's exp(dot(q, k)/sqrt(d)); {plan.spec.name} has the score {sympy.sstr(score)}. "
                    "Fix: remove approx, or write the similarity as exp(c * dot(q, k))")


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------

def _heads(qs, k, col, p: int) -> torch.Tensor:
    """h(col) = (H[col, col], ..., H[col + p - 1, col]) for col [BH] (each <= T - p): [BH, p], p d products."""
    d = k.shape[-1]
    kc = k.gather(1, col.view(-1, 1, 1).expand(-1, 1, d))  # [BH, 1, D]
    rows = col.view(-1, 1) + torch.arange(p, device=k.device)  # [BH, p]
    qr = qs.gather(1, rows.unsqueeze(-1).expand(-1, -1, d))  # [BH, p, D]
    return (qr * kc).sum(-1)


def recover(qs, k, cfg) -> torch.Tensor:
    """The starts [BH, K] (int64, ascending, T where a (b, h) found fewer than K elements; K = the largest
    number found, <= cfg.k). Only columns with a full head (col <= T - p) are candidates. No autograd: the
    starts are discrete."""
    t = qs.shape[1]
    if cfg.k == 1:
        return torch.zeros(qs.shape[0], 1, dtype=torch.int64, device=qs.device)
    with torch.no_grad():
        fn = _binary if cfg.search == "binary" else _scan
        starts = fn(qs, k, cfg.k, cfg.probe, float(cfg.delta))
    found = (starts < t).any(0)
    keep = int(found.nonzero().max()) + 1  # element 0 (s_1 = 0) always exists
    return starts[:, :keep]


def _binary(qs, k, k_max: int, p: int, delta: float) -> torch.Tensor:
    """Binary search for each next start, vectorised over BH: under the paper's non-degeneracy assumption
    the predicate P(col) = |h(col) - h(s_prev)|_1 >= delta is false then true on s_prev < col <= T - p, and
    the search returns the first col where it is true (without the assumption: some col with P(col) true and
    P(col - 1) false). A (b, h) whose last candidate column T - p has P false has no further element."""
    bh, t, _ = qs.shape
    last = t - p
    dev = qs.device
    starts = [torch.zeros(bh, dtype=torch.int64, device=dev)]
    prev_head = _heads(qs, k, starts[0], p)
    active = torch.ones(bh, dtype=torch.bool, device=dev)
    for _ in range(1, k_max):
        lo = starts[-1] + 1
        active = active & (lo <= last)
        if not bool(active.any()):
            break
        hi = torch.full_like(lo, last)
        active = active & ((_heads(qs, k, hi, p) - prev_head).abs().sum(-1) >= delta)
        lo = torch.where(active, lo, hi)  # inactive rows: an empty interval
        while bool((lo < hi).any()):  # invariant: P(hi) is true; at most log2(T) steps
            mid = (lo + hi) // 2
            ok = (_heads(qs, k, mid, p) - prev_head).abs().sum(-1) >= delta
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid + 1)
        new = torch.where(active, hi, torch.full_like(hi, t))
        starts.append(new)
        if bool(active.any()):
            prev_head = torch.where(active.unsqueeze(-1), _heads(qs, k, torch.where(active, new, 0), p), prev_head)
    return torch.stack(starts, 1)


def _scan(qs, k, k_max: int, p: int, delta: float) -> torch.Tensor:
    """Linear scan: the heads of every candidate column (O(T p d)), then for each next start the first column
    after the previous start whose head is at least delta from the previous start's head (no assumption)."""
    bh, t, _ = qs.shape
    cand = t - p + 1  # columns 0 .. T - p have a full head
    heads = torch.stack([(qs[:, o:o + cand] * k[:, :cand]).sum(-1) for o in range(p)], -1)  # [BH, C, p]
    cols = torch.arange(cand, device=qs.device)
    rows = torch.arange(bh, device=qs.device)
    starts = [torch.zeros(bh, dtype=torch.int64, device=qs.device)]
    active = torch.ones(bh, dtype=torch.bool, device=qs.device)
    for _ in range(1, k_max):
        prev = starts[-1]
        ref = heads[rows, prev.clamp_max(cand - 1)]  # [BH, p]
        hit = ((heads - ref.unsqueeze(1)).abs().sum(-1) >= delta) & (cols > prev.unsqueeze(1))
        active = active & hit.any(1)
        if not bool(active.any()):
            break
        first = hit.to(torch.uint8).argmax(1)  # the first True
        starts.append(torch.where(active, first, torch.full_like(first, t)))
    return torch.stack(starts, 1)


# ---------------------------------------------------------------------------------------------
# the basis columns and their application
# ---------------------------------------------------------------------------------------------

def _lag_columns(qs, k, cols) -> torch.Tensor:
    """[BH, K, T]: entry [r, t] = H[cols_r + t, cols_r] for cols_r + t < T, else 0."""
    bh, t, d = qs.shape
    c = cols.clamp(0, t - 1)
    kc = k.gather(1, c.unsqueeze(-1).expand(-1, -1, d))  # [BH, K, D]
    full = kc @ qs.transpose(1, 2)  # [BH, K, T]: H[i, col] for every row i (K T d products)
    idx = c.unsqueeze(-1) + torch.arange(t, device=qs.device)  # [BH, K, T] rows col + t
    inside = idx < t
    out = full.gather(2, idx.clamp_max(t - 1))
    return torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))


def basis_columns(qs, k, starts):
    """(b [BH, K, T], valid [BH, K, T] bool): b_1 = H[:, 0] and b_r = H[s_r:, s_r] - H[s_r - 1 : T - 1, s_r - 1]
    (lag-aligned from the diagonal), each of length m_r = T - s_r, zero beyond and for absent elements."""
    t = qs.shape[1]
    present = starts < t
    valid = (torch.arange(t, device=qs.device) < (t - starts).unsqueeze(-1)) & present.unsqueeze(-1)
    at = _lag_columns(qs, k, starts)
    before = _lag_columns(qs, k, (starts - 1).clamp_min(0))
    before = torch.where((starts > 0).unsqueeze(-1), before, torch.zeros((), dtype=before.dtype,
                                                                          device=before.device))
    b = torch.where(valid, at - before, torch.zeros((), dtype=at.dtype, device=at.device))
    return b, valid


def exponentials(b, valid):
    """(e [BH, K, T], shift [BH]): u_r = b_1 + ... + b_r (lag-aligned: the earlier, longer b's are cut at m_r),
    e_1 = exp(u_1 - M), e_r = exp(u_r - M) - exp(u_{r-1} - M) on t < m_r, zero beyond.

    M (per (b, h)) is the largest recovered score, max_r max_{t < m_r} u_r[t]: every exponent is <= 0, so
    nothing overflows, and M cancels in num / den (softmax is shift invariant). It is one shift for all rows:
    a per-row shift would break the Toeplitz structure. A row whose scores all lie far below M keeps only
    the digits the FFT leaves it (see _fft_dtype); more than ~700 below M (float64) its row sum underflows
    to zero."""
    u = torch.cumsum(b, 1)
    neg = torch.tensor(float("-inf"), dtype=u.dtype, device=u.device)
    u = torch.where(valid, u, neg)
    shift = u.amax(dim=(1, 2))
    w = torch.exp(u - shift.view(-1, 1, 1))  # 0 where not valid
    prev = torch.cat([torch.zeros_like(w[:, :1]), w[:, :-1]], 1)
    e = torch.where(valid, w - prev, torch.zeros((), dtype=w.dtype, device=w.device))
    return e, shift


def _fft_dtype(dtype):
    # float32 FFT rounding is ~1e-7 of the LARGEST term of the whole convolution, not of each row's own
    # values: a row whose softmax mass is small next to exp(M) then loses its digits (or the sign of its row
    # sum). float64 pushes that ~1e9 further down, for about twice the time.
    return torch.promote_types(dtype, FFT_DTYPE)


def _size(t: int) -> int:
    """A power of two >= 2T: the circular convolution (and correlation) of length-T signals is then exact."""
    return 1 << max(1, (2 * t - 1).bit_length())


def _on(starts, r: int, t: int, device):
    """[BH, 1, T] mask of the positions j >= s_r (element r's columns)."""
    return (torch.arange(t, device=device) >= starts[:, r:r + 1]).unsqueeze(1)


def conv_apply(ef, starts, x, size: int):
    """sum_r conv(e_r, m_r) x = E~ x for x [BH, T, C]: causal convolutions of e_r with the rows j >= s_r of x
    (``ef`` = rfft(e, size) [BH, K, F]); one rfft per element, one irfft in all. The transforms run along
    the last (contiguous) dimension of a zero-padded [BH, C, size] buffer (about twice as fast as along a
    strided one, and no padding copy per transform); the starts ascend, so element r's input is the previous
    one with the positions s_{r-1} .. s_r - 1 zeroed in place."""
    bh, t, c = x.shape
    buf = x.new_zeros(bh, c, size)
    buf[..., :t] = x.transpose(1, 2)
    acc = None
    for r in range(ef.shape[1]):
        if r:
            buf[..., :t].masked_fill_(~_on(starts, r, t, x.device), 0)
        term = torch.fft.rfft(buf, dim=-1).mul_(ef[:, r].unsqueeze(1))  # [BH, C, F]
        acc = term if acc is None else acc.add_(term)
    return torch.fft.irfft(acc, n=size, dim=-1)[..., :t].transpose(1, 2)


def conv_apply_transposed(ef, starts, y, size: int):
    """E~^T y for y [BH, T, C]: out[j] = sum_r [j >= s_r] sum_t e_r[t] y[j + t] (correlations by FFT);
    one rfft, one irfft per element."""
    t = y.shape[1]
    yf = torch.fft.rfft(y.transpose(1, 2), n=size, dim=-1)  # [BH, C, F]
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    out = None
    for r in range(ef.shape[1]):
        corr = torch.fft.irfft(yf * ef[:, r].conj().unsqueeze(1), n=size, dim=-1)[..., :t]
        term = torch.where(_on(starts, r, t, y.device), corr, zero)
        out = term if out is None else out.add_(term)
    return out.transpose(1, 2)


GRAD_BUDGET = 1 << 25  # backward: elements of one [BH, E * dd, size] block of moments transformed at once


class _ConvBasis(torch.autograd.Function):
    """acc = E~ [V | 1] with E~ = sum_r conv(e_r, m_r) ~ mask o exp(H - M), H = mask o (qs k^T).

    Backward: the exact gradient of acc = (mask o exp(H - M)) v with respect to H, qs, k and v, with E~ in
    place of mask o exp(H - M) (the paper's route): dL/dH_ij = E~_ij (g_i . v_j), so
        dv = E~^T g,   dqs_i = sum_a g_ia (E~ (v_a k))_i,   dk_j = sum_a v_ja (E~^T (g_a qs))_j,
    each through the basis by FFT, O(k T D E log T). Where H is exactly k-conv (E~ = mask o exp(H - M)) these
    are the exact gradients. It is not the derivative of the approximation itself: that one reads q, k only
    through the 2k - 1 probed columns, so the key gradient would reach at most 2k - 1 rows of k."""

    @staticmethod
    def forward(ctx, qs, k, v, starts):
        t = qs.shape[1]
        b, valid = basis_columns(qs, k, starts)
        fdt = _fft_dtype(v.dtype)
        e, shift = exponentials(b.to(fdt), valid)  # in the FFT dtype: exp(u - M) underflows later there
        size = _size(t)
        ef = torch.fft.rfft(e, n=size, dim=-1)  # [BH, K, F]
        acc = conv_apply(ef, starts, v.to(fdt), size).to(v.dtype)
        ctx.save_for_backward(qs, k, v, starts, ef)
        ctx.size = size
        shift = shift.to(v.dtype)
        ctx.mark_non_differentiable(b, shift)
        return acc, b, shift

    @staticmethod
    def backward(ctx, g, _gb, _gshift):
        qs, k, v, starts, ef = ctx.saved_tensors
        size, fdt = ctx.size, ef.real.dtype
        bh, t, d = qs.shape
        e_dim = v.shape[-1]
        gf, vf, qf, kf = g.to(fdt), v.to(fdt), qs.to(fdt), k.to(fdt)
        dv = conv_apply_transposed(ef, starts, gf, size) if ctx.needs_input_grad[2] else None
        dq = dk = None
        step = max(1, GRAD_BUDGET // (bh * e_dim * size))  # head-dim columns per block of moments
        if ctx.needs_input_grad[0]:  # dq_i = sum_a g_ia (conv of v_a k)_i
            dq = _moments(conv_apply, ef, starts, size, vf, kf, gf, step).to(qs.dtype)
        if ctx.needs_input_grad[1]:  # dk_j = sum_a v_ja (transposed conv of g_a qs)_j
            dk = _moments(conv_apply_transposed, ef, starts, size, gf, qf, vf, step).to(k.dtype)
        return dq, dk, None if dv is None else dv.to(v.dtype), None


def _moments(apply, ef, starts, size, outer, inner, weight, step):
    """sum_a weight_a * apply((outer_a inner))[..., d] for d in blocks of ``step`` head-dim columns:
    outer [BH, T, E], inner [BH, T, D], weight [BH, T, E] -> [BH, T, D]."""
    bh, t, e_dim = outer.shape
    parts = []
    for d0 in range(0, inner.shape[-1], step):
        x = (outer.unsqueeze(-1) * inner[:, :, None, d0:d0 + step]).flatten(2)  # [BH, T, E * dd]
        y = apply(ef, starts, x, size).view(bh, t, e_dim, -1)
        parts.append(torch.einsum("bia,biad->bid", weight, y))
    return torch.cat(parts, -1)


def apply_basis(qs, k, v, starts):
    """(acc [BH, T, E], b [BH, K, T], shift [BH]): acc = exp(-M) sum_r conv(e_r, m_r) v (see _ConvBasis)."""
    return _ConvBasis.apply(qs, k, v, starts)
