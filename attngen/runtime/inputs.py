"""The spec-aware face of the one validator (attngen.runtime.validate): q, k, v and parameters checked against
a spec, the parameters' default values from their ``init`` expressions, packed sequence boundaries."""
from __future__ import annotations

import functools
import math

import torch

from attngen.errors import InputError
from attngen.frontend.expr import HEAD, HEADS, N_K, N_Q, D
from attngen.frontend.spec import Spec
from attngen.runtime import validate
from attngen.runtime.evaluate import Evaluator, compiled


def default_parameters(spec: Spec, heads: int, dtype=torch.float32, device=None, *, head_dim: int | None = None,
                       names=None) -> dict:
    """The spec's parameters at their ``init`` values: per-head ones of shape [H], scalars of shape [].

    ``head_dim`` is the head dim d of the call (q's last dim), the value of ``d`` in an init such as
    ``1/sqrt(d)``; None is allowed only when no init uses d. ``names`` limits the parameters evaluated (default:
    all). InputError names a parameter whose init is not a finite number here."""
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise InputError(f"{spec.name}: head_dim={head_dim!r}; expected a positive integer (the head dim of q, k)")
    out = {}
    for p in spec.parameters:
        if names is not None and p.name not in names:
            continue
        if head_dim is None and p.init_expr.has(D):
            raise InputError(f"{spec.name}: the init of parameter {p.name!r} ({p.init}) uses the head dim d: pass "
                             f"head_dim= (q's last dim), or pass {p.name}= explicitly")
        h = torch.arange(heads, dtype=torch.float64)
        env = {HEAD: h, HEADS: heads} | ({D: head_dim} if head_dim is not None else {})
        try:
            value = Evaluator(env, where=f"{spec.where}: parameters.{p.name}.init")(p.init_expr)
            t = torch.as_tensor(value, dtype=torch.float64)
        except (ArithmeticError, ValueError, TypeError) as exc:  # 1/(d - 64) at d = 64, a domain error
            raise InputError(f"{spec.name}: the init of parameter {p.name!r} ({p.init}) cannot be evaluated at "
                             f"d = {head_dim}, H = {heads} ({type(exc).__name__}); pass {p.name}= explicitly") from None
        t = _filled(p, t, heads, head_dim)
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{spec.name}: the init of parameter {p.name!r} ({p.init}) is not finite at "
                             f"d = {head_dim}, H = {heads}; pass {p.name}= explicitly")
        out[p.name] = t.to(dtype=dtype, device=device)
    return out


def _filled(p, value: torch.Tensor, heads: int, head_dim: int | None) -> torch.Tensor:
    """The parameter's tensor from its evaluated init ``value`` (a number, or [H] over the head index): filled
    with it, or its N(0, value**2) draw (the spec's seed) or the identity."""
    if p.kind == "scalar":
        return value.expand(heads).clone() if p.per_head else value.reshape(())
    if head_dim is None and "Dk" in p.shape:
        raise InputError(f"the shape of parameter {p.name!r} uses Dk: pass head_dim=")
    shape = p.tensor_shape(heads, head_dim)
    per_head = value.reshape(-1, *([1] * (len(shape) - 1))) if p.per_head and value.dim() else value
    if p.draw == "normal":
        return _normal(shape, p.seed) * per_head
    if p.draw == "eye":
        return torch.eye(shape[-2], shape[-1], dtype=torch.float64).expand(shape).clone()
    return torch.broadcast_to(per_head, shape).clone()


