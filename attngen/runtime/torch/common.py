"""Pieces shared by the torch backend's orderings: the symbol environment, the feature maps Q' and K'
(docs/derivations.md section 1), the decay rate (section 4), the ones column and the final division
(section 2).

Shapes: q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv]; E = Dv + 1 with the ones column, else Dv.
Per-head values (the head index h, per-head parameters) are [1, H, 1, 1].
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import sympy
import torch

from attngen.errors import InputError
from attngen.frontend.expr import KE, QE, Elem, I, J
from attngen.ir import PositionTerm, ReweightClass, SimilarityClass
from attngen.runtime.evaluate import Evaluator, compiled, scalar_env

FFT_POSITION = PositionTerm(sympy.Integer(1), sympy.Integer(1), sympy.Integer(1))  # the FFT ordering's blocks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32: states and row sums never accumulate in half precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def symbol_env(plan, n_q: int, n_k: int, heads: int, d: int, params: dict, dtype, device) -> dict:
    """Values of the row-constant symbols (lengths, d, h, H, parameters) as numbers or [1, H, 1, 1]."""
    params = {name: t.to(dtype=dtype, device=device) for name, t in params.items()}
    return scalar_env(plan.spec, n_q, n_k, d, heads, params, dtype, device)


def with_rank5(env: dict) -> dict:
    """The same environment with [1, H, 1, 1] tensors as [1, H, 1, 1, 1] (for [B, H, T, S, D] tiles)."""
    return {s: x.unsqueeze(-2 if isinstance(s, Elem) else -1) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
            for s, x in env.items()}


def as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    """An evaluated value (number or tensor) as a tensor of ``like``'s dtype and device."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def row_evaluator(env: dict, elem, x: torch.Tensor, pos_symbol, pos: torch.Tensor, where: str) -> Evaluator:
    """Evaluate element formulas of one side: ``elem`` (QE or KE) is the rows x [B, H, T, D]; the
    reductions norm and dot run over the head dim and keep it as width 1."""
    def dot(ev, a, b):
        return (as_tensor(ev(a), x) * as_tensor(ev(b), x)).sum(-1, keepdim=True)

    def norm(ev, a):
        return torch.linalg.vector_norm(as_tensor(ev(a), x), dim=-1, keepdim=True)

    return Evaluator({**env, elem: x, pos_symbol: pos}, dot, norm, where=where)


def tensor_product(factors: list, prefix: tuple, like: torch.Tensor) -> torch.Tensor:
    """Flattened outer product of m factors [*prefix, D] -> [*prefix, D**m]; m = 0 gives a ones column."""
    if not factors:
        return like.new_ones(*prefix, 1)
    out = factors[0]
    for f in factors[1:]:
        out = (out.unsqueeze(-1) * f.unsqueeze(-2)).flatten(-2)
    return out


def feature_maps(blocks, env: dict, q: torch.Tensor, k: torch.Tensor, where: str,
                 start: torch.Tensor | None = None):
    """Q' [B, H, T, F] and K' [B, H, S, F] for ``blocks``, a sequence of (FeatureTerm, PositionTerm):
    block r is coeff * f_r(i) * c * qscale(q) * (a_1 (x) ... )(q) on the query side and
    g_r(j) * kscale(k) * (b_1 (x) ...)(k) on the key side (the IR's LinearTerm).

    ``start`` [B] (int64) shifts the positions of each sequence: i = start + arange(T), likewise j (a
    continuation from a recurrent state); the position factors are then [B, 1, T, 1]."""
    sides, shared, positional = blocks if type(blocks) is Sides else _sides(tuple(blocks))
    i = j = None
    if positional:
        t, s = q.shape[2], k.shape[2]
        if start is not None and t == s == 1:  # a decode step: the positions are the start
            i = j = start.to(device=q.device, dtype=q.dtype).view(-1, 1, 1, 1)
        else:
            i = torch.arange(t, dtype=q.dtype, device=q.device).view(1, 1, t, 1)
            j = torch.arange(s, dtype=k.dtype, device=k.device).view(1, 1, s, 1)
            if start is not None:
                offset = start.to(device=q.device, dtype=q.dtype).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
                i, j = i + offset, j + offset
    qev = row_evaluator(env, QE, q, I, i, where)
    kev = row_evaluator(env, KE, k, J, j, where)
    if positional and i is j:  # one position (decode): the key side's position factors are the query side's
        kev.env[I.name], kev.memo, sides = i, qev.memo, shared
    q_blocks = [_side(qev, scales, factors, q) for (scales, factors), _ in sides]
    k_blocks = [_side(kev, scales, factors, k) for _, (scales, factors) in sides]
    if len(sides) == 1:
        return q_blocks[0], k_blocks[0]
    return torch.cat(q_blocks, -1), torch.cat(k_blocks, -1)


