"""topk_sparse's execution over a Selection: ``attend`` (torch gather path or the generated block-sparse
kernels) and ``run_triton`` (backend='triton' for a topk_sparse plan: select, then the kernels)."""
from __future__ import annotations

import torch

from attngen.approx.topk_sparse import execute as torch_sparse
from attngen.approx.topk_sparse.selection import Selection, select, selection_from_blocks
from attngen.errors import InputError, PlanError
from attngen.ir import is_softmax_family
from attngen.runtime.inputs import check_params
from attngen.runtime.torch.common import compute_dtype, symbol_env, with_ones
from attngen.runtime.triton.loader import load_module


def attend(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection, params: dict | None = None,
           backend: str = "torch") -> torch.Tensor:
    """Exact softmax attention of a softmax-family ``plan`` over the blocks of ``selection`` only.

    q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv] -> o [B, H, T, Dv] in q's dtype, differentiable in q, k,
    v and the spec's parameters. ``selection`` is a Selection (from select_blocks, so any scores) or kv_blocks
    [B, H, NQB, M] (int, -1 padded) in blocks of plan.spec.approximation.block (or of 64 for a spec without
    approx). Query rows with no kept key give 0. ``backend``: "torch", or "triton" for the generated kernels."""
    spec = plan.spec
    if not is_softmax_family(plan.similarity, plan.reweight, plan.normalize):
        raise PlanError(f"{spec.where}: sparse.attend computes softmax attention over blocks: {spec.name} is not of "
                        "the softmax family (an exp similarity, normalize rowsum or softmax, a reweight that is none "
                        "or exp(bias))")
    if backend not in ("torch", "triton"):
        raise InputError(f"backend={backend!r}: expected 'torch' or 'triton'")
    block = spec.approximation.block if spec.approximation is not None else 64
    if not isinstance(selection, Selection):
        selection = selection_from_blocks(selection, block, q.shape[2], k.shape[2], spec.causal)
    if (selection.n_q, selection.n_k, selection.causal) != (q.shape[2], k.shape[2], spec.causal) or \
            tuple(selection.kv_blocks.shape[:2]) != tuple(q.shape[:2]):
        raise InputError(f"selection: made for B, H = {list(selection.kv_blocks.shape[:2])}, n_q = {selection.n_q}, "
                         f"n_k = {selection.n_k}, causal = {selection.causal}; the call has B, H = "
                         f"{list(q.shape[:2])}, n_q = {q.shape[2]}, n_k = {k.shape[2]}, causal = {spec.causal}")
    values = check_params(spec, params or {}, q.shape[1], q, head_dim=q.shape[3])
    if backend == "triton":
        return _triton_blocks(plan, q, k, v, values, selection)
    in_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    env = symbol_env(plan, q.shape[2], k.shape[2], q.shape[1], q.shape[3], values, dtype, q.device)
    return torch_sparse.block_sparse(plan, q, k, with_ones(v, plan.normalize), env, selection).to(in_dtype)


def run_triton(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, info: dict | None = None):
    """backend='triton' for a topk_sparse plan: the selection in torch (block scores + top-k, no_grad), then
    the generated module's ``<spec>_attention_block_sparse`` over the kept blocks. ``info["selection"]``
    receives the Selection. q, k, v [B, H, T, D] ("bhtd")."""
    selection = select(plan, q, k)
    if info is not None:
        info["selection"] = selection
    return _triton_blocks(plan, q, k, v, params, selection)


def _triton_blocks(plan, q, k, v, params: dict, selection: Selection):
    name = f"{plan.spec.name}_attention_block_sparse"
    fn = getattr(load_module(plan), name, None)
    if fn is None:
        raise PlanError(f"{plan.spec.where}: the generated Triton module of {plan.spec.name} ({plan.spec.mode}) "
                        f"has no {name} (no block-sparse kernels generated for this spec); use backend='torch'")
    return fn(q, k, v, selection.kv_blocks, selection.block, **params)
