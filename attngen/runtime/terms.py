"""Specs of several terms (docs/specs.md, "terms"): O = sum_t c_t O_t, each term's O_t from its own spec on its slice
of q and k, or, with a shared normaliser, O = sum_t c_t N_t / (sum_t c_t Z_t (+) eps) with N_t, Z_t the term's
unnormalised output and row sums (one run on [V | 1]); an exp(score) term gives its softmax output o_t and log row
sum lse_t instead (N_t = o_t e^lse_t, Z_t = e^lse_t), combined with one shift per row so that nothing overflows
(_shared_exp). The op (each term an AttentionOp) and the naive reference (each term's reference) combine through the
same function, except for exp terms under a shared normaliser, which the reference evaluates directly
(attngen.naive).

The op fuses what it can: terms whose specs are the same computation (differential attention's two softmax halves)
over slices of one width run as one call on their slices stacked along the head axis (``batches``); the naive
reference runs every term on its own."""
from __future__ import annotations

import math

import torch

from attngen.errors import InputError
from attngen.frontend.expr import HEAD, HEADS, D
from attngen.frontend.spec import shared_exp_terms
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


def batchable(term) -> bool:
    """Whether term's computation is the same on every head: no parameters, gates or expressions in h or H (stacking
    its heads with another term's would change what h means)."""
    s = term.spec
    exprs = [s.similarity_expr, s.reweight_expr] + [c.expr for c in s.constants]
    return not s.parameters and not s.gates and not any(e.has(HEAD) or e.has(HEADS) for e in exprs)


def batches(spec, cuts: list) -> list:
    """The terms grouped into calls: lists of term indices, each list one call. Terms whose specs are the same
    computation (equal but for the name) over slices of one width share a call."""
    groups, seen = [], {}
    for n, (term, cut) in enumerate(zip(spec.terms, cuts)):
        if not batchable(term):
            groups.append([n])
            continue
        body = term.spec.canonical()
        body.pop("name", None)
        key = (repr(body), None if cut is None else cut[1] - cut[0])
        if key in seen:
            groups[seen[key]].append(n)
        else:
            seen[key] = len(groups)
            groups.append([n])
    return groups


def coefficient_closures(spec) -> list:
    """The terms' coefficients translated into closures (attngen.runtime.evaluate.compiled), once per op."""
    return [compiled(t.coefficient_expr, f"{spec.where}: terms") for t in spec.terms]


def combine(spec, q, k, v, values: dict, layout: str, run_term, cuts: list | None = None,
            closures: list | None = None, groups: list | None = None) -> torch.Tensor:
    """O of a spec with terms for q, k, v in ``layout``: ``run_term(n, q_n, k_n, v_n, params_n, lse)`` runs term n (its
    op or its reference) on its slices of q and k; ``lse`` (the exp terms under a shared normaliser,
    shared_exp_terms) asks it for (o_n, lse_n): its normalised output and its log row sum [B, H, T] ("bhtd") or
    [B, T, H] ("bthd"), -inf on rows it attends nothing. ``cuts`` (slices(spec, head dim)) and ``closures``
    (coefficient_closures(spec)): worked out beforehand by the op (a torch.compile trace then meets no sympy).
    ``groups`` (batches(spec, cuts)): terms of one computation run as one call of the first one's ``run_term`` on
    their slices stacked along the head axis; None runs every term alone (the naive reference)."""
    head_axis = 1 if layout == "bhtd" else 2
    heads, head_dim = q.shape[head_axis], q.shape[-1]
    cs = coefficients(spec, values, heads, head_dim, q, closures)
    cuts = cuts if cuts is not None else slices(spec, head_dim)
    shared = spec.normalize.kind != "none"
    with_lse = set(shared_exp_terms(spec))
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1) if shared and len(with_lse) < len(spec.terms) else v
    outs = {}
    for group in (groups if groups is not None else [[n] for n in range(len(spec.terms))]):
        parts = [(q, k) if cuts[n] is None else (q[..., cuts[n][0]:cuts[n][1]], k[..., cuts[n][0]:cuts[n][1]])
                 for n in group]
        first = spec.terms[group[0]]
        params = {p: values[p] for p in first.spec.param_names if p in values}
        lse = group[0] in with_lse  # the terms of a group are one computation: all or none of them
        vg = v if lse else vv
        if len(group) == 1:
            outs[group[0]] = run_term(group[0], parts[0][0], parts[0][1], vg, params, lse)
            continue
        qs = torch.cat([a for a, _ in parts], head_axis)
        ks = torch.cat([b for _, b in parts], head_axis)
        out = run_term(group[0], qs, ks, torch.cat([vg] * len(group), head_axis), params, lse)
        pieces = zip(*(x.chunk(len(group), head_axis) for x in out)) if lse else out.chunk(len(group), head_axis)
        for n, o in zip(group, pieces):
            outs[n] = o
    if with_lse:
        return _shared_exp(spec, outs, cs, with_lse, layout, v.dtype)
    num = None
    for n, c in enumerate(cs):
        if isinstance(c, torch.Tensor) and layout == "bthd":
            c = c.transpose(1, 2)
        part = outs[n] * c
        num = part if num is None else num + part
    if not shared:
        return num
    eps = spec.normalize.eps
    z = num[..., -1:]
    z = z.clamp_min(eps) if spec.normalize.eps_mode == "clamp" else z + eps
    return num[..., :-1] / z


