"""The quadratic ordering's template slots: a plan's similarity (or softmax score) and reweighting as code
over one [BM, BN] tile of query rows i and key columns j (docs/derivations.md section 6).

The tile expression is the plan's sympy expression with every reduction replaced by a tile quantity:
    pair dot    dot(a(q), b(k))   -> b_p<n> = tl.dot(a(Q block), b(K block)^T)   [BM, BN]
    q-row       norm(a(q)), dot(a(q), b(q)) -> b_qr<n>                           [BM] (as [:, None])
    k-row       norm(b(k)), dot(a(k), b(k)) -> b_kr<n>                           [BN] (as [None, :])
A reduction that mixes q and k (norm(q - k)) is first expanded bilinearly into those three kinds
(norm(q - k)**2 = dot(q, q) - 2 dot(q, k) + dot(k, k)); an element formula that multiplies q by k has no
such expansion and is refused. The gradient of the tile expression by each quantity (sympy.diff) is
printed too, and the kernels chain it through the element maps: dQ += (G * ds/dp) B(K), and so on.
Every formula is printed by attngen.printer; the template holds only structure.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
from sympy import Add

from attngen.codegen.features import ROW_REDUCTIONS, SCALARS, Side, outermost, param_names
from attngen.codegen.features import params as param_slots
from attngen.codegen.printer import TritonPrinter, print_t5_bucket
from attngen.errors import PlanError
from attngen.frontend.expr import KE, QE, D, Dot, I, J, Lookup, Norm, sides
from attngen.ir import Plan, ReweightClass, SimilarityClass

FULL_TILE = "tl.zeros([BM, BN], dtype=tl.float32) + "  # broadcasts a row, a column or a number to [BM, BN]

SPARSE_MAX_BLOCK = 128  # the largest block of the block-sparse kernels (it is their tile: registers)
# with rotary positions each tile also holds the cos / sin rows of its q and k: at blocks of 128 and head dim 128
# the forward spilled ~14 KB on sm_80 and the dk/dv kernel needed 197 KB of shared memory (attngen aot); a table
# lookup's bucket and entry tiles alike (t5_bias: 197 KB and 27 KB of spills in the dk/dv kernel on sm_80)
ROTARY_SPARSE_MAX_BLOCK = 64


@dataclass(frozen=True)
class Map:
    """An element map of one side (a(q) or b(k)): its block [BM or BN, BK] and its gradient contribution."""
    i: int
    code: str  # the map of the raw block b_q / b_k
    grad: str | None  # d loss / d element from the accumulator b_d<s>a<i> (None: the map is constant)
    dparams: tuple = ()  # of MapParam: the parameters the map uses
    chain: object = None  # features.Chain: the row reductions inside the map (None: none)


@dataclass(frozen=True)
class MapParam:
    """d map / d parameter, printed over the block [rows, BK]; ``vector``: a vector parameter, whose gradient is
    summed over the rows only (element m of the map reads element m of it)."""
    name: str
    vector: bool
    code: str


@dataclass(frozen=True)
class RowReduction:
    """A reduction over the head dim of one side's rows (norm(q), dot(a(k), b(k)))."""
    i: int
    value: str  # [rows] code
    dexpr: str  # d tile expression / d reduction, [BM, BN] (or broadcastable)
    dred: str | None  # d reduction / d element, [rows, BK] (None: chained, ``chain``)
    chain: object = None  # features.Chain of a reduction with parameters or reductions inside (norm(g q), ...)


@dataclass(frozen=True)
class Pair:
    """dot(a(q), b(k)) over a tile: the q map, the k map and d tile expression / d pair."""
    i: int
    qmap: int
    kmap: int
    dexpr: str