@functools.lru_cache(maxsize=64)
def _normal_cached(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _normal(shape: tuple, seed: int) -> torch.Tensor:
    """N(0, 1) in float64 from a CPU generator seeded with ``seed``: the same tensor on every machine."""
    return _normal_cached(tuple(shape), seed).clone()


def check_qkv(spec: Spec, q, k, v, layout: str, limits: validate.Limits = validate.TORCH, closure=None):
    """Validate q, k, v (attngen.runtime.validate.qkv) and return them as [B, H, T, D] views (no copies); the
    lengths T and S within the spec's max_length (``closure``: see length_limit)."""
    qh, kh, vh = validate.qkv(q, k, v, layout, name=spec.name, causal=spec.causal, limits=limits)
    if spec.length_limit is not None:
        t, s = qh.shape[2], kh.shape[2]
        check_positions(spec, max(t, s), lengths=(t, s), closure=closure)
    return qh, kh, vh


def length_limit(spec: Spec, n_q: int, n_k: int, closure=None) -> int | None:
    """The spec's max_length at lengths n_q, n_k (an int, or its expression in n_q, n_k evaluated and floored;
    None: no limit). ``closure``: the expression's (limit_closure), which a torch.compile trace evaluates on the
    symbolic lengths instead of the sympy substitution."""
    limit = spec.length_limit
    if limit is None or isinstance(limit, int):
        return limit
    if torch.compiler.is_compiling():
        if closure is None:
            raise InputError(f"{spec.name}: its max_length {limit} depends on the lengths; under torch.compile it "
                             "is evaluated from the op's closure (call the op made by attngen.compile)")
        value = Evaluator({N_Q: n_q, N_K: n_k}, where=f"{spec.where}: max_length").run(closure)
        return value if isinstance(value, (int, torch.SymInt)) else math.floor(value)
    return _limit_at(limit, n_q, n_k)


def limit_closure(spec: Spec):
    """The closure of a length-dependent max_length (attngen.runtime.evaluate.compiled), else None: an op keeps it
    for its calls under torch.compile (length_limit)."""
    limit = spec.length_limit
    return None if limit is None or isinstance(limit, int) else compiled(limit, f"{spec.where}: max_length")


@functools.lru_cache(maxsize=1024)
def _limit_at(limit, n_q: int, n_k: int) -> int:
    """A length-dependent max_length at n_q, n_k (memoised: every call of an op with such a spec asks)."""
    return math.floor(float(limit.subs({N_Q: n_q, N_K: n_k})))


def check_positions(spec: Spec, end, what: str | None = None, lengths: tuple | None = None, closure=None) -> None:
    """InputError when positions 0 .. end - 1 (``end`` an int or per-sequence tensor) pass spec's max_length,
    a length-dependent one evaluated at ``lengths`` (n_q, n_k; default: the longest end for both)."""
    if spec.length_limit is None:
        return
    if lengths is None:
        last = int(end.max()) if isinstance(end, torch.Tensor) else end
        lengths = (last, last)
    validate.positions(end, max_length=length_limit(spec, *lengths, closure=closure), spec=spec.name,
                       what=what or spec.name)


def check_params(spec: Spec, params: dict, heads: int, like: torch.Tensor, head_dim: int | None = None,
                 defaults=None) -> dict:
    """Fill defaults for missing parameters (their init at the call's head dim: ``head_dim``, default
    ``like.shape[-1]``, q's last dim for the [B, H, T, D] ``like`` every caller passes) and validate the given
    ones. ``defaults(missing)``: the missing parameters' default tensors (default_parameters' result, kept by the
    caller: an op evaluates them once per size, outside any torch.compile trace)."""
    unknown = set(params) - set(spec.param_names)
    if unknown:
        raise InputError(f"unknown keyword(s) {sorted(unknown)} for {spec.name}; its parameters are "
                         f"{list(spec.param_names) or 'none'}")
    if head_dim is None:
        head_dim = int(like.shape[-1]) if like.dim() else None
    if head_dim is None or head_dim < 1:
        raise InputError(f"{spec.name}: head dim {head_dim}: expected q and k with a last dim >= 1")
    missing = tuple(p.name for p in spec.parameters if p.name not in params)
    if defaults is not None:
        out = dict(defaults(missing)) if missing else {}
    else:
        out = default_parameters(spec, heads, like.dtype, like.device, head_dim=head_dim, names=missing)
    for p in spec.parameters:
        if p.name in params:
            out[p.name] = validate.parameter(p.name, params[p.name], per_head=p.per_head, heads=heads, like=like,
                                             spec=spec.name, shape=p.tensor_shape(heads, head_dim))
    return out


def check_gates(spec: Spec, gates: dict, layout: str, qh: torch.Tensor) -> dict:
    """The spec's gate tensors (every one is required: a gate is an input like q) as [B, H, T] / [B, H, T, Dk]
    views of q's batch, heads and length; InputError names a missing, misshapen or positive gate."""
    out = {}
    for g in spec.gates:
        if g.name not in gates:
            shape = "[B, H, T" if layout == "bhtd" else "[B, T, H"
            shape += ", Dk]" if g.per == "key_dim" else "]"
            raise InputError(f"{spec.name}: missing the gate {g.name}= (a tensor {shape} of log gates <= 0, e.g. "
                             "torch.nn.functional.logsigmoid of a projection of x)")
        out[g.name] = validate.gate(g.name, gates[g.name], per_dim=g.per == "key_dim", shape=tuple(qh.shape),
                                    layout=layout, like=qh, spec=spec.name)
    return out


def check_cu_seqlens(cu_seqlens, batch: int, length: int, device) -> list:
    """Validate packed sequence boundaries (B = 1, sequences packed along T) and return them as ints:
    sequence n holds tokens [cu[n], cu[n + 1])."""
    return validate.cu_seqlens(cu_seqlens, batch=batch, length=length, device=device).tolist()
