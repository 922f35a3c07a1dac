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
from dataclasses import dataclass

import sympy
from sympy import Function, Integer, Symbol

from attngen.errors import SpecError

# ---------------------------------------------------------------------------------------------
# Symbols and functions of the algebra
# ---------------------------------------------------------------------------------------------
QE = Symbol("q_e", real=True)  # one element of the query vector
KE = Symbol("k_e", real=True)  # one element of the key vector
I = Symbol("i", integer=True, nonnegative=True)  # query position (0-based)
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
        if x.is_Number:
            return sympy.Max(x, 0)

    def fdiff(self, argindex=1):
        return sympy.Heaviside(self.args[0], 0)


class Elu(Function):
    """elu(x) = x for x > 0, exp(x) - 1 otherwise (alpha = 1, like torch.nn.functional.elu)."""
    nargs = 1
    is_real = True

    @classmethod
    def eval(cls, x):
        if x.is_Number:
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


REDUCTIONS = (Dot, Norm)

# name -> (sympy constructor, arity); element-wise: applies to scalars and to vectors element by element
ELEMENTWISE = {
    "relu": (Relu, 1), "elu": (Elu, 1), "sigmoid": (Sigmoid, 1), "exp": (sympy.exp, 1),
    "log": (sympy.log, 1), "tanh": (sympy.tanh, 1), "abs": (sympy.Abs, 1), "sqrt": (sympy.sqrt, 1),
    "sin": (sympy.sin, 1), "cos": (sympy.cos, 1), "min": (sympy.Min, 2), "max": (sympy.Max, 2),
}
FUNCTION_NAMES = sorted([*ELEMENTWISE, "dot", "norm"])

# Limits that keep parsing and sympy's automatic folding fast on hostile input.
MAX_SOURCE_CHARS = 2000
MAX_NODES = 400
MAX_DEPTH = 40
MAX_LITERAL = 1e30
MAX_FOLDED_EXPONENT = 64  # numeric ** numeric folds only below this exponent
MAX_SYMBOLIC_POWER = 8  # integer powers of expressions that contain q or k (tensor powers)
NON_FINITE = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)


@dataclass(frozen=True)
class Value:
    """A parsed sub-expression: its sympy form and whether it is a vector (element formula)."""
    expr: sympy.Expr
    vector: bool


@dataclass(frozen=True)
class Context:
    """What an expression may use: where it comes from (for errors) and which names it may reference."""
    where: str  # file name or '<dict>'
    key: str  # spec key, e.g. 'similarity' or 'constants.M'
    names: dict  # allowed scalar names -> sympy symbol
    vectors: bool  # whether q and k are allowed
    forbidden_hint: dict  # name -> why it is not allowed here (for better errors)


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
    return value.expr


