"""Rewrites of the attention expression: canonicalisation rules (data), separation and classification.

A rule is one named line: ``Rule(name, why, function)``; tests check for every rule that its result
has the intended form and still equals its input, symbolically and at random numeric points.
Separation turns the canonical similarity into FeatureTerms and the reweighting into a decay, position
terms (sympy finds cosFormer's cos(a - b) = cos a cos b + sin a sin b by itself), a Toeplitz kernel, or
gives up (general).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy
from sympy import Abs, Add, Mul, exp
from sympy.simplify.fu import TR10

from attngen.errors import SpecError
from attngen.frontend.expr import KE, QE, Dot, I, J, sides, varies
from attngen.ir import Decay, FeatureTerm, PositionTerm, Reweight, ReweightClass, Similarity, SimilarityClass

T_DIFF = sympy.Symbol("t", integer=True)  # i - j, the argument of a Toeplitz kernel h(t)


@dataclass(frozen=True)
class Rule:
    name: str
    why: str
    apply: Callable[[sympy.Expr], sympy.Expr]
    domain: str = "all"  # 'causal': equal only where j <= i


def _is_abs_diff(e) -> bool:
    return isinstance(e, Abs) and (sympy.expand(e.args[0] - (I - J)) == 0 or sympy.expand(e.args[0] + (I - J)) == 0)


def _causal_abs(expr):
    return expr.replace(_is_abs_diff, lambda e: I - J)


def _is_row_scalar(f, elem=None) -> bool:
    """True if f does not vary along the vector's elements: q's, k's and vector parameters' element symbols and
    vector maps (matmul, softmax) occur only inside reductions (norm, dot, mean, sum)."""
    return not varies(f)


def _pull_row_scalars(expr):
    def pull(dot):
        a, b = dot.args
        keep_a, out_a = _split_row(a, QE if QE in a.free_symbols else KE)
        keep_b, out_b = _split_row(b, QE if QE in b.free_symbols else KE)
        return out_a * out_b * Dot(keep_a, keep_b)
    return expr.replace(lambda e: isinstance(e, Dot), pull)


def _split_row(vec, elem):
    keep, out = [], []
    for f in Mul.make_args(vec):  # a factor varying along the head dim in either q or k stays inside
        (out if _is_row_scalar(f, QE) and _is_row_scalar(f, KE) else keep).append(f)
    return Mul(*keep), Mul(*out)


def _expand_products(expr):
    # expand products and integer powers of sums (Based's (1 + s + s**2/2)); the element formulas inside
    # dot() are left whole, so elu(q) + 1 stays one feature map of width d.
    return sympy.expand(expr, deep=False, power_exp=False, log=False)


def _expand_trig(expr):
    # TR10 splits sin/cos of sums only (no multiple-angle expansion, which would add terms)
    expanded = sympy.expand(expr, power_exp=True, log=False)
    return sympy.expand(TR10(expanded), power_exp=True, log=False)


SIMILARITY_RULES = (
    Rule("pull-row-scalars", "dot(c*a, b) = c*dot(a, b) when c is constant along the head dim "
         "(e.g. cosine's 1/max(norm(q), eps))", _pull_row_scalars),
    Rule("expand-products", "distribute products and integer powers of sums into a sum of terms",
         _expand_products),
)
CAUSAL_REWEIGHT_RULES = (
    Rule("causal-abs", "abs(i - j) = i - j on the causal part (j <= i)", _causal_abs, domain="causal"),
)
SEPARATION_RULES = (
    Rule("expand-trig", "expand arguments, then cos(a + b) = cos a cos b - sin a sin b, "
         "sin(a + b) = sin a cos b + cos a sin b and exp(a + b) = exp(a) exp(b)", _expand_trig),
)


def apply_rules(expr, rules, steps: list):
    for rule in rules:
        new = rule.apply(expr)
        if new != expr:
            steps.append((rule.name, f"{sympy.sstr(expr)}  ->  {sympy.sstr(new)}"))
        expr = new
    return expr


# ---------------------------------------------------------------------------------------------
# similarity
# ---------------------------------------------------------------------------------------------
def separate_terms(expr) -> tuple | None:
    """FeatureTerms of a canonical similarity, or None if some term has no finite separation."""
    terms = []
    for term in Add.make_args(expr):
        t = _feature_term(term)
        if t is None:
            return None
        terms.append(t)
    return tuple(terms)


def _feature_term(term):
    coeff, q_scale, k_scale, pairs = sympy.Integer(1), sympy.Integer(1), sympy.Integer(1), []
    for f in Mul.make_args(term):
        base, p = f.as_base_exp()
        who = sides(f)
        if isinstance(base, Dot) and p.is_Integer and int(p) > 0 and sides(base) == {"q", "k"}:
            a, b = base.args
            if sides(a) == {"k"} and sides(b) == {"q"}:
                a, b = b, a
            if sides(a) != {"q"} or sides(b) != {"k"}:
                return None  # a dot product that mixes q and k inside one argument
            pairs += [(a, b)] * int(p)
        elif not who:
            coeff *= f
        elif who == {"q"} and _is_row_scalar(f, QE):
            q_scale *= f
        elif who == {"k"} and _is_row_scalar(f, KE):
            k_scale *= f
        else:
            return None
    pairs.sort(key=lambda ab: (sympy.sstr(ab[0]), sympy.sstr(ab[1])))
    return FeatureTerm(coeff, q_scale, k_scale, tuple(a for a, _ in pairs), tuple(b for _, b in pairs))


def classify_similarity(expr, steps: list) -> Similarity:
    """Canonicalise the similarity and find its separable terms (or the exp / general class)."""
    canonical = apply_rules(expr, SIMILARITY_RULES, steps)
    terms = separate_terms(canonical)
    if terms is not None:
        return Similarity(SimilarityClass.SEPARABLE, canonical, terms)
    if isinstance(expr, exp):
        score = apply_rules(expr.args[0], SIMILARITY_RULES, [])
        if separate_terms(score) is not None:
            return Similarity(SimilarityClass.EXP, expr, (), score)
    return Similarity(SimilarityClass.GENERAL, canonical)


# ---------------------------------------------------------------------------------------------
# reweighting
# ---------------------------------------------------------------------------------------------
def _decay_factor(f):
    """(gamma, two_sided) if f is gamma**(c*(i-j)), gamma**(c*abs(i-j)) or exp(c*(i-j)) / exp(c*abs(i-j))."""
    if isinstance(f, exp):
        base, e = sympy.E, f.args[0]
    elif isinstance(f, sympy.Pow):
        base, e = f.args
    else:
        return None
    if base.has(I, J):
        return None
    for diff, two_sided in ((I - J, False), (Abs(I - J), True)):
        c = sympy.simplify(e / diff)
        if not c.has(I, J) and c != 0:
            gamma = exp(c) if base is sympy.E else base ** c
            return gamma, two_sided
    return None


def classify_reweight(expr, causal: bool, steps: list, where: str) -> Reweight:
    """Split W into decay x separable terms, or find the Toeplitz kernel, or give up (general)."""
    if causal:
        expr = apply_rules(expr, CAUSAL_REWEIGHT_RULES, steps)
    if not expr.has(I, J):
        kind = ReweightClass.NONE if expr == 1 else ReweightClass.SEPARABLE
        return Reweight(kind, expr, (PositionTerm(expr, sympy.Integer(1), sympy.Integer(1)),),
                        log_weight=_log_weight(expr))
    gammas, two_sided, rest = [], set(), []
    for f in Mul.make_args(expr):
        found = _decay_factor(f)
        if found is None:
            rest.append(f)
        else:
            gammas.append(found[0])
            two_sided.add(found[1])
    decay = None
    if gammas:
        if not causal and False in two_sided:
            raise SpecError(f"{sympy.sstr(expr)} grows without bound for j > i in the bidirectional mode",
                            where=where, key="reweight", expected="a decay of abs(i - j)",
                            fix="write gamma**abs(i - j), or make the spec causal")
        decay = Decay(Mul(*gammas), two_sided == {True})
    remainder = Mul(*rest)
    terms = _position_terms(remainder, steps)
    if terms is not None:
        kind = ReweightClass.DECAY if decay else ReweightClass.SEPARABLE
        return Reweight(kind, expr, terms, decay, log_weight=_log_weight(expr))
    kernel = _toeplitz_kernel(expr)
    if kernel is not None:
        steps.append(("toeplitz", f"W depends on i - j only: h(t) = {sympy.sstr(kernel)}"))
        return Reweight(ReweightClass.TOEPLITZ, expr, (), None, kernel, _log_weight(expr))
    return Reweight(ReweightClass.GENERAL, expr, (), None, None, _log_weight(expr))


def _position_terms(expr, steps):
    if not expr.has(I, J):
        return (PositionTerm(expr, sympy.Integer(1), sympy.Integer(1)),)
    expanded = apply_rules(expr, SEPARATION_RULES, steps)
    terms = []
    for term in Add.make_args(expanded):
        parts = sympy.separatevars(term, symbols=[I, J], dict=True)
        if parts is None:
            return None
        f, g = parts.get(I, sympy.Integer(1)), parts.get(J, sympy.Integer(1))
        if f.has(J) or g.has(I):
            return None
        terms.append(PositionTerm(parts["coeff"], f, g))
    return tuple(terms)


def _toeplitz_kernel(expr):
    h = sympy.simplify(expr.subs(I, J + T_DIFF))
    return None if h.has(J) or h.has(I) else h


def _log_weight(expr):
    """log W in closed form when W is a product of exponentials and positive powers (folds into a
    softmax score); None otherwise."""
    logs = []
    for f in Mul.make_args(expr):
        if f == 1:
            continue
        if isinstance(f, exp):
            logs.append(f.args[0])
        elif isinstance(f, sympy.Pow) and f.args[0].is_positive:
            logs.append(f.args[1] * sympy.log(f.args[0]))
        else:
            return None
    return Add(*logs)
