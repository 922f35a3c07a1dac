"""Frontend passes: the loaded spec's expressions into the draft, constants substituted, softmax canonicalised.

(Loading itself, the restricted parser and the validation, is attngen.frontend.)
"""
from __future__ import annotations

import keyword
from dataclasses import replace

import sympy

from attngen.errors import SpecError
from attngen.frontend.spec import Normalize
from attngen.passes.draft import Draft

# Parameters become keyword arguments of the op, of the reference and of a generated module's functions, next to
# these names (and the module's globals): a parameter named like one of them would shadow it or clash with it
CALL_NAMES = frozenset({
    "q", "k", "v", "q_t", "k_t", "v_t", "S", "z", "pos", "state", "initial_state", "return_state", "cu_seqlens",
    "layout", "crossover", "kv_blocks", "block", "plan", "backend", "chunk", "params", "self",  # call signatures
    "host", "MODULE", "torch", "triton", "tl", "math", "Optional", "CROSSOVER",  # a generated module's globals
})


def check_names(x: Draft) -> Draft:
    """SpecError for a parameter name that would clash in generated code or a call signature."""
    for g in x.spec.gates:
        if g.name in CALL_NAMES or keyword.iskeyword(g.name) or g.name.startswith("_"):
            raise SpecError(f"the gate name {g.name!r} clashes with a name of the op's call or of the generated "
                            "module", where=x.spec.where, key=f"gates.{g.name}",
                            expected="a name that is not a Python keyword, does not start with '_' and is not one of "
                                     + ", ".join(sorted(CALL_NAMES)), fix="rename it, e.g. g")
    for p in x.spec.parameters:
        clash = p.name in CALL_NAMES or keyword.iskeyword(p.name) or p.name.startswith("_") or \
            p.name.upper() == p.name and p.name in ("SPEC_NAME", "SPEC_HASH", "TEMPLATE_HASH", "ATTNGEN_VERSION")
        if clash:
            raise SpecError(f"the parameter name {p.name!r} clashes with a name of the op's call or of the generated "
                            "module", where=x.spec.where, key=f"parameters.{p.name}",
                            expected="a name that is not a Python keyword, does not start with '_' and is not one of "
                                     + ", ".join(sorted(CALL_NAMES)),
                            fix=f"rename it, e.g. {p.name.strip('_') or 'p'}_param")
    return x


def read_spec(x: Draft) -> Draft:
    """The spec's expressions (parsed and validated by load_spec) become the draft's."""
    spec = x.spec
    mask = "[j <= i] * " if spec.causal else ""
    if spec.window is not None:
        mask += f"[|i - j| < {spec.window}] * "
    x = x.step("input", f"A(i,j) = {mask}W(i,j) * s(q_i, k_j);  "
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
