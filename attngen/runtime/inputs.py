"""The spec-aware face of the one validator (attngen.runtime.validate): q, k, v and parameters checked against
a spec, the parameters' default values from their ``init`` expressions, packed sequence boundaries."""
from __future__ import annotations

import torch

from attngen.errors import InputError
from attngen.runtime import validate
from attngen.runtime.evaluate import Evaluator
from attngen.frontend.expr import D, HEAD, HEADS
from attngen.frontend.spec import Spec


def default_parameters(spec: Spec, heads: int, dtype=torch.float32, device=None) -> dict:
    """The spec's parameters at their ``init`` values: per-head ones of shape [H], scalars of shape []."""
    out = {}
    for p in spec.parameters:
        h = torch.arange(heads, dtype=torch.float64)
        value = Evaluator({HEAD: h, HEADS: heads, D: 0}, where=f"{spec.where}: parameters.{p.name}.init")(
            p.init_expr)
        t = torch.as_tensor(value, dtype=torch.float64)
        t = t.expand(heads).clone() if p.shape else t.reshape(())
        out[p.name] = t.to(dtype=dtype, device=device)
    return out


def check_qkv(spec: Spec, q, k, v, layout: str, limits: validate.Limits = validate.TORCH):
    """Validate q, k, v (attngen.runtime.validate.qkv) and return them as [B, H, T, D] views (no copies)."""
    return validate.qkv(q, k, v, layout, name=spec.name, causal=spec.causal, limits=limits)


def check_params(spec: Spec, params: dict, heads: int, like: torch.Tensor) -> dict:
    """Fill defaults for missing parameters and validate the given ones."""
    unknown = set(params) - set(spec.param_names)
    if unknown:
        raise InputError(f"unknown keyword(s) {sorted(unknown)} for {spec.name}; its parameters are "
                         f"{list(spec.param_names) or 'none'}")
    out = default_parameters(spec, heads, like.dtype, like.device)
    for p in spec.parameters:
        if p.name in params:
            out[p.name] = validate.parameter(p.name, params[p.name], per_head=bool(p.shape), heads=heads, like=like,
                                             spec=spec.name)
    return out


def check_cu_seqlens(cu_seqlens, batch: int, length: int, device) -> list:
    """Validate packed sequence boundaries (B = 1, sequences packed along T) and return them as ints:
    sequence n holds tokens [cu[n], cu[n + 1])."""
    return validate.cu_seqlens(cu_seqlens, batch=batch, length=length, device=device).tolist()
