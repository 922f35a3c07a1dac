"""The feature prologue of the Triton target: feature maps its templates cannot form, computed before the kernels.

The generated kernels print a feature map element by element from the q or k block they hold, with the row
reductions norm and dot of that block, and read number parameters ([] / [H]) and vector ones ([Dk] / [H, Dk], a
row of the block's width) inside the element formulas of a dot of q and k, their gradients reduced in-kernel. A
feature map with a matrix product (``matmul(W, q)``), a softmax over the vector, ``mean`` / ``sum``, reductions
nested in reductions, or a parameter elsewhere inside a reduction (norm(g * q), a matrix) is instead evaluated by
the torch evaluator (autograd gives the parameters' gradients), and the kernels run the *core* spec on those
feature rows:

    similarity  c * dot(a(q), b(k))**2          core: c * dot(q', k')**2        q' = a(q), k' = b(k)
    similarity  dot(a1(q), b1(k)) + c dot(a2(q), b2(k))     core: dot(q', k')   q' = [a1(q) | c a2(q)], k' = [b1 | b2]

Which similarities split: every dot that needs the prologue is the same dot (one pair a, b), or the dots that need it
are the terms of one sum with coefficients free of q and k; q and k appear nowhere else. The core keeps the spec's
reweight, normalisation, gates and the parameters they use. Anything else is a PlanError that says so
(backend='torch' evaluates every spec).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy

from attngen.errors import PlanError
from attngen.frontend.expr import (
    HEAD,
    HEADS,
    KE,
    N_K,
    N_Q,
    QE,
    REDUCTIONS,
    VECTOR_FUNCTIONS,
    D,
    Dot,
    Elem,
    Matrix,
    MatVec,
    Mean,
    Norm,
    Softmax,
    Total,
    VecMax,
    sides,
    vector_width,
)
from attngen.frontend.spec import Spec

CORE_DOT = Dot(QE, KE)


@dataclass(frozen=True)
class Prologue:
    """q' = [q_vectors evaluated on q], k' = [k_vectors on k] (element formulas, concatenated), then ``core``."""
    spec: Spec  # the spec as written
    core: Spec  # the spec the kernels run, on q', k'
    q_vectors: tuple
    k_vectors: tuple
    per_head_keys: bool  # the key side uses the head index or a per-head parameter: k is repeated per query head
    # the Triton kernels compute q', k' themselves from the q / k blocks (matmul by tl.dot, softmax and row
    # reductions in registers, gradients in-kernel: fusable()); False: the op computes them first in torch
    fused: bool = False
    unfused: str = ""  # why a prologue the planner looked at is not fused ('' when fused or not looked at)

    def width(self, head_dim: int) -> int:
        """The width of q', k' at head dim ``head_dim``."""
        return sum(int(vector_width(v, head_dim)) for v in self.q_vectors)

    def describe(self) -> str:
        q = " | ".join(sympy.sstr(v) for v in self.q_vectors)
        k = " | ".join(sympy.sstr(v) for v in self.k_vectors)
        if self.fused:
            return (f"feature maps fused into the linear kernels (matmul by tl.dot, softmax and row reductions in "
                    f"registers, their gradients in-kernel): q' = [{q}], k' = [{k}]; the kernels run similarity "
                    f"{self.core.similarity} on q', k'")
        why = f" (not fused: {self.unfused})" if self.unfused else ""
        return (f"feature maps computed before the kernels (torch, autograd){why}: q' = [{q}], k' = [{k}]; the "
                f"kernels run similarity {self.core.similarity} on q', k'")

    def core_values(self, values: dict) -> dict:
        """The parameters the core spec takes (those its reweight and similarity still use)."""
        names = set(self.core.param_names)
        return {n: t for n, t in values.items() if n in names}


def needs_prologue(spec: Spec) -> bool:
    return bool(_prologue_nodes(_similarity(spec), _parameter_symbols(spec), _fusable_symbols(spec)))


def fused(spec: Spec) -> str:
    """What the Triton kernels evaluate inside their feature maps beyond the element functions they always print:
    the parameters and the row reductions in the element formulas of the dots of q and k (one line; '' when there
    are none, or when the spec needs a prologue)."""
    if needs_prologue(spec):
        return ""
    params = _parameter_symbols(spec)
    pairs, names = [], set()
    for node in sympy.preorder_traversal(_similarity(spec)):
        if _pair_dot(node) and any(a.free_symbols & params or a.has(*REDUCTIONS) for a in node.args):
            a, b = node.args if sides(node.args[0]) == {"q"} else node.args[::-1]
            pairs.append(f"{_formula(a)} of q, {_formula(b)} of k")
            names |= {p.name for p in spec.parameters if p.symbol in a.free_symbols | b.free_symbols}
    if not pairs:
        return ""
    read = f"; parameters {', '.join(sorted(names))} read in-kernel, their gradients reduced there" if names else ""
    return f"feature maps fused into the kernels (no prologue): {'; '.join(dict.fromkeys(pairs))}{read}"


def split(spec: Spec) -> Prologue | None:
    """The spec's prologue and core for the Triton target, or None when the kernels can form its feature maps."""
    params = _parameter_symbols(spec)
    expr = _similarity(spec)
    nodes = _prologue_nodes(expr, params, _fusable_symbols(spec))
    if not nodes:
        return None
    where = spec.where

    def refuse(why: str) -> PlanError:
        return PlanError(f"{where}: the similarity {spec.similarity.strip()} has feature maps the Triton kernels "
                         "cannot form (a matmul, softmax, mean, sum, nested reductions or a parameter inside them), "
                         f"and {why}; use backend='torch'")

    if spec.rotary is not None:
        raise refuse("rotary positions would have to be applied before them")
    if spec.gate is not None and spec.gate.per == "key_dim":
        raise refuse("a per-key-dimension gate needs the similarity's own dot product")
    dots = {n for n in nodes if isinstance(n, Dot)}
    if dots != set(nodes):
        raise refuse("a row scale (norm, mean, sum) outside every dot() needs them")
    if expr.xreplace({d: sympy.Symbol("_") for d in dots}).has(QE, KE):
        raise refuse("q or k also appear outside those dots")
    if len(dots) == 1:
        (dot,) = dots
        core = expr.xreplace({dot: CORE_DOT})
        pairs = [_oriented(dot, refuse)]
    else:
        found = [a for a in sympy.preorder_traversal(expr) if isinstance(a, sympy.Add) and _sum_of(a, dots)]
        if not found:
            raise refuse("its dots that need them are not the terms of one sum with coefficients free of q and k")
        pairs = []
        for term in found[0].args:
            coeff, dot = _coeff_dot(term)
            a, b = _oriented(dot, refuse)
            pairs.append((coeff * a, b))
        core = expr.xreplace({found[0]: CORE_DOT})
    core_params = tuple(p for p in spec.parameters if p.symbol in core.free_symbols
                        or p.symbol in spec.reweight_expr.free_symbols)
    text = _source(core)
    core_spec = dataclasses.replace(spec, similarity=text, similarity_expr=core, parameters=core_params)
    keys = [b for _, b in pairs]
    per_head = {HEAD} | {p.symbol for p in spec.parameters if p.per_head}
    return Prologue(spec, core_spec, tuple(a for a, _ in pairs), tuple(keys),
                    any(k.free_symbols & per_head for k in keys))