@dataclass(frozen=True)
class TableLookup:
    """lookup(table, t5_bucket(...)) over a tile: b_bk<i> the buckets (int32, from the integer positions), b_lk<i> the
    table's entries there (of the program's head i_h for a table per head)."""
    i: int
    table: str  # the parameter's name
    offset: str  # '' (a shared table [NB]) or 'i_h * NB + ' (a table per head [H, NB])
    rel: str  # relative positions [BM, BN] (int32)
    dist: str  # distances [BM, BN] from b_rp<i>
    bucket: str  # buckets [BM, BN] from b_rp<i>, b_rd<i>


@dataclass(frozen=True)
class TableGrad:
    """d loss / d table[b] += the sum over the tile's pairs in bucket b (b_bk<i>) of upstream * derivative."""
    i: int  # the TableLookup
    terms: tuple  # of (upstream tile name, printed derivative by the entry b_lk<i>)


@dataclass(frozen=True)
class ParamGrad:
    """d loss / d parameter = sum over the tile of upstream * derivative, per (upstream, derivative) term; a table
    parameter [H, NB] / [NB] (``buckets`` = NB) scatters its gradient by bucket instead (``table``: TableGrads)."""
    name: str
    terms: tuple  # of (upstream tile name, printed derivative)
    buckets: int = 0
    table: tuple = ()


def tile_slots(plan: Plan) -> dict:
    """The quadratic template's slots for ``plan`` (PlanError for what the kernels cannot express)."""
    spec = plan.spec
    where = f"{spec.where} ({spec.name}, {spec.mode})"
    sim, rw, norm = plan.similarity, plan.reweight, plan.normalize
    flash = sim.kind is SimilarityClass.EXP and norm.kind == "rowsum"
    if norm.kind not in ("none", "rowsum"):
        raise PlanError(f"{where}: normalisation {norm.kind!r} has no quadratic Triton kernel")
    if flash and norm.eps_mode == "clamp" and norm.eps != 0:
        raise PlanError(f"{where}: an exp similarity with a clamped row sum (eps_mode: clamp, eps {norm.eps:g}) is "
                        "not generated by the Triton backend; use eps_mode: add, or backend='torch'")
    params = {p.symbol: p.name for p in spec.parameters}
    expr, weight = sim.expr, None if rw.kind is ReweightClass.NONE else rw.expr
    if flash:
        expr = sim.score
        if rw.log_weight is not None:  # W = exp(log W) folds into the score
            expr, weight = (expr + rw.log_weight if rw.log_weight != 0 else expr), None
    tile = _Tile(where, params, param_slots(spec))
    tables = {p.symbol: p for p in spec.parameters if p.kind == "table"}
    shown, shown_weight = expr, weight  # as the header says them (with lookup(...), not the tile's b_lk<n>)
    expr, weight = tile.lookups(expr, tables), None if weight is None else tile.lookups(weight, tables)
    flat = tile.flatten(expr)
    pr = tile.printer("tile expression")
    if spec.gate is not None and not (flash and spec.gate.per == "head"):
        raise PlanError(f"{where}: the quadratic Triton kernels add a per-head gate's G_i - G_j to a softmax score "
                        "only; use backend='torch' (or the linear ordering)")
    slots = {
        "flash": flash, "rowsum": norm.kind == "rowsum",
        "sparse_max_block": ROTARY_SPARSE_MAX_BLOCK if spec.rotary is not None or spec.reweight_expr.has(Lookup)
        else SPARSE_MAX_BLOCK,
        "qgate": spec.gate is not None,  # the score gains G_i - G_j (gc: the cumulative sum of the gate)
        "window": spec.window,  # None, or N: the loops visit the blocks intersecting |i - j| < N (a literal)
        "rotary": spec.rotary is not None,  # q and k rotated in registers (rc, rs: the host's cos / sin tables)
        "expr": tile.full(pr(flat), flat), "expr_text": sympy.sstr(shown),
        "weight": None if weight is None else tile.full(tile.printer("reweighting")(weight), weight),
        "weight_text": None if weight is None else sympy.sstr(shown_weight),
    }
    pairs = [Pair(n, qm, km, pr(sympy.diff(flat, d))) for n, (d, qm, km) in enumerate(tile.pairs)]
    sides_ = {s: {"maps": tile.maps[s], "reductions": [
        RowReduction(r.i, r.value, pr(sympy.diff(flat, d)), *dred) for r, d, dred in tile.reductions[s].values()],
        # every row reduction of the side: the tile's and those inside its element maps (inner ones first)
        "all_reductions": sorted(tile.sides[s].reductions.values(), key=lambda r: r.i)}
        for s in ("q", "k")}
    grads = []
    for p in spec.parameters:
        if p.kind == "table":
            table = []
            for slot, dummy in zip(tile.lookups_, tile.lookup_dummies.values()):
                if slot.table != p.name:
                    continue
                terms = tuple((upstream, tile.printer(f"derivative by {p.name} of the {what}")(sympy.diff(e, dummy)))
                              for upstream, e, what in (("b_ds", flat, "tile expression"),
                                                        ("b_dw", weight, "reweighting"))
                              if e is not None and sympy.diff(e, dummy) != 0)
                table.append(TableGrad(slot.i, terms))
            grads.append(ParamGrad(p.name, (), p.buckets, tuple(table)))
            continue
        terms = []
        for upstream, e, what in (("b_ds", flat, "tile expression"), ("b_dw", weight, "reweighting")):
            if e is not None:
                d = sympy.diff(e, p.symbol)
                if d != 0:
                    terms.append((upstream, tile.printer(f"derivative by {p.name} of the {what}")(d)))
        grads.append(ParamGrad(p.name, tuple(terms)))
    eps = repr(float(norm.eps))
    if flash:  # b_l: the row sum in units of exp(b_mc) (the running max): eps enters rescaled
        den = "b_l" if norm.eps == 0 else f"b_l + {eps} * tl.exp(-b_mc)"
        dden_mask = None
    else:
        clamp = norm.eps_mode == "clamp"
        den = f"tl.maximum(b_den, {eps})" if clamp else f"b_den + {eps}"
        dden_mask = f"b_den > {eps}" if clamp else None
    need_dw = any(u == "b_dw" for g in grads for u, _ in g.terms) or any(
        u == "b_dw" for g in grads for t in g.table for u, _ in t.terms)
    slots.update(lookups=tile.lookups_, pairs=pairs, qsides=sides_, param_grads=grads, qden_expr=den,
                 qdden_mask=dden_mask, need_dw=need_dw)
    return slots