class Sides(tuple):
    """_sides' result (closures per block, the same at i = j, whether any formula uses the positions): passed to
    feature_maps in place of the blocks, it skips the per-call lookup."""


def sides_of(blocks) -> Sides:
    """The closures of ``blocks`` (see _sides), worked out now (once per plan: Lowered)."""
    return Sides(_sides(tuple(blocks)))


@functools.lru_cache(maxsize=256)
def _sides(blocks: tuple):
    """Per block ((q scales, q factors), (k scales, k factors)) as closures, with the scales that are 1 left out;
    the same with j written as i on the key side (a decode step, where i = j: cos(c i) and cos(c j) are then one
    closure and computed once); whether any formula uses the positions i, j. Worked out once per plan."""
    sides, shared, exprs = [], [], []
    for feature, position in blocks:
        q_scales = tuple(x for x in (position.coeff, position.f_i, feature.coeff, feature.q_scale) if x != 1)
        k_scales = tuple(x for x in (position.g_j, feature.k_scale) if x != 1)
        parts = (q_scales, tuple(feature.q_factors)), (k_scales, tuple(feature.k_factors))
        exprs += [e for side in parts for group in side for e in group]
        sides.append(tuple((tuple(map(compiled, scales)), tuple(map(compiled, factors))) for scales, factors in parts))
        at_i = [tuple(compiled(sympy.sympify(e).xreplace({J: I})) for e in group) for group in parts[1]]
        shared.append((sides[-1][0], tuple(at_i)))
    return tuple(sides), tuple(shared), any(sympy.sympify(e).has(I, J) for e in exprs)


def _side(ev: Evaluator, scales, factors, x: torch.Tensor) -> torch.Tensor:
    # factors evaluated separately and multiplied in torch: no sympy re-simplification of the product
    prefix = tuple(x.shape[:-1])
    feats = [_full(t, prefix + (t.shape[-1] if t.dim() and t.shape[-1] > 1 else x.shape[-1],))
             for t in (as_tensor(ev.run(f), x) for f in factors)]  # width d, or F of a matmul(W, .)
    out = tensor_product(feats, prefix, x)
    for scale in scales:
        out = out * ev.run(scale)  # a number or a tensor: torch takes both
    return _full(out, prefix + out.shape[-1:])


def _full(x: torch.Tensor, shape) -> torch.Tensor:
    return x if x.shape == shape else torch.broadcast_to(x, shape)


def log_decay(plan, env: dict, heads: int, like: torch.Tensor) -> torch.Tensor:
    """log(gamma) of the plan's decay as [1, H, 1, 1]; InputError unless 0 < gamma <= 1 for every head (under
    torch.compile: a RuntimeError with the same message from an assertion in the graph, torch._assert_async).

    The log is taken symbolically first (Lowered), so gamma = exp(-slope) gives -slope exactly (no underflow)."""
    low = lowered(plan)
    ev = Evaluator(env, where=f"{plan.spec.where}: decay rate")
    if low.log_gamma is not None:
        lg = torch.broadcast_to(as_tensor(ev.run(low.log_gamma), like), (1, heads, 1, 1))
        ok = torch.isfinite(lg) & (lg <= 0)
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph: the check runs in it
            torch._assert_async(ok.all(), f"{plan.spec.name}: {low.decay_message}")
            return lg
        if bool(ok.all()):
            return lg
    elif torch.compiler.is_compiling():  # a log with I: gamma is negative whatever the values
        raise InputError(f"{plan.spec.name}: {low.decay_message}")
    values = torch.broadcast_to(as_tensor(ev.run(low.gamma), like), (1, heads, 1, 1)).detach().flatten().tolist()
    raise InputError(f"{plan.spec.name}: {low.decay_message}; found {[round(g, 6) for g in values]}")


