"""The restricted expression language of specs, parsed into sympy.

A spec's expressions are untrusted text. They are parsed with ``ast.parse`` (which only builds a
syntax tree, it executes nothing) and walked node by node against a whitelist; sympy objects are built
directly from the nodes, never by ``sympify``/``eval`` of the text. Numeric folding that could hang
(``2**2**2**99``) is refused before sympy sees it.

Vectors. ``q`` and ``k`` are vectors of the head dimension. A vector expression is held as the formula of
*one element* in the element symbols ``QE`` (an element of q) and ``KE`` (of k): ``relu(q)`` is
``Relu(QE)``, ``q / norm(q)`` is ``QE / Norm(QE)``. Reductions give scalars: ``dot(a, b)`` is
``Dot(a_elem, b_elem)``, ``norm(a)`` is ``Norm(a_elem)``. So the feature map of a separable similarity is
literally the element formula, and ``sympy.diff`` by ``QE`` is its derivative.
"""
from __future__ import annotations

import ast
import math
import reprlib
import warnings
from dataclasses import dataclass, field

import sympy
from sympy import Function, Integer, Symbol

from attngen.errors import SpecError

# ---------------------------------------------------------------------------------------------
# Symbols and functions of the algebra
# ---------------------------------------------------------------------------------------------
QE = Symbol("q_e", real=True)  # one element of the query vector
KE = Symbol("k_e", real=True)  # one element of the key vector
I = Symbol("i", integer=True, nonnegative=True)  # noqa: E741 (the query position i, 0-based)
J = Symbol("j", integer=True, nonnegative=True)  # key position (0-based)
N_Q = Symbol("n_q", integer=True, positive=True)  # query length
N_K = Symbol("n_k", integer=True, positive=True)  # key length (= n)
D = Symbol("d", integer=True, positive=True)  # head dim of q and k
HEAD = Symbol("h", integer=True, nonnegative=True)  # head index
HEADS = Symbol("H", integer=True, positive=True)  # number of heads

BUILTIN_SYMBOLS = {"i": I, "j": J, "n_q": N_Q, "n_k": N_K, "n": N_K, "d": D, "h": HEAD, "H": HEADS}


class Dot(Function):
    """dot(a, b): sum over the head dimension of a_e * b_e (arguments are element formulas)."""
    nargs = 2
    is_real = True


class Norm(Function):
    """norm(a): the L2 norm over the head dimension (argument is an element formula)."""
    nargs = 1
    is_real = True
    is_nonnegative = True


class Relu(Function):
    """relu(x) = max(x, 0); derivative Heaviside(x) (0 at 0, like torch)."""
    nargs = 1
    is_real = True

    @classmethod
    def eval(cls, x):
        if x.is_number and x.is_comparable:  # a number or a numeric expression (relu(sigmoid(1)))
            return sympy.Max(x, 0)

    def fdiff(self, argindex=1):
        return sympy.Heaviside(self.args[0], 0)


class Elu(Function):
    """elu(x) = x for x > 0, exp(x) - 1 otherwise (alpha = 1, like torch.nn.functional.elu)."""
    nargs = 1
    is_real = True

    @classmethod
    def eval(cls, x):
        if x.is_number and x.is_comparable:
            return x if x > 0 else sympy.exp(x) - 1

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sympy.Piecewise((Integer(1), x > 0), (sympy.exp(x), True))


class Sigmoid(Function):
    """sigmoid(x) = 1 / (1 + exp(-x))."""
    nargs = 1
    is_real = True

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))

    def fdiff(self, argindex=1):
        return self * (1 - self)


class Mean(Function):
    """mean(a): the mean over the vector's elements (argument is an element formula)."""
    nargs = 1
    is_real = True


class Total(Function):
    """sum(a): the sum over the vector's elements (argument is an element formula)."""
    nargs = 1
    is_real = True


class VecMax(Function):
    """The largest element of a vector (the stabiliser of softmax(a); not written in specs)."""
    nargs = 1
    is_real = True


class Elem(Symbol):
    """One element of a vector parameter (shape [Dk] or [H, Dk]): element m multiplies element m of q or k."""


class Matrix(Symbol):
    """A matrix parameter (shape [F, Dk] or [H, F, Dk]); it appears only as the first argument of MatVec."""


class MatVec(Function):
    """matmul(W, a): element f of W a, sum_m W[f, m] a_m; args (Matrix, element formula of a, F). A vector of
    width F: its element varies along the output dimension, not along a's."""
    nargs = 3
    is_real = True


class Softmax(Function):
    """softmax(a): element m is exp(a_m - max a) / sum exp(a - max a) (a vector of a's width)."""
    nargs = 1
    is_real = True
    is_positive = True


class Table(Symbol):
    """A table parameter (shape [H, NB] or [NB]); it appears only as the first argument of Lookup."""


class T5Bucket(Function):
    """t5_bucket(x, num_buckets, max_distance): T5's relative-position bucket of the integer x (Raffel et al. 2020;
    ``_relative_position_bucket`` of transformers' T5Attention with relative_position = x). Args (x, num_buckets,
    max_distance, bidirectional): the last is 1 in the bidirectional mode (half the buckets for x > 0), 0 in the
    causal one (-min(x, 0) only). An integer in [0, num_buckets - 1], piecewise constant in x."""
    nargs = 4
    is_integer = True
    is_nonnegative = True

    def fdiff(self, argindex=1):
        return Integer(0)


