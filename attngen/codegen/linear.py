"""The linear ordering's template slots (feature maps, their derivatives, position factors, the decay, the
normaliser), printed from a plan; and ``check_linear``: whether the linear templates express a plan.

Python fills the templates' named slots; the templates hold no math. Every formula (feature maps, their
derivatives from sympy.diff, row scales, position factors, parameter derivatives, the normaliser) is printed
by attngen.codegen.printer, which refuses what it cannot print.
"""
from __future__ import annotations

import sympy

from attngen.codegen.features import SCALARS, ParamGrad, Side, param_names
from attngen.codegen.features import params as param_slots
from attngen.codegen.printer import TritonPrinter
from attngen.errors import PlanError
from attngen.frontend.expr import KE, QE, I, J
from attngen.ir import Plan, ReweightClass

POWER_MAX_HEAD_DIM = 16  # a d**2 feature block lives in registers: [BT, BK * BK] and a [BK * BK, BV] state
# the rows of one term's block in the state S [F, Dv], by the term's tensor power (K is the head dim)
STATE_WIDTH = {0: "1", 1: "K", 2: "K * K"}


def linear_slots(plan: Plan) -> dict:
    """The linear template's slots for ``plan``."""
    spec = plan.spec
    params = param_slots(spec)
    names = dict(SCALARS)
    names.update(param_names(params))
    sides = {s: Side(s, names, spec.where, params) for s in ("q", "k")}
    terms, offset = [], []
    for r, lt in enumerate(plan.linear_terms):
        f, pos = lt.feature, lt.position
        q_factor = tuple(f.q_factors) if f.q_factors else None
        k_factor = tuple(f.k_factors) if f.k_factors else None
        width = STATE_WIDTH[f.power]
        terms.append({
            "i": r, "cols": "BK * BK" if f.power == 2 else "BK", "width": width,
            "offset": " + ".join(offset) or "0",
            "q": sides["q"].term(f.q_scale, q_factor, f.coeff * pos.coeff * pos.f_i, params),
            "k": sides["k"].term(f.k_scale, k_factor, pos.g_j, params),
        })
        offset.append(width)
    norm = plan.normalize
    rowsum = norm.kind == "rowsum"
    eps = repr(float(norm.eps))
    clamp = rowsum and norm.eps_mode == "clamp"
    return {
        "plan_lines": [lt.feature.describe() + "  x  " + lt.position.describe() for lt in plan.linear_terms],
        "chunk": plan.chunk, "length_terms": list(plan.capabilities.length_terms),
        # the feature width F = width[0] + width[1] * d + width[2] * d**2 (the blocks of widths 1, K, K * K)
        "width": tuple(sum(t["width"] == w for t in terms) for w in STATE_WIDTH.values()), "terms": terms,
        "sides": {s: side.slots() for s, side in sides.items()},
        "rowsum": rowsum,
        "den_expr": (f"tl.maximum(b_den, {eps})" if clamp else f"b_den + {eps}") if rowsum else "b_den",
        "dden_mask": f"b_den > {eps}" if clamp else None,
        "decay": _decay(plan, names, params),
        # a gate: the chunk-parallel scan's per-token (per-column) weights (linear_chunked.py.j2), no fused kernels
        "weights": "gamma" if plan.reweight.decay is not None else None if spec.gate is None
        else "dim" if spec.gate.per == "key_dim" else "gate",
        "gate_dim": spec.gate is not None and spec.gate.per == "key_dim",
        "scan_arg": "gam, " if plan.reweight.decay is not None else "gt, " if spec.gate is not None else "",
        "max_power_dim": POWER_MAX_HEAD_DIM if any(lt.feature.power == 2 for lt in plan.linear_terms) else None,
        # a causal module with tensor-power features has no fused forward scan: its [BT, BK * BK] feature tiles
        # and state do not fit one program's registers (attngen aot: spills on sm_90); the chunk-parallel
        # forward runs instead, whose passes each hold half of them
        "fused_forward": not any(lt.feature.power == 2 for lt in plan.linear_terms),
    }


