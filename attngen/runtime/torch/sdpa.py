"""The torch target's quadratic ordering when it is exactly SDPA's operator (plan.sdpa, from the planning pass
`delegate`): torch.nn.functional.scaled_dot_product_attention with the plan's scale and, for a reweighting
W = exp(bias(i, j)), a float attention mask of H x T x S elements (causal pairs j > i set to -inf). A spec with a
window never runs here: the planner keeps it on the tiles, which skip the keys outside the window."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attngen.errors import PlanError
from attngen.frontend.expr import I, J
from attngen.ir import SDPA_BIAS_LIMIT
from attngen.runtime.evaluate import Evaluator
from attngen.runtime.torch.common import as_tensor, compute_dtype, lowered, symbol_env


def fits(plan, q: torch.Tensor, k: torch.Tensor, params: dict) -> bool:
    """Whether this call runs SDPA: the plan delegates, and its bias (if any) has at most SDPA_BIAS_LIMIT
    elements and needs no gradient. A learnable bias (ALiBi's slope) under autograd runs tiled: its gradient is
    a long sum of dS_ij (i - j) over rows whose dS sums to 0, which SDPA's fp32 backward does not keep
    (dslope 1.1e-5 off at T = 1000 against 2.9e-6 for the tiles' float64 row normalisation)."""
    if plan.sdpa is None:
        return False
    if plan.spec.window is not None:  # the planner never delegates a window (its tiles skip the keys outside it)
        raise PlanError(f"{plan.spec.where}: window: SDPA's operator has no window; a windowed plan must run the "
                        "tiled quadratic ordering (the planning pass 'delegate' routes it there)")
    if plan.sdpa.bias is None:
        return True
    learned = torch.is_grad_enabled() and any(params[name].requires_grad for name in lowered(plan).sdpa_learned)
    return not learned and q.shape[1] * q.shape[2] * k.shape[2] <= SDPA_BIAS_LIMIT


def attention(plan, q, k, v, params: dict) -> torch.Tensor:
    """O [B, H, T, Dv] in the compute dtype (fp32, fp64 for fp64 inputs); gradients by SDPA's backward."""
    dtype = compute_dtype(q.dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    b, h, t, d = q.shape
    s = k.shape[2]
    env = symbol_env(plan, t, s, h, d, params, dtype, q.device)
    where = plan.spec.where
    low = lowered(plan)
    scale = Evaluator(env, where=f"{where}: score scale").run(low.sdpa_scale)
    if isinstance(scale, torch.Tensor):  # per head (a parameter): into q, so its gradient flows
        q, scale = q * scale, 1.0
    causal = plan.spec.causal
    # grouped KV heads: SDPA reads each group's k, v in place; a branch, not bool(): under torch.compile with
    # symbolic head counts the comparison is a SymBool, which SDPA's enable_gqa does not take (the branch guards)
    gqa = True if k.shape[1] != h else False
    if plan.sdpa.bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=float(scale), enable_gqa=gqa)
    i = torch.arange(t, dtype=dtype, device=q.device).view(1, 1, t, 1)
    j = torch.arange(s, dtype=dtype, device=q.device).view(1, 1, 1, s)
    if causal:
        j = torch.minimum(j, i)  # masked pairs take the diagonal's value: finite, then -inf below
    bias = torch.broadcast_to(as_tensor(Evaluator({**env, I: i, J: j}, where=f"{where}: reweight").run(low.sdpa_bias),
                                        q), (1, h, t, s))
    if causal:
        allowed = torch.arange(s, device=q.device).view(1, s) <= torch.arange(t, device=q.device).view(t, 1)
        bias = bias.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=float(scale), enable_gqa=gqa)