class Lookup(Function):
    """lookup(table, index): the entry of a table parameter (of the current head for an [H, NB] table) at an
    integer index (a T5Bucket). Its derivative by the index is 0; by the table it is a scatter (the backends
    accumulate d table[b] = sum of the upstream gradient over the pairs in bucket b)."""
    nargs = 2
    is_real = True

    def fdiff(self, argindex=1):
        if argindex == 2:
            return Integer(0)
        raise sympy.ArgumentIndexError(self, argindex)


REDUCTIONS = (Dot, Norm, Mean, Total, VecMax)
VECTOR_FUNCTIONS = (MatVec, Softmax)  # vector -> vector, not element by element

# name -> (sympy constructor, arity); element-wise: applies to scalars and to vectors element by element
ELEMENTWISE = {
    "relu": (Relu, 1), "elu": (Elu, 1), "sigmoid": (Sigmoid, 1), "exp": (sympy.exp, 1),
    "log": (sympy.log, 1), "tanh": (sympy.tanh, 1), "abs": (sympy.Abs, 1), "sqrt": (sympy.sqrt, 1),
    "sin": (sympy.sin, 1), "cos": (sympy.cos, 1), "min": (sympy.Min, 2), "max": (sympy.Max, 2),
}
VECTOR_CALLS = ("dot", "norm", "mean", "sum", "matmul", "softmax")  # similarity only: reductions and vector maps
TABLE_CALLS = ("lookup", "t5_bucket")  # reweight only: a table parameter's entry at T5's relative-position bucket
FUNCTION_NAMES = sorted([*ELEMENTWISE, *VECTOR_CALLS, *TABLE_CALLS])
MAX_BUCKET_DISTANCE = 1 << 20  # max_distance of t5_bucket (the buckets are checked on 0 .. max_distance)

# Limits that keep parsing and sympy's automatic folding fast on hostile input.
MAX_SOURCE_CHARS = 2000
MAX_NODES = 400
MAX_DEPTH = 40
MAX_CALL_DEPTH = 6  # function calls inside function calls (also once constants are substituted)
MAX_LITERAL = 1e30
MAX_FOLDED_EXPONENT = 64  # numeric ** numeric folds only below this exponent
MAX_SYMBOLIC_POWER = 8  # powers of expressions that contain q or k (tensor powers), and the tensor degree
MAX_INTEGER_POWER = 16  # integer powers of other symbolic expressions (the planner expands powers of sums)
MAX_EXPONENT = 1e6  # any other numeric exponent
MAX_MAGNITUDE = 1e300  # every numeric value (a literal, a folded number, a numeric sub-expression)
MIN_MAGNITUDE = 1e-300  # every nonzero number sympy holds (a folded coefficient), so float64 keeps it
MAX_LOG2 = math.log2(MAX_MAGNITUDE)
NON_FINITE = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)


@dataclass(frozen=True)
class Value:
    """A parsed sub-expression: its sympy form, whether it is a vector (element formula), and its value as a
    float when it is known at load time (numbers, numeric constants), else None."""
    expr: sympy.Expr
    vector: bool
    num: float | None = None
    calls: int = 0  # how deep function calls nest in it
    width: object = None  # a vector's length: "d" (the head dim) or an int F (matmul(W, q) with W [F, Dk])


@dataclass(frozen=True)
class Context:
    """What an expression may use: where it comes from (for errors) and which names it may reference."""
    where: str  # file name or '<dict>'
    key: str  # spec key, e.g. 'similarity' or 'constants.M'
    names: dict  # allowed scalar names -> sympy symbol
    vectors: bool  # whether q and k are allowed
    forbidden_hint: dict  # name -> why it is not allowed here (for better errors)
    numbers: dict = field(default_factory=dict)  # symbol -> float: the values of numeric constants
    rows: dict = field(default_factory=dict)  # Matrix symbol -> its number of rows F
    tables: dict = field(default_factory=dict)  # Table symbol -> its number of entries NB
    bidirectional: bool = False  # the spec's mode (t5_bucket's bidirectional argument)


# ---------------------------------------------------------------------------------------------
# Numeric values at load time: every numeric sub-expression is evaluated in float64 *before* sympy builds
# the node around it, so sympy never folds or evalf's a number beyond float64 (exp(exp(exp(exp(1)))) would
# make its assumption queries run for minutes).
# ---------------------------------------------------------------------------------------------
class OutOfRange(ArithmeticError):
    """A numeric value beyond float64 (|x| > MAX_MAGNITUDE, or a nonzero |x| < MIN_MAGNITUDE held exactly)."""


