"""What the linear and the quadratic slots share: the feature blocks of one side (q or k), printed.

Kernel variable names the slots refer to (per side s = q or k, kernel conventions of fla):
    b_<s>    the raw block [BT, BK] (fp32)          b_t<s>  positions i or j [BT] (fp32)
    b_<s>r<n> a row reduction [BT] (norm / dot)      f_nq, f_nk, f_d, f_h, f_H  n_q, n_k, d, h, H
    b_par_<p> the value of parameter p: a number, or (a vector parameter [Dk] / [H, Dk]) its row [BK], which an
             element formula reads as b_par_<p>[None, :]
    b_dpar_<p> the program's partial sum of d loss / d p: [rows] for a number (summed when stored), [BK] for a vector
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy

from attngen.codegen.printer import TritonPrinter
from attngen.errors import PlanError
from attngen.frontend.expr import HEAD, HEADS, KE, N_K, N_Q, QE, D, Dot, I, J, MatVec, Mean, Norm, Softmax, Total

SCALARS = {N_Q: "f_nq", N_K: "f_nk", D: "f_d", HEAD: "f_h", HEADS: "f_H"}
ROW_REDUCTIONS = (Norm, Dot, Mean, Total)  # over the head dim of one side's rows: the kernels hold whole rows


def outermost(expr, types=ROW_REDUCTIONS) -> list:
    """The reductions of ``expr`` not inside another one, in a fixed order."""
    out = []

    def walk(e):
        if isinstance(e, types):
            out.append(e)
            return
        for a in e.args:
            if isinstance(a, sympy.Basic):
                walk(a)
    walk(sympy.sympify(expr))
    return sorted(set(out), key=sympy.default_sort_key)


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
    chain: "Chain | None" = None  # the row reductions inside phi (None: none)
    chain2: "Chain | None" = None  # those inside a tensor square's second factor
    same: bool = False  # a tensor square of one factor (its reductions chained once)
    scale_chain: "Chain | None" = None  # the row scale's reductions when they hold parameters or reductions


@dataclass(frozen=True)
class ChainStep:
    """The backward of one row reduction r = F(sum_e u_e) inside an element formula (docs/derivations.md section
    10): with its adjoint c_r complete, c' = c_r F'(r); d loss / d x_e += c' du_e/dx_e, the adjoint of each
    reduction r' that u uses += c' sum_e du_e/dr', and each parameter p that u uses gains c' du_e/dp (summed over
    the elements for a number, over the rows for a vector)."""
    n: int  # the reduction b_<s>r<n>
    fprime: str  # F'(r) [rows]: 1/d (mean), 1 (sum, dot), 1/(2r) (norm; 0 where r = 0)
    dx: str | None  # du_e/dx_e [rows, BK] (None when zero)
    inner: tuple  # of (m, du_e/dr_m [rows, BK])
    params: tuple  # of (name, vector, du_e/dp [rows, BK])


@dataclass(frozen=True)
class Chain:
    """The reverse pass over the row reductions an element formula phi uses (nested ones included): ``seeds``
    (n, d phi_e / d r_n) start the adjoints c_n = sum_e g_e d phi_e / d r_n of those phi reads directly (g: the
    upstream gradient of phi); ``zeros`` the other adjoints (reductions only inner ones read); ``steps`` run from
    the outermost reduction inwards, so each adjoint is complete when its step runs."""
    seeds: tuple
    zeros: tuple
    steps: tuple
    rows: bool = False  # seeds of a row formula: c_n = g d phi / d r_n, g a row (no sum over the elements)


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
             "default": default(p), "learnable": p.learnable, "buckets": p.buckets,
             "matrix": p.rows if p.kind == "matrix" else 0} for p in spec.parameters]


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
        self.dummies = {}  # reduction node -> its symbol in flattened element formulas
        self.features = {}  # (scale, factor) -> Feature

    def printer(self, what, extra=None, rows=False) -> TritonPrinter:
        # a reduction's symbol in an element formula is its row [rows] broadcast along the columns (``rows``: in
        # a row formula, the row itself)
        tail = "" if rows else "[:, None]"
        cols = {d: f"b_{self.s}r{self.reductions[n].i}{tail}" for n, d in self.dummies.items()}
        return TritonPrinter({**self.names, **cols, **(extra or {})}, self.where, f"{what} of {self.s}")

    def flat(self, expr):
        """``expr`` (an element formula of this side) with each row reduction in it replaced by a symbol, the
        reductions registered (inner ones first, so each is computed after those it reads)."""
        expr = sympy.sympify(expr)
        nodes = outermost(expr)
        for node in nodes:
            self.reduction(node)
        return expr.xreplace({n: self.dummies[n] for n in nodes})

    def chain(self, flat, rows=False) -> "Chain | None":
        """The reverse pass over the reductions of a flattened element formula (None when it has none); ``rows``:
        of a row formula (a row scale), whose upstream gradient is a row [rows]."""
        by_dummy = {d: n for n, d in self.dummies.items()}
        direct = [by_dummy[d] for d in sorted(flat.free_symbols & set(by_dummy), key=sympy.default_sort_key)]
        if not direct:
            return None
        closure, todo = {}, list(direct)
        while todo:
            node = todo.pop()
            if node in closure:
                continue
            closure[node] = self._summand(node)
            todo += [by_dummy[d] for d in closure[node].free_symbols & set(by_dummy)]
        order = sorted(closure, key=lambda n: -self.reductions[n].i)  # outermost first (registered last)
        pr = self.printer("row reduction derivative")
        pr_seed = self.printer("row reduction derivative", rows=rows)
        seeds = tuple((self.reductions[n].i, pr_seed(sympy.diff(flat, self.dummies[n]))) for n in direct)
        zeros = tuple(self.reductions[n].i for n in order if n not in direct)
        steps = []
        for node in order:
            u, r = closure[node], self.reductions[node]
            fprime = {Mean: "(1.0 / f_d)", Total: "1.0", Dot: "1.0"}.get(
                type(node), f"tl.where(b_{self.s}r{r.i} > 0.0, 0.5 / b_{self.s}r{r.i}, 0.0)")
            dx = sympy.diff(u, self.elem)
            inner = tuple((self.reductions[by_dummy[d]].i, pr(sympy.diff(u, d)))
                          for d in sorted(u.free_symbols & set(by_dummy), key=sympy.default_sort_key)
                          if sympy.diff(u, d) != 0)
            params = tuple((p["name"], p["vector"], pr(sympy.diff(u, p["symbol"]))) for p in self.params
                           if sympy.diff(u, p["symbol"]) != 0)
            steps.append(ChainStep(r.i, fprime, pr(dx) if dx != 0 else None, inner, params))
        return Chain(seeds, zeros, tuple(steps), rows)

    def _summand(self, node):
        """u_e of a reduction r = F(sum_e u_e), flattened: mean / sum of a -> a, norm(a) -> a**2, dot(a, b) -> a b."""
        args = [self.flat(a) for a in node.args]
        return args[0] ** 2 if isinstance(node, Norm) else args[0] * args[1] if isinstance(node, Dot) else args[0]

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
        # the row reductions inside the element formulas become symbols (computed first, chained in the backward)
        phi = self.flat(factor) if factor is not None else sympy.Integer(1)
        second = self.flat(factors[1]) if factors is not None and len(factors) == 2 else None
        width = "d" if factor is not None else "1"
        pr = self.printer("feature map")
        dphi = sympy.diff(phi, self.elem) if factor is not None else sympy.Integer(0)
        power2 = None
        if second is not None:
            power2 = Power2(pr(second), pr(sympy.diff(second, self.elem)))
            width = "d2"
            factors = (phi, second)
        extra = dict(cols="BK * BK", power2=power2) if power2 else {}
        # a square of one factor (e = h, ReBased's) chains its reductions once, with the upstream G h + G^T e
        same = second is not None and second == phi
        extra.update(chain=self.chain(phi), chain2=self.chain(second) if second is not None and not same else None,
                     same=same)
        # a tensor square's gradient needs both factors' derivatives, printed even when zero
        dphi_code = pr(dphi) if power2 or dphi != 0 else None
        if scale == 1:
            return Feature(i, width, pr(phi), dphi_code, None, (),
                           dparams=self._dparams(phi, factors, scale), **extra)
        param_syms = {p["symbol"] for p in self.params}
        if any(a.has(*ROW_REDUCTIONS) or a.free_symbols & param_syms for r in outermost(scale) for a in r.args):
            # reductions with parameters or reductions inside (norm(g q), ...): chained like an element formula's
            flat = self.flat(scale)
            return Feature(i, width, pr(phi), dphi_code, self.printer("row scale", rows=True)(flat), (),
                           dparams=self._dparams(phi, factors, scale), scale_chain=self.chain(flat, rows=True),
                           **extra)
        reds = sorted(scale.atoms(*ROW_REDUCTIONS), key=sympy.default_sort_key)
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
        """The derivatives by every parameter the feature map uses directly (element formula, a tensor square's
        second factor, the row scale outside its reductions), its row reductions held fixed: a parameter inside a
        reduction reaches the gradient through the reduction's chain step (Side.chain)."""
        second = factors[1] if factors is not None and len(factors) == 2 else None
        out = []
        for p in self.params:
            sym = p["symbol"]
            dphi = sympy.diff(phi, sym)
            dpower = sympy.diff(second, sym) if second is not None else sympy.Integer(0)
            flat = self.flat(scale) if scale != 1 else scale
            dscale = sympy.diff(flat, sym) if scale != 1 else sympy.Integer(0)
            if dphi == 0 and dpower == 0 and dscale == 0:
                continue
            if p["vector"] and dscale != 0:
                raise PlanError(f"{self.where}: the vector parameter {p['name']} in the row scale "
                                f"{sympy.sstr(scale)} of {self.s}")
            what = f"derivative by {p['name']} of the feature map of {self.s}"
            pr = self.printer(what)
            out.append(FeatureParam(
                p["name"], p["vector"], pr(dphi) if dphi != 0 else None, pr(dpower) if dpower != 0 else None,
                self.printer(f"derivative by {p['name']} of the row scale", rows=True)(dscale)
                if dscale != 0 else None))
        return tuple(out)

    def reduction(self, node) -> Reduction:
        if node not in self.reductions:
            code = self._reduction_code(node)  # registers the reductions inside it first
            self.reductions[node] = Reduction(len(self.reductions), code)
            self.dummies[node] = sympy.Dummy(f"{self.s}r{self.reductions[node].i}", real=True)
        return self.reductions[node]

    def _reduction_terms(self, node):
        """The arguments of a reduction used outside an element formula (a row scale, a tile quantity), whose
        derivative _dreduction prints directly: no reductions or parameters inside (those are chained only
        inside element formulas, Side.chain)."""
        args = node.args
        for a in args:
            if a.has(*ROW_REDUCTIONS) or (a.free_symbols - {self.elem} - set(SCALARS)):
                raise PlanError(f"{self.where}: the row reduction {sympy.sstr(node)} of {self.s} outside a feature "
                                "map's element formula holds a reduction or a parameter; the Triton kernels chain "
                                "those only inside the element formulas of a dot of q and k")
        return args

    def _reduction_code(self, node) -> str:
        """Its value [rows] over the whole row (masked columns count 0; the kernels hold every column of the head
        dim in one block), after the reductions it reads (registered here)."""
        body = self._summand(node)
        total = f"tl.sum(tl.where(m_{self.s}d, {self.printer('row reduction')(body)}, 0.0), axis=1)"
        if isinstance(node, Norm):
            return f"tl.sqrt({total})"
        return f"{total} / f_d" if isinstance(node, Mean) else total

    def _dreduction(self, node, value) -> str:
        """d node / d element: norm(g) -> g g' / norm (0 where the norm is 0); dot(a, b) -> (a b)';
        mean(g) -> g' / d; sum(g) -> g'."""
        args = self._reduction_terms(node)
        pr = self.printer("row reduction derivative")
        if isinstance(node, Norm):
            g = args[0]
            return f"{pr(g * sympy.diff(g, self.elem))} / tl.where({value} > 0.0, {value}, 1.0)"
        if isinstance(node, (Mean, Total)):
            d = pr(sympy.diff(args[0], self.elem))
            return f"{d} / f_d" if isinstance(node, Mean) else d
        return pr(sympy.diff(args[0] * args[1], self.elem))


