"""Frontend passes: the loaded spec's expressions into the draft, constants substituted, softmax canonicalised.

(Loading itself, the restricted parser and the validation, is attngen.frontend.)
"""
from __future__ import annotations

from dataclasses import replace

import sympy

from attngen.frontend.spec import Normalize
from attngen.passes.draft import Draft


def read_spec(x: Draft) -> Draft:
    """The spec's expressions (parsed and validated by load_spec) become the draft's."""
    spec = x.spec
    x = x.step("input", f"A(i,j) = {'[j <= i] * ' if spec.causal else ''}W(i,j) * s(q_i, k_j);  "
               f"s = {spec.similarity};  W = {spec.reweight};  normalize = {spec.normalize.kind}")
    return replace(x, similarity_expr=spec.similarity_expr, reweight_expr=spec.reweight_expr,
                   normalize=spec.normalize)


def substitute_constants(x: Draft) -> Draft:
    """The spec's constants replaced by their values (which may use n_q, n_k, d, h)."""
    consts = x.spec.constant_values()
    if not consts:
        return x
    x = x.step("substitute-constants", ", ".join(f"{k} = {sympy.sstr(v)}" for k, v in consts.items()))
    return replace(x, similarity_expr=x.similarity_expr.xreplace(consts),
                   reweight_expr=x.reweight_expr.xreplace(consts))


def softmax_as_exp(x: Draft) -> Draft:
    """normalize: softmax is the row sum of exp(similarity)."""
    if x.normalize.kind != "softmax":
        return x
    sim = sympy.exp(x.similarity_expr)
    x = x.step("softmax-as-exp", f"softmax = row sum of exp(s): s -> {sympy.sstr(sim)}")
    return replace(x, similarity_expr=sim, normalize=Normalize("rowsum", 0.0, "add"))