def describe(plan: Plan, slots: dict) -> list:
    """Header lines of a module: what the quadratic kernels compute."""
    norm = plan.normalize
    den = "none" if norm.kind == "none" else f"row sum (eps {norm.eps:g}, {norm.eps_mode})"
    if slots["flash"]:
        lines = [f"softmax family: P = exp(s - LSE), s = {slots['expr_text']}"]
    else:
        lines = [f"A = s(q, k) = {slots['expr_text']}"]
    if slots["weight_text"] is not None:
        lines.append(f"times W(i, j) = {slots['weight_text']}")
    mode = "causal (blocks above the diagonal skipped)" if plan.spec.causal else "bidirectional"
    lines.append(f"normalisation: {den}; {mode}")
    if plan.spec.window is not None:
        lines.append(f"window: |i - j| < {plan.spec.window} (blocks outside it skipped, pairs outside it masked)")
    return lines


class _Tile:
    """Collects the tile quantities of one expression and prints over them."""

    def __init__(self, where: str, params: dict, slots: list = ()):
        self.where, self.params = where, params
        # the parameters an element map may use (numbers and vectors): fused, their gradients reduced in-kernel
        self.map_params = [p for p in slots if not p["buckets"]]
        self.map_names = {**SCALARS, **param_names(self.map_params)}
        # the row reductions are printed exactly as in the linear kernels
        self.map_params = [p for p in slots if not p["buckets"]]
        self.map_names = {**SCALARS, **param_names(self.map_params)}
        self.sides = {s: Side(s, self.map_names, where, self.map_params) for s in ("q", "k")}
        self.maps = {"q": [], "k": []}  # of Map
        self._map_index = {"q": {}, "k": {}}  # formula -> index
        self.pairs = []  # (dummy, q map index, k map index)
        self.reductions = {"q": {}, "k": {}}  # reduction index -> (Reduction, dummy, dred code)
        self.dummies = {}  # reduction node -> dummy
        self.names = dict(SCALARS)
        self.names.update({sym: f"b_par_{name}" for sym, name in params.items()})
        self.names.update({I: "b_ti[:, None]", J: "b_tj[None, :]"})
        self.lookups_ = []  # of TableLookup
        self.lookup_dummies = {}  # Lookup node -> dummy (in the order of lookups_)

    def lookups(self, expr, tables: dict):
        """``expr`` with every lookup(table, t5_bucket(...)) replaced by a dummy tile quantity b_lk<n> (registered)."""
        expr = sympy.sympify(expr)
        for node in sorted(expr.atoms(Lookup), key=sympy.default_sort_key):
            if node in self.lookup_dummies:
                continue
            table, bucket = node.args
            p = tables.get(table)
            if p is None:
                raise PlanError(f"{self.where}: lookup of {sympy.sstr(table)}, which is not a table parameter")
            n = len(self.lookups_)
            rel, dist, code = print_t5_bucket(bucket, "o_i[:, None]", "o_j[None, :]", f"b_rp{n}", f"b_rd{n}",
                                              self.where)
            offset = f"i_h * {p.buckets} + " if p.per_head else ""
            self.lookups_.append(TableLookup(n, p.name, offset, rel, dist, code))
            dummy = sympy.Dummy(f"lk{n}", real=True)
            self.names[dummy] = f"b_lk{n}"
            self.lookup_dummies[node] = dummy
        return expr.xreplace(self.lookup_dummies)

    def printer(self, what: str) -> TritonPrinter:
        return TritonPrinter(self.names, self.where, what)

    def full(self, code: str, expr) -> str:
        """``code`` as a full [BM, BN] tile: rows (i, q-row quantities) times columns (j, k-row ones)."""
        syms = sympy.sympify(expr).free_symbols
        rows = {I} | {d for _, d, _ in self.reductions["q"].values()}
        cols = {J} | {d for _, d, _ in self.reductions["k"].values()}
        pairs = {d for d, _, _ in self.pairs} | set(self.lookup_dummies.values())
        if syms & pairs or (syms & rows and syms & cols):
            return code
        return FULL_TILE + code

    def flatten(self, expr):
        """``expr`` with every reduction replaced by a dummy tile quantity (registered here)."""
        expr = _bilinear(sympy.sympify(expr), self.where)
        nodes = outermost(expr)
        for node in nodes:
            self.dummies[node] = self._quantity(node)
        flat = expr.xreplace(self.dummies)
        stray = flat.free_symbols & {QE, KE}
        if stray:
            raise PlanError(f"{self.where}: {sympy.sstr(expr)} uses q or k outside dot() / norm()")
        return flat

    def _quantity(self, node):
        who = sides(node)
        if who in ({"q"}, {"k"}):
            s = who.pop()
            red = self.sides[s].reduction(node)
            d = sympy.Dummy(f"{s}r{red.i}", real=True)
            if red.i not in self.reductions[s]:
                side = self.sides[s]
                params = {p["symbol"] for p in self.map_params}
                if any(a.has(*ROW_REDUCTIONS) or a.free_symbols & params for a in node.args):  # chained
                    dred = (None, side.chain(side.flat(node), rows=True))
                else:
                    dred = (side._dreduction(node, f"b_{s}r{red.i}[:, None]"), None)
                self.reductions[s][red.i] = (red, d, dred)
                self.names[d] = f"b_{s}r{red.i}" + ("[:, None]" if s == "q" else "[None, :]")
            return self.reductions[s][red.i][1]
        if not isinstance(node, Dot) or who != {"q", "k"}:
            raise PlanError(f"{self.where}: the reduction {sympy.sstr(node)} is not supported by the Triton "
                            "quadratic kernels (expected dot() or norm() of q and/or k)")
        a, b = node.args
        if sides(a) == {"k"}:
            a, b = b, a
        d = sympy.Dummy(f"p{len(self.pairs)}", real=True)
        self.names[d] = f"b_p{len(self.pairs)}"
        self.pairs.append((d, self._map("q", a), self._map("k", b)))
        return d

    def _map(self, s: str, formula) -> int:
        if formula in self._map_index[s]:
            return self._map_index[s][formula]
        elem = QE if s == "q" else KE
        extra = formula.free_symbols - {elem} - set(self.map_names)
        if extra:
            raise PlanError(f"{self.where}: the element map {sympy.sstr(formula)} of {s} uses "
                            f"{', '.join(sorted(map(str, extra)))}; the Triton quadratic kernels take number and "
                            "vector parameters in element maps, positions outside dot() / norm() only")
        side = self.sides[s]
        flat = side.flat(formula)  # its row reductions (mean(q), ...) computed before the map, chained after
        pr = side.printer("element map")
        dparams = []
        for p in self.map_params:
            d = sympy.diff(flat, p["symbol"])
            if d != 0:
                dparams.append(MapParam(p["name"], p["vector"], side.printer(f"derivative by {p['name']} of the "
                                                                              "element map")(d)))
        i = len(self.maps[s])
        code = f"b_{s}" if formula == elem else f"tl.where(m_{s}d, {pr(flat)}, 0.0)"
        deriv = sympy.diff(flat, elem)
        acc = f"b_d{s}a{i}"
        grad = None if deriv == 0 else acc if deriv == 1 else f"{acc} * ({pr(deriv)})"
        self.maps[s].append(Map(i, code, grad, tuple(dparams), side.chain(flat)))
        self._map_index[s][formula] = i
        return i