def default(p):
    """A parameter's default in the module record: a number, a lambda of the head dim d (an init in d only, such
    as the per-call scale's 1/sqrt(d), printed from the validated expression), or None (required; a table drawn
    from normal(std) too: its entries are not one number)."""
    if p.kind in ("table", "matrix") and p.draw:
        return None
    if p.init_expr.is_number:
        return repr(float(p.init_expr))
    if {str(s) for s in p.init_expr.free_symbols} == {"d"}:
        return "lambda d: " + sympy.pycode(p.init_expr)
    return None


@dataclass(frozen=True)
class VecNode:
    """One vector [rows, F] of a fused matmul feature map (docs/derivations.md section 11): ``kind`` 'matmul'
    (u = x W^T: ``matrix`` the parameter, ``arg`` the index of x in VecSide.args) or 'softmax' (u = softmax(a),
    ``arg`` the code of a [rows, F], ``grads`` how its adjoint reaches the symbols a reads)."""
    n: int
    kind: str
    matrix: str = ""
    arg: object = None
    grads: tuple = ()  # of (kind, index or name, code of d a / d symbol): kind 'u' node, 'r' reduction, 'p' param


@dataclass(frozen=True)
class VecArg:
    """An element formula x [rows, D] of the raw row inside a matmul, its derivative and the learnable number
    parameters' derivatives."""
    i: int
    code: str
    dx: str | None
    params: tuple  # of (name, code)


