"""The naive reference: evaluates a spec directly, materialising the full attention matrix.

It knows nothing of the planner: it walks the spec's own similarity and reweighting expressions over
broadcast tensors [B, H, T, S, D], masks, normalises and multiplies by V. Run it in float64 to get the
"golden" answer; it supports autograd, so gradients are checked against it too.
"""
from __future__ import annotations

import functools
import math
import operator

import sympy
import torch

from attngen.errors import InputError, PlanError
from attngen.frontend.expr import HEAD, HEADS, KE, N_K, N_Q, QE, D, I, J
from attngen.frontend.spec import Spec, load_spec, shared_exp_terms
from attngen.runtime import terms as terms_lib
from attngen.runtime.evaluate import Evaluator, parameter_value
from attngen.runtime.inputs import check_gates, check_params, check_qkv


def reference(spec, layout: str = "bhtd"):
    """The naive reference of ``spec`` (a Spec or anything load_spec takes), with op's call signature."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)

    if spec.terms:  # each term's own reference on its slices, combined (attngen.runtime.terms)
        refs = [reference(t.spec, layout) for t in spec.terms]
        direct = bool(shared_exp_terms(spec))

        def run_terms(q, k, v, *, initial_state=None, return_state=False, **params):
            if initial_state is not None or return_state:
                raise InputError("the naive reference has no recurrent state; call it on the whole sequence")
            qh, _, _ = check_qkv(spec, q, k, v, layout)
            gates = {n: params.pop(n) for n in spec.gate_names if n in params}
            values = check_params(spec, params, qh.shape[1], qh, head_dim=qh.shape[3])
            if direct:  # exp terms under the shared row sum: every A_t materialised, no log-sum-exp
                return _shared_rowsum(spec, q, k, v, values, gates, layout)
            return terms_lib.combine(spec, q, k, v, values, layout,
                                     lambda n, qn, kn, vn, ps, _: refs[n](qn, kn, vn, **ps, **gates))

        run_terms.spec = spec
        return run_terms

    def run(q, k, v, *, initial_state=None, return_state=False, **params):
        if initial_state is not None or return_state:
            raise InputError("the naive reference has no recurrent state; call it on the whole sequence")
        qh, kh, vh, values, gates = _prepared(spec, q, k, v, params, layout)
        out = attention_matrix_apply(spec, qh, kh, vh, values, gates=gates)
        return out.transpose(1, 2) if layout == "bthd" else out

    run.spec = spec
    return run


def _prepared(spec: Spec, q, k, v, params: dict, layout: str) -> tuple:
    """q, k, v as [B, H, T, D] (k, v repeated per query head for grouped KV heads, q and k rotated for rotary
    positions), the parameters' values and the gates, checked: what the reference of one spec evaluates."""
    params = dict(params)
    qh, kh, vh = check_qkv(spec, q, k, v, layout)
    gates = check_gates(spec, {n: params.pop(n) for n in spec.gate_names if n in params}, layout, qh)
    values = check_params(spec, params, qh.shape[1], qh, head_dim=qh.shape[3])
    groups = qh.shape[1] // kh.shape[1]  # grouped KV heads: query head h reads kv head h // groups
    if groups > 1:
        kh, vh = (x.repeat_interleave(groups, dim=1) for x in (kh, vh))
    if spec.rotary is not None:
        qh, kh = (_rotated(x, spec.rotary.theta) for x in (qh, kh))
    return qh, kh, vh, values, gates


