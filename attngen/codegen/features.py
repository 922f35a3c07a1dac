"""What the linear and the quadratic slots share: the feature blocks of one side (q or k), printed.

Kernel variable names the slots refer to (per side s = q or k, kernel conventions of fla):
    b_<s>    the raw block [BT, BK] (fp32)          b_t<s>  positions i or j [BT] (fp32)
    b_<s>r<n> a row reduction [BT] (norm / dot)      f_nq, f_nk, f_d, f_h, f_H  n_q, n_k, d, h, H
    b_par_<p> the value of parameter p: a number, or (a vector parameter [Dk] / [H, Dk]) its row [BK], which an
             element formula reads as b_par_<p>[None, :]
    b_dpar_<p> the program's partial sum of d loss / d p: [rows] for a number (summed when stored), [BK] for a vector
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from attngen.codegen.printer import TritonPrinter
from attngen.errors import PlanError
from attngen.frontend.expr import HEAD, HEADS, KE, N_K, N_Q, QE, D, Dot, I, J, Norm

SCALARS = {N_Q: "f_nq", N_K: "f_nk", D: "f_d", HEAD: "f_h", HEADS: "f_H"}


@dataclass(frozen=True)
class Reduction:
    i: int
    value: str  # code of the row reduction [BT]


@dataclass(frozen=True)
class ScaleGrad:
    dscale: str  # d scale / d reduction [BT]
    dred: str  # d reduction / d element [BT, BK]


@dataclass(frozen=True)
class Feature:
    i: int
    width: str  # 'd' (an element map, width d) or '1' (a constant feature, width 1)
    phi: str  # element formula [BT, BK]
    dphi: str | None  # its derivative (None when zero)
    scale: str | None  # row scale [BT] (None when 1)
    scale_grads: tuple  # of ScaleGrad
    cols: str = "BK"  # columns of its block: BK, or BK * BK for a tensor square
    power2: "Power2 | None" = None  # the second factor of a tensor square (None: power <= 1)
    dparams: tuple = ()  # of FeatureParam: the parameters the feature map uses (fused: gradients in-kernel)


@dataclass(frozen=True)
class FeatureParam:
    """d feature / d parameter p of one feature block, printed: ``dphi`` the derivative of its element formula
    [BT, BK] (None when zero), ``dpower`` that of a tensor square's second factor (None when zero or no square),
    ``dscale`` that of its row scale [BT] outside the row reductions (None when zero). ``vector``: p is a vector
    parameter (element m of the formula reads element m of p), so its gradient is summed over the rows only."""
    name: str
    vector: bool
    dphi: str | None
    dpower: str | None = None
    dscale: str | None = None


@dataclass(frozen=True)
class Power2:
    """The second factor h of a tensor-square feature e (x) h (its first factor is Feature.phi)."""
    phi: str
    dphi: str


@dataclass(frozen=True)
class SideTerm:
    f: int  # index of the feature block
    row: str  # position factor (and coefficient) of the rows [BT] or a scalar
    dparams: tuple  # of ParamGrad


@dataclass(frozen=True)
class ParamGrad:
    name: str
    code: str  # d row / d parameter


def params(spec) -> list:
    """The parameters' slots; ``buckets``: NB of a table parameter [H, NB] / [NB] (0 for the others)."""
    return [{"name": p.name, "per_head": p.per_head, "symbol": p.symbol, "vector": p.kind == "vector",
             "default": default(p), "learnable": p.learnable, "buckets": p.buckets} for p in spec.parameters]


def param_names(params: list) -> dict:
    """Kernel names of the parameters in printed formulas: b_par_<p>, a vector's row as b_par_<p>[None, :]."""
    return {p["symbol"]: f"b_par_{p['name']}" + ("[None, :]" if p["vector"] else "") for p in params}


