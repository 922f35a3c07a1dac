"""SEA-style sparse attention (``approx: {kind: topk_sparse, ...}``): which key blocks each query block keeps.

    scores = block_scores(est_plan, q, k, block, params)       # [B, H, NQB, NKB], pooled estimator features
    sel = select_blocks(scores, approx, causal, n_q, n_k)     # Selection: always-kept + top-k per query block
    o = attend(plan, q, k, v, sel, params)                    # exact softmax over the kept blocks only

The estimator is a separable spec (planned by the planner's ``approximate`` pass): its similarity mass over a
block pair is sum_{i in I, j in J} <phi(q_i), psi(k_j)> = <sum_I phi(q_i), sum_J psi(k_j)>, so the scores of
all NQB x NKB block pairs cost one pass of feature maps plus a [NQB, F] x [F, NKB] product: no T x S tensor.
phi and psi include the estimator's position factors (cosFormer's cos/sin of i and j). The selection is a
discrete choice and is not differentiated (it runs under no_grad); gradients reach q, k, v through the exact
attention over the kept blocks. The device-independent logic lives here; the torch execution is
approx/topk_sparse/execute.py, both executions behind ``attend`` in approx/topk_sparse/attend.py.
See docs/sparse.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attngen.errors import InputError
from attngen.runtime.inputs import check_params
from attngen.runtime.torch.common import compute_dtype, feature_maps, symbol_env


@dataclass(frozen=True)
class Selection:
    """The key blocks kept for each query block of one call (``op.last_selection``).

    kv_blocks [B, H, NQB, MAXK] int64: kept key-block indices of query block I in ascending order, padded
    with -1; counts [B, H, NQB] int64: how many are kept; scores [B, H, NQB, NKB]: the estimator's block
    scores (None when the blocks came from elsewhere, or above KEEP_SCORES elements); always [B, H, NQB]
    int64: how many of the kept blocks were always-kept (the first blocks and the diagonal), not chosen."""
    block: int
    n_q: int
    n_k: int
    causal: bool
    kv_blocks: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor | None = None
    always: torch.Tensor | None = None

    def block_mask(self) -> torch.Tensor:
        """[B, H, NQB, NKB] bool: True where key block J is kept for query block I."""
        nkb = -(-self.n_k // self.block)
        mask = torch.zeros(*self.kv_blocks.shape[:3], nkb + 1, dtype=torch.bool, device=self.kv_blocks.device)
        mask.scatter_(-1, torch.where(self.kv_blocks < 0, nkb, self.kv_blocks), True)
        return mask[..., :nkb]

    def dense_mask(self) -> torch.Tensor:
        """[B, H, n_q, n_k] bool: (i, j) attended (kept block and, when causal, j <= i). Small T only."""
        m = self.block_mask().repeat_interleave(self.block, 2).repeat_interleave(self.block, 3)
        m = m[:, :, :self.n_q, :self.n_k]
        if self.causal:
            m = m & torch.ones(self.n_q, self.n_k, dtype=torch.bool, device=m.device).tril()
        return m

    def density(self) -> float:
        """Kept block pairs over the block pairs the causal mask allows (1.0: dense attention)."""
        allowed = allowed_blocks(self.n_q, self.n_k, self.block, self.causal, self.kv_blocks.device)
        return float(self.counts.sum()) / float(allowed.sum() * self.counts.shape[0] * self.counts.shape[1])


def n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of x [B, H, T, F] over consecutive blocks of ``block`` rows -> [B, H, ceil(T / block), F]; the
    last partial block sums only the rows that exist (zero padding)."""
    b, h, t, f = x.shape
    pad = n_blocks(t, block) * block - t
    if pad:
        x = torch.cat([x, x.new_zeros(b, h, pad, f)], 2)
    return x.view(b, h, -1, block, f).sum(3)


POOL_ROWS = 1024  # rows of feature maps alive at a time while pooling (at least one block)


