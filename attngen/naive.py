"""The naive reference: evaluates a spec directly, materialising the full attention matrix.

It knows nothing of the planner: it walks the spec's own similarity and reweighting expressions over
broadcast tensors [B, H, T, S, D], masks, normalises and multiplies by V. Run it in float64 to get the
"golden" answer; it supports autograd, so gradients are checked against it too.
"""
from __future__ import annotations

import sympy
import torch

from attngen.errors import InputError, PlanError
from attngen.frontend.expr import HEAD, HEADS, KE, N_K, N_Q, QE, D, I, J
from attngen.frontend.spec import Spec, load_spec
from attngen.runtime.evaluate import Evaluator
from attngen.runtime.inputs import check_params, check_qkv


def reference(spec, layout: str = "bhtd"):
    """The naive reference of ``spec`` (a Spec or anything load_spec takes), with op's call signature."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)

    def run(q, k, v, *, initial_state=None, return_state=False, **params):
        if initial_state is not None or return_state:
            raise InputError("the naive reference has no recurrent state; call it on the whole sequence")
        qh, kh, vh = check_qkv(spec, q, k, v, layout)
        values = check_params(spec, params, qh.shape[1], qh, head_dim=qh.shape[3])
        out = attention_matrix_apply(spec, qh, kh, vh, values)
        return out.transpose(1, 2) if layout == "bthd" else out

    run.spec = spec
    return run


def attention_matrix(spec: Spec, q, k, params: dict, *, modify=None, keep=None):
    """A(i, j) = mask * W(i, j) * s(q_i, k_j) as a [B, H, T, S] tensor (softmax scores stabilised by the
    row max, which cancels in the normalisation).

    For the references of approximations (attngen.verify): ``modify`` maps the score [B, H, T, S] of a
    softmax-family spec (s = exp(score), or normalize: softmax) to the score the approximation uses;
    ``keep`` [B, H, T, S] bool restricts the attended pairs further (block-sparse attention)."""
    b, h, t, d = q.shape
    s_len = k.shape[2]
    consts = spec.constant_values()
    qv, kv = q[:, :, :, None, :], k[:, :, None, :, :]  # [B,H,T,1,D], [B,H,1,S,D]

    def dot(ev, a, bb):
        ea, eb = ev(a), ev(bb)
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
        env[p.symbol] = params[p.name].to(q.dtype).view(1, h, 1, 1, 1) if p.shape else params[p.name].to(q.dtype)
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
    if softmax:  # A = W * exp(s); the row max cancels
        sim = torch.as_tensor(sim, dtype=q.dtype, device=q.device).expand(b, h, t, s_len, 1)
        if spec.causal:
            sim = sim.masked_fill(~_causal(t, s_len, q.device)[..., None], float("-inf"))
        sim = torch.exp(sim - sim.amax(dim=3, keepdim=True).detach())
    a = (torch.as_tensor(weight, dtype=q.dtype, device=q.device) * sim)
    a = a.expand(b, h, t, s_len, 1)[..., 0]
    if spec.causal:
        a = torch.where(_causal(t, s_len, q.device), a, torch.zeros((), dtype=a.dtype, device=a.device))
    if keep is not None:
        a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
    return a


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


def attention_matrix_apply(spec: Spec, q, k, v, params: dict, *, modify=None, keep=None):
    """O = normalise(A) V for [B, H, T, D] inputs (``modify``, ``keep``: see attention_matrix; with ``keep``
    a row that attends to nothing gives 0)."""
    a = attention_matrix(spec, q, k, params, modify=modify, keep=keep)
    out = a @ v
    norm = spec.normalize
    if norm.kind in ("rowsum", "softmax"):
        den = a.sum(-1, keepdim=True)
        den = den.clamp_min(norm.eps) if norm.eps_mode == "clamp" else den + norm.eps
        if keep is not None:  # nothing kept: 0, not 0 / 0
            empty = den == 0
            den = torch.where(empty, torch.ones_like(den), den)
        out = out / den
    return out


def _causal(t, s, device):
    return torch.ones(t, s, dtype=torch.bool, device=device).tril()


def _only(expr, sym) -> bool:
    other = KE if sym is QE else QE
    fs = expr.free_symbols
    return sym in fs and other not in fs