class _Walker:
    def __init__(self, ctx: Context, text: str):
        self.ctx, self.text = ctx, text

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
        return value

    def _check_finite(self, node, expr):
        """Refuse infinities, NaN and non-real numbers (0**-1, log(0), sqrt(-1)) where they appear."""
        if expr.has(*NON_FINITE) or (expr.is_number and expr.is_real is False):
            raise self.fail(node, f"the value {str(expr)[:60]} is not a finite real number",
                            "finite real values", "check for division by zero, log(0), sqrt or ** of a negative")

    # -- leaves ------------------------------------------------------------------------------
    def visit_Constant(self, node, depth):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(node, f"literal {v!r:.40} is not a number", "an int or float literal")
        if abs(v) > MAX_LITERAL or not math.isfinite(v):
            raise self.fail(node, f"number {v!r:.40} is out of range", f"|x| <= {MAX_LITERAL:g}")
        return Value(Integer(v) if isinstance(v, int) else sympy.Float(v), False)

    def visit_Name(self, node, depth):
        name = node.id
        ctx = self.ctx
        if name == "pi":
            return Value(sympy.pi, False)
        if name in ("q", "k"):
            if not ctx.vectors:
                raise self.fail(node, f"the vector {name!r} is not allowed here",
                                fix="q and k may appear only in 'similarity'")
            return Value(QE if name == "q" else KE, True)
        if name in ctx.names:
            return Value(ctx.names[name], False)
        if name in ctx.forbidden_hint:
            raise self.fail(node, f"{name!r} is not allowed here: {ctx.forbidden_hint[name]}")
        allowed = sorted({"pi", *ctx.names, *(("q", "k") if ctx.vectors else ())})
        raise self.fail(node, f"unknown symbol {name!r}", "one of " + ", ".join(allowed),
                        "declare it under 'constants' or 'parameters', or correct the spelling")

    # -- operators ---------------------------------------------------------------------------
    def visit_UnaryOp(self, node, depth):
        operand = self.visit(node.operand, depth)
        if isinstance(node.op, ast.USub):
            return Value(-operand.expr, operand.vector)
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
        if isinstance(op, (ast.Add, ast.Sub)):
            self._check_mix(node, a, b)
            return Value(a.expr + b.expr if isinstance(op, ast.Add) else a.expr - b.expr, a.vector or b.vector)
        if isinstance(op, ast.Mult):
            return Value(a.expr * b.expr, a.vector or b.vector)
        if isinstance(op, ast.Div):
            if b.expr.is_zero:
                raise self.fail(node, "division by zero")
            return Value(a.expr / b.expr, a.vector or b.vector)
        return self._power(node, a, b)

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
        if base.is_number and exp.is_number:
            self._check_fold(node, base, exp)
        elif (a.vector or base.has(Dot, Norm)) and exp.is_number and abs(float(exp)) > MAX_SYMBOLIC_POWER:
            raise self.fail(node, f"power {exp} of a q/k expression is too large",
                            f"|exponent| <= {MAX_SYMBOLIC_POWER}")
        if exp.is_number and exp.is_real and abs(float(exp)) > 1e6:
            raise self.fail(node, f"exponent {exp} is too large", "|exponent| <= 1e6")
        return Value(base ** exp, a.vector)

    def _check_fold(self, node, base, exp):
        """Refuse numeric powers whose exact value would be huge (sympy folds them eagerly)."""
        try:
            e = float(exp)
            bmag = abs(float(base))
        except (TypeError, OverflowError, ValueError):
            raise self.fail(node, "numeric power is out of range") from None
        if abs(e) > MAX_FOLDED_EXPONENT and bmag not in (0.0, 1.0):
            raise self.fail(node, f"numeric power with exponent {exp} would be huge",
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
        if name not in ELEMENTWISE and name not in ("dot", "norm"):
            raise self.fail(node, f"unknown function {name!r}", "one of " + ", ".join(FUNCTION_NAMES))
        args = [self.visit(a, depth) for a in node.args]
        if name in ("dot", "norm"):
            if not self.ctx.vectors:
                raise self.fail(node, f"{name}() is not allowed here", fix="dot and norm apply to q and k in 'similarity'")
            want = 2 if name == "dot" else 1
            if len(args) != want:
                raise self.fail(node, f"{name}() takes {want} argument(s), got {len(args)}")
            for a in args:
                if not a.vector:
                    raise self.fail(node, f"{name}() got a scalar argument", "vector arguments (built from q, k)",
                                    "e.g. dot(relu(q), relu(k))")
            if name == "dot":
                return Value(Dot(args[0].expr, args[1].expr), False)
            return Value(Norm(args[0].expr), False)
        fn, arity = ELEMENTWISE[name]
        if len(args) != arity:
            raise self.fail(node, f"{name}() takes {arity} argument(s), got {len(args)}")
        if arity == 2:
            self._check_mix(node, args[0], args[1])
        try:
            out = fn(*[a.expr for a in args])
        except (TypeError, ValueError, OverflowError) as exc:
            raise self.fail(node, f"{name}() cannot be applied: {exc}") from None
        return Value(out, any(a.vector for a in args))


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
