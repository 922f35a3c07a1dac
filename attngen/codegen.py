"""Code generation: a Plan -> the text of one Triton module (kernels, host functions, registration,
the public function).

A module holds the kernels of the orderings of ``module_orderings(plan)``: the forced one, or every
ordering of the Triton backend (linear, quadratic) that is legal for the spec and expressible by the
templates, so its text does not depend on the head dim. With both, the public function dispatches on the
key length at a ``crossover`` argument (the plan's crossover for the call's head dim; attngen.compile
passes it, see ``dispatch_length``). The linear slots are built here, the quadratic ones in
attngen.codegen_quadratic.

Python fills the templates' named slots; the templates hold no math. Every formula (feature maps,
their derivatives from sympy.diff, row scales, position factors, parameter derivatives, the
normaliser) is printed by attngen.printer, which refuses what it cannot print. The output is
deterministic: the same spec gives the same bytes.

Kernel variable names the slots refer to (per side s = q or k, kernel conventions of fla):
    b_<s>    the raw block [BT, BK] (fp32)          b_t<s>  positions i or j [BT] (fp32)
    b_<s>r<n> a row reduction [BT] (norm / dot)      f_nq, f_nk, f_d, f_h, f_H  n_q, n_k, d, h, H
    b_par_<p> the value of parameter p
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import jinja2
import sympy

from . import __version__, resources
from .errors import PlanError
from .expr import D, HEAD, HEADS, KE, N_K, N_Q, QE, Dot, I, J, Norm
from .ir import Ordering, Plan, ReweightClass
from .printer import TritonPrinter

TEMPLATES = {Ordering.LINEAR: "linear.py.j2", Ordering.QUADRATIC: "quadratic.py.j2"}  # by the module's first ordering
TRITON = (Ordering.LINEAR, Ordering.QUADRATIC)  # the orderings with templates
CROSSOVER_HEAD_DIM = 64  # the head dim of a module's default crossover (the caller passes its own)
POWER_MAX_HEAD_DIM = 16  # a d**2 feature block lives in registers: [BT, BK * BK] and a [BK * BK, BV] state
# the rows of one term's block in the state S [F, Dv], by the term's tensor power (K is the head dim)
STATE_WIDTH = {0: "1", 1: "K", 2: "K * K"}
SCALARS = {N_Q: "f_nq", N_K: "f_nk", D: "f_d", HEAD: "f_h", HEADS: "f_H"}


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one Jinja environment (strict: an unknown slot is an error)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(resources.templates_dir())),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=1)
def template_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(resources.templates_dir().glob("*.j2")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def module_name(plan: Plan) -> str:
    return f"{plan.spec.name}_{plan.spec.mode}"


def render(plan: Plan) -> str:
    """The generated module's source text for ``plan`` (see the module docstring)."""
    text = environment().get_template(TEMPLATES[module_orderings(plan)[0]]).render(**slots(plan))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_IN_BODY.sub("\n", text)


# macro calls leave blank lines inside function bodies; a blank line before an indented line goes
_BLANK_IN_BODY = re.compile(r"\n(?:[ \t]*\n)+(?=[ \t]+\S)")


# ---------------------------------------------------------------------------------------------
# slots
# ---------------------------------------------------------------------------------------------
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


def slots(plan: Plan) -> dict:
    """Every slot of the module's templates: the common ones, the linear and / or the quadratic ones."""
    check_supported(plan)
    orderings = module_orderings(plan)
    spec = plan.spec
    tag = "".join(o.value[0] for o in orderings)  # l, q or lq: modules of one spec with other kernels
    out = {
        "version": __version__, "spec_name": spec.name, "mode": spec.mode, "spec_hash": spec.hash,
        "template_hash": template_hash(), "spec_yaml": spec.to_yaml().rstrip("\n").splitlines(),
        "prefix": f"_{spec.name}", "fn": f"{spec.name}_attention", "causal": spec.causal,
        "op_name": f"{spec.name}_{spec.mode}_{tag}_{spec.hash[:8]}_{template_hash()[:8]}",
        "params": _params(spec),
        "regenerate": (f'attngen.codegen.render(build_plan(load_spec(...), plan="{orderings[0].value}"))'
                       if len(orderings) == 1 else "attngen.build.generate(load_spec(...)) (attngen build)"),
        "quadratic": Ordering.QUADRATIC in orderings, "standalone": Ordering.LINEAR not in orderings,
    }
    if Ordering.LINEAR in orderings:
        out.update(_linear_slots(plan))
    if Ordering.QUADRATIC in orderings:
        from .codegen_quadratic import describe, tile_slots
        q = tile_slots(plan)
        out.update(q, quadratic_lines=describe(plan, q))
        if Ordering.LINEAR in orderings:
            out["crossover"] = _length_code(_default_crossover(plan))
    return out