class NotFinite(ArithmeticError):
    """A numeric value that is not a finite real number (log(0), sqrt(-1), 1/0)."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _prod(*xs: float) -> float:
    out = 1.0
    for x in xs:
        out *= x
    return out


# float64 counterparts of the functions of the language (by name) and of the sympy nodes they build
FLOAT_FUNCTIONS = {
    "relu": lambda x: max(x, 0.0), "elu": lambda x: x if x > 0 else math.expm1(x), "sigmoid": _sigmoid,
    "exp": math.exp, "log": math.log, "tanh": math.tanh, "abs": abs, "sqrt": math.sqrt, "sin": math.sin,
    "cos": math.cos, "min": min, "max": max,
}
FLOAT_NODES = {
    sympy.Add: lambda *xs: math.fsum(xs), sympy.Mul: _prod, sympy.Pow: math.pow, sympy.exp: math.exp,
    sympy.log: math.log, sympy.sin: math.sin, sympy.cos: math.cos, sympy.tanh: math.tanh, sympy.Abs: abs,
    sympy.Max: max, sympy.Min: min, Relu: FLOAT_FUNCTIONS["relu"], Elu: FLOAT_FUNCTIONS["elu"], Sigmoid: _sigmoid,
}


def apply_float(fn, args) -> float | None:
    """``fn(*args)`` in float64: OutOfRange beyond MAX_MAGNITUDE, None outside the domain (log(-1), 1/0)."""
    try:
        out = fn(*args)
    except OverflowError:
        raise OutOfRange() from None
    except (ValueError, ZeroDivisionError, TypeError):
        return None
    if isinstance(out, complex) or out != out:
        return None
    out = float(out)
    if math.isinf(out) or abs(out) > MAX_MAGNITUDE:
        raise OutOfRange()
    return out


def log2_magnitude(number) -> float | None:
    """log2 |number| of a sympy Number without converting it (None for zero or a non-finite number)."""
    if isinstance(number, sympy.Float):
        sign, man, exp, bc = number._mpf_
        return None if not man else float(exp + bc)
    if isinstance(number, sympy.Rational):
        p, q = abs(int(number.p)), int(number.q)
        return None if not p else float(p.bit_length() - q.bit_length())
    return None


def number_in_range(number) -> bool:
    """Whether a sympy Number is 0 or within MIN_MAGNITUDE .. MAX_MAGNITUDE (checked on its exponent)."""
    bits = log2_magnitude(number)
    return bits is None or -MAX_LOG2 + 1 <= bits <= MAX_LOG2 - 1


def out_of_range_number(expr, shallow: bool = False):
    """The first sympy Number in ``expr`` (its top two levels when ``shallow``) beyond float64, else None."""
    if shallow:
        candidates = [expr, *expr.args, *(b for a in expr.args for b in a.args)]
        numbers = [n for n in candidates if isinstance(n, sympy.Number)]
    else:
        numbers = expr.atoms(sympy.Number)
    return next((n for n in numbers if not number_in_range(n)), None)


def magnitude(expr) -> float:
    """|value| of a numeric sympy expression: inf beyond float64 or when it has no float64 value."""
    try:
        value = numeric_value(expr)
    except OutOfRange:
        return math.inf
    return math.inf if value is None else abs(value)


def numeric_value(expr, memo: dict | None = None) -> float | None:
    """The float64 value of a numeric sympy tree, walked bottom-up (OutOfRange beyond float64); None when a
    node is outside its domain or is not a node of the language."""
    memo = {} if memo is None else memo
    if expr in memo:
        return memo[expr]
    if isinstance(expr, sympy.Number):
        if not number_in_range(expr):
            raise OutOfRange()
        out = float(expr) if expr.is_finite else None
    elif expr is sympy.pi:
        out = math.pi
    elif expr is sympy.E:
        out = math.e
    elif expr.func in FLOAT_NODES and expr.args:
        args = [numeric_value(a, memo) for a in expr.args]
        out = None if None in args else apply_float(FLOAT_NODES[expr.func], args)
    else:
        out = None
    memo[expr] = out
    return out


def brief(value, width: int = 60) -> str:
    """A short repr of untrusted data for error messages; safe for huge ints and deep or aliased nesting."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, width, width, width
    try:
        return short.repr(value)[:width]
    except Exception:  # a hostile __repr__ or an int inside a container beyond the str-conversion limit
        return f"a {type(value).__name__}"


def _err(ctx: Context, what: str, expected: str | None = None, fix: str | None = None) -> SpecError:
    return SpecError(what, where=ctx.where, key=ctx.key, expected=expected, fix=fix)


def parse_expression(text, ctx: Context) -> sympy.Expr:
    """Parse untrusted ``text`` into a sympy scalar expression under the rules of ``ctx``.

    Raises SpecError (never anything else) for any text that is not a valid expression here.
    """
    return parse_value(text, ctx).expr


