"""The quadratic ordering in PyTorch: (Q K^T) V tile by tile, never the full n x n matrix.

Query tiles of BLOCK_Q rows; inside, key tiles of BLOCK_K columns. The softmax family (an exp
similarity) keeps a running max and rescales (flash-style); other similarities accumulate A V directly.
Each query tile runs under activation checkpointing, so autograd keeps one tile's scores at a time.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from attngen.runtime.evaluate import Evaluator
from attngen.frontend.expr import KE, QE, I, J, sides
from attngen.ir import ReweightClass, SimilarityClass
from attngen.runtime.torch.common import as_tensor, finish, with_rank5

BLOCK_Q = 64  # query rows per tile
BLOCK_K = 64  # key columns per tile


def quadratic(plan, q, k, v, env: dict, causal: bool) -> torch.Tensor:
    """O [B, H, T, Dv] (normalised) for q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, E]."""
    tile = functools.partial(_query_tile, plan, env, with_rank5(env), causal)
    track = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *_tensors(env)))
    outs = []
    for i0 in range(0, q.shape[2], BLOCK_Q):
        q_tile = q[:, :, i0:i0 + BLOCK_Q]
        if track:  # recompute the tile's scores in backward instead of keeping them
            outs.append(checkpoint(tile, i0, q_tile, k, v, use_reentrant=False))
        else:
            outs.append(tile(i0, q_tile, k, v))
    return torch.cat(outs, 2)


def _tensors(env: dict):
    return [x for x in env.values() if isinstance(x, torch.Tensor)]


def _query_tile(plan, env4: dict, env5: dict, causal: bool, i0: int, q_tile, k, v):
    """Rows i0 .. i0 + Tq of O: loop over key tiles, skipping those entirely above the diagonal."""
    b, h, tq, _ = q_tile.shape
    s_len = k.shape[2]
    exp_class = plan.similarity.kind is SimilarityClass.EXP
    sim_expr = plan.similarity.score if exp_class else plan.similarity.expr
    log_weight = plan.reweight.log_weight
    fold = exp_class and log_weight is not None  # W = exp(log W) folds into the score
    if fold and log_weight == 0:
        log_weight = None
    weighted = plan.reweight.kind is not ReweightClass.NONE and not fold
    acc = q_tile.new_zeros(b, h, tq, v.shape[-1])  # [Tq, E]
    row_max = q_tile.new_full((b, h, tq, 1), float("-inf")) if exp_class else None
    i = torch.arange(i0, i0 + tq, dtype=q_tile.dtype, device=q_tile.device).view(1, 1, tq, 1)
    stop = min(s_len, i0 + tq) if causal else s_len
    for j0 in range(0, stop, BLOCK_K):
        j1 = min(stop, j0 + BLOCK_K)
        j = torch.arange(j0, j1, dtype=q_tile.dtype, device=q_tile.device).view(1, 1, 1, j1 - j0)
        allowed = None
        if causal and j1 - 1 > i0:  # the tile crosses the diagonal
            allowed = j <= i
            # masked pairs take the diagonal's (i, i): W stays finite there whenever it is on allowed pairs,
            # so no inf enters the graph (0 * inf in a backward would be NaN)
            j = torch.minimum(j, i)
        scores = pair_values(sim_expr, env5, q_tile, k[:, :, j0:j1], plan.spec.where)  # [B, H, Tq, Tk]
        wev = Evaluator({**env4, I: i, J: j}, where=f"{plan.spec.where}: reweight")
        if exp_class:
            if fold and log_weight is not None:
                scores = scores + as_tensor(wev(log_weight), scores)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            # the max only shifts the exponent and cancels in num / den: no gradient flows through it
            new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True)).detach()
            p = torch.exp(scores - new_max)
            if weighted:
                p = p * as_tensor(wev(plan.reweight.expr), p)
            acc = acc * torch.exp(row_max - new_max) + p @ v[:, :, j0:j1]
            row_max = new_max
        else:
            a = scores * as_tensor(wev(plan.reweight.expr), scores) if weighted else scores
            if allowed is not None:
                a = torch.where(allowed, a, torch.zeros_like(a))
            acc = acc + a @ v[:, :, j0:j1]
    return finish(acc, plan.normalize, row_max)


def pair_values(expr, env5: dict, q_tile, k_tile, where: str) -> torch.Tensor:
    """s(q_i, k_j) for a tile as [B, H, Tq, Tk]. Vectors are [B, H, Tq, 1, D] and [B, H, 1, Tk, D];
    dot(a(q), b(k)) is a matmul, a dot that mixes q and k is a broadcast multiply-sum."""
    b, h, tq, d = q_tile.shape
    tk = k_tile.shape[2]
    cache = {}

    def dot(ev, a, bb):
        if sides(a) == {"k"} and sides(bb) == {"q"}:
            a, bb = bb, a
        key = (a, bb)
        if key not in cache:
            if sides(a) == {"q"} and sides(bb) == {"k"}:
                ea = torch.broadcast_to(as_tensor(ev(a), q_tile), (b, h, tq, 1, d))[:, :, :, 0]
                eb = torch.broadcast_to(as_tensor(ev(bb), q_tile), (b, h, 1, tk, d))[:, :, 0]
                cache[key] = (ea @ eb.transpose(-1, -2)).unsqueeze(-1)  # [B, H, Tq, Tk, 1]
            else:
                cache[key] = (as_tensor(ev(a), q_tile) * as_tensor(ev(bb), q_tile)).sum(-1, keepdim=True)
        return cache[key]

    def norm(ev, a):
        return torch.linalg.vector_norm(as_tensor(ev(a), q_tile), dim=-1, keepdim=True)

    ev = Evaluator({**env5, QE: q_tile[:, :, :, None, :], KE: k_tile[:, :, None, :, :]}, dot, norm, where=where)
    return torch.broadcast_to(as_tensor(ev(expr), q_tile), (b, h, tq, tk, 1))[..., 0]