def _shared_exp(spec, outs: dict, cs: list, with_lse: set, layout: str, out_dtype) -> torch.Tensor:
    """O = sum_t c_t N_t / (sum_t c_t Z_t + eps) (eps clamped with eps_mode clamp) where the exp terms gave
    (o_t, lse_t), N_t = o_t exp(lse_t) and Z_t = exp(lse_t), and the others [N_t | Z_t]. One shift per row,
    M = max(lse_t over the exp terms, 0 when a term has no exp, log(eps) when eps > 0) (0 where that is -inf: no
    term attends the row), multiplies the numerator and the denominator by exp(-M), which cancels:
        O = (sum_exp c_t o_t e^(lse_t - M) + sum_other c_t N_t e^-M)
            / (sum_exp c_t e^(lse_t - M) + sum_other c_t Z_t e^-M + eps e^-M)
    with every exponent <= 0 (no overflow at any score). M carries no gradient (it cancels); lse_t does: its gradient
    enters each term's backward as dlse (flash-style: ds_ij gains p_ij dlse_i). Rows with nothing to divide (no term
    attends them, eps = 0) give 0. The terms' outputs come in the compute dtype (AttentionOp.softmax_lse: float32
    for half inputs); the combination, a few elementwise ops per output, runs in float64 for float32 / float64
    outputs (float32 for half ones) and is rounded once to ``out_dtype``: in float32 its rounding alone reached 5x the
    torch backend's error on a coefficient's gradient that cancels to ~0 (T = 1, where O = V up to eps)."""
    dtype = torch.float64 if out_dtype in (torch.float32, torch.float64) else torch.float32
    lses = {n: outs[n][1].to(dtype).unsqueeze(-1) for n in with_lse}  # [.., T, 1] in the layout of o
    top = torch.stack(list(lses.values())).amax(0).detach()
    norm = spec.normalize
    floor = [0.0] * (len(with_lse) < len(spec.terms)) + ([math.log(norm.eps)] if norm.eps > 0 else [])
    if floor:
        top = top.clamp_min(max(floor))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # every lse -inf (no key), no floor
    num = den = 0
    empty = None  # rows no term attends: every lse -inf and every other Z exactly 0
    for n, c in enumerate(cs):
        if isinstance(c, torch.Tensor) and layout == "bthd":
            c = c.transpose(1, 2)
        if n in with_lse:
            w = c * torch.exp(lses[n] - top)
            num = num + w * outs[n][0].to(dtype)
            den = den + w
            none = lses[n] == float("-inf")
        else:
            part = outs[n].to(dtype) * torch.exp(-top)
            num = num + c * part[..., :-1]
            den = den + c * part[..., -1:]
            none = outs[n][..., -1:] == 0
        empty = none if empty is None else empty & none
    eps = norm.eps * torch.exp(-top)
    den = torch.maximum(den, eps) if norm.eps_mode == "clamp" else den + eps
    den = torch.where(empty & (den == 0), torch.ones_like(den), den)
    return (num / den).to(out_dtype)