def _shared_rowsum(spec: Spec, q, k, v, values: dict, gates: dict, layout: str):
    """O = sum_t c_t A_t V / (sum_t c_t A_t 1 + eps) (eps clamped instead with eps_mode clamp) of a spec with terms
    under a shared row sum that has exp(score) terms, evaluated directly: every A_t [B, H, T, S] is materialised on
    the term's slices of q and k. An exp term's A_t = W exp(score - m_t) comes out of attention_matrix shifted by its
    own row max m_t (rows with no allowed key: m_t = 0, A_t = 0); all A_t are brought to one shift per row,
    M = max(m_t over the exp terms, 0 when a term has no exp, log(eps) when eps > 0), which cancels between the
    numerator and the denominator: exp terms are multiplied by exp(m_t - M), the others and eps by exp(-M), so no
    exp overflows. Rows that no term attends (a window, cross attention) give 0, as for one spec."""
    head_axis = 1 if layout == "bhtd" else 2
    heads, head_dim = q.shape[head_axis], q.shape[-1]
    cs = terms_lib.coefficients(spec, values, heads, head_dim, q)
    cuts = terms_lib.slices(spec, head_dim)
    exp_terms = set(shared_exp_terms(spec))
    parts, rows, vh = [], [], None
    for n, (term, cut) in enumerate(zip(spec.terms, cuts)):
        qn, kn = (q, k) if cut is None else (q[..., cut[0]:cut[1]], k[..., cut[0]:cut[1]])
        ps = {p: values[p] for p in term.spec.param_names if p in values}
        qh, kh, vh, tvalues, tgates = _prepared(term.spec, qn, kn, v, ps | gates, layout)
        if n in exp_terms:
            a, shift = attention_matrix(term.spec, qh, kh, tvalues, gates=tgates, shifted=True)
        else:
            a, shift = attention_matrix(term.spec, qh, kh, tvalues, gates=tgates), None
        parts.append((cs[n], a, shift))  # a coefficient per head is [1, H, 1, 1], as A [B, H, T, S]
        allowed = allowed_pairs(term.spec, qh.shape[2], kh.shape[2], q.device)
        rows.append(None if allowed is None else allowed.any(-1)[:, None])  # [T, 1]: the rows the term attends
    attended = None if any(r is None for r in rows) else functools.reduce(operator.or_, rows)
    norm = spec.normalize
    shifts = [s for _, _, s in parts if s is not None]
    top = torch.stack(shifts).amax(0) if shifts else None  # [B, H, T, 1]
    floor = [0.0] * (len(shifts) < len(parts)) + ([math.log(norm.eps)] if norm.eps > 0 else [])
    if floor:
        top = torch.full_like(vh[..., :1], max(floor)) if top is None else top.clamp_min(max(floor))
    total = 0
    for c, a, s in parts:
        total = total + c * a * torch.exp((s if s is not None else 0) - top)
    den = total.sum(-1, keepdim=True)
    eps = norm.eps * torch.exp(-top)
    den = torch.maximum(den, eps) if norm.eps_mode == "clamp" else den + eps
    if attended is not None:
        den = torch.where(attended, den, torch.ones_like(den))
    out = (total @ vh) / den
    return out.transpose(1, 2) if layout == "bthd" else out


def _rotated(x, theta: float):
    """RoPE by its definition: the pair (x_m, x_(m + d/2)) of the row at position p, as the complex number
    x_m + i x_(m + d/2), multiplied by exp(i p theta**(-2m/d)) (positions 0 .. T - 1)."""
    t, d = x.shape[2], x.shape[3]
    half = d // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * freq[None, :]  # [T, d/2]
    turn = torch.polar(torch.ones_like(angle), angle).to(device=x.device)
    z = torch.complex(x[..., :half].to(torch.float64), x[..., half:2 * half].to(torch.float64)) * turn
    return torch.cat([z.real, z.imag, x[..., 2 * half:].to(torch.float64)], -1).to(x.dtype)


