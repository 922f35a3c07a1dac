"""The capabilities pass: what the backends can do with the chosen plan, recorded on it (ir.Capabilities).

- the orderings whose Triton kernels the plan's generated module holds: those of a forced plan (or of an
  approximation), else every ordering the generator has templates for that is legal for the spec and that its
  templates express, so a module's text depends on the spec and not on the head dim; with two, the module's
  default crossover (at CROSSOVER_HEAD_DIM; a caller passes the one of its own head dim);
- whether the plan has a recurrent state (causal, separable, free of the final length) and, if not, why;
- the linear plan's factors that use the final length n_q / n_k (cosFormer's default M = max(n_q, n_k)).

For a plan whose target is the generator (target="triton"), an ordering its templates cannot express is a
PlanError; for a torch plan the reason is recorded instead.
"""
from __future__ import annotations

import sympy

from attngen.errors import PlanError
from attngen.frontend.expr import HEAD, N_K, N_Q
from attngen.ir import CROSSOVER_HEAD_DIM, Capabilities, Ordering
from attngen.passes import cost
from attngen.passes.draft import Draft


def capabilities(x: Draft) -> Draft:
    terms = length_terms(x)
    decodable, why = _decodable(x, terms)
    kernels, reason, crossover = (), "", None
    if x.generator is None:
        reason = "no code generator given"
    else:
        try:
            kernels = _module_orderings(x)
        except PlanError as exc:
            if x.target == x.generator.name:
                raise
            reason = str(exc)
        if len(kernels) > 1:
            cands = tuple(c for c in x.candidates if c.ordering in x.generator.orderings)
            crossover = cost.choose(cands, CROSSOVER_HEAD_DIM, x.chunk)[0].dispatch_length(x.spec.where)
    shared, shared_why = _shared_state(x) if decodable else (False, "no recurrent state")
    cap = Capabilities(kernels=kernels, kernels_reason=reason, crossover=crossover, decodable=decodable,
                       decode_reason=why, length_terms=tuple(sorted(sympy.sstr(e) for e in set(terms))),
                       shared_state=shared, shared_reason=shared_why)
    name = x.generator.name if x.generator is not None else "kernels"
    detail = (f"{name}: " + (", ".join(o.value for o in kernels) or "none")
              + (f" (default crossover {crossover:g} at d = {CROSSOVER_HEAD_DIM})" if crossover is not None else "")
              + "; decodable: " + ("yes" if decodable else "no")
              + ("; with grouped KV heads one state per kv head" if shared else
                 f"; states per query head ({shared_why})" if decodable else ""))
    return x.step("capabilities", detail, capabilities=cap)


def length_terms(x) -> list:
    """The linear plan's factors (features, positions, decay) that depend on n_q or n_k."""
    exprs = [e for t in x.linear_terms for e in (t.feature.coeff, t.feature.q_scale, t.feature.k_scale,
                                                  *t.feature.q_factors, *t.feature.k_factors, t.position.coeff,
                                                  t.position.f_i, t.position.g_j)]
    if x.reweight is not None and x.reweight.decay is not None:
        exprs.append(x.reweight.decay.gamma)
    return [e for e in exprs if sympy.sympify(e).has(N_Q, N_K)]


def _shared_state(x: Draft) -> tuple:
    """(True, "") when the state S = sum_j K'_j^T V_j (and its decay) is the same for every query head of a group of
    grouped KV heads: no gate (gates are per query head) and key-side features, position factors and decay free of
    the head index and of per-head parameters; else (False, why)."""
    if x.spec.gates:
        return False, "the gate is per query head"
    per_head = {HEAD} | {p.symbol for p in x.spec.parameters if p.shape}
    exprs = [e for t in x.linear_terms for e in (t.feature.k_scale, *t.feature.k_factors, t.position.g_j)]
    if x.reweight is not None and x.reweight.decay is not None:
        exprs.append(x.reweight.decay.gamma)
    if any(sympy.sympify(e).free_symbols & per_head for e in exprs):
        return False, "the key side or the decay depends on the head"
    return True, ""


