"""Evaluate sympy expressions of the spec algebra on torch tensors, through one mapping table.

Used by the naive reference (which evaluates the spec directly) and by the torch backend (which evaluates
the planner's feature maps and position factors). No code is generated or executed: each tree is translated
once into nested closures (one per node), which later calls run.
"""
from __future__ import annotations

import math
import operator

import sympy
import torch

from attngen.errors import PlanError
from attngen.frontend.expr import (
    HEAD,
    HEADS,
    KE,
    N_K,
    N_Q,
    QE,
    D,
    Dot,
    Elu,
    Lookup,
    MatVec,
    Mean,
    Norm,
    Relu,
    Sigmoid,
    Softmax,
    T5Bucket,
    Total,
    VecMax,
)
from attngen.runtime.t5 import relative_position_bucket


def _max(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = _binary(out, x, torch.maximum, max)
    return out


def _min(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = _binary(out, x, torch.minimum, min)
    return out


def _binary(a, b, tfn, pyfn):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return tfn(a, b)
    if isinstance(a, torch.Tensor):
        return tfn(a, torch.as_tensor(b, dtype=a.dtype, device=a.device))
    if isinstance(b, torch.Tensor):
        return tfn(torch.as_tensor(a, dtype=b.dtype, device=b.device), b)
    return pyfn(a, b)


def _unary(tfn, pyfn):
    return lambda x: tfn(x) if isinstance(x, torch.Tensor) else pyfn(x)


def _pow(base, exp):
    if isinstance(exp, (int, torch.SymInt)):  # an integer exponent stays a Python int: dynamo with dynamic shapes
        exp = operator.index(exp)  # would otherwise trace a closure's constant as a SymInt (no pow derivative)
    if not isinstance(base, torch.Tensor) and not isinstance(exp, torch.Tensor):
        return float(base) ** exp
    if isinstance(exp, (int, float)) and float(exp) == 0.5:
        return torch.sqrt(base)
    if not isinstance(base, torch.Tensor):  # torch.full, not float(base): under torch.compile with dynamic shapes
        # float() would specialise a symbolic length (n**x: one graph per length)
        base = torch.full((), base, dtype=exp.dtype, device=exp.device)
    return torch.pow(base, exp)


def _heaviside(x, h0=0.0):
    if isinstance(x, torch.Tensor):
        return (x > 0).to(x.dtype) + (x == 0).to(x.dtype) * float(h0)
    return 1.0 if x > 0 else float(h0) if x == 0 else 0.0


def _matvec(w, a, rows):
    """Element f of W a over the last dim of ``a`` [B, H, ..., D]: W [F, D], or [H, F, D] per head."""
    if w.dim() == 3:
        w = w.view(1, w.shape[0], *([1] * (a.dim() - 3)), *w.shape[1:])
        return torch.einsum("...d,...fd->...f", a, w.to(a.dtype))
    return a @ w.to(a.dtype).transpose(-1, -2)


def _t5_bucket(x, num_buckets, max_distance, bidirectional):
    """T5's bucket of the relative positions x (a tensor of integer values) as int64 (attngen.runtime.t5)."""
    return relative_position_bucket(x, int(num_buckets), int(max_distance), bool(bidirectional))


def _lookup(table, index):
    """table[index] for a table [NB] (shared), or table[h, index] along the head axis (dim 1) of ``index`` for a
    table [H, NB]: plain indexing, so the gradient by the table is the scatter-add over the pairs of each bucket."""
    index = torch.as_tensor(index, device=table.device)
    if table.dim() == 1:
        return table[index]
    if index.dim() < 2:
        raise PlanError(f"lookup of a table per head at an index of shape {list(index.shape)}: no head axis")
    heads = torch.arange(table.shape[0], device=table.device).view(1, -1, *([1] * (index.dim() - 2)))
    return table[heads, index]


def _reduce(fn):
    return lambda x: fn(x) if isinstance(x, torch.Tensor) else x


# sympy node type -> how to compute it from its evaluated arguments
TABLE = {
    sympy.exp: _unary(torch.exp, math.exp),
    sympy.log: _unary(torch.log, math.log),
    sympy.sin: _unary(torch.sin, math.sin),
    sympy.cos: _unary(torch.cos, math.cos),
    sympy.tanh: _unary(torch.tanh, math.tanh),
    sympy.Abs: _unary(torch.abs, abs),
    Relu: _unary(torch.relu, lambda x: max(x, 0.0)),
    Elu: _unary(torch.nn.functional.elu, lambda x: x if x > 0 else math.expm1(x)),
    Sigmoid: _unary(torch.sigmoid, lambda x: 1.0 / (1.0 + math.exp(-x))),
    sympy.Max: _max,
    sympy.Min: _min,
    sympy.Heaviside: _heaviside,
    sympy.Pow: _pow,
    MatVec: _matvec,
    Softmax: lambda x: torch.softmax(x, dim=-1),
    Mean: _reduce(lambda x: x.mean(-1, keepdim=True)),
    Total: _reduce(lambda x: x.sum(-1, keepdim=True)),
    VecMax: _reduce(lambda x: x.amax(-1, keepdim=True)),
    T5Bucket: _t5_bucket,
    Lookup: _lookup,
}


class Arg:
    """An argument of a reduction (dot, norm) as the ``dot`` / ``norm`` functions of an Evaluator receive it: the
    expression, its closure and the vectors it reads ('q', 'k'), all worked out when the tree is translated, so
    evaluating a reduction walks no sympy tree (and a torch.compile trace meets no sympy call)."""

    __slots__ = ("expr", "fn", "sides", "free_symbols")

    def __init__(self, expr, where: str):
        self.expr, self.fn = expr, compiled(expr, where)
        self.free_symbols = expr.free_symbols
        self.sides = frozenset(s for s, e in (("q", QE), ("k", KE)) if e in self.free_symbols)


class Evaluator:
    """Evaluates sympy trees; ``env`` maps symbols to tensors or numbers; ``dot(ev, a, b)`` / ``norm(ev, a)``
    evaluate the reductions, given this evaluator for their arguments (the caller decides how vectors are
    laid out; passing the evaluator in keeps the functions free of references back to it).

    Each tree is translated once into nested Python closures (``compiled``, cached per expression): a call
    runs those closures on this evaluator's env and walks no sympy tree."""

    def __init__(self, env: dict, dot=None, norm=None, where: str = "<expr>"):
        # keyed by the symbols' names: a lookup compares strings, never sympy objects (two equal Symbols need not be
        # one object, and a torch.compile trace would have to hash sympy objects to compare them)
        self.env = {k if type(k) is str else k.name: v for k, v in env.items()}
        self.dot, self.norm, self.where = dot, norm, where
        self.memo = {}  # closure -> value: a formula asked for twice (a factor shared by terms) runs once

    def __call__(self, expr):
        return self.run(expr)

    def run(self, fn):
        """The value of a closure from ``compiled`` (equal expressions share one: computed once per evaluator),
        of a reduction's Arg, or of an expression."""
        if type(fn) is Arg:
            fn = fn.fn
        elif isinstance(fn, sympy.Basic):
            fn = compiled(fn, self.where)
        if fn in self.memo:
            return self.memo[fn]
        value = self.memo[fn] = fn(self)
        return value

    def lookup(self, symbol: str):
        try:
            return self.env[symbol]
        except KeyError:
            raise PlanError(f"{self.where}: no value for symbol {symbol} (known: {sorted(map(str, self.env))})") \
                from None


COMPILED_LIMIT = 4096  # expressions kept translated (a plan holds a few dozen)
_COMPILED: dict = {}


def compiled(expr, where: str = "<expr>"):
    """The closure computing ``expr`` from an Evaluator: built on the first request, then reused. Raises
    PlanError for a node with no torch equivalent (naming ``where``)."""
    fn = _COMPILED.get(expr)
    if fn is None:
        fn = _translate(expr, where)
        if len(_COMPILED) >= COMPILED_LIMIT:
            _COMPILED.clear()
        _COMPILED[expr] = fn
    return fn


def _translate(expr, where: str):
    if isinstance(expr, sympy.Symbol):
        name = expr.name
        return lambda ev: ev.lookup(name)
    if expr is sympy.pi:
        return lambda ev: math.pi
    if expr.is_Number or expr.is_NumberSymbol:
        value = int(expr) if expr.is_Integer else float(expr)
        return lambda ev: value
    if isinstance(expr, Dot):
        a, b = (Arg(x, where) for x in expr.args)
        return lambda ev: ev.dot(ev, a, b)
    if isinstance(expr, Norm):
        a = Arg(expr.args[0], where)
        return lambda ev: ev.norm(ev, a)
    if isinstance(expr, sympy.Piecewise):
        return _piecewise(expr, where)
    args = [_translate(a, where) for a in expr.args]
    if isinstance(expr, sympy.Add):
        return lambda ev: _fold(args, ev, lambda x, y: x + y)
    if isinstance(expr, sympy.Mul):
        return lambda ev: _fold(args, ev, lambda x, y: x * y)
    if isinstance(expr, sympy.Pow):
        base, exp = args
        return lambda ev: _pow(base(ev), exp(ev))
    fn = TABLE.get(type(expr)) or TABLE.get(expr.func)
    if fn is None:
        raise PlanError(f"{where}: cannot evaluate {type(expr).__name__} in {expr}")
    return lambda ev: fn(*[a(ev) for a in args])


def _fold(args, ev, op):
    out = args[0](ev)
    for a in args[1:]:
        out = op(out, a(ev))
    return out


def _piecewise(expr, where: str):
    branches = []  # (value, condition's lhs or None for the default), last branch first
    for value, cond in reversed(expr.args):
        if cond is sympy.true:
            branches.append((_translate(value, where), None))
            continue
        if not isinstance(cond, sympy.core.relational.StrictGreaterThan) or cond.rhs != 0:
            raise PlanError(f"{where}: cannot evaluate the condition {cond}")
        branches.append((_translate(value, where), _translate(cond.lhs, where)))

    def run(ev):
        out = None
        for value, lhs in branches:
            v = value(ev)
            if lhs is None:
                out = v
                continue
            c = lhs(ev) > 0
            out = torch.where(c, v, out) if isinstance(c, torch.Tensor) else (v if c else out)
        return out
    return run


def scalar_env(spec, n_q: int, n_k: int, d: int, heads: int, params: dict, dtype, device) -> dict:
    """Values of the symbols that do not vary within a row: lengths, d, head index and count, parameters
    (per head as [1, H, 1, 1], scalars as 0-d tensors). Constants are substituted before evaluation."""
    # d and H as Python ints: under torch.compile with symbolic shapes they are specialised (the op keys its plans
    # on them) and stay out of the graph's arithmetic (a symbolic exponent such as d**-0.5 has no derivative there)
    d, heads = operator.index(d), operator.index(heads)
    env = {N_Q: n_q, N_K: n_k, D: d, HEADS: heads,
           HEAD: torch.arange(heads, dtype=dtype, device=device).view(1, heads, 1, 1)}
    for p in spec.parameters:
        env[p.symbol] = parameter_value(p, params[p.name], 4)
    return env


def parameter_value(p, t: torch.Tensor, rank: int):
    """A parameter's tensor laid out for rows of ``rank`` dims [B, H, ..., D]: a scalar as [] (per head
    [1, H, 1, ...]), a vector [1, H or 1, 1, ..., D], a matrix as it is ([F, D] or [H, F, D], for MatVec), a table
    as it is ([H, NB] or [NB], for Lookup)."""
    if p.kind in ("matrix", "table"):
        return t
    if p.kind == "vector":
        return t.view(1, t.shape[0] if p.per_head else 1, *([1] * (rank - 3)), t.shape[-1])
    return t.view(1, t.shape[0], *([1] * (rank - 2))) if p.per_head else t.reshape(())