def _params(spec) -> list:
    return [{"name": p.name, "per_head": bool(p.shape), "symbol": p.symbol, "default": _default(p)}
            for p in spec.parameters]


def _linear_slots(plan: Plan) -> dict:
    spec = plan.spec
    params = _params(spec)
    names = dict(SCALARS)
    names.update({p["symbol"]: f"b_par_{p['name']}" for p in params})
    sides = {s: _Side(s, names, spec.where) for s in ("q", "k")}
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
        "chunk": plan.chunk, "length_terms": _length_dependent(plan),
        "feature_width": " + ".join(t["width"] for t in terms).replace("K", "dk"), "terms": terms,
        "sides": {s: side.slots() for s, side in sides.items()},
        "rowsum": rowsum,
        "den_expr": (f"tl.maximum(b_den, {eps})" if clamp else f"b_den + {eps}") if rowsum else "b_den",
        "dden_mask": f"b_den > {eps}" if clamp else None,
        "decay": _decay(plan, names, params),
        "max_power_dim": POWER_MAX_HEAD_DIM if any(lt.feature.power == 2 for lt in plan.linear_terms) else None,
    }


def _length_dependent(plan: Plan) -> list:
    """The position factors and coefficients that use n_q or n_k (cosFormer's default M = max(n_q, n_k)):
    a state of such a plan has no meaning before the final length is known, so its module refuses states."""
    exprs = []
    for lt in plan.linear_terms:
        f, pos = lt.feature, lt.position
        exprs += [f.coeff, f.q_scale, f.k_scale, *f.q_factors, *f.k_factors, pos.coeff, pos.f_i, pos.g_j]
    if plan.reweight.decay is not None:
        exprs.append(plan.reweight.decay.gamma)
    return sorted({sympy.sstr(e) for e in exprs if sympy.sympify(e).has(N_Q, N_K)})


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


class _Side:
    """The feature blocks of one side (q or k): deduplicated element maps with their row scales."""

    def __init__(self, s: str, names: dict, where: str):
        self.s, self.where = s, where
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
            return Feature(i, width, pr(phi), dphi_code, None, (), **extra)
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
        return Feature(i, width, pr(phi), dphi_code, scale_code, tuple(grads), **extra)

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


def _default(p):
    return repr(float(p.init_expr)) if p.init_expr.is_number else None


# ---------------------------------------------------------------------------------------------
# which orderings a module holds, and what the templates support
# ---------------------------------------------------------------------------------------------
def kernel_orderings(plan: Plan) -> tuple:
    """The orderings whose kernels run ``plan``'s choice (a topk_sparse plan runs the quadratic block-sparse
    kernels); PlanError for an ordering without a template."""
    out = []
    for o in dict.fromkeys((plan.choice.below, plan.choice.above)):
        if o is Ordering.TOPK_SPARSE:
            o = Ordering.QUADRATIC
        if o not in TRITON:
            spec = plan.spec
            raise PlanError(f"{spec.where} ({spec.name}, {spec.mode}): the Triton backend generates the linear and "
                            f"quadratic orderings (and topk_sparse's block-sparse kernels); this plan is "
                            f"{plan.choice.describe()}: use backend='torch', or force plan='linear' / 'quadratic'")
        out.append(o)
    return tuple(out)