@dataclass(frozen=True)
class VecReduction:
    """A row reduction [rows] of the raw row in a fused matmul feature map: its value and d r / d x [rows, D]."""
    i: int
    value: str
    dx: str


@dataclass(frozen=True)
class VecPart:
    """One vector of q' (or k') [rows, F]: its code and the derivatives by the symbols it reads."""
    i: int
    code: str
    grads: tuple  # of (kind, index or name, code)


class VecSide:
    """The fused matmul feature maps of one side (q or k), printed for the kernel_macros.j2 macros vec_features /
    vec_grads: the raw row b_<s>vq [rows, BD] (the block as loaded), the matmul arguments b_<s>vx<i>, the row
    reductions b_<s>vr<i>, the vectors b_<s>vu<n> (matmul, softmax), the parts b_<s>vy<i> joined into b_<s>
    [rows, K]. Learnable matrix parameters get d loss / d W summed in b_dpar_<W> [F, BD]."""

    def __init__(self, s: str, vectors, spec, names: dict):
        self.s, self.where = s, spec.where
        self.elem = QE if s == "q" else KE
        self.names = {**names, self.elem: f"b_{s}vq"}
        self.learnable = {p.symbol: p.name for p in spec.parameters if p.kind == "scalar" and p.learnable}
        self.matrices = {p.symbol: p for p in spec.parameters if p.kind == "matrix"}
        self.nodes, self.args, self.reductions = {}, {}, {}  # sympy node -> (dummy, record)
        self.parts = [self._part(i, v) for i, v in enumerate(vectors)]
        self.width = int(vectors[0].atoms(MatVec).pop().args[2])

    def _printer(self, what):
        extra = {d: f"b_{self.s}vu{r.n}" for d, r in self.nodes.values()}
        extra.update({d: f"b_{self.s}vr{r.i}[:, None]" for d, r in self.reductions.values()})
        return TritonPrinter({**self.names, **extra}, self.where, f"{what} of {self.s}")

    def _flat(self, e):
        """``e`` with its matmuls, softmaxes and row reductions replaced by symbols (registered inner first)."""
        if isinstance(e, MatVec):
            return self._node(e)
        if isinstance(e, Softmax):
            return self._node(e)
        if isinstance(e, ROW_REDUCTIONS):
            return self._reduction(e)
        if not e.args:
            return e
        return e.func(*[self._flat(a) if isinstance(a, sympy.Basic) else a for a in e.args])

    def _grads(self, flat, what) -> tuple:
        pr = self._printer(what)
        out = []
        for d, r in self.nodes.values():
            g = sympy.diff(flat, d)
            if g != 0:
                out.append(("u", r.n, pr(g)))
        for d, r in self.reductions.values():
            g = sympy.diff(flat, d)
            if g != 0:
                out.append(("r", r.i, pr(g)))
        for sym, name in self.learnable.items():
            g = sympy.diff(flat, sym)
            if g != 0:
                out.append(("p", name, pr(g)))
        return tuple(out)

    def _node(self, e):
        if e in self.nodes:
            return self.nodes[e][0]
        dummy = sympy.Dummy(f"{self.s}vu{len(self.nodes)}", real=True)
        if isinstance(e, MatVec):
            w, x, _ = e.args
            rec = VecNode(len(self.nodes), "matmul", self.matrices[w].name, self._arg(x).i)
        else:
            flat = self._flat(e.args[0])
            rec = VecNode(len(self.nodes), "softmax", arg=self._printer("softmax argument")(flat),
                          grads=self._grads(flat, "softmax argument derivative"))
            rec = dataclasses.replace(rec, n=len(self.nodes))
        self.nodes[e] = (dummy, rec)
        return dummy

    def _arg(self, x) -> VecArg:
        if x not in self.args:
            pr = self._printer("matmul argument")
            dx = sympy.diff(x, self.elem)
            params = tuple((name, pr(sympy.diff(x, sym))) for sym, name in self.learnable.items()
                           if sympy.diff(x, sym) != 0)
            self.args[x] = VecArg(len(self.args), pr(x), pr(dx) if dx != 0 else None, params)
        return self.args[x]

    def _reduction(self, node):
        if node in self.reductions:
            return self.reductions[node][0]
        pr = self._printer("row reduction")
        a = node.args
        body = a[0] ** 2 if isinstance(node, Norm) else a[0] * a[1] if isinstance(node, Dot) else a[0]
        total = f"tl.sum(tl.where(m_{self.s}vd, {pr(body)}, 0.0), axis=1)"
        i = len(self.reductions)
        value = f"b_{self.s}vr{i}"
        if isinstance(node, Norm):
            code, dx = f"tl.sqrt({total})", (f"{pr(a[0] * sympy.diff(a[0], self.elem))} / "
                                               f"tl.where({value}[:, None] > 0.0, {value}[:, None], 1.0)")
        elif isinstance(node, Mean):
            code, dx = f"{total} / f_d", f"{pr(sympy.diff(a[0], self.elem))} / f_d"
        elif isinstance(node, Total):
            code, dx = total, pr(sympy.diff(a[0], self.elem))
        else:
            code, dx = total, pr(sympy.diff(body, self.elem))
        dummy = sympy.Dummy(f"{self.s}vr{i}", real=True)
        self.reductions[node] = (dummy, VecReduction(i, code, dx))
        return dummy

    def _part(self, i, v) -> VecPart:
        flat = self._flat(sympy.sympify(v))
        return VecPart(i, self._printer("feature vector")(flat), self._grads(flat, "feature vector derivative"))

    def slots(self) -> dict:
        return {"F": self.width, "parts": self.parts,
                "args": sorted(self.args.values(), key=lambda a: a.i),
                "reductions": sorted((r for _, r in self.reductions.values()), key=lambda r: r.i),
                "nodes": sorted((r for _, r in self.nodes.values()), key=lambda r: r.n)}


def vec_slots(plan) -> dict | None:
    """The fused matmul feature maps of a plan whose prologue the kernels compute (None: no such prologue)."""
    pro = plan.prologue
    if pro is None or not pro.fused:
        return None
    spec = pro.spec
    names = dict(SCALARS)
    names.update(param_names(params(spec)))
    sides = {s: VecSide(s, vectors, spec, names) for s, vectors in (("q", pro.q_vectors), ("k", pro.k_vectors))}
    learn = [p.name for p in spec.parameters if p.kind == "matrix" and p.learnable]
    return {"sides": {s: v.slots() for s, v in sides.items()}, "F": sides["q"].width,
            "width": pro.width(sympy.Symbol("d")), "learnable": learn}
