"""The torch backend: executes a Plan with plain PyTorch ops; autograd differentiates all of it.

    run(plan, ordering, q, k, v, params, chunk) -> o
    run_state(plan, ordering, q, k, v, params, chunk, s0, start) -> (o, s)   causal, from a recurrent state
    step(plan, q, k, v, params, s0, start) -> (o, s)                         one decode step (T = 1)

One function per ordering lives in linear (linear, recurrent), quadratic and fft;
this module validates the ordering against the plan, builds the shared inputs (feature maps, ones
column, decay rate) and divides by the row sum at the end.
"""
from __future__ import annotations

import torch

from attngen.errors import PlanError
from attngen.ir import Ordering, ReweightClass, SimilarityClass
from attngen.runtime.evaluate import Evaluator
from attngen.runtime.torch import fft as torch_fft
from attngen.runtime.torch import linear as torch_linear
from attngen.runtime.torch import quadratic as torch_quadratic
from attngen.runtime.torch import sdpa as torch_sdpa
from attngen.runtime.torch.common import (
    compute_dtype,
    divide,
    feature_maps,
    finish,
    grouped,
    log_decay,
    lowered,
    symbol_env,
    token_decay,
    with_ones,
)
from attngen.runtime.torch.gated import decay_factor, gated_recurrent, gated_scan

CHUNK = 32  # the causal scan's chunk when the op names none: measured fastest on a CPU (benchmarks cpu)


def run(plan, ordering, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict,
        chunk: int | None = None, gate: torch.Tensor | None = None, lse: bool = False):
    """Attention output [B, H, T, Dv] in q's dtype for q [B, H, T, Dk], k [B, H_kv, S, Dk], v [B, H_kv, S, Dv]
    (H_kv divides H; rotary positions already applied by the caller).

    ``params`` holds every spec parameter (per head [H] or scalar []); ``chunk`` is the causal linear
    plan's chunk size (default CHUNK, sized for a CPU); ``gate`` the spec's gate [B, H, T] or [B, H, T, Dk] (log
    space). Computes in fp32 (fp64 for fp64 inputs). ``lse`` (a softmax plan, the quadratic ordering: the caller
    checks): (o, lse) with lse [B, H, T] the log row sum, both in the compute dtype, from the tiles (not SDPA)."""
    ordering = Ordering(ordering)
    _check_ordering(plan, ordering)
    spec = plan.spec
    in_dtype = q.dtype
    if ordering is Ordering.QUADRATIC and gate is None and not lse and torch_sdpa.fits(plan, q, k, params):
        return torch_sdpa.attention(plan, q, k, v, params).to(in_dtype)
    k, v = grouped(k, v, q.shape[1])
    q, k, v, env = prepare(plan, q, k, v, params)
    h = q.shape[1]
    if ordering is Ordering.QUADRATIC:
        big = None if gate is None else gate.to(q.dtype).cumsum(2)
        if lse:  # o in the compute dtype: the caller rounds (a combination of several terms rounds once)
            return torch_quadratic.quadratic(plan, q, k, v, env, spec.causal, big, lse=True)
        if torch.compiler.is_compiling():  # one opaque node: no loop over tiles traced (a graph for every length)
            return torch_quadratic.compiled_tiles(plan, q, k, v, params, spec.causal, big).to(in_dtype)
        return torch_quadratic.quadratic(plan, q, k, v, env, spec.causal, big).to(in_dtype)
    low = lowered(plan)
    if ordering is Ordering.FFT:
        qf, kf = feature_maps(low.fft, env, q, k, spec.where)
        acc = torch_fft.toeplitz(qf, kf, v, low.kernel, env, spec.causal, spec.where)
    else:
        causal = spec.causal and ordering is not Ordering.RECURRENT
        blocks, scale = _query_scale(low, env) if causal and gate is None else (low.linear, 1.0)
        qf, kf = feature_maps(blocks, env, q, k, spec.where)
        # the scans need gamma in (0, 1]; the quadratic ordering evaluates W directly and needs no check
        lg = log_decay(plan, env, h, q) if plan.reweight.decay is not None else None
        tokens = token_decay(plan, gate, lg, q)
        if tokens is not None:  # gated: causal (the spec refuses a bidirectional gate)
            acc, _ = _gated(ordering, qf, kf, v, tokens, chunk)
        elif ordering is Ordering.RECURRENT:
            acc, _ = torch_linear.recurrent(qf, kf, v, lg)
        elif spec.causal:
            acc = torch_linear.causal_chunked(qf, kf, v, chunk or CHUNK, lg, scale=scale)
        elif lg is None:
            acc = torch_linear.bidirectional(qf, kf, v)
        else:
            acc = torch_linear.two_sided(qf, kf, v, chunk or CHUNK, lg)
    return finish(acc, plan.normalize).to(in_dtype)