def attention_matrix(spec: Spec, q, k, params: dict, *, modify=None, keep=None, gates=None, shifted=False):
    """A(i, j) = mask * W(i, j) * s(q_i, k_j) as a [B, H, T, S] tensor (softmax scores stabilised by the
    row max, which cancels in the normalisation). ``shifted`` (softmax-family specs): (A, m) with m [B, H, T, 1]
    the row max A was divided by (its exp: A is exp(-m) times the true W exp(score); 0 on rows with no allowed
    key), for a caller that normalises several such A together (a shared row sum of terms).

    For the references of approximations (attngen.verify): ``modify`` maps the score [B, H, T, S] of a
    softmax-family spec (s = exp(score), or normalize: softmax) to the score the approximation uses;
    ``keep`` [B, H, T, S] bool restricts the attended pairs further (block-sparse attention). ``gates``: the
    spec's gate tensors by name ([B, H, T] or [B, H, T, D]), applied as the spec's gates key defines."""
    b, h, t, d = q.shape
    s_len = k.shape[2]
    consts = spec.constant_values()
    qv, kv = q[:, :, :, None, :], k[:, :, None, :, :]  # [B,H,T,1,D], [B,H,1,S,D]
    gate = _gate_differences(spec, gates or {}, q)  # G_i - G_j: [B, H, T, S] per head, [B, H, T, S, D] per dim

    def dot(ev, a, bb):
        ea, eb = ev(a), ev(bb)
        if gate is not None and gate.dim() == 5 and _only(a, QE) and _only(bb, KE):  # GLA: per dimension
            return (ea * eb * torch.exp(gate)).sum(-1, keepdim=True)
        if gate is not None and gate.dim() == 5 and _only(a, KE) and _only(bb, QE):
            return dot(ev, bb, a)
        if _only(a, QE) and _only(bb, KE):  # an outer product: a matmul, not a [T,S,D] tensor
            return (ea[:, :, :, 0, :] @ eb[:, :, 0, :, :].transpose(-1, -2)).unsqueeze(-1) \
                if ea.dim() == 5 and eb.dim() == 5 else (ea * eb).sum(-1, keepdim=True)
        if _only(a, KE) and _only(bb, QE):
            return dot(ev, bb, a)
        return (ea * eb).sum(-1, keepdim=True)

    def norm(ev, a):
        return torch.linalg.vector_norm(ev(a), dim=-1, keepdim=True)

    env = {QE: qv, KE: kv, N_Q: t, N_K: s_len, D: d, HEADS: h,
           HEAD: torch.arange(h, dtype=q.dtype, device=q.device).view(1, h, 1, 1, 1),
           I: torch.arange(t, dtype=q.dtype, device=q.device).view(1, 1, t, 1, 1),
           J: torch.arange(s_len, dtype=q.dtype, device=q.device).view(1, 1, 1, s_len, 1)}
    for p in spec.parameters:
        env[p.symbol] = parameter_value(p, params[p.name].to(q.dtype), 5)
    ev = Evaluator(env, dot, norm, where=spec.where)
    sim_expr = spec.similarity_expr.xreplace(consts)
    weight_expr = spec.reweight_expr.xreplace(consts)
    # a row-sum of exp(score) without eps is the softmax of the score; and W = exp(w) is exp(score + w) (ALiBi's
    # exp(-slope |i - j|) alone overflows float32 once -slope |i - j| > 88): both are stabilised by the row max
    softmax = spec.normalize.kind == "softmax" or (modify is None and spec.normalize.kind == "rowsum"
                                                   and spec.normalize.eps == 0 and isinstance(sim_expr, sympy.exp))
    if modify is not None:
        sim = _modified(spec, sim_expr, ev, modify, (b, h, t, s_len), q)
    else:
        sim = ev(sim_expr.args[0] if softmax and spec.normalize.kind == "rowsum" else sim_expr)
    if softmax and modify is None and isinstance(weight_expr, sympy.exp):
        sim = torch.as_tensor(sim, dtype=q.dtype, device=q.device) + ev(weight_expr.args[0])
        weight_expr = sympy.Integer(1)
    weight = ev(weight_expr)
    if gate is not None and gate.dim() == 4:  # per head: the score gains G_i - G_j, or W gains exp(G_i - G_j)
        if softmax:
            sim = torch.as_tensor(sim, dtype=q.dtype, device=q.device) + gate[..., None]
        else:
            weight = torch.as_tensor(weight, dtype=q.dtype, device=q.device) * torch.exp(gate)[..., None]
    allowed = allowed_pairs(spec, t, s_len, q.device)  # the causal and window masks (None: every pair)
    if softmax:  # A = W * exp(s); the row max cancels
        sim = torch.as_tensor(sim, dtype=q.dtype, device=q.device).expand(b, h, t, s_len, 1)
        if allowed is not None:
            sim = sim.masked_fill(~allowed[..., None], float("-inf"))
        top = sim.amax(dim=3, keepdim=True).detach()
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row with no allowed key: 0, not NaN
        sim = torch.exp(sim - top)
    elif shifted:
        raise PlanError(f"{spec.where}: a row shift needs a softmax-family spec (similarity exp(score) with a row sum "
                        f"and no eps); {spec.name} has the similarity {spec.similarity}")
    a = (torch.as_tensor(weight, dtype=q.dtype, device=q.device) * sim)
    a = a.expand(b, h, t, s_len, 1)[..., 0]
    if allowed is not None:
        a = torch.where(allowed, a, torch.zeros((), dtype=a.dtype, device=a.device))
    if keep is not None:
        a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
    return (a, top.expand(b, h, t, 1, 1)[..., 0]) if shifted else a