@functools.lru_cache(maxsize=256)
def _log_of(gamma):
    """log(gamma) expanded symbolically (gamma = exp(-slope) gives -slope), once per decay expression."""
    return sympy.expand_log(sympy.log(gamma), force=True)


PLANS: dict = {}  # Lowered.key -> plan: how the torch backend's custom ops (which take no Python object) find it


@contextlib.contextmanager
def autograd_in_kernel():
    """Autograd inside a custom op's kernel. torch.library runs a custom op's kernel below the autograd dispatch keys
    (excluded in the thread's dispatch state), so its tensor ops record no graph even under torch.enable_grad(); a
    kernel that differentiates with torch.autograd (attngen::torch_tiles_bwd recomputes each tile) includes them again
    for its duration. The rest of the dispatch state (functionalisation, fake tensors, modes) is left as it is."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude):
        yield


def lowered(plan) -> "Lowered":
    """The plan's Lowered (kept in plan.memo): built on the first call, eagerly; attngen.compile builds it with the
    plan, so that a torch.compile trace of the op only reads it."""
    low = plan.memo.get("torch")
    if low is None:
        low = plan.memo["torch"] = Lowered(plan)
    return low


class Lowered:
    """What the torch backend evaluates for a plan, translated once from its sympy expressions into closures
    (attngen.runtime.evaluate): a call, and a torch.compile trace of it, runs closures and walks no sympy tree.

    linear: the feature maps' Sides of the linear terms; scaled: (Sides without the query number c, c's closures)
    when the one block's query features are c times q (backend._query_scale), else None; fft: the Sides of the
    similarity terms (FFT ordering); gamma, log_gamma: the decay rate and its logarithm; similarity (the score of an
    exp similarity), log_weight (an exp reweighting folded into the score; None when 0), weight: the quadratic
    ordering's closures; sdpa_scale, sdpa_bias, sdpa_learned (the parameters the bias reads): the SDPA delegation's;
    kernel: the Toeplitz kernel h(t); key: the plan's name in PLANS (for the custom ops)."""

    def __init__(self, plan):
        where = plan.spec.where
        self.key = f"{plan.spec.name}:{id(plan):x}"  # names the plan to the custom ops (PLANS keeps it alive)
        PLANS[self.key] = plan
        c = functools.partial(_closure, where=where)
        blocks = [(t.feature, t.position) for t in plan.linear_terms]
        self.linear = sides_of(blocks) if blocks else None
        self.scaled = None
        if len(blocks) == 1:
            feature, position = blocks[0]
            if tuple(feature.q_factors) == (QE,) and feature.q_scale == 1 and position.f_i == 1:
                one = sympy.Integer(1)
                bare = [(dataclasses.replace(feature, coeff=one), dataclasses.replace(position, coeff=one))]
                self.scaled = sides_of(bare), c(position.coeff), c(feature.coeff)
        self.fft = None
        if plan.reweight.kernel is not None and plan.similarity.terms:
            self.fft = sides_of([(term, FFT_POSITION) for term in plan.similarity.terms])
        self.kernel = c(plan.reweight.kernel)
        decay = plan.reweight.decay
        self.gamma = self.log_gamma = None
        self.decay_text = self.decay_message = ""
        if decay is not None:
            log_expr = _log_of(decay.gamma)
            self.gamma = c(decay.gamma)
            self.log_gamma = None if log_expr.has(sympy.I) else c(log_expr)
            self.decay_text = f"gamma = {sympy.sstr(decay.gamma)}"
            self.decay_message = (f"the decay rate {self.decay_text} must lie in (0, 1] for every head. gamma > 1 "
                                  "grows without bound and gamma <= 0 has no stable scan: keep a learnable gamma in "
                                  "range (e.g. gamma = sigmoid(x))")
        exp_class = plan.similarity.kind is SimilarityClass.EXP
        self.similarity = c(plan.similarity.score if exp_class else plan.similarity.expr)
        log_weight = plan.reweight.log_weight
        fold = exp_class and log_weight is not None
        self.fold = fold
        self.log_weight = c(log_weight) if fold and log_weight != 0 else None
        self.weighted = plan.reweight.kind is not ReweightClass.NONE and not fold
        self.weight = c(plan.reweight.expr) if self.weighted else None
        sdpa = plan.sdpa
        self.sdpa_scale = c(sdpa.scale) if sdpa is not None else None
        self.sdpa_bias = c(sdpa.bias) if sdpa is not None and sdpa.bias is not None else None
        self.sdpa_learned = tuple(p.name for p in plan.spec.parameters
                                  if sdpa is not None and sdpa.bias is not None and p.symbol in sdpa.bias.free_symbols)