def parse_value(text, ctx: Context) -> Value:
    """parse_expression, returning the Value: the sympy form and its float64 value when it is numeric."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise _err(ctx, f"found {type(text).__name__} {brief(text, 80)}", "an expression string or a number",
                   "write the expression as a string, e.g. 'dot(relu(q), relu(k))'")
    if not isinstance(text, str):
        if (abs(text) > MAX_LITERAL) if isinstance(text, int) else not math.isfinite(text):
            raise _err(ctx, f"number {brief(text)} is out of range", f"a finite number with |x| <= {MAX_LITERAL:g}")
        text = repr(text)
    if len(text) > MAX_SOURCE_CHARS:
        raise _err(ctx, f"expression is {len(text)} characters long", f"at most {MAX_SOURCE_CHARS}",
                   "split it into named constants")
    if not text.strip():
        raise _err(ctx, "the expression is empty", "an expression such as 'dot(q, k)'")
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal" for '1if': the error below says it
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        detail = getattr(exc, "msg", None) or type(exc).__name__
        raise _err(ctx, f"cannot parse {text!r:.120}: {detail}",
                   "an arithmetic expression with + - * / **, calls like relu(q), names and numbers") from None
    count = sum(1 for _ in ast.walk(tree))
    if count > MAX_NODES:
        raise _err(ctx, f"expression has {count} syntax nodes", f"at most {MAX_NODES}",
                   "split it into named constants")
    try:
        value = _Walker(ctx, text).visit(tree.body, 0)
    except RecursionError:
        raise _err(ctx, "expression is nested too deeply", f"at most {MAX_DEPTH} levels") from None
    except (ArithmeticError, TypeError, ValueError) as exc:  # sympy refusing an extreme numeric value
        raise _err(ctx, f"cannot evaluate {text!r:.120}: {type(exc).__name__}",
                   "numbers of moderate size (|x| <= 1e30, results within 1e-300..1e300)") from None
    if value.vector:
        raise _err(ctx, f"{text!r:.120} is a vector", "a scalar",
                   "reduce it with dot(a, b) or norm(a), e.g. dot(relu(q), relu(k))")
    if out_of_range_number(value.expr) is not None:
        raise _err(ctx, "a number it folds to is beyond float64",
                   f"numeric values within {MIN_MAGNITUDE:g} .. {MAX_MAGNITUDE:g} in magnitude")
    return value


class _Walker:
    def __init__(self, ctx: Context, text: str):
        self.ctx, self.text = ctx, text
        self.memo = {}  # numeric_value's memo, shared by the nodes of this expression

    def src(self, node) -> str:
        return ast.get_source_segment(self.text.strip(), node) or ast.dump(node)[:80]

    def fail(self, node, what, expected=None, fix=None):
        return _err(self.ctx, f"in {self.src(node)!r}: {what}", expected, fix)

    def visit(self, node, depth: int) -> Value:
        if depth > MAX_DEPTH:
            raise self.fail(node, "expression is nested too deeply", f"at most {MAX_DEPTH} levels")
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            raise self.fail(node, f"{type(node).__name__} syntax is not allowed",
                            "numbers, names, + - * / **, unary minus and function calls")
        value = method(node, depth + 1)
        self._check_finite(node, value.expr)
        return self._check_numbers(node, value)

    def _check_finite(self, node, expr):
        """Refuse infinities, NaN and non-real numbers (0**-1, log(0), sqrt(-1)) where they appear."""
        if expr.has(*NON_FINITE) or (expr.is_number and expr.is_real is False):
            raise self.fail(node, f"the value {str(expr)[:60]} is not a finite real number",
                            "finite real values", "check for division by zero, log(0), sqrt or ** of a negative")

    def _out_of_range(self, node, what="the value"):
        return self.fail(node, f"{what} is beyond float64", f"numeric values within {MIN_MAGNITUDE:g} .. "
                         f"{MAX_MAGNITUDE:g} in magnitude", "use smaller numbers, or split the value into factors")

    def _check_numbers(self, node, value: Value) -> Value:
        """The numbers sympy folded stay within float64, and a numeric node has a float64 value."""
        if out_of_range_number(value.expr, shallow=True) is not None:
            raise self._out_of_range(node, "a number it folds to")
        if value.num is None and value.expr.is_number:  # e.g. n - n + 1: numeric only after sympy's folding
            try:
                num = numeric_value(value.expr, self.memo)
            except OutOfRange:
                raise self._out_of_range(node) from None
            if num is None:
                raise self.fail(node, f"the value {str(value.expr)[:60]} has no float64 value", "finite real values")
            value = Value(value.expr, value.vector, num, value.calls, value.width)
        return value

    def _fold(self, node, fn, values, what="the value"):
        """fn of the operands' float values when all are known (None otherwise), refused beyond float64:
        computed before sympy builds the node, so sympy never sees such a number."""
        nums = [v.num for v in values]
        if None in nums:
            return None
        try:
            out = apply_float(fn, nums)
        except OutOfRange:
            raise self._out_of_range(node, what) from None
        if out is None:  # log(0), sqrt(-1), 0**-1, also of numeric constants (log(c) with c: 0)
            raise self.fail(node, "the value is not a finite real number", "finite real values",
                            "check for division by zero, log(0), sqrt or ** of a negative")
        return out

    # -- leaves ------------------------------------------------------------------------------
    def visit_Constant(self, node, depth):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(node, f"literal {v!r:.40} is not a number", "an int or float literal")
        if abs(v) > MAX_LITERAL or not math.isfinite(v):
            raise self.fail(node, f"number {v!r:.40} is out of range", f"|x| <= {MAX_LITERAL:g}")
        return Value(Integer(v) if isinstance(v, int) else sympy.Float(v), False, float(v))

    def visit_Name(self, node, depth):
        name = node.id
        ctx = self.ctx
        if name == "pi":
            return Value(sympy.pi, False, math.pi)
        if name in ("q", "k"):
            if not ctx.vectors:
                raise self.fail(node, f"the vector {name!r} is not allowed here",
                                fix="q and k may appear only in 'similarity'")
            return Value(QE if name == "q" else KE, True, width="d")
        if name in ctx.names:
            symbol = ctx.names[name]
            if isinstance(symbol, Table):
                raise self.fail(node, f"the table parameter {name!r} is used outside lookup()",
                                "a table read entry by entry", f"write lookup({name}, t5_bucket(j - i, 32, 128)) "
                                "in 'reweight'")
            if isinstance(symbol, (Elem, Matrix)) and not ctx.vectors:
                raise self.fail(node, f"the {'vector' if isinstance(symbol, Elem) else 'matrix'} parameter {name!r} "
                                "is not allowed here", fix="vector and matrix parameters belong in 'similarity'")
            if isinstance(symbol, Matrix):
                raise self.fail(node, f"{name!r} is a matrix", "a scalar or a vector here",
                                f"multiply it with a vector: matmul({name}, q)")
            if isinstance(symbol, Elem):
                return Value(symbol, True, width="d")
            return Value(symbol, False, ctx.numbers.get(symbol))
        if name in ctx.forbidden_hint:
            raise self.fail(node, f"{name!r} is not allowed here: {ctx.forbidden_hint[name]}")
        allowed = sorted({"pi", *ctx.names, *(("q", "k") if ctx.vectors else ())})
        raise self.fail(node, f"unknown symbol {name!r}", "one of " + ", ".join(allowed),
                        "declare it under 'constants' or 'parameters', or correct the spelling")

    # -- operators ---------------------------------------------------------------------------
    def visit_UnaryOp(self, node, depth):
        operand = self.visit(node.operand, depth)
        if isinstance(node.op, ast.USub):
            return Value(-operand.expr, operand.vector, None if operand.num is None else -operand.num, operand.calls,
                         operand.width)
        if isinstance(node.op, ast.UAdd):
            return operand
        raise self.fail(node, f"operator {type(node.op).__name__} is not allowed", "unary - or +")

    def visit_BinOp(self, node, depth):
        op = node.op
        if isinstance(op, ast.BitXor):
            raise self.fail(node, "'^' is not a power here", "'**' for powers", "write a**b")
        if not isinstance(op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
            raise self.fail(node, f"operator {type(op).__name__} is not allowed", "+ - * / **")
        a, b = self.visit(node.left, depth), self.visit(node.right, depth)
        vector, calls = a.vector or b.vector, max(a.calls, b.calls)
        width = self._width(node, a, b)
        if isinstance(op, (ast.Add, ast.Sub)):
            self._check_mix(node, a, b)
            if isinstance(op, ast.Add):
                return Value(a.expr + b.expr, vector, self._fold(node, lambda x, y: x + y, (a, b)), calls, width)
            return Value(a.expr - b.expr, vector, self._fold(node, lambda x, y: x - y, (a, b)), calls, width)
        if isinstance(op, ast.Mult):
            return Value(a.expr * b.expr, vector, self._fold(node, lambda x, y: x * y, (a, b)), calls, width)
        if isinstance(op, ast.Div):
            if b.num == 0 or b.expr.is_zero:
                raise self.fail(node, "division by zero")
            return Value(a.expr / b.expr, vector, self._fold(node, lambda x, y: x / y, (a, b)), calls, width)
        return self._power(node, a, b)

    def _width(self, node, *values: Value):
        """The common width of the vectors among ``values`` (None if none is a vector); two widths differ: error."""
        widths = {v.width for v in values if v.vector}
        if len(widths) > 1:
            shown = " and ".join(sorted(f"F = {w}" if isinstance(w, int) else "d (the head dim)" for w in widths))
            raise self.fail(node, f"combines vectors of different widths: {shown}", "vectors of one width",
                            "element-wise arithmetic needs equal widths; reduce one side first (dot, norm, mean, sum)")
        return widths.pop() if widths else None

    def _check_mix(self, node, a: Value, b: Value):
        """vector + scalar broadcasts only for constants (elu(q) + 1); a position there is a mistake."""
        if a.vector == b.vector:
            return
        scalar = b if a.vector else a
        if scalar.expr.free_symbols & {I, J}:
            raise self.fail(node, "adds a vector and a position-dependent scalar",
                            "vector + vector, or vector + a constant",
                            "position terms belong in 'reweight', e.g. reweight: cos(pi/2*(i-j)/M)")

    def _power(self, node, a: Value, b: Value) -> Value:
        if b.vector:
            raise self.fail(node, "the exponent is a vector", "a scalar exponent")
        base, exp = a.expr, b.expr
        if exp.is_number and exp.is_real is not True:
            raise self.fail(node, f"the exponent {str(exp)[:60]} is not a real number", "a real exponent")
        e = b.num  # the exponent's value, also when it is a numeric constant (M**2 with M: 4096)
        shown = str(exp)[:40] if exp.is_number or e is None else f"{str(exp)[:40]} = {e:g}"
        if base.is_number and exp.is_number:
            self._check_fold(node, a, b)
        elif e is not None and (a.vector or base.has(Dot, Norm)) and abs(e) > MAX_SYMBOLIC_POWER:
            raise self.fail(node, f"power {shown} of a q/k expression is too large",
                            f"|exponent| <= {MAX_SYMBOLIC_POWER}")
        elif e is not None and not base.is_number and e.is_integer() and abs(e) > MAX_INTEGER_POWER:
            raise self.fail(node, f"integer power {shown} of an expression is too large",
                            f"|exponent| <= {MAX_INTEGER_POWER} for an integer power (sympy expands it)")
        if e is not None and abs(e) > MAX_EXPONENT:
            raise self.fail(node, f"exponent {shown} is too large", f"|exponent| <= {MAX_EXPONENT:g}")
        num = self._fold(node, math.pow, (a, b), "the power")
        out = base ** exp
        if isinstance(out, sympy.Pow) and out.exp.is_number and not out.base.is_number:  # powers of powers multiply
            if out.base.has(QE, KE, Dot, Norm) and abs(magnitude(out.exp)) > MAX_SYMBOLIC_POWER:  # (dot(q, k)**8)**8
                raise self.fail(node, f"power {str(out.exp)[:40]} of a q/k expression is too large (powers of "
                                "powers multiply)", f"|exponent| <= {MAX_SYMBOLIC_POWER}")
            if out.exp.is_Integer and abs(out.exp) > MAX_INTEGER_POWER:  # ((i + 1)**64)**64
                raise self.fail(node, f"integer power {str(out.exp)[:40]} of an expression is too large (powers of "
                                "powers multiply)", f"|exponent| <= {MAX_INTEGER_POWER} for an integer power")
        return Value(out, a.vector, num, max(a.calls, b.calls), a.width)

    def _check_fold(self, node, a: Value, b: Value):
        """Refuse numeric powers whose exact value would be huge (sympy folds them eagerly)."""
        if a.num is None or b.num is None:
            raise self.fail(node, "numeric power is out of range")
        e, bmag = b.num, abs(a.num)
        if abs(e) > MAX_FOLDED_EXPONENT and bmag not in (0.0, 1.0):
            raise self.fail(node, f"numeric power with exponent {b.expr} would be huge",
                            f"|exponent| <= {MAX_FOLDED_EXPONENT} for a numeric base",
                            "write the value as a decimal literal")
        if bmag > 0 and abs(e) * abs(math.log10(bmag)) > 300:
            raise self.fail(node, "numeric power overflows", "a result within 1e-300..1e300")

    # -- calls -------------------------------------------------------------------------------
    def visit_Call(self, node, depth):
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "only plain function names can be called", ", ".join(FUNCTION_NAMES))
        if node.keywords:
            raise self.fail(node, "keyword arguments are not allowed", "positional arguments")
        name = node.func.id
        if name in TABLE_CALLS:
            return self._table_call(node, name, depth)
        if name not in ELEMENTWISE and name not in VECTOR_CALLS:
            raise self.fail(node, f"unknown function {name!r}", "one of " + ", ".join(FUNCTION_NAMES))
        if name in VECTOR_CALLS and not self.ctx.vectors:
            raise self.fail(node, f"{name}() is not allowed here",
                            fix=f"{', '.join(VECTOR_CALLS)} apply to the vectors q and k in 'similarity'")
        matrix = self._matrix(node) if name == "matmul" else None
        args = [self.visit(a, depth) for a in node.args[1 if matrix is not None else 0:]]
        calls = 1 + max((a.calls for a in args), default=0)
        if calls > MAX_CALL_DEPTH:  # sympy's automatic evaluation of nested calls (tanh(tanh(...))) is exponential
            raise self.fail(node, f"function calls are nested {calls} deep", f"at most {MAX_CALL_DEPTH}",
                            "name an inner part as a constant, or simplify")
        if name in VECTOR_CALLS:
            return self._vector_call(node, name, args, calls, matrix)
        fn, arity = ELEMENTWISE[name]
        if len(args) != arity:
            raise self.fail(node, f"{name}() takes {arity} argument(s), got {len(args)}")
        if arity == 2:
            self._check_mix(node, args[0], args[1])
        width = self._width(node, *args)
        num = self._fold(node, FLOAT_FUNCTIONS[name], args, f"{name}() cannot be applied: its value")
        try:
            out = fn(*[a.expr for a in args])
        except (TypeError, ValueError, OverflowError) as exc:
            raise self.fail(node, f"{name}() cannot be applied: {exc}") from None
        return Value(out, any(a.vector for a in args), num, calls, width)

    def _table_call(self, node, name, depth):
        """lookup(table, t5_bucket(x, num_buckets, max_distance)): a table parameter's entry at T5's bucket of x."""
        example = "e.g. reweight: exp(lookup(rel, t5_bucket(j - i, 32, 128))) with rel: {shape: [H, 32], init: 0}"
        if self.ctx.key != "reweight":
            raise self.fail(node, f"{name}() is not allowed here", "lookup() and t5_bucket() in 'reweight' only",
                            example)
        if name == "t5_bucket":
            raise self.fail(node, "t5_bucket() is a bucket index, used outside lookup()",
                            "t5_bucket() as the index of lookup(table, t5_bucket(x, num_buckets, max_distance))",
                            example)
        if len(node.args) != 2:
            raise self.fail(node, f"lookup() takes 2 arguments, got {len(node.args)}", "lookup(table, index)")
        first, index = node.args
        symbol = self.ctx.names.get(first.id) if isinstance(first, ast.Name) else None
        if not isinstance(symbol, Table):
            shown = f"{first.id!r} is not a table parameter" if isinstance(first, ast.Name) else \
                "the first argument is not a name"
            raise self.fail(node, f"lookup() of a non-table: {shown}",
                            "the name of a parameter declared with shape [H, NB] or [NB]", example)
        if not (isinstance(index, ast.Call) and isinstance(index.func, ast.Name) and index.func.id == "t5_bucket"):
            raise self.fail(node, f"the index {self.src(index)!r} of lookup() is not t5_bucket(...)",
                            "lookup(table, t5_bucket(x, num_buckets, max_distance))", example)
        bucket, num_buckets = self._t5_bucket(index, depth + 1)
        entries = self.ctx.tables[symbol]
        if num_buckets > entries:
            raise self.fail(node, f"t5_bucket() gives buckets 0 .. {num_buckets - 1}, but {first.id!r} has {entries} "
                            "entries", f"a table of at least {num_buckets} entries",
                            f"declare {first.id} with shape [H, {num_buckets}] (or [{num_buckets}])")
        return Value(Lookup(symbol, bucket), False, None, 2)

    def _t5_bucket(self, node, depth):
        """T5Bucket(x, num_buckets, max_distance, bidirectional) of a t5_bucket call; and num_buckets."""
        if node.keywords:
            raise self.fail(node, "keyword arguments are not allowed", "positional arguments")
        if len(node.args) != 3:
            raise self.fail(node, f"t5_bucket() takes 3 arguments, got {len(node.args)}",
                            "t5_bucket(x, num_buckets, max_distance)")
        x = self.visit(node.args[0], depth)
        if x.vector or x.expr.has(QE, KE):
            raise self.fail(node, "the index depends on q or k", "a relative position j - i")
        if sympy.expand(x.expr - (J - I)) != 0 and sympy.expand(x.expr - (I - J)) != 0:
            raise self.fail(node, f"the relative position {self.src(node.args[0])!r} is not j - i or i - j",
                            "t5_bucket(j - i, num_buckets, max_distance) (T5's memory position minus query position)")
        numbers = []
        for what, arg in (("num_buckets", node.args[1]), ("max_distance", node.args[2])):
            value = self.visit(arg, depth)
            if value.num is None or value.num != int(value.num) or value.num < 1:
                raise self.fail(node, f"{what} {self.src(arg)!r} is not a positive integer known at load time",
                                "a positive integer literal or numeric constant (T5: 32 and 128)")
            numbers.append(int(value.num))
        num_buckets, max_distance = numbers
        half = num_buckets // 2 if self.ctx.bidirectional else num_buckets
        exact = half // 2
        mode = "bidirectional" if self.ctx.bidirectional else "causal"
        if exact < 1 or num_buckets > 4096:
            raise self.fail(node, f"num_buckets {num_buckets} in the {mode} mode",
                            f"{4 if self.ctx.bidirectional else 2} .. 4096 (half of the buckets, and half of those "
                            "again, count distances exactly: at least one)")
        if not exact < max_distance <= MAX_BUCKET_DISTANCE:
            raise self.fail(node, f"max_distance {max_distance}", f"an integer in {exact + 1} .. {MAX_BUCKET_DISTANCE} "
                            f"(above the {exact} exact buckets of the {mode} mode)")
        flag = Integer(1 if self.ctx.bidirectional else 0)
        return T5Bucket(x.expr, Integer(num_buckets), Integer(max_distance), flag), num_buckets

    def _matrix(self, node):
        """matmul's first argument: the name of a matrix parameter -> (symbol, rows)."""
        first = node.args[0] if node.args else None
        symbol = self.ctx.names.get(first.id) if isinstance(first, ast.Name) else None
        if not isinstance(symbol, Matrix):
            raise self.fail(node, "matmul() takes a matrix parameter first", "matmul(W, a) with W declared with "
                            "shape [F, Dk] or [H, F, Dk] and a a vector of width d", "e.g. matmul(W, q)")
        return symbol, self.ctx.rows[symbol]

    def _vector_call(self, node, name, args, calls, matrix):
        """dot, norm, mean, sum (reductions to a scalar), matmul and softmax (vector -> vector)."""
        want = 2 if name == "dot" else 1
        if len(args) != want:
            raise self.fail(node, f"{name}() takes {want + (matrix is not None)} argument(s), "
                            f"got {len(args) + (matrix is not None)}")
        for a in args:
            if not a.vector:
                raise self.fail(node, f"{name}() got a scalar argument", "vector arguments (built from q, k)",
                                "e.g. dot(relu(q), relu(k))")
        width = self._width(node, *args)
        if name == "dot":
            return Value(Dot(args[0].expr, args[1].expr), False, None, calls)
        if name == "matmul":
            if width != "d":
                raise self.fail(node, f"matmul() of a vector of width F = {width}", "a vector of width d (Dk)",
                                "matmul(W, q) with W [F, Dk]; a second projection needs its own [F2, F] matrix, "
                                "which is not supported")
            return Value(MatVec(matrix[0], args[0].expr, Integer(matrix[1])), True, None, calls, matrix[1])
        if name == "softmax":
            return Value(Softmax(args[0].expr), True, None, calls, width)
        node_type = {"norm": Norm, "mean": Mean, "sum": Total}[name]
        return Value(node_type(args[0].expr), False, None, calls)