def pooled_features(est_plan, q: torch.Tensor, k: torch.Tensor, block: int, params: dict | None = None):
    """(sum_I phi(q_i) [B, H, NQB, F], sum_J psi(k_j) [B, H, NKB, F]): the estimator's feature maps (with its
    position factors) pooled over blocks of ``block``; the last partial block sums only the rows that exist.

    q [B, H, T, D], k [B, H, S, D]; ``est_plan`` the estimator's Plan (plan.estimator), its feature maps
    those of its linear ordering; ``params`` its parameters by name (default: their ``init``). Computed in
    fp32 (fp64 for fp64 inputs) under no_grad: the selection is not differentiated."""
    spec = est_plan.spec
    b, h, t, d = q.shape
    dtype = compute_dtype(q.dtype)
    values = check_params(spec, params or {}, h, q, head_dim=d)  # defaults filled, names, shapes checked (InputError)
    with torch.no_grad():
        q, k = q.detach().to(dtype), k.detach().to(dtype)
        env = symbol_env(est_plan, t, k.shape[2], h, d, values, dtype, q.device)
        blocks = [(term.feature, term.position) for term in est_plan.linear_terms]

        def pooled(x, side):  # feature maps of POOL_ROWS rows at a time (positions from their offset), pooled
            out = []
            step = max(POOL_ROWS // block, 1) * block  # whole blocks per piece
            for r0 in range(0, x.shape[2], step):
                rows = x[:, :, r0:r0 + step]
                start = torch.full((b,), r0, dtype=torch.int64, device=x.device)
                pair = (rows, k[:, :, :1]) if side == 0 else (q[:, :, :1], rows)  # the other side: one row, unused
                out.append(pool(feature_maps(blocks, env, *pair, f"{spec.where}: estimator", start=start)[side], block))
            return torch.cat(out, 2)

        return pooled(q, 0), pooled(k, 1)


def block_scores(est_plan, q: torch.Tensor, k: torch.Tensor, block: int, params: dict | None = None) -> torch.Tensor:
    """The estimator's similarity mass of every (query block, key block) pair, [B, H, NQB, NKB]:
    <sum_I phi(q_i), sum_J psi(k_j)> = sum_{i in I, j in J} <phi(q_i), psi(k_j)> (arguments as pooled_features)."""
    pq, pk = pooled_features(est_plan, q, k, block, params)
    return pq @ pk.transpose(-1, -2)


def allowed_blocks(n_q: int, n_k: int, block: int, causal: bool, device=None, rows: range | None = None):
    """[NQB, NKB] bool (only the query blocks ``rows`` if given): the block pair holds at least one attended
    (i, j) (j <= i when causal)."""
    rows = rows or range(n_blocks(n_q, block))
    nkb = n_blocks(n_k, block)
    if not causal:
        return torch.ones(len(rows), nkb, dtype=torch.bool, device=device)
    ii = torch.arange(rows.start, rows.stop, device=device)
    last_i = torch.clamp((ii + 1) * block, max=n_q) - 1  # the last row of block I
    first_j = torch.arange(nkb, device=device) * block
    return first_j.view(1, nkb) <= last_i.view(-1, 1)


def always_blocks(approx, n_q: int, n_k: int, causal: bool, device=None, rows: range | None = None):
    """[NQB, NKB] bool (only the query blocks ``rows`` if given): the always-kept blocks (the first ``first``
    key blocks and, with diagonal, key block I for query block I) among the allowed ones."""
    block, keep = approx.block, approx.always_keep
    rows = rows or range(n_blocks(n_q, block))
    jj = torch.arange(n_blocks(n_k, block), device=device).view(1, -1)
    ii = torch.arange(rows.start, rows.stop, device=device).view(-1, 1)
    out = (jj < keep.first) | ((jj == ii) if keep.diagonal else torch.zeros_like(ii, dtype=torch.bool))
    return out & allowed_blocks(n_q, n_k, block, causal, device, rows)


SELECT_ELEMENTS = 1 << 21  # block-score elements per chunk of query blocks: the selection's temporaries stay small
KEEP_SCORES = 1 << 22  # a Selection keeps the block scores (diagnostics) up to this many elements


def select_blocks(scores: torch.Tensor, approx, causal: bool, n_q: int, n_k: int) -> Selection:
    """The always-kept blocks plus, among the other allowed blocks (the candidates), the ``approx.k`` with the
    highest ``scores`` [B, H, NQB, NKB]; ties go to the lower block index. Any source of scores works here:
    a trained estimator's (docs/sparse.md, "Plugging in a trained estimator") as well as block_scores'."""
    nqb, nkb = n_blocks(n_q, approx.block), n_blocks(n_k, approx.block)
    if scores.dim() != 4 or tuple(scores.shape[2:]) != (nqb, nkb):
        raise InputError(f"block scores: expected [B, H, {nqb}, {nkb}] for n_q = {n_q}, n_k = {n_k} and block "
                         f"{approx.block}, found {list(scores.shape)}")
    return _select(lambda rows: scores[:, :, rows.start:rows.stop].detach(), scores.shape[:2], approx, causal,
                   n_q, n_k, scores)


def select(plan, q: torch.Tensor, k: torch.Tensor) -> Selection:
    """The Selection of a topk_sparse plan for q [B, H, T, D], k [B, H, S, D]: block scores from the pooled
    estimator features, chunk by chunk of query blocks (no [NQB, NKB] temporary beyond a chunk), then top-k."""
    approx = plan.spec.approximation
    pq, pk = pooled_features(plan.estimator, q, k, approx.block)  # the estimator's parameters at their init
    pk_t = pk.transpose(-1, -2)
    keep = pq.shape[0] * pq.shape[1] * pq.shape[2] * pk.shape[2] <= KEEP_SCORES
    return _select(lambda rows: pq[:, :, rows.start:rows.stop] @ pk_t, q.shape[:2], approx, plan.spec.causal,
                   q.shape[2], k.shape[2], keep)


def _select(scores_of, batch_heads, approx, causal: bool, n_q: int, n_k: int, keep_scores) -> Selection:
    """Top-k per query block, over chunks of query blocks; scores_of(rows) gives [B, H, len(rows), NKB].
    keep_scores: the full scores to store, True to store the chunks, False to store none."""
    if approx.k < 1:
        raise InputError(f"topk_sparse: k = {approx.k}; expected an integer >= 1 (key blocks per query block)")
    block = approx.block
    nqb, nkb = n_blocks(n_q, block), n_blocks(n_k, block)
    width = min(nkb, approx.k + approx.always_keep.first + int(approx.always_keep.diagonal))
    chunk = max(1, SELECT_ELEMENTS // (batch_heads[0] * batch_heads[1] * nkb))
    kv, counts, always, kept_scores = [], [], [], []
    with torch.no_grad():
        for i0 in range(0, nqb, chunk):
            rows = range(i0, min(nqb, i0 + chunk))
            scores = scores_of(rows)
            fixed = always_blocks(approx, n_q, n_k, causal, scores.device, rows)  # [G, NKB]
            candidate = allowed_blocks(n_q, n_k, block, causal, scores.device, rows) & ~fixed
            masked = scores.masked_fill(~candidate, float("-inf"))
            # descending and stable: equal scores keep their ascending block order (deterministic ties)
            order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :min(approx.k, nkb)]
            chosen = torch.zeros(masked.shape, dtype=torch.bool, device=masked.device).scatter(-1, order, True)
            rows_kv, rows_counts = _lists((chosen & candidate) | fixed, width)
            kv.append(rows_kv)
            counts.append(rows_counts)
            always.append(fixed.sum(-1).expand(rows_counts.shape))
            if keep_scores is True:
                kept_scores.append(scores)
    counts = torch.cat(counts, 2)
    most = max(int(counts.max()), 1)
    scores = keep_scores if isinstance(keep_scores, torch.Tensor) else \
        torch.cat(kept_scores, 2) if kept_scores else None
    return Selection(block, n_q, n_k, causal, torch.cat(kv, 2)[..., :most].contiguous(), counts,
                     scores, torch.cat(always, 2))


def _lists(keep: torch.Tensor, width: int):
    """(kv_blocks [..., width] ascending, -1 padded; counts [...]) of a boolean block mask [..., NKB]."""
    nkb = keep.shape[-1]
    index = torch.arange(nkb, device=keep.device).expand_as(keep)
    ranked = torch.sort(torch.where(keep, index, nkb), -1).values[..., :width]
    return torch.where(ranked < nkb, ranked, -1), keep.sum(-1)


def selection_from_blocks(kv_blocks: torch.Tensor, block: int, n_q: int, n_k: int, causal: bool) -> Selection:
    """A Selection from explicit key-block lists kv_blocks [B, H, NQB, M] (int, -1 = none): sorted,
    deduplicated, and blocks the causal mask rules out dropped. For hand-made or externally chosen blocks."""
    nqb, nkb = n_blocks(n_q, block), n_blocks(n_k, block)
    if kv_blocks.dim() != 4 or kv_blocks.shape[2] != nqb or kv_blocks.dtype.is_floating_point:
        raise InputError(f"kv_blocks: expected an integer tensor [B, H, {nqb}, M] (query blocks of {block} for "
                         f"n_q = {n_q}), found {kv_blocks.dtype} {list(kv_blocks.shape)}")
    if bool(((kv_blocks < -1) | (kv_blocks >= nkb)).any()):
        raise InputError(f"kv_blocks: entries must be -1 (none) or key-block indices 0 .. {nkb - 1}")
    keep = torch.zeros(*kv_blocks.shape[:3], nkb + 1, dtype=torch.bool, device=kv_blocks.device)
    keep.scatter_(-1, torch.where(kv_blocks < 0, nkb, kv_blocks).long(), True)
    keep = keep[..., :nkb] & allowed_blocks(n_q, n_k, block, causal, kv_blocks.device)
    kv, counts = _lists(keep, max(int(keep.sum(-1).max()), 1))
    return Selection(block, n_q, n_k, causal, kv.contiguous(), counts)
