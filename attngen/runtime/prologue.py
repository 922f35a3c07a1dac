"""The feature prologue at run time (attngen.passes.prologue plans it): the feature rows q', k' the generated
kernels take, computed by the torch evaluator (autograd gives the parameters' gradients)."""
from __future__ import annotations

import torch

from attngen.frontend.expr import KE, QE, I, J
from attngen.runtime.evaluate import scalar_env
from attngen.runtime.torch.common import row_evaluator


def features(pro, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, values: dict) -> tuple:
    """q' [B, H, T, F], k' [B, H(_kv), S, F] and v from q, k, v [B, H(_kv), T, D] and the spec's parameters
    (k and v repeated per query head when the key side's feature map differs per head), all three in float64
    for float64 inputs, else float32."""
    heads = qh.shape[1]
    if pro.per_head_keys and kh.shape[1] != heads:
        kh, vh = (x.repeat_interleave(heads // kh.shape[1], dim=1) for x in (kh, vh))
    dtype = torch.float64 if qh.dtype == torch.float64 else torch.float32
    params = {n: t.to(dtype=dtype, device=qh.device) for n, t in values.items()}
    env = scalar_env(pro.spec, qh.shape[2], kh.shape[2], qh.shape[3], heads, params, dtype, qh.device)
    out = []
    for elem, pos, x, vectors in ((QE, I, qh, pro.q_vectors), (KE, J, kh, pro.k_vectors)):
        xs = x.to(dtype)
        ev = row_evaluator(env, elem, xs, pos, None, pro.spec.where)
        parts = []
        for v in vectors:
            t = ev(v)
            t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=dtype, device=x.device)
            width = t.shape[-1] if t.dim() and t.shape[-1] > 1 else xs.shape[-1]
            parts.append(torch.broadcast_to(t, (*xs.shape[:-1], width)))
        # kept in the compute dtype (float32 for half inputs): rounding the feature rows to half again would add
        # an error the fused kernels do not make (the op casts the output back to the inputs' dtype)
        out.append((parts[0] if len(parts) == 1 else torch.cat(parts, -1)).contiguous())
    return out[0], out[1], vh.to(dtype)