FUSED_WIDTHS = (16, 32, 64, 128)  # F of a fused matmul feature map: one tl.dot tile [BT, F], no padded columns
FUSED_PARTS = (1, 2)  # vectors concatenated in q' (two: tl.join of two [BT, F] tiles)
ROW_SCALARS = (N_Q, N_K, D, HEAD, HEADS)


def fusable(pro: Prologue) -> str:
    """'' when the linear Triton kernels can compute the prologue's feature rows themselves (docs/derivations.md
    section 11), else why not. Each of q' and k' is 1 or 2 vectors of one width F (a power of two, 16 .. 128),
    each an element-wise formula of: matmul(W, x) (W a matrix parameter, x an element-wise formula of the raw row
    with number parameters), softmax of such vectors, row reductions (norm, dot, mean, sum) of element-wise
    formulas of the raw row, number parameters and constants; the raw row appears only inside matmul and the
    reductions. The core spec may use number parameters only, and not the head dim d (the kernels' d is the raw
    rows')."""
    spec = pro.spec
    kinds = {p.symbol: p for p in spec.parameters}
    numbers = {p.symbol for p in spec.parameters if p.kind == "scalar"}
    core = pro.core
    if any(p.kind != "scalar" for p in core.parameters):
        return "the core similarity uses vector or table parameters"
    if core.similarity_expr.xreplace(core.constant_values()).has(D) or core.reweight_expr.has(D):
        return "the core similarity or the reweighting uses the head dim d"
    if core.gate is not None:
        return "a gate"
    widths = set()
    for side, elem, vectors in (("q", QE, pro.q_vectors), ("k", KE, pro.k_vectors)):
        if len(vectors) not in FUSED_PARTS:
            return f"{side}' concatenates {len(vectors)} vectors (fused: {' or '.join(map(str, FUSED_PARTS))})"
        for v in vectors:
            why = _vector_fusable(v, elem, numbers, kinds)
            if why:
                return f"{sympy.sstr(v)}: {why}"
            widths.add(vector_width(v, None))
    if len(widths) != 1 or None in widths:
        return f"the vectors of q' and k' have widths {sorted(map(str, widths))}, not one matmul width F"
    (width,) = widths
    if width not in FUSED_WIDTHS:
        return f"the matmul width F = {width} is not one of {', '.join(map(str, FUSED_WIDTHS))}"
    return ""


