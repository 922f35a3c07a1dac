"""A strict sympy -> Triton expression printer.

One class, one mapping table from sympy node types to Triton spellings. Symbols (and whole
sub-expressions such as ``Norm(q_e)``) are printed through a caller-given mapping to kernel variable
names; anything the table does not know is a PlanError that names the spec and the sub-expression,
never silently wrong code. Derivatives (``sympy.diff`` of an element formula) print through the same
class. Every number prints as a float literal, so no integer division can sneak into a kernel.

Triton 3.6 (the oldest version generated code must run on) has no tanh and no sigmoid that the
interpreter and the GPU agree on, so both are written with tl.exp.
"""
from __future__ import annotations

import sympy
from sympy.core.relational import Relational

from attngen.errors import PlanError
from attngen.frontend.expr import Elu, I, J, Relu, Sigmoid, T5Bucket
from attngen.frontend.t5 import thresholds

MAX_INTEGER_POWER = 16  # x**n with |n| up to this prints as a product; larger is refused


def _f(text: str) -> str:
    return f"({text})"


# sympy function -> template over the printed arguments (each already parenthesised)
UNARY = {
    sympy.exp: "tl.exp({0})",
    sympy.log: "tl.log({0})",
    sympy.sin: "tl.sin({0})",
    sympy.cos: "tl.cos({0})",
    sympy.Abs: "tl.abs({0})",
    sympy.sign: "tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, 0.0))",  # d abs(x) / dx
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 for large |x|, no inf - inf
    sympy.tanh: "(1.0 - 2.0 / (tl.exp(2.0 * {0}) + 1.0))",
    Relu: "tl.maximum({0}, 0.0)",
    Elu: "tl.where({0} > 0.0, {0}, tl.exp({0}) - 1.0)",
    Sigmoid: "(1.0 / (1.0 + tl.exp(-{0})))",
}
NARY = {sympy.Max: "tl.maximum", sympy.Min: "tl.minimum"}
RELATIONS = {sympy.StrictGreaterThan: ">", sympy.GreaterThan: ">=", sympy.StrictLessThan: "<",
             sympy.LessThan: "<=", sympy.Equality: "==", sympy.Unequality: "!="}


