"""Validation of the tensors passed to an op (shared by the reference and every backend), and the
parameters' default values."""
from __future__ import annotations

import torch

from .errors import InputError
from .evaluate import Evaluator
from .expr import D, HEAD, HEADS
from .spec import Spec


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


def check_qkv(spec: Spec, q, k, v, layout: str):
    """Validate q, k, v and return them as [B, H, T, D] views (no copies)."""
    if layout not in ("bhtd", "bthd"):
        raise InputError(f"layout {layout!r}: expected 'bhtd' ([B,H,T,D]) or 'bthd' ([B,T,H,D])")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name}: expected 4 dimensions ({layout}), found shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise InputError(f"{name}: expected a floating dtype, found {t.dtype}")
    if layout == "bthd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    (b, h, t, dk), (bk, hk, s, dk2), (bv, hv, sv, _) = q.shape, k.shape, v.shape
    if (b, h) != (bk, hk) or (b, h) != (bv, hv):
        raise InputError(f"batch/heads differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(layout {layout})")
    if dk != dk2:
        raise InputError(f"q and k head dims differ: {dk} vs {dk2}")
    if s != sv:
        raise InputError(f"k and v lengths differ: {s} vs {sv}")
    if t < 1 or s < 1:
        raise InputError(f"empty sequence: query length {t}, key length {s}")
    if spec.causal and t != s:
        raise InputError(f"{spec.name} is causal, so the query length must equal the key length "
                         f"(found {t} and {s}); load it with causal=False for cross attention")
    return q, k, v


def check_params(spec: Spec, params: dict, heads: int, like: torch.Tensor) -> dict:
    """Fill defaults for missing parameters and validate the given ones."""
    unknown = set(params) - set(spec.param_names)
    if unknown:
        raise InputError(f"unknown keyword(s) {sorted(unknown)} for {spec.name}; its parameters are "
                         f"{list(spec.param_names) or 'none'}")
    out = default_parameters(spec, heads, like.dtype, like.device)
    for p in spec.parameters:
        if p.name not in params:
            continue
        t = params[p.name]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        want = (heads,) if p.shape else ()
        if tuple(t.shape) != want:
            raise InputError(f"parameter {p.name}: expected shape {list(want)}, found {list(t.shape)}")
        out[p.name] = t
    return out


def check_cu_seqlens(cu_seqlens, batch: int, length: int, device) -> list:
    """Validate packed sequence boundaries (B = 1, sequences packed along T) and return them as ints:
    sequence n holds tokens [cu[n], cu[n + 1])."""
    fix = "Fix: cu_seqlens = [0, len_0, len_0 + len_1, ..., T] (an int32/int64 tensor), with B = 1"
    if not isinstance(cu_seqlens, torch.Tensor):
        raise InputError(f"cu_seqlens: expected a 1-D integer tensor, found {type(cu_seqlens).__name__}. {fix}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex \
            or cu_seqlens.dtype == torch.bool:
        raise InputError(f"cu_seqlens: expected a 1-D integer tensor, found {cu_seqlens.dtype} of shape "
                         f"{list(cu_seqlens.shape)}. {fix}")
    if batch != 1:
        raise InputError(f"cu_seqlens: packed sequences need batch size 1 (the sequences lie along T); found "
                         f"batch {batch}. {fix}")
    if cu_seqlens.device != torch.device(device) and cu_seqlens.device.type != "cpu":
        raise InputError(f"cu_seqlens: on {cu_seqlens.device}, the inputs on {device}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if len(bounds) < 2:
        raise InputError(f"cu_seqlens: expected at least 2 entries (N + 1 for N sequences), found {bounds}. {fix}")
    if bounds[0] != 0:
        raise InputError(f"cu_seqlens: must start at 0, found {bounds[0]} (in {_short(bounds)}). {fix}")
    bad = next((n for n in range(1, len(bounds)) if bounds[n] <= bounds[n - 1]), None)
    if bad is not None:
        raise InputError(f"cu_seqlens: must be strictly increasing (every sequence holds >= 1 token), found "
                         f"{bounds[bad - 1]} then {bounds[bad]} at entries {bad - 1}, {bad} (in {_short(bounds)}). "
                         f"{fix}")
    if bounds[-1] != length:
        raise InputError(f"cu_seqlens: must end at T = {length} (the packed length), found {bounds[-1]} "
                         f"(in {_short(bounds)}). {fix}")
    return bounds


def _short(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:10]))}, ..., {values[-1]}]"