# ---------------------------------------------------------------------------------------------
# reductions that mix q and k: bilinear expansion
# ---------------------------------------------------------------------------------------------
def _mixed(node) -> bool:
    return any(sides(a) == {"q", "k"} for a in node.args)


def _bilinear(expr, where: str):
    """Rewrite norm() / dot() of expressions that mix q and k into dots of one-sided element formulas."""
    def even_power(e):
        return (e.is_Pow and isinstance(e.base, Norm) and _mixed(e.base) and e.exp.is_Integer
                and int(e.exp) % 2 == 0)
    expr = expr.replace(even_power, lambda e: Dot(e.base.args[0], e.base.args[0]) ** (int(e.exp) // 2))
    expr = expr.replace(lambda e: isinstance(e, Norm) and _mixed(e), lambda e: sympy.sqrt(Dot(e.args[0], e.args[0])))
    return expr.replace(lambda e: isinstance(e, Dot) and _mixed(e), lambda e: _expand_dot(e, where))


def _expand_dot(node, where: str):
    total = sympy.Integer(0)
    for ca, ea in _addends(node.args[0], where):
        for cb, eb in _addends(node.args[1], where):
            total += ca * cb * _dot(ea, eb)
    return total


def _addends(x, where: str):
    out = []
    for term in Add.make_args(sympy.expand(x)):
        coeff, elem = term.as_independent(QE, KE, as_Add=False)
        if sides(elem) == {"q", "k"}:
            raise PlanError(f"{where}: {sympy.sstr(term)} mixes elements of q and k in one element formula inside "
                            "a reduction; the Triton quadratic kernels need each reduction to split into dot products "
                            "of a q-side and a k-side element formula (use backend='torch')")
        out.append((coeff, elem))
    return out


def _dot(a, b):
    """dot(a, b) of one-sided element formulas (a constant element is a vector of that value)."""
    if not sides(a) and not sides(b):
        return D * a * b
    if sides(a) == {"k"} and sides(b) == {"q"} or (sides(a) == sides(b) and sympy.default_sort_key(b) <
                                                  sympy.default_sort_key(a)):
        a, b = b, a
    return Dot(a, b)
