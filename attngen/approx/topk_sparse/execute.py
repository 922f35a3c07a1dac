"""The topk_sparse ordering in PyTorch: exact softmax attention over the key blocks a Selection keeps.

Query blocks run in groups. For a group the kept key and value blocks are gathered ([B, H, G, MAXK * block, D],
MAXK kept blocks per query block), the scores of the group's rows against them are evaluated by the quadratic
ordering's pair_values (so any softmax-family score and folded log-reweighting works), the causal mask is
applied elementwise (in diagonal blocks) together with the padding of absent blocks, and the softmax of each
row is taken over what remains. Memory is linear in T at fixed k: the largest temporary is one group's
[G * block, MAXK * block] scores; no T x S tensor exists. Under autograd each group runs under activation
checkpointing (its scores recomputed in backward). The selection (attngen.sparse) is not differentiated.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from attngen.approx.topk_sparse import selection as sparse
from attngen.frontend.expr import I, J
from attngen.runtime.evaluate import Evaluator
from attngen.runtime.torch.backend import prepare
from attngen.runtime.torch.common import as_tensor, finish, with_rank5
from attngen.runtime.torch.quadratic import pair_values

GROUP_SCORES = 1 << 20  # score elements per group of query blocks (4 MiB in fp32): small temporaries


def run(plan, q, k, v, params: dict, info: dict | None = None) -> torch.Tensor:
    """o [B, H, T, Dv] in q's dtype for q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv] with the spec's
    ``params``; what it decided is recorded into ``info``."""
    qc, kc, vc, env = prepare(plan, q, k, v, params)
    return topk_sparse(plan, qc, kc, vc, env, info).to(q.dtype)


def topk_sparse(plan, q, k, v, env: dict, info: dict | None) -> torch.Tensor:
    """O [B, H, T, Dv] (normalised) for q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv + 1] ([V | 1]):
    the plan's estimator picks the blocks (attngen.sparse.select), recorded as ``info["selection"]``."""
    selection = sparse.select(plan, q, k)
    if info is not None:
        info["selection"] = selection
    return block_sparse(plan, q, k, v, env, selection)


def block_sparse(plan, q, k, v, env: dict, selection) -> torch.Tensor:
    """Exact softmax attention over the blocks of ``selection`` (an attngen.sparse.Selection); shapes as in
    topk_sparse. Query rows with no kept key give 0 (and zero gradients, no NaN)."""
    b, h, t, d = q.shape
    s_len, e = k.shape[2], v.shape[-1]
    blk = selection.block
    nqb, nkb = sparse.n_blocks(t, blk), sparse.n_blocks(s_len, blk)
    kv_blocks = selection.kv_blocks.to(q.device)
    maxk = kv_blocks.shape[-1]
    q = _pad(q, nqb * blk)
    kb = _pad(k, nkb * blk).view(b, h, nkb, blk, d)  # [B, H, NKB, block, Dk]
    vb = _pad(v, nkb * blk).view(b, h, nkb, blk, e)  # [B, H, NKB, block, E]
    group = max(1, GROUP_SCORES // (b * h * blk * maxk * blk))
    fn = functools.partial(_group, plan, env, selection.causal, s_len)
    track = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *_tensors(env)))
    outs = []
    out = None if track else q.new_empty(b, h, nqb * blk, e - 1)  # no autograd: written in place, no final cat
    for g0 in range(0, nqb, group):
        g1 = min(nqb, g0 + group)
        args = (g0, q[:, :, g0 * blk:g1 * blk], kb, vb, kv_blocks[:, :, g0:g1])
        if track:
            outs.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            out[:, :, g0 * blk:g1 * blk] = fn(*args)
    return (torch.cat(outs, 2) if track else out)[:, :, :t]


def _group(plan, env: dict, causal: bool, s_len: int, g0: int, q_g, kb, vb, idx) -> torch.Tensor:
    """Rows of query blocks g0 .. g0 + G: q_g [B, H, G * block, Dk], idx [B, H, G, MAXK] -> [B, H, G * block, Dv]."""
    b, h, g, maxk = idx.shape
    blk, d, e = kb.shape[3], kb.shape[4], vb.shape[4]
    span = maxk * blk  # key positions gathered per query block
    bi = torch.arange(b, device=idx.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=idx.device).view(1, h, 1, 1)
    safe = idx.clamp_min(0)  # padding (-1) gathers block 0, then is masked out
    k_g = kb[bi, hi, safe].reshape(b, h * g, span, d)  # [B, H*G, MAXK*block, Dk]
    v_g = vb[bi, hi, safe].reshape(b, h * g, span, e)  # [B, H*G, MAXK*block, E]
    q_g = q_g.reshape(b, h * g, blk, d)  # [B, H*G, block, Dk]
    dtype, dev = q_g.dtype, q_g.device
    offs = torch.arange(blk, device=dev)
    i = (g0 * blk + torch.arange(g * blk, device=dev)).view(1, g, blk, 1).repeat(1, h, 1, 1)  # [1, H*G, block, 1]
    j = (safe.unsqueeze(-1) * blk + offs).reshape(b, h * g, 1, span)  # [B, H*G, 1, MAXK*block]
    valid = (idx >= 0).repeat_interleave(blk, -1).reshape(b, h * g, 1, span) & (j < s_len)
    if causal:
        valid = valid & (j <= i)
    env_g = {s: x.repeat_interleave(g, 1) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
             for s, x in env.items()}  # per-head values [1, H, 1, 1] -> [1, H*G, 1, 1]
    scores = pair_values(plan.similarity.score, with_rank5(env_g), q_g, k_g, plan.spec.where)  # [B, H*G, blk, span]
    log_weight = plan.reweight.log_weight
    if log_weight is not None and log_weight != 0:
        # masked pairs take the diagonal's (i, i), so the weight stays finite where it is never used
        i_f, j_f = i.to(dtype), torch.where(valid, j, i).to(dtype)
        wev = Evaluator({**env_g, I: i_f, J: j_f}, where=f"{plan.spec.where}: reweight")
        scores = scores + as_tensor(wev(log_weight), scores)
    scores = scores.masked_fill(~valid, float("-inf"))
    # the max only shifts the exponent and cancels in num / den; a row with nothing kept keeps 0
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros((), dtype=dtype, device=dev))
    acc = torch.exp(scores - row_max) @ v_g  # [B, H*G, block, E]
    den = acc[..., -1:]
    acc = torch.cat([acc[..., :-1], torch.where(den > 0, den, torch.ones((), dtype=dtype, device=dev))], -1)
    return finish(acc, plan.normalize, row_max).reshape(b, h, g * blk, e - 1)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [B, H, T, D] zero-padded along T to ``length``."""
    extra = length - x.shape[2]
    return x if extra == 0 else torch.cat([x, x.new_zeros(*x.shape[:2], extra, x.shape[3])], 2)


def _tensors(env: dict):
    return [x for x in env.values() if isinstance(x, torch.Tensor)]