class TritonPrinter:
    """Print sympy expressions as Triton (tl.*) code.

    ``names`` maps sympy symbols or whole sub-expressions to code (kernel variable names); ``where``
    (the spec file) and ``what`` (e.g. 'feature map of q') go into error messages.
    """

    def __init__(self, names: dict, where: str = "<spec>", what: str = "expression"):
        self.names, self.where, self.what = dict(names), where, what

    def __call__(self, expr) -> str:
        self._root = sympy.sympify(expr)
        return self.print(self._root)

    def fail(self, node, why: str) -> PlanError:
        return PlanError(f"{self.where}: cannot print {sympy.sstr(node)!r} in the {self.what} "
                         f"{sympy.sstr(self._root)!r} as Triton: {why}")

    def print(self, e) -> str:
        if e in self.names:
            return self.names[e]
        if isinstance(e, sympy.Symbol):
            known = ", ".join(sorted(sympy.sstr(s) for s in self.names)) or "none"
            raise self.fail(e, f"unknown symbol (known here: {known})")
        if e.is_Number or e in (sympy.pi, sympy.E):
            return self._number(e)
        if isinstance(e, sympy.Add):
            return _f(" + ".join(self.print(a) for a in _ordered(e.args)))
        if isinstance(e, sympy.Mul):
            return self._mul(e)
        if isinstance(e, sympy.Pow):
            return self._pow(*e.args)
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e)
        if isinstance(e, sympy.Heaviside):
            x = self.print(e.args[0])
            h0 = self._number(e.args[1]) if len(e.args) > 1 else "0.5"
            return f"tl.where({x} > 0.0, 1.0, tl.where({x} == 0.0, {h0}, 0.0))"
        if e.func in UNARY and len(e.args) == 1:
            return UNARY[e.func].format(_f(self.print(e.args[0])))
        if e.func in NARY:
            args = [self.print(a) for a in _ordered(e.args)]
            out = args[0]
            for a in args[1:]:
                out = f"{NARY[e.func]}({out}, {a})"
            return out
        raise self.fail(e, f"{type(e).__name__} is not in the printer's table "
                        f"(supported: + * ** exp log sin cos tanh abs sign relu elu sigmoid max min "
                        f"Heaviside Piecewise, numbers and pi)")

    def _number(self, e) -> str:
        if not e.is_real or not e.is_finite:
            raise self.fail(e, "only finite real numbers can be printed")
        return repr(float(e))

    def _mul(self, e) -> str:
        num, den = [], []
        for a in _ordered(e.args):
            base, ex = a.as_base_exp()
            if ex.is_Integer and ex < 0:
                den.append(self._pow(base, -ex))
            else:
                num.append(self.print(a))
        top = " * ".join(num) if num else "1.0"
        return _f(top if not den else f"{top} / ({' * '.join(den)})")

    def _pow(self, base, ex) -> str:
        b = self.print(base)
        if ex.is_Integer:
            n = int(ex)
            if abs(n) > MAX_INTEGER_POWER:
                raise self.fail(base ** ex, f"integer power {n} is larger than {MAX_INTEGER_POWER}")
            if n == 0:
                return "1.0"
            prod = _f(" * ".join([b] * abs(n)))
            return prod if n > 0 else _f(f"1.0 / {prod}")
        if ex == sympy.Rational(1, 2):
            return f"tl.sqrt({b})"
        if ex == sympy.Rational(-1, 2):
            return _f(f"1.0 / tl.sqrt({b})")
        # a real power of a positive base (NaN for a negative one, like torch.pow)
        return f"tl.exp({self.print(ex)} * tl.log({b}))"

    def _piecewise(self, e) -> str:
        pieces = list(e.args)
        if pieces[-1].cond is not sympy.true:
            raise self.fail(e, "a Piecewise needs a final 'otherwise' branch")
        out = self.print(pieces[-1].expr)
        for value, cond in reversed(pieces[:-1]):
            out = f"tl.where({self._condition(cond)}, {self.print(value)}, {out})"
        return out

    def _condition(self, cond) -> str:
        if not isinstance(cond, Relational) or type(cond) not in RELATIONS:
            raise self.fail(cond, "a Piecewise condition must be one comparison such as x > 0")
        return f"({self.print(cond.lhs)} {RELATIONS[type(cond)]} {self.print(cond.rhs)})"


def _ordered(args):
    """A fixed order of commutative arguments, so the same spec prints the same bytes."""
    return sorted(args, key=sympy.default_sort_key)


def print_triton(expr, names: dict, where: str = "<spec>", what: str = "expression") -> str:
    """Print one expression (see TritonPrinter)."""
    return TritonPrinter(names, where, what)(expr)


def print_t5_bucket(node, rows: str, cols: str, rel: str, dist: str, where: str = "<spec>") -> tuple:
    """T5's bucket (attngen.runtime.t5) of a T5Bucket over a tile, in int32 arithmetic: the codes of the relative
    positions x, the distances n (from the variable ``rel``) and the buckets (from ``rel`` and ``dist``), given the
    integer positions ``rows`` (i, [BM] as [:, None]) and ``cols`` (j, [None, :]). No float log: the bucket of a
    distance n >= max_exact is max_exact plus the number of thresholds n reaches (read off the reference
    arithmetic, attngen.frontend.t5.thresholds), so the kernels agree with the reference on every pair, the
    boundaries included."""

    if not isinstance(node, T5Bucket):
        raise PlanError(f"{where}: {sympy.sstr(node)} is not t5_bucket(...)")
    x, num_buckets, max_distance, flag = node.args
    if sympy.expand(x - (J - I)) == 0:
        rel_code = f"{cols} - {rows}"
    elif sympy.expand(x - (I - J)) == 0:
        rel_code = f"{rows} - {cols}"
    else:
        raise PlanError(f"{where}: t5_bucket of {sympy.sstr(x)}: the Triton kernels take j - i or i - j")
    bidirectional = bool(flag)
    exact, steps = thresholds(int(num_buckets), int(max_distance), bidirectional)
    far = " + ".join([str(exact)] + [f"({dist} >= {t}).to(tl.int32)" for t in steps])
    bucket = f"tl.where({dist} < {exact}, {dist}, {far})"
    if bidirectional:  # half the buckets for x > 0
        return rel_code, f"tl.abs({rel})", f"tl.where({rel} > 0, {int(num_buckets) // 2}, 0) + {bucket}"
    return rel_code, f"tl.maximum(-{rel}, 0)", bucket