class Side:
    """The feature blocks of one side (q or k): deduplicated element maps with their row scales."""

    def __init__(self, s: str, names: dict, where: str, params: list = ()):
        self.s, self.where = s, where
        self.params = [p for p in params if not p["buckets"]]  # the parameters a feature map may use
        self.elem = QE if s == "q" else KE
        self.pos = I if s == "q" else J
        self.names = dict(names)
        self.names[self.elem] = f"b_{s}"
        self.names[self.pos] = f"b_t{s}"
        self.reductions = {}  # reduction node -> Reduction
        self.features = {}  # (scale, factor) -> Feature

    def printer(self, what, extra=None) -> TritonPrinter:
        return TritonPrinter({**self.names, **(extra or {})}, self.where, f"{what} of {self.s}")

    def slots(self) -> dict:
        feats = sorted(self.features.values(), key=lambda f: f.i)
        return {"reductions": sorted(self.reductions.values(), key=lambda r: r.i), "features": feats,
                "width_one": any(f.width == "1" for f in feats)}

    def term(self, scale, factor, row, params) -> SideTerm:
        key = (scale, factor)
        if key not in self.features:
            self.features[key] = self._feature(len(self.features), scale, factor)
        # a row factor never sees the element symbol: printing one that uses it is an error
        row_names = {k: v for k, v in self.names.items() if k != self.elem}
        row_code = TritonPrinter(row_names, self.where, f"position factor of {self.s}")(row)
        dparams = []
        for p in params:
            d = sympy.diff(row, p["symbol"])
            if d != 0:
                what = f"derivative by {p['name']} of the position factor of {self.s}"
                dparams.append(ParamGrad(p["name"], TritonPrinter(row_names, self.where, what)(d)))
        return SideTerm(self.features[key].i, row_code, tuple(dparams))

    def _feature(self, i, scale, factors) -> Feature:
        factor = factors[0] if factors else None
        phi = factor if factor is not None else sympy.Integer(1)
        width = "d" if factor is not None else "1"
        pr = self.printer("feature map")
        dphi = sympy.diff(phi, self.elem) if factor is not None else sympy.Integer(0)
        power2 = None
        if factors is not None and len(factors) == 2:
            power2 = Power2(pr(factors[1]), pr(sympy.diff(factors[1], self.elem)))
            width = "d2"
        extra = dict(cols="BK * BK", power2=power2) if power2 else {}
        # a tensor square's gradient needs both factors' derivatives, printed even when zero
        dphi_code = pr(dphi) if power2 or dphi != 0 else None
        if scale == 1:
            return Feature(i, width, pr(phi), dphi_code, None, (),
                           dparams=self._dparams(phi, factors, scale), **extra)
        reds = sorted(scale.atoms(Norm, Dot), key=sympy.default_sort_key)
        dummies = {r: sympy.Dummy(f"r{n}") for n, r in enumerate(reds)}
        flat = scale.xreplace(dummies)
        row_vars, col_vars, grads = {}, {}, []
        for r in reds:
            red = self.reduction(r)
            row_vars[dummies[r]] = f"b_{self.s}r{red.i}"
            col_vars[r] = f"b_{self.s}r{red.i}[:, None]"
        scale_code = self.printer("row scale", {r: row_vars[dummies[r]] for r in reds})(scale)
        for r in reds:
            dscale = sympy.diff(flat, dummies[r])
            if dscale != 0:
                grads.append(ScaleGrad(self.printer("row scale derivative", row_vars)(dscale),
                                       self._dreduction(r, col_vars[r])))
        return Feature(i, width, pr(phi), dphi_code, scale_code, tuple(grads),
                       dparams=self._dparams(phi, factors, scale), **extra)

    def _dparams(self, phi, factors, scale) -> tuple:
        """The derivatives by every parameter the feature map uses (element formula, a tensor square's second
        factor, the row scale outside its reductions; a parameter inside a row reduction is refused there)."""
        second = factors[1] if factors is not None and len(factors) == 2 else None
        out = []
        for p in self.params:
            sym = p["symbol"]
            dphi = sympy.diff(phi, sym)
            dpower = sympy.diff(second, sym) if second is not None else sympy.Integer(0)
            flat = scale.xreplace({r: sympy.Dummy() for r in scale.atoms(Norm, Dot)}) if scale != 1 else scale
            dscale = sympy.diff(flat, sym) if scale != 1 else sympy.Integer(0)
            if dphi == 0 and dpower == 0 and dscale == 0:
                continue
            if p["vector"] and dscale != 0:
                raise PlanError(f"{self.where}: the vector parameter {p['name']} in the row scale "
                                f"{sympy.sstr(scale)} of {self.s}")
            what = f"derivative by {p['name']} of the feature map of {self.s}"
            pr = self.printer(what)
            rows = {r: f"b_{self.s}r{self.reduction(r).i}" for r in scale.atoms(Norm, Dot)} if scale != 1 else {}
            out.append(FeatureParam(
                p["name"], p["vector"], pr(dphi) if dphi != 0 else None, pr(dpower) if dpower != 0 else None,
                self.printer(f"derivative by {p['name']} of the row scale of {self.s}", rows)(sympy.diff(scale, sym))
                if dscale != 0 else None))
        return tuple(out)

    def reduction(self, node) -> Reduction:
        if node not in self.reductions:
            self.reductions[node] = Reduction(len(self.reductions), self._reduction_code(node))
        return self.reductions[node]

    def _reduction_terms(self, node):
        args = node.args
        for a in args:
            if a.has(Norm, Dot) or (a.free_symbols - {self.elem} - set(SCALARS)):
                raise PlanError(f"{self.where}: the row reduction {sympy.sstr(node)} of {self.s} is not "
                                "supported by the Triton backend yet (nested reductions or parameters)")
        return args

    def _reduction_code(self, node) -> str:
        args = self._reduction_terms(node)
        pr = self.printer("row reduction")
        body = args[0] ** 2 if isinstance(node, Norm) else args[0] * args[1]
        total = f"tl.sum(tl.where(m_{self.s}d, {pr(body)}, 0.0), axis=1)"
        return f"tl.sqrt({total})" if isinstance(node, Norm) else total

    def _dreduction(self, node, value) -> str:
        """d node / d element: norm(g) -> g g' / norm (0 where the norm is 0); dot(a, b) -> (a b)'."""
        args = self._reduction_terms(node)
        pr = self.printer("row reduction derivative")
        if isinstance(node, Norm):
            g = args[0]
            return f"{pr(g * sympy.diff(g, self.elem))} / tl.where({value} > 0.0, {value}, 1.0)"
        return pr(sympy.diff(args[0] * args[1], self.elem))


def default(p):
    """A parameter's default in the module record: a number, a lambda of the head dim d (an init in d only, such
    as the per-call scale's 1/sqrt(d), printed from the validated expression), or None (required; a table drawn
    from normal(std) too: its entries are not one number)."""
    if p.kind == "table" and p.draw:
        return None
    if p.init_expr.is_number:
        return repr(float(p.init_expr))
    if {str(s) for s in p.init_expr.free_symbols} == {"d"}:
        return "lambda d: " + sympy.pycode(p.init_expr)
    return None
