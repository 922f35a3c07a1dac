"""Specs of several terms (docs/specs.md, "terms"): O = sum_t c_t O_t, each term's O_t from its own spec on its slice
of q and k, or, with a shared normaliser, O = sum_t c_t N_t / (sum_t c_t Z_t (+) eps) with N_t, Z_t the term's
unnormalised output and row sums (one run on [V | 1]). The op (each term an AttentionOp) and the naive reference
(each term's reference) combine through the same function."""
from __future__ import annotations

import torch

from attngen.errors import InputError
from attngen.frontend.expr import HEAD, HEADS, D
from attngen.runtime.evaluate import Evaluator, compiled, parameter_value


def slices(spec, head_dim: int) -> list:
    """(lo, hi) of each term at head dim ``head_dim`` (None: the whole head dim); InputError when out of range."""
    out = []
    for n, t in enumerate(spec.terms):
        if t.slice_exprs is None:
            out.append(None)
            continue
        lo, hi = (float(e.subs(D, head_dim)) for e in t.slice_exprs)
        if lo != int(lo) or hi != int(hi) or not 0 <= lo < hi <= head_dim:
            raise InputError(f"{spec.name}: terms[{n}].slice [{t.slice[0]}, {t.slice[1]}] is [{lo:g}, {hi:g}] at head "
                             f"dim {head_dim}; expected whole numbers 0 <= lo < hi <= {head_dim}")
        out.append((int(lo), int(hi)))
    return out


def coefficients(spec, values: dict, heads: int, head_dim: int, like: torch.Tensor, closures=None) -> list:
    """Each term's coefficient: a number, or a [1, H, 1, 1] tensor when it depends on the head (differentiable in
    the parameters it uses). ``closures``: the coefficients' (coefficient_closures), translated beforehand."""
    env = {D: head_dim, HEADS: heads, HEAD: torch.arange(heads, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)}
    for p in spec.parameters:
        if p.kind == "scalar" and p.name in values:
            env[p.symbol] = parameter_value(p, values[p.name].to(like.dtype), 4)
    ev = Evaluator(env, where=f"{spec.where}: terms")
    return [ev.run(c) for c in closures] if closures is not None else [ev(t.coefficient_expr) for t in spec.terms]


def coefficient_closures(spec) -> list:
    """The terms' coefficients translated into closures (attngen.runtime.evaluate.compiled), once per op."""
    return [compiled(t.coefficient_expr, f"{spec.where}: terms") for t in spec.terms]


def combine(spec, q, k, v, values: dict, layout: str, run_term, cuts: list | None = None,
            closures: list | None = None) -> torch.Tensor:
    """O of a spec with terms for q, k, v in ``layout``: ``run_term(n, q_n, k_n, v_n, params_n)`` runs term n (its op
    or its reference) on its slices of q and k. ``cuts`` (slices(spec, head dim)) and ``closures``
    (coefficient_closures(spec)): worked out beforehand by the op (a torch.compile trace then meets no sympy)."""
    head_axis = 1 if layout == "bhtd" else 2
    heads, head_dim = q.shape[head_axis], q.shape[-1]
    cs = coefficients(spec, values, heads, head_dim, q, closures)
    shared = spec.normalize.kind != "none"
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1) if shared else v
    num = None
    for n, (term, cut, c) in enumerate(zip(spec.terms, cuts or slices(spec, head_dim), cs)):
        qn, kn = (q, k) if cut is None else (q[..., cut[0]:cut[1]], k[..., cut[0]:cut[1]])
        out = run_term(n, qn, kn, vv, {p: values[p] for p in term.spec.param_names if p in values})
        if isinstance(c, torch.Tensor) and layout == "bthd":
            c = c.transpose(1, 2)
        part = out * c
        num = part if num is None else num + part
    if not shared:
        return num
    eps = spec.normalize.eps
    z = num[..., -1:]
    z = z.clamp_min(eps) if spec.normalize.eps_mode == "clamp" else z + eps
    return num[..., :-1] / z