def check_supported(plan: Plan):
    """PlanError (saying why) unless the templates can generate every ordering ``plan`` chooses."""
    from .codegen_quadratic import tile_slots
    for o in kernel_orderings(plan):
        if o is Ordering.LINEAR:
            _check_linear(plan)
        else:
            slots = tile_slots(plan)
            if plan.choice.below is Ordering.TOPK_SPARSE and not slots["flash"]:
                spec = plan.spec
                raise PlanError(f"{spec.where} ({spec.name}, {spec.mode}): block-sparse kernels are generated for the "
                                "softmax family only (an exp similarity with a row-sum normaliser)")
            a = plan.spec.approximation
            if plan.choice.below is Ordering.TOPK_SPARSE and a.block > slots["sparse_max_block"]:
                raise PlanError(f"{plan.spec.where}: approx.block = {a.block}: the Triton block-sparse kernels take "
                                f"blocks of 16 .. {slots['sparse_max_block']}; use a smaller block, or backend='torch'")


_ORDERINGS: dict = {}  # memo of module_orderings


def module_orderings(plan: Plan) -> tuple:
    """The orderings whose kernels ``plan``'s module holds: those of a forced plan (or of an approximation),
    else every ordering of TRITON that is legal for the spec and that the templates express. It depends on
    the spec, not on the head dim (the dispatch length does: dispatch_length)."""
    choice = plan.choice
    key = (plan.spec.hash, plan.spec.mode, plan.chunk, choice.forced, choice.below, choice.above)
    if key not in _ORDERINGS:
        chosen = kernel_orderings(plan)
        if choice.forced or choice.below not in TRITON:
            _ORDERINGS[key] = chosen
        else:
            from .codegen_quadratic import tile_slots
            checks = {Ordering.LINEAR: _check_linear, Ordering.QUADRATIC: tile_slots}
            out = []
            for o in TRITON:
                if o is Ordering.LINEAR and not plan.linear_terms:
                    continue
                try:
                    checks[o](plan)
                except PlanError:
                    if o in chosen:
                        raise
                    continue
                out.append(o)
            _ORDERINGS[key] = tuple(out)
    return _ORDERINGS[key]


def dispatch_length(plan: Plan) -> float:
    """The key length from which a module holding both orderings runs the linear one, for ``plan``'s head dim:
    its crossover, 0 when it chooses linear at every length, inf for quadratic at every length."""
    choice = plan.choice
    if choice.crossover is not None:
        if (choice.below, choice.above) != (Ordering.QUADRATIC, Ordering.LINEAR):
            raise PlanError(f"{plan.spec.where}: the generated modules dispatch quadratic -> linear, not "
                            f"{choice.describe()}")
        return float(choice.crossover)
    return 0.0 if choice.below is Ordering.LINEAR else float("inf")


def _default_crossover(plan: Plan) -> float:
    """dispatch_length at CROSSOVER_HEAD_DIM: the module's default for callers that pass none."""
    from .plan import build_plan
    at = build_plan(plan.spec, head_dim=CROSSOVER_HEAD_DIM, chunk=plan.chunk, orderings=TRITON)
    return dispatch_length(at)


def _length_code(n: float) -> str:
    return 'float("inf")' if n == float("inf") else repr(float(n))


def _check_linear(plan: Plan):
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
    if plan.normalize.kind not in ("none", "rowsum"):
        raise PlanError(f"{where}: normalisation {plan.normalize.kind!r} has no linear kernel")
    params = {p.symbol for p in spec.parameters}
    for lt in plan.linear_terms:
        f = lt.feature
        if f.power > 2:
            raise PlanError(f"{where}: the feature term {f.describe()} is a tensor power (width d**{f.power}); "
                            "the Triton backend generates tensor powers up to 2 (width d**2) only")
        for e in (*f.q_factors, *f.k_factors, f.q_scale, f.k_scale):
            if e.free_symbols & params:
                raise PlanError(f"{where}: {sympy.sstr(e)} uses a learnable parameter inside a feature map; "
                                "the Triton backend supports parameters in position factors and coefficients only")
        if f.coeff.has(QE, KE, I, J) or lt.position.f_i.has(J) or lt.position.g_j.has(I):
            raise PlanError(f"{where}: {lt.feature.describe()} x {lt.position.describe()} is not separable")