def _closure(expr, where: str):
    return None if expr is None else compiled(expr, where)


def with_ones(v: torch.Tensor, normalize) -> torch.Tensor:
    """[V | 1] for a row-sum normalisation (the row sum rides along as one more value column)."""
    if normalize.kind != "rowsum":
        return v
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)


def finish(acc: torch.Tensor, normalize, log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """O from the unnormalised result acc [..., E]; ``log_scale`` [..., 1] (a running max) means the true
    result is acc * exp(log_scale), so eps is rescaled by exp(-log_scale) to stay exact."""
    if normalize.kind != "rowsum":
        return acc if log_scale is None else acc * torch.exp(log_scale)
    return divide(acc[..., :-1], acc[..., -1:], normalize, log_scale)


def divide(num: torch.Tensor, den: torch.Tensor, normalize, log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """num / den'(den) of a row-sum normalisation (eps added or clamped; see finish for ``log_scale``)."""
    eps = normalize.eps
    if log_scale is not None and eps != 0:
        eps = eps * torch.exp(-log_scale)
    if normalize.eps_mode == "clamp":
        den = torch.maximum(den, eps) if isinstance(eps, torch.Tensor) else den.clamp_min(eps)
    elif isinstance(eps, torch.Tensor) or eps != 0:
        den = den + eps
    return num / den


def rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE with the rotate-half pairing (dimension m with m + d/2, angle p * theta**(-2m/d)) of the rows of x
    [B, H, T, D] at positions ``pos`` [T] or [B, T] (each sequence its own). The angles are formed in float64 (a
    position of 10**6 times a frequency keeps its digits), cos and sin applied in x's dtype."""
    d = x.shape[-1]
    if d % 2:
        raise InputError(f"rotary positions pair dimension m with m + d/2: the head dim of q and k must be even, "
                         f"found {d}")
    half = d // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64, device=x.device) / d)
    angle = pos.to(device=x.device, dtype=torch.float64)[..., None] * freq  # [(B,) T, d/2]
    if angle.dim() == 3:
        angle = angle[:, None]  # [B, 1, T, d/2]
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def grouped(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple:
    """k, v of H_kv heads as H = heads (query head h reads kv head h // (H / H_kv)): a repeat along the head dim
    that autograd sums back over each group. The orderings of this backend run per query head; SDPA reads the
    groups in place (enable_gqa) and the generated kernels index them."""
    groups = heads // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def token_decay(plan, gate: torch.Tensor | None, lg: torch.Tensor | None, like: torch.Tensor):
    """The log decay of each token for the gated scans (attngen.runtime.torch.gated): the gate (+ log(gamma) of a
    constant decay), [B, H, T] per head or [B, H, T, F] per feature column (a per-key-dimension gate repeated over
    the feature blocks, each of width d); None without a gate."""
    if gate is None:
        return None
    g = gate.to(like.dtype)
    if plan.spec.gate.per == "key_dim":
        blocks = len(plan.linear_terms)
        g = g.repeat(1, 1, 1, blocks) if blocks > 1 else g
        return g if lg is None else g + lg
    return g if lg is None else g + lg[..., 0]