# ---------------------------------------------------------------------------------------------
# Bounds after constants are substituted (the planner's view of an expression)
# ---------------------------------------------------------------------------------------------
def tree_size(expr, sizes: dict, cap: int) -> int:
    """The number of nodes of ``expr`` once each symbol in ``sizes`` is replaced by a tree of that many
    nodes (shared subtrees counted every time, as the planner's walks visit them); at most cap + 1."""
    memo = {}

    def size(e):
        if e in memo:
            return memo[e]
        if e in sizes:
            out = sizes[e]
        else:
            out = 1
            for a in e.args:
                out = min(out + size(a), cap + 1)
        memo[e] = out
        return out

    return size(expr)


def substitute(expr, values: dict, memo: dict | None = None) -> sympy.Expr:
    """``expr`` with the symbols in ``values`` replaced, rebuilt bottom-up; a node whose arguments are all
    numeric is evaluated in float64 before sympy builds it (OutOfRange beyond float64, NotFinite for log(0),
    sqrt(-1), 1/0), so folding the
    substituted numbers (exp(exp(exp(exp(c)))) with c: 1) never reaches sympy's arbitrary precision.
    Bound the result's size with tree_size first."""
    memo = {} if memo is None else memo
    floats = {}

    def walk(e):
        if e in memo:
            return memo[e]
        if e in values:
            out = values[e]
        elif not e.args:
            out = e
        else:
            args = [walk(a) for a in e.args]
            if e.func in FLOAT_NODES and all(a.is_number for a in args):
                nums = [numeric_value(a, floats) for a in args]
                if None in nums or apply_float(FLOAT_NODES[e.func], nums) is None:  # OutOfRange beyond float64
                    raise NotFinite()
            out = e if all(x is y for x, y in zip(args, e.args)) else e.func(*args)
            if out.is_number and not isinstance(out, sympy.Number) and numeric_value(out, floats) is None:
                raise NotFinite()
        memo[e] = out
        return out

    out = walk(expr)
    if out_of_range_number(out) is not None:
        raise OutOfRange()
    if out.has(*NON_FINITE):
        raise NotFinite()
    return out