def prepare(plan, q, k, v, params: dict) -> tuple:
    """q, k, [v | 1] (the ones column for a row-sum spec) in the compute dtype, and the symbol values of the
    call: what every ordering, the approximations' included (attngen.approx), starts from."""
    dtype = compute_dtype(q.dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    b, h, t, d = q.shape
    env = symbol_env(plan, t, k.shape[2], h, d, params, dtype, q.device)
    return q, k, with_ones(v, plan.normalize), env


def run_state(plan, ordering, q, k, v, params: dict, chunk: int | None, s0: torch.Tensor | None,
              start: torch.Tensor, valid: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> tuple:
    """(o [B, H, T, Dv], s [B, H, F, E]) of a causal separable plan continuing from a recurrent state.

    ``s0`` [B, H, F, E] is the state after the tokens before this call (E = Dv + 1 for a row-sum spec: the
    normaliser z is its last column), or None for a fresh start; ``start`` [B] int64 the number of those
    tokens per sequence (the positions continue from it). ``ordering`` is linear (chunked) or recurrent;
    gradients reach ``s0``. The caller checks that the plan is decodable (state.check_decodable). ``valid``
    [B, T] bool (right-padded packed sequences, no decay): the rows where it is False add nothing to the state."""
    ordering = Ordering(ordering)
    if ordering not in (Ordering.LINEAR, Ordering.RECURRENT) or not plan.spec.causal:
        raise PlanError(f"{plan.spec.where}: a recurrent state needs the causal linear or recurrent ordering, "
                        f"not {ordering.value} ({plan.spec.mode})")
    _check_ordering(plan, ordering)
    in_dtype = q.dtype
    scaled = ordering is Ordering.LINEAR and gate is None
    k, v = grouped(k, v, q.shape[1])
    qf, kf, v, lg, scale = _linear_inputs(plan, q, k, v, params, start, scaled)
    if valid is not None:
        keep = valid[:, None, :, None].to(kf.dtype)
        kf, v = kf * keep, v * keep
    s0 = None if s0 is None else s0.to(qf.dtype)
    tokens = token_decay(plan, gate, lg, qf)
    if tokens is not None:  # padded rows (valid) carry a zero gate: they do not decay the state
        acc, s = _gated(ordering, qf, kf, v, tokens, chunk, s0)
    elif ordering is Ordering.RECURRENT:
        acc, s = torch_linear.recurrent(qf, kf, v, lg, initial=s0)
    else:
        acc, s = torch_linear.causal_chunked(qf, kf, v, chunk or CHUNK, lg, initial=s0, return_final=True,
                                             scale=scale)
    return finish(acc, plan.normalize).to(in_dtype), s


def step(plan, q, k, v, params: dict, s: torch.Tensor, z: torch.Tensor | None, start: torch.Tensor,
         constant: bool = False, gate: torch.Tensor | None = None) -> tuple:
    """One decode step: q, k [B, H, 1, Dk], v [B, H, 1, Dv] at positions ``start`` [B] (each sequence its
    own), the state S [B, H, F, Dv] and z [B, H, F] (row-sum specs; else None) -> (o [B, H, 1, Dv], S, z after
    this token). S' = gamma S + K'^T v and z' = gamma z + K' in one fused op each, o = Q' S' / den(Q' . z').
    ``constant``: ``params`` are the same at every call (the defaults): the symbol values and gamma are kept
    in plan.memo instead of evaluated per token."""
    in_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    if in_dtype != dtype:
        q, k, v = (x.to(dtype) for x in (q, k, v))
    h, d = q.shape[1], q.shape[3]
    key = ("step", h, d, dtype, q.device)
    if constant and key in plan.memo:
        env, blocks, gamma = plan.memo[key]
    else:
        env = symbol_env(plan, 1, 1, h, d, params, dtype, q.device)
        blocks = lowered(plan).linear
        gamma = None if plan.reweight.decay is None else torch.exp(log_decay(plan, env, h, q))  # [1, H, 1, 1]
        if constant:
            plan.memo[key] = env, blocks, gamma
    k, v = grouped(k, v, h)
    qf, kf = feature_maps(blocks, env, q, k, plan.spec.where, start=start)  # [B, H, 1, F]
    kt = kf.transpose(-1, -2)  # [B, H, F, 1]
    if gate is not None:  # this token's decay: exp(g_t) (times gamma), [B, H, 1, 1] or [B, H, F, 1] per row
        lg = None if gamma is None else torch.log(gamma)
        gamma = decay_factor(token_decay(plan, gate, lg, qf)[:, :, 0])
    if gamma is not None:
        s = torch.addcmul(kt * v, s, gamma)
        z = None if z is None else torch.addcmul(kf.squeeze(2), z, gamma.squeeze(-1))
    else:
        s = torch.addcmul(s, kt, v)
        z = None if z is None else z + kf.squeeze(2)
    num = qf @ s  # [B, H, 1, Dv]
    if z is None:
        return finish(num, plan.normalize).to(in_dtype), s, None
    return divide(num, qf @ z.unsqueeze(-1), plan.normalize).to(in_dtype), s, z


def _gated(ordering, qf, kf, v, tokens, chunk, initial=None) -> tuple:
    """(out, final state) of a gated plan: the per-token recurrence, or the chunked scan (chunk or CHUNK)."""
    if ordering is Ordering.RECURRENT:
        return gated_recurrent(qf, kf, v, tokens, initial=initial)
    return gated_scan(qf, kf, v, tokens, chunk or CHUNK, initial=initial)


def _linear_inputs(plan, q, k, v, params, start, scaled: bool = False):
    """Q', K' (positions from ``start``), [V | 1], log(gamma) in the compute dtype and the number the scan
    multiplies Q' by (``scaled``: taken out of Q' when it is a number times q; else 1)."""
    dtype = compute_dtype(q.dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    b, h, t, d = q.shape
    env = symbol_env(plan, t, k.shape[2], h, d, params, dtype, q.device)
    low = lowered(plan)
    blocks, scale = _query_scale(low, env) if scaled else (low.linear, 1.0)
    qf, kf = feature_maps(blocks, env, q, k, plan.spec.where, start=start)
    lg = log_decay(plan, env, h, q) if plan.reweight.decay is not None else None
    return qf, kf, with_ones(v, plan.normalize), lg, scale


def _query_scale(low, env: dict) -> tuple:
    """(the linear blocks' Sides, 1.0), or, when the one block's query features are a number c times q itself
    (dot(q, k)/sqrt(d), retention), (the block without c, c): the scan applies c inside its products instead of a
    pass over q. ``low``: the plan's Lowered (the block without c and c's closures worked out there)."""
    if low.scaled is None:
        return low.linear, 1.0
    bare, position_coeff, feature_coeff = low.scaled
    ev = Evaluator(env, where="query scale")
    c = ev.run(position_coeff) * ev.run(feature_coeff)
    if isinstance(c, torch.Tensor):  # per head (a parameter): stays in Q'
        return low.linear, 1.0
    return bare, float(c)


def _check_ordering(plan, ordering: Ordering) -> None:
    """A PlanError when the plan cannot run ``ordering`` (the cost table says why)."""
    ok = {
        Ordering.QUADRATIC: True,
        Ordering.LINEAR: bool(plan.linear_terms),
        Ordering.RECURRENT: bool(plan.linear_terms) and plan.spec.causal,
        Ordering.FFT: plan.similarity.kind is SimilarityClass.SEPARABLE
        and plan.reweight.kind is ReweightClass.TOEPLITZ,
    }.get(ordering)
    if ok is None:  # conv_basis, topk_sparse
        raise PlanError(f"{plan.spec.where}: the {ordering.value} approximation runs in attngen.approx."
                        f"{ordering.value} (through the op), not in the exact torch backend")
    if not ok:
        reason = next((c.reason for c in plan.candidates if c.ordering == ordering), "not in the cost table")
        raise PlanError(f"{plan.spec.where}: the {ordering.value} ordering cannot run {plan.spec.name} "
                        f"({plan.spec.mode}): {reason}")