def _vector_fusable(v, elem, numbers: set, kinds: dict) -> str:
    """Why the vector formula ``v`` of one side is not fusable ('' when it is)."""
    allowed = numbers | {elem, *ROW_SCALARS}
    found = [False]

    def element(x, where) -> str:
        if x.has(*REDUCTIONS, *VECTOR_FUNCTIONS) or any(isinstance(s, (Elem, Matrix)) for s in x.free_symbols):
            return f"{where} {sympy.sstr(x)} holds a reduction, a vector map or a vector parameter"
        extra = x.free_symbols - allowed
        return f"{where} {sympy.sstr(x)} uses {', '.join(map(str, sorted(extra, key=str)))}" if extra else ""

    def walk(e) -> str:
        if isinstance(e, MatVec):
            w, x, _ = e.args
            if not isinstance(w, Matrix) or w not in kinds:
                return f"matmul of {sympy.sstr(w)}"
            found[0] = True
            return element(x, "the argument")
        if isinstance(e, Softmax):
            return walk(e.args[0])
        if isinstance(e, (Norm, Dot, Mean, Total)):
            for a in e.args:
                why = element(a, "the row reduction argument")
                if why:
                    return why
                if a.free_symbols & {p for p in numbers if kinds[p].learnable}:
                    return f"a learnable parameter inside the row reduction {sympy.sstr(e)}"
            return ""
        if isinstance(e, VecMax):
            return "a max over the vector"
        if e == elem:
            return "the raw row outside matmul and the row reductions (width d, not F)"
        if isinstance(e, sympy.Symbol) and e not in allowed:
            return f"the symbol {e}"
        for a in e.args:
            if isinstance(a, sympy.Basic):
                why = walk(a)
                if why:
                    return why
        return ""

    why = walk(v)
    return why or ("" if found[0] else "no matmul")


def _similarity(spec: Spec):
    return spec.similarity_expr.xreplace(spec.constant_values())


def _parameter_symbols(spec: Spec) -> set:
    return {p.symbol for p in spec.parameters}


def _fusable_symbols(spec: Spec) -> set:
    """The parameters the kernels can read inside a feature map: numbers ([] / [H]) and vectors ([Dk] / [H, Dk])."""
    return {p.symbol for p in spec.parameters if p.kind in ("scalar", "vector")}