def tensor_degree(expr, cap: int = 1 << 20) -> int:
    """The tensor-power degree of a similarity: how many dot() factors a product of its terms multiplies
    (dot(q, k)**2 * dot(relu(q), relu(k)) is 3, a feature width of d**3); at most cap."""
    memo = {}

    def deg(e):
        if e in memo:
            return memo[e]
        if isinstance(e, Dot):
            out = 1
        elif isinstance(e, sympy.Mul):
            out = sum(deg(a) for a in e.args)
        elif isinstance(e, sympy.Pow):
            b = deg(e.base)
            out = b * math.ceil(min(abs(magnitude(e.exp)), cap)) if b and e.exp.is_number else b
        else:  # a sum, or a function: the largest degree of its arguments
            out = max((deg(a) for a in e.args), default=0)
        memo[e] = out = min(out, cap)
        return out

    return deg(expr)


def expanded_terms(expr, cap: int) -> int:
    """An upper bound of the work of expanding ``expr`` the way the planner does (sympy.expand of products,
    integer powers of sums and function arguments; sin/cos of a sum of t terms into 2**(t - 1) products):
    the number of terms, summed over every node; at most cap + 1."""
    memo, total = {}, [0]

    def terms(e):
        if e in memo:
            return memo[e]
        if not e.args:
            out = 1
        elif isinstance(e, sympy.Add):
            out = sum(terms(a) for a in e.args)
        elif isinstance(e, sympy.Mul):
            out = 1
            for a in e.args:
                out = min(out * terms(a), cap + 1)
        elif isinstance(e, sympy.Pow):
            t, n = terms(e.base), e.exp
            terms(n)
            t = min(t, cap + 1)  # a sum of t terms to the integer power n: comb(t + |n| - 1, t - 1) terms
            out = math.comb(t + abs(int(n)) - 1, t - 1) if t > 1 and n.is_Integer and n != 0 else 1
        elif isinstance(e, (sympy.sin, sympy.cos)):
            out = 2 ** (min(terms(e.args[0]), 64) - 1)
        else:
            for a in e.args:
                terms(a)
            out = 1
        out = min(out, cap + 1)
        memo[e] = out
        total[0] += out
        if total[0] > cap:
            raise OutOfRange()
        return out

    try:
        terms(expr)
    except OutOfRange:
        return cap + 1
    return total[0]