def _decay(plan: Plan, names: dict, params: list):
    """The decay slot: gamma per head and d log(gamma) / d parameter, printed (None without a decay)."""
    decay = plan.reweight.decay
    if decay is None:
        return None
    where = plan.spec.where
    gamma = decay.gamma
    dparams = []
    for p in params:
        d = sympy.simplify(sympy.diff(sympy.log(gamma), p["symbol"]))
        if d != 0:
            what = f"derivative by {p['name']} of log of the decay gamma"
            dparams.append(ParamGrad(p["name"], TritonPrinter(names, where, what)(d)))
    return {"gamma": TritonPrinter(names, where, "decay gamma")(gamma), "dparams": dparams,
            "two_sided": decay.two_sided, "text": sympy.sstr(gamma)}


def check_linear(plan: Plan):
    """PlanError unless the linear templates can generate ``plan``'s linear ordering."""
    spec = plan.spec
    where = f"{spec.where} ({spec.name}, {spec.mode})"
    if not plan.linear_terms:
        raise PlanError(f"{where}: the linear ordering is not legal for this plan ({plan.choice.describe()})")
    if plan.reweight.kind is ReweightClass.DECAY:
        if plan.normalize.kind != "none":
            raise PlanError(f"{where}: decay reweighting ({sympy.sstr(plan.reweight.decay.gamma)}**(i-j)) with "
                            f"normalisation {plan.normalize.kind!r} is not generated by the Triton backend yet "
                            "(decay kernels have no row-sum column); use backend='torch' or normalize: none")
        if plan.reweight.decay.gamma.has(I, J, QE, KE):
            raise PlanError(f"{where}: the decay gamma {sympy.sstr(plan.reweight.decay.gamma)} must not depend "
                            "on i, j, q or k")
    if spec.rotary is not None and not spec.causal:
        raise PlanError(f"{where}: rotary positions are applied by the quadratic and the causal (chunk-parallel) "
                        "linear Triton kernels, not by the bidirectional linear ones yet; use backend='torch'")
    gate = spec.gate
    if gate is not None:
        one_block = len(plan.linear_terms) == 1 and plan.linear_terms[0].feature.power == 1
        why = ("a per-key-dimension gate over several feature blocks" if gate.per == "key_dim" and not one_block else
               "a gate with a decay reweighting" if plan.reweight.kind is ReweightClass.DECAY else
               "a gate with a row-sum normalisation" if plan.normalize.kind != "none" else "")
        if why:
            raise PlanError(f"{where}: {why} is not generated by the Triton templates yet (they scan a gate without a "
                            "decay or row sums, per key dimension over one feature block); use backend='torch'")
    if plan.normalize.kind not in ("none", "rowsum"):
        raise PlanError(f"{where}: normalisation {plan.normalize.kind!r} has no linear kernel")
    unfused = {p.symbol for p in spec.parameters if p.kind not in ("scalar", "vector")}
    for lt in plan.linear_terms:
        f = lt.feature
        if f.power > 2:
            raise PlanError(f"{where}: the feature term {f.describe()} is a tensor power (width d**{f.power}); "
                            "the Triton backend generates tensor powers up to 2 (width d**2) only")
        for e in (*f.q_factors, *f.k_factors, f.q_scale, f.k_scale):
            if e.free_symbols & unfused:
                raise PlanError(f"{where}: {sympy.sstr(e)} uses a matrix or table parameter inside a feature map; "
                                "the Triton kernels fuse number and vector parameters there only")
        if f.coeff.has(QE, KE, I, J) or lt.position.f_i.has(J) or lt.position.g_j.has(I):
            raise PlanError(f"{where}: {lt.feature.describe()} x {lt.position.describe()} is not separable")
