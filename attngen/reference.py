"""The naive reference: evaluates a spec directly, materialising the full attention matrix.

It knows nothing of the planner: it walks the spec's own similarity and reweighting expressions over
broadcast tensors [B, H, T, S, D], masks, normalises and multiplies by V. Run it in float64 to get the
"golden" answer; it supports autograd, so gradients are checked against it too.
"""
from __future__ import annotations

import torch

from .errors import InputError
from .evaluate import Evaluator
from .expr import D, HEAD, HEADS, KE, N_K, N_Q, QE, I, J
from .spec import Spec, load_spec


def default_parameters(spec: Spec, heads: int, dtype=torch.float32, device=None) -> dict:
    """The spec's parameters at their ``init`` values: per-head ones of shape [H], scalars of shape []."""
    out = {}
    for p in spec.parameters:
        h = torch.arange(heads, dtype=torch.float64)
        value = Evaluator({HEAD: h, HEADS: heads, D: 0}, where=f"{spec.where}: parameters.{p.name}.init")(
            p.init_expr)
        t = torch.as_tensor(value, dtype=torch.float64)
        t = t.expand(heads).clone() if p.shape else t.reshape(())
        out[p.name] = t.to(dtype=dtype, device=device)
    return out


def check_qkv(spec: Spec, q, k, v, layout: str):
    """Validate q, k, v and return them as [B, H, T, D] views (no copies)."""
    if layout not in ("bhtd", "bthd"):
        raise InputError(f"layout {layout!r}: expected 'bhtd' ([B,H,T,D]) or 'bthd' ([B,T,H,D])")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name}: expected 4 dimensions ({layout}), found shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise InputError(f"{name}: expected a floating dtype, found {t.dtype}")
    if layout == "bthd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    (b, h, t, dk), (bk, hk, s, dk2), (bv, hv, sv, _) = q.shape, k.shape, v.shape
    if (b, h) != (bk, hk) or (b, h) != (bv, hv):
        raise InputError(f"batch/heads differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(layout {layout})")
    if dk != dk2:
        raise InputError(f"q and k head dims differ: {dk} vs {dk2}")
    if s != sv:
        raise InputError(f"k and v lengths differ: {s} vs {sv}")
    if t < 1 or s < 1:
        raise InputError(f"empty sequence: query length {t}, key length {s}")
    if spec.causal and t != s:
        raise InputError(f"{spec.name} is causal, so the query length must equal the key length "
                         f"(found {t} and {s}); load it with causal=False for cross attention")
    return q, k, v


def check_params(spec: Spec, params: dict, heads: int, like: torch.Tensor) -> dict:
    """Fill defaults for missing parameters and validate the given ones."""
    unknown = set(params) - set(spec.param_names)
    if unknown:
        raise InputError(f"unknown keyword(s) {sorted(unknown)} for {spec.name}; its parameters are "
                         f"{list(spec.param_names) or 'none'}")
    out = default_parameters(spec, heads, like.dtype, like.device)
    for p in spec.parameters:
        if p.name not in params:
            continue
        t = params[p.name]
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        want = (heads,) if p.shape else ()
        if tuple(t.shape) != want:
            raise InputError(f"parameter {p.name}: expected shape {list(want)}, found {list(t.shape)}")
        out[p.name] = t
    return out


def reference(spec, layout: str = "bhtd"):
    """The naive reference of ``spec`` (a Spec or anything load_spec takes), with op's call signature."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)

    def run(q, k, v, *, initial_state=None, return_state=False, **params):
        if initial_state is not None or return_state:
            raise InputError("the naive reference has no recurrent state; call it on the whole sequence")
        qh, kh, vh = check_qkv(spec, q, k, v, layout)
        out = attention_matrix_apply(spec, qh, kh, vh, check_params(spec, params, qh.shape[1], qh))
        return out.transpose(1, 2) if layout == "bthd" else out

    run.spec = spec
    return run


def attention_matrix(spec: Spec, q, k, params: dict):
    """A(i, j) = mask * W(i, j) * s(q_i, k_j) as a [B, H, T, S] tensor (softmax scores stabilised by the
    row max, which cancels in the normalisation)."""
    b, h, t, d = q.shape
    s_len = k.shape[2]
    consts = spec.constant_values()
    qv, kv = q[:, :, :, None, :], k[:, :, None, :, :]  # [B,H,T,1,D], [B,H,1,S,D]

    def dot(a, bb):
        ea, eb = ev(a), ev(bb)
        if _only(a, QE) and _only(bb, KE):  # an outer product: a matmul, not a [T,S,D] tensor
            return (ea[:, :, :, 0, :] @ eb[:, :, 0, :, :].transpose(-1, -2)).unsqueeze(-1) \
                if ea.dim() == 5 and eb.dim() == 5 else (ea * eb).sum(-1, keepdim=True)
        if _only(a, KE) and _only(bb, QE):
            return dot(bb, a)
        return (ea * eb).sum(-1, keepdim=True)

    def norm(a):
        return torch.linalg.vector_norm(ev(a), dim=-1, keepdim=True)

    env = {QE: qv, KE: kv, N_Q: t, N_K: s_len, D: d, HEADS: h,
           HEAD: torch.arange(h, dtype=q.dtype, device=q.device).view(1, h, 1, 1, 1),
           I: torch.arange(t, dtype=q.dtype, device=q.device).view(1, 1, t, 1, 1),
           J: torch.arange(s_len, dtype=q.dtype, device=q.device).view(1, 1, 1, s_len, 1)}
    for p in spec.parameters:
        env[p.symbol] = params[p.name].to(q.dtype).view(1, h, 1, 1, 1) if p.shape else params[p.name].to(q.dtype)
    ev = Evaluator(env, dot, norm, where=spec.where)
    sim = ev(spec.similarity_expr.xreplace(consts))
    weight = ev(spec.reweight_expr.xreplace(consts))
    if spec.normalize.kind == "softmax":  # A = W * exp(s); the row max cancels
        sim = torch.as_tensor(sim, dtype=q.dtype, device=q.device).expand(b, h, t, s_len, 1)
        if spec.causal:
            sim = sim.masked_fill(~_causal(t, s_len, q.device)[..., None], float("-inf"))
        sim = torch.exp(sim - sim.amax(dim=3, keepdim=True).detach())
    a = (torch.as_tensor(weight, dtype=q.dtype, device=q.device) * sim)
    a = a.expand(b, h, t, s_len, 1)[..., 0]
    if spec.causal:
        a = torch.where(_causal(t, s_len, q.device), a, torch.zeros((), dtype=a.dtype, device=a.device))
    return a


def attention_matrix_apply(spec: Spec, q, k, v, params: dict):
    """O = normalise(A) V for [B, H, T, D] inputs."""
    a = attention_matrix(spec, q, k, params)
    out = a @ v
    norm = spec.normalize
    if norm.kind in ("rowsum", "softmax"):
        den = a.sum(-1, keepdim=True)
        den = den.clamp_min(norm.eps) if norm.eps_mode == "clamp" else den + norm.eps
        out = out / den
    return out


def _causal(t, s, device):
    return torch.ones(t, s, dtype=torch.bool, device=device).tril()


def _only(expr, sym) -> bool:
    other = KE if sym is QE else QE
    fs = expr.free_symbols
    return sym in fs and other not in fs