TRIG = (sympy.sin, sympy.cos, sympy.tanh)


def largest_integer_power(expr) -> int:
    """The largest |n| of an integer power x**n of a non-numeric x in ``expr`` (0 if none)."""
    return max((abs(int(e.exp)) for e in sympy.preorder_traversal(expr)
                if isinstance(e, sympy.Pow) and e.exp.is_Integer and not e.base.is_number), default=0)


def call_depth(expr, depths: dict, cap: int = 1 << 10) -> int:
    """How deep function calls nest in ``expr`` once each symbol in ``depths`` is replaced by an expression
    whose calls nest that deep."""
    memo = {}

    def depth(e):
        if e in memo:
            return memo[e]
        if e in depths:
            out = depths[e]
        else:
            inner = max((depth(a) for a in e.args), default=0)
            out = min(inner + isinstance(e, (sympy.Function, sympy.Max, sympy.Min)), cap)
        memo[e] = out
        return out

    return depth(expr)


def trig_terms(expr) -> int:
    """The terms of the arguments of every sin, cos and tanh in ``expr``, each occurrence counted: what
    sympy's trigonometric simplification of the reweight (the planner's Toeplitz test) grows with."""
    return sum(len(sympy.Add.make_args(e.args[0])) for e in sympy.preorder_traversal(expr) if isinstance(e, TRIG))