def _gate_differences(spec: Spec, gates: dict, q):
    """G_i - G_j of the spec's gate (G the inclusive cumulative sum of g along T) on the causal pairs j <= i,
    0 elsewhere (masked later): [B, H, T, S] per head, [B, H, T, S, D] per key dimension; None without a gate."""
    if spec.gate is None:
        return None
    g = gates[spec.gate.name].to(q.dtype)
    big = g.cumsum(2)
    allowed = _causal(q.shape[2], q.shape[2], q.device)
    if spec.gate.per == "head":
        diff = big[:, :, :, None] - big[:, :, None, :]
        return torch.where(allowed, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    diff = big[:, :, :, None, :] - big[:, :, None, :, :]
    return torch.where(allowed[..., None], diff, torch.zeros((), dtype=diff.dtype, device=diff.device))


def _modified(spec: Spec, sim_expr, ev, modify, shape, like):
    """The similarity with its softmax score passed through ``modify`` (see attention_matrix)."""
    if spec.normalize.kind == "softmax":
        score = sim_expr
    elif isinstance(sim_expr, sympy.exp):
        score = sim_expr.args[0]
    else:
        raise PlanError(f"{spec.where}: a modified score needs a softmax-family spec (similarity exp(score) or "
                        f"normalize: softmax); {spec.name} has the similarity {spec.similarity}")
    value = torch.as_tensor(ev(score), dtype=like.dtype, device=like.device).expand(*shape, 1)[..., 0]
    value = modify(value)[..., None]
    return value if spec.normalize.kind == "softmax" else torch.exp(value)


def attention_matrix_apply(spec: Spec, q, k, v, params: dict, *, modify=None, keep=None, gates=None):
    """O = normalise(A) V for [B, H, T, D] inputs (``modify``, ``keep``, ``gates``: see attention_matrix; with
    ``keep`` a row that attends to nothing gives 0)."""
    a = attention_matrix(spec, q, k, params, modify=modify, keep=keep, gates=gates)
    out = a @ v
    norm = spec.normalize
    if norm.kind in ("rowsum", "softmax"):
        den = a.sum(-1, keepdim=True)
        den = den.clamp_min(norm.eps) if norm.eps_mode == "clamp" else den + norm.eps
        if keep is not None:  # nothing kept: 0, not 0 / 0
            empty = den == 0
            den = torch.where(empty, torch.ones_like(den), den)
        allowed = allowed_pairs(spec, q.shape[2], k.shape[2], q.device)
        if allowed is not None:  # a row the masks leave no key (a window, cross attention): 0, not 0 / 0
            den = torch.where(allowed.any(-1)[..., None], den, torch.ones_like(den))
        out = out / den
    return out


def _causal(t, s, device):
    return torch.ones(t, s, dtype=torch.bool, device=device).tril()


def allowed_pairs(spec: Spec, t: int, s: int, device):
    """The pairs (i, j) the spec attends, [T, S] bool: j <= i when causal, and |i - j| < window when the spec
    has one (positions 0 .. T - 1 and 0 .. S - 1, as the causal mask); None when every pair is attended."""
    allowed = _causal(t, s, device) if spec.causal else None
    if spec.window is not None:
        diff = torch.arange(t, device=device)[:, None] - torch.arange(s, device=device)[None, :]
        near = diff.abs() < spec.window
        allowed = near if allowed is None else allowed & near
    return allowed


def _only(expr, sym) -> bool:
    other = KE if sym is QE else QE
    fs = expr.free_symbols  # a sympy expression or a reduction's Arg
    return sym in fs and other not in fs