def _pair_dot(e) -> bool:
    """Whether ``e`` is dot(a(q), b(k)): one argument a formula of q only, the other of k only."""
    return isinstance(e, Dot) and {frozenset(sides(a)) for a in e.args} == {frozenset({"q"}), frozenset({"k"})}


def _prologue_nodes(expr, params: set, fusable: set = frozenset()) -> list:
    """The outermost reductions whose arguments the kernels cannot print (``_fused``)."""
    out = []

    def walk(e):
        if isinstance(e, REDUCTIONS):
            if not _fused(e, params, fusable):
                out.append(e)
            return
        for a in e.args:
            if isinstance(a, sympy.Basic):
                walk(a)

    walk(expr)
    return out


def _fused(node, params: set, fusable: set) -> bool:
    """Whether the kernels form the reduction ``node`` themselves. A dot of q and k, or a row reduction of one side
    (a row scale): its element formulas may hold number and vector parameters (``fusable``) and row reductions of
    their own side, nested too (mean(q), norm(q - mean(q)), ...), no vector map (matmul, softmax). A reduction
    of q and k together (norm(q - k), expanded into dots): a plain element formula, no parameter or reduction
    inside, not mean / sum."""
    inner = [a for a in node.args if isinstance(a, sympy.Basic)]
    if any(a.has(*VECTOR_FUNCTIONS, VecMax) for a in inner):
        return False
    used = set().union(*(a.free_symbols & params for a in inner))
    if _pair_dot(node):
        return used <= fusable and all(_one_sided_reductions(a) for a in inner)
    if len(sides(node)) == 1:  # a row reduction of one side (a row scale): the same as an element formula's
        return used <= fusable and _one_sided_reductions(node)
    return not used and not any(a.has(*REDUCTIONS) for a in inner) and not isinstance(node, (Mean, Total))


def _one_sided_reductions(formula) -> bool:
    """Whether every reduction inside an element formula of one side reduces rows of that side."""
    side = sides(formula)
    return all(sides(n) == side for n in sympy.preorder_traversal(formula) if isinstance(n, REDUCTIONS))


def _oriented(dot, refuse) -> tuple:
    a, b = dot.args
    if sides(a) == {"k"} and sides(b) == {"q"}:
        a, b = b, a
    if sides(a) != {"q"} or sides(b) != {"k"}:
        raise refuse(f"{sympy.sstr(dot)} does not take a function of q and a function of k")
    return a, b


def _coeff_dot(term) -> tuple:
    """(c, dot) of a term c * dot (dot None when the term does not hold exactly one dot as a factor)."""
    coeff, dots = sympy.Integer(1), []
    for f in sympy.Mul.make_args(term):
        if isinstance(f, Dot):
            dots.append(f)
        else:
            coeff = coeff * f
    return coeff, (dots[0] if len(dots) == 1 else None)


def _sum_of(add, dots: set) -> bool:
    """Whether ``add`` is sum_t c_t * dot_t over exactly ``dots``, each c_t free of q and k."""
    seen = []
    for term in add.args:
        coeff, dot = _coeff_dot(term)
        if dot is None or dot not in dots or coeff.has(QE, KE, *REDUCTIONS):
            return False
        seen.append(dot)
    return set(seen) == dots and len(seen) == len(dots)


NAMES = {"Dot(q_e, k_e)": "dot(q, k)", "Relu": "relu", "Elu": "elu", "Sigmoid": "sigmoid"}
FORMULA_NAMES = {**NAMES, "Mean": "mean", "Total": "sum", "Norm": "norm", "Dot": "dot", "q_e": "q", "k_e": "k"}


def _source(expr) -> str:
    text = sympy.sstr(expr)
    for a, b in NAMES.items():
        text = text.replace(a, b)
    return text


def _formula(expr) -> str:
    """An element formula as a spec writes it (q, mean(q), ...)."""
    text = sympy.sstr(expr)
    for a, b in FORMULA_NAMES.items():
        text = text.replace(a, b)
    return text