def outer_free_symbols(expr: sympy.Expr) -> set:
    """Free symbols of ``expr`` outside the arguments of Dot and Norm (whose element symbols are bound)."""
    if isinstance(expr, REDUCTIONS):
        return set()
    if isinstance(expr, Symbol):
        return {expr}
    out = set()
    for a in expr.args:
        if isinstance(a, sympy.Basic):
            out |= outer_free_symbols(a)
    return out


def sides(expr: sympy.Expr) -> set:
    """Which vectors ('q', 'k') an expression depends on, looking inside Dot and Norm."""
    syms = expr.free_symbols
    return {s for s, e in (("q", QE), ("k", KE)) if e in syms}


def vector_width(expr, d=D):
    """The width of a vector element formula: F of a matmul(W, .) outside the reductions in it (W [F, Dk]), else
    the head dim ``d`` (the parser checks that the vectors an expression combines have one width)."""
    def rows(e):
        if isinstance(e, REDUCTIONS):
            return None
        if isinstance(e, MatVec):
            return int(e.args[2])
        return next((r for r in (rows(a) for a in e.args if isinstance(a, sympy.Basic)) if r is not None), None)

    found = rows(expr)
    return d if found is None else found


def varies(expr) -> bool:
    """Whether an expression varies along a vector's elements: an element symbol (q's, k's, a vector parameter's)
    or a vector map outside the reductions in it."""
    if isinstance(expr, REDUCTIONS):
        return False
    if isinstance(expr, VECTOR_FUNCTIONS) or expr in (QE, KE) or isinstance(expr, Elem):
        return True
    return any(varies(a) for a in expr.args if isinstance(a, sympy.Basic))


def vector_parameters(expr) -> set:
    """The vector and matrix parameter symbols an expression uses (inside reductions too)."""
    return {s for s in expr.free_symbols if isinstance(s, (Elem, Matrix))}