def _decodable(x: Draft, terms: list) -> tuple:
    """(True, "") when the plan has a recurrent state, else (False, why and how to fix it)."""
    spec = x.spec
    if not spec.causal:
        return False, (f"{spec.name} is bidirectional: every output depends on every token, so it has no recurrent "
                       "state to carry or decode. Fix: load_spec(..., causal=True) to decode, or call the op on "
                       "the whole sequence")
    if spec.window is not None:
        return False, (f"{spec.name} ({spec.mode}) has a window of {spec.window} keys: the mask is not separable, so "
                       "there is no constant-size state (its decode state would be a cache of the last "
                       f"{spec.window} keys, which attngen does not provide). Fix: call the op on the whole sequence "
                       "(cu_seqlens packs several), or remove the window")
    if not x.linear_terms:
        reason = next(c.reason for c in x.candidates if c.ordering is Ordering.LINEAR)
        return False, (f"{spec.name} ({spec.mode}) has no linear (separable) form, so no constant-size state: "
                       f"{reason}. Its decode state would be the whole KV cache. Fix: call the op on the whole "
                       "sequence, or use a separable spec")
    if x.available is not None and Ordering.LINEAR not in x.available:
        return False, (f"{spec.name} ({spec.mode}): the {x.target} backend runs its quadratic ordering only (the "
                       "linear kernels are not generated for it, see the plan), so it has no constant-size state. "
                       "Fix: use backend='torch' to decode, or call the op on the whole sequence")
    if not terms:
        return True, ""
    values = spec.constant_values()
    names = [c.name for c in spec.constants if values[c.symbol].has(N_Q) or values[c.symbol].has(N_K)]
    if names:
        fix = (f"fix {', '.join(names)} as a constant at least as long as the longest sequence you will run, "
               f"e.g. attngen.load_spec({spec.name!r}, {names[0]}=4096)")
        cause = "the constant " + ", ".join(f"{c.name} = {values[c.symbol]}" for c in spec.constants
                                            if c.name in names)
    else:
        fix = "write the reweight without n, n_q or n_k (or with a fixed constant in their place)"
        cause = "the reweight"
    return False, (f"{spec.name}'s position terms depend on the final sequence length through {cause} (in "
                   f"{terms[0]}), so the weights of tokens already consumed would change as the sequence grows: it "
                   f"cannot be decoded, continued from a state or streamed exactly. Fix: {fix} (docs/specs.md, "
                   "'Decoding and length-dependent constants')")


def _kernel_orderings(x: Draft) -> tuple:
    """The orderings whose kernels run the choice (topk_sparse runs the quadratic block-sparse kernels)."""
    out = []
    for o in dict.fromkeys((x.choice.below, x.choice.above)):
        if o is Ordering.TOPK_SPARSE:
            o = Ordering.QUADRATIC
        if o not in x.generator.orderings:
            spec = x.spec
            raise PlanError(f"{spec.where} ({spec.name}, {spec.mode}): the {x.generator.name} backend generates the "
                            f"{' and '.join(o.value for o in x.generator.orderings)} orderings (and topk_sparse's "
                            f"block-sparse kernels); this plan is {x.choice.describe()}: use backend='torch', or "
                            "force plan='linear' / 'quadratic'")
        out.append(o)
    return tuple(out)


def _module_orderings(x: Draft) -> tuple:
    chosen = _kernel_orderings(x)
    for o in chosen:
        x.generator.check(x, o)
    if x.choice.forced or x.choice.below not in x.generator.orderings:
        return chosen
    out = []
    for o in x.generator.orderings:
        if o is Ordering.LINEAR and not x.linear_terms:
            continue
        if not all(c.legal for c in x.candidates if c.ordering is o):  # a gate rules out the quadratic one
            continue
        if o not in chosen:
            try:
                x.generator.check(x, o)
            except PlanError:
                continue
        out.append(o)
    return tuple(out)
