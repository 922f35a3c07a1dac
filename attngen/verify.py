"""Verification against the naive reference: output and every gradient, by relative RMS error.

Three ways, as in FlexAttention's tests: the float64 reference ("golden"), the reference in the op's dtype
("ref", for context: how much of the error is just the dtype), and the op. A case passes when the op's error
against golden is within the dtype's tolerance.

An approximation is verified against the naive reference of what it claims to compute, given the discrete
decisions the op made on the same inputs (which are not differentiated): topk_sparse is exact softmax over the
kept blocks (the reference masked to op.last_selection); conv_basis is softmax of the scores rebuilt from the
recovered starts (b_1 = H[:, 0], b_r = H[s_r:, s_r] - H[s_r - 1:, s_r - 1], H~ = sum_r conv(b_r, m_r)), with the
gradient of softmax at H~ taken through H = c q k^T. The error against the exact reference is reported beside
(CaseResult.exact_error), not a pass criterion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attngen import pipeline
from attngen.errors import InputError
from attngen.frontend.spec import Spec
from attngen.ir import Ordering
from attngen.naive import attention_matrix_apply, reference
from attngen.op import compile as compile_op
from attngen.op import resolve_backend
from attngen.runtime.inputs import check_params, check_qkv, default_parameters

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# generated kernels accumulate in fp32 with tl.dot and tile-order sums: the Triton issue's bounds
TRITON_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# A case also passes within FUDGE x the error of the same computation in the op's dtype (the naive reference
# for the torch backend, the torch backend's run of the same ordering for generated kernels): where the dtype
# cannot meet the tolerance (e.g. the linear ordering of a tensor-power feature map at T = 1, whose row sum
# cancels in float32), the op is held to that accuracy instead.
FUDGE = 2.0
# ... and within an absolute noise floor of 8 units of roundoff (inputs are of unit scale): a gradient that is
# exactly zero in exact arithmetic (dq, dk of a row-sum-normalised op at T = 1) comes out as ~1e-7 in float32.
NOISE_ULPS = 8
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS(out - ref) / max(RMS(ref), 1e-2), in float64; NaN if out has NaNs (never a pass)."""
    out, ref = out.detach().cpu().to(torch.float64), ref.detach().cpu().to(torch.float64)
    num = (out - ref).pow(2).mean().sqrt()
    den = ref.pow(2).mean().sqrt().clamp_min(1e-2)
    return float(num / den)


@dataclass
class CaseResult:
    spec: str
    mode: str
    backend: str
    ordering: str
    dtype: str
    shape: str
    errors: dict = field(default_factory=dict)  # name -> error of op vs float64 reference
    abs_errors: dict = field(default_factory=dict)  # name -> RMS(op - float64 reference)
    ref_errors: dict = field(default_factory=dict)  # name -> error of same-dtype reference vs float64
    tolerance: float = 0.0
    noise: float = 0.0  # absolute noise floor (NOISE_ULPS units of roundoff of the dtype)
    exact_error: float | None = None  # an approximation: its output's error against the exact reference

    @property
    def worst(self) -> float:
        return max(self.errors.values())

    @property
    def passed(self) -> bool:
        return all(self.quantity_passed(n) for n in self.errors)

    def quantity_passed(self, name: str) -> bool:
        """Within the tolerance, or within FUDGE x the same-dtype yardstick's error, or under the noise floor.
        A non-finite error never passes, and neither does any quantity whose yardstick is non-finite (an
        overflowing yardstick would otherwise excuse anything, an op returning zeros included)."""
        e, ref, absolute = self.errors[name], self.ref_errors[name], self.abs_errors[name]
        if not (math.isfinite(e) and math.isfinite(ref) and math.isfinite(absolute)):
            return False
        return e <= max(self.tolerance, FUDGE * ref) or absolute <= self.noise


def _inputs(spec: Spec, b, h, t, s, dk, dv, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dk, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, s, dk, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, s, dv, generator=g, dtype=torch.float64)
    do = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    params = default_parameters(spec, h, torch.float64, head_dim=dk)
    params = {n: p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    for gate in spec.gates:  # log gates <= 0 around log(0.9): a decay that is felt over a few dozen tokens
        shape = (b, h, t) + ((dk,) if gate.per == "key_dim" else ())
        params[gate.name] = torch.nn.functional.logsigmoid(2.2 + torch.randn(shape, generator=g, dtype=torch.float64))
    return q, k, v, do, params


def _run(fn, q, k, v, do, params, dtype, device, fixed=()):
    """Output and gradients of q, k, v and of every parameter and gate but the ``fixed`` ones (the per-call scale: a
    number per call, like SDPA's, whose gradient is not part of the contract)."""
    leaves = {n: x.detach().to(dtype=dtype, device=device, copy=True).requires_grad_() for n, x in
              (("q", q), ("k", k), ("v", v))}
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32  # parameters stay fp32 for fp16 inputs
    pleaves = {n: x.detach().to(dtype=pdtype, device=device, copy=True).requires_grad_(n not in fixed)
               for n, x in params.items()}
    out = fn(leaves["q"], leaves["k"], leaves["v"], **pleaves)
    out.backward(do.to(dtype=dtype, device=device))
    grads = {"o": out} | {f"d{n}": x.grad for n, x in leaves.items()}
    return grads | {f"d{n}": x.grad for n, x in pleaves.items() if n not in fixed}


def verify_case(op, spec: Spec, dtype=torch.float32, b=1, h=2, t=63, s=None, dk=16, dv=None,
                seed=0, device="cpu") -> CaseResult:
    """Compare ``op`` (a compiled op) with the reference on one shape; returns the errors."""
    s = t if s is None else s
    dv = dk if dv is None else dv
    q, k, v, do, params = _inputs(spec, b, h, t, s, dk, dv, seed)
    ref = reference(spec)
    ordering = op.ordering_for(dk, s, device).value if hasattr(op, "ordering_for") else "?"
    backend = resolve_backend(op.backend, torch.device(device)) if hasattr(op, "backend") else "?"
    fixed = tuple(p.name for p in spec.parameters if not p.learnable)
    got = _run(op, q, k, v, do, params, dtype, device, fixed)
    exact = None
    if ordering in APPROXIMATE:  # the reference of what the approximation claims, given the op's decisions
        exact = _run(ref, q, k, v, do, params, torch.float64, "cpu", fixed)["o"]
        ref = approximation_reference(op, spec)
    golden = _run(ref, q, k, v, do, params, torch.float64, "cpu", fixed)
    same = golden
    if dtype != torch.float64:
        # the yardstick of the three-way rule: the same evaluation order in the same dtype, in plain torch
        # (generated kernels); the naive reference in that dtype (the torch backend)
        yard = ref if backend in ("torch", "?") else compile_op(spec, backend="torch",
                                                               plan=None if spec.terms else ordering)
        same = _run(yard, q, k, v, do, params, dtype, "cpu", fixed)
    res = CaseResult(spec.name, spec.mode, backend, ordering, str(dtype).replace("torch.", ""),
                     f"B{b}-H{h}-T{t}" + (f"-S{s}" if s != t else "") + f"-D{dk}" + (f"-Dv{dv}" if dv != dk else ""),
                     tolerance=(TRITON_TOLERANCE if backend == "triton" else TOLERANCE)[dtype],
                     noise=NOISE_ULPS * torch.finfo(dtype).eps)
    if exact is not None:
        res.exact_error = rel_rms(got["o"].cpu(), exact)
    for name, value in golden.items():
        res.errors[name] = rel_rms(got[name].cpu(), value)
        res.abs_errors[name] = float((got[name].detach().cpu().double() - value.detach()).pow(2).mean().sqrt())
        res.ref_errors[name] = rel_rms(same[name], value)
    return res


APPROXIMATE = ("conv_basis", "topk_sparse")


def approximation_reference(op, spec: Spec):
    """The naive float64 reference of an approximation, with the decisions of ``op``'s last call (see the
    module docstring); call the op on the inputs first."""
    kind = spec.approximation.kind
    decision = op.last_selection if kind == "topk_sparse" else op.last_basis
    if decision is None:
        raise ValueError(f"{spec.name}: the op recorded no {kind} decision; call it before building the reference")

    def run(q, k, v, **params):
        qh, kh, vh = check_qkv(spec, q, k, v, op.layout)
        values = check_params(spec, params, qh.shape[1], qh, head_dim=qh.shape[3])
        if kind == "topk_sparse":
            keep = decision.dense_mask().to(qh.device)
            out = attention_matrix_apply(spec, qh, kh, vh, values, keep=keep)
        else:
            starts = decision.starts.to(qh.device)
            out = attention_matrix_apply(spec, qh, kh, vh, values,
                                         modify=lambda score: score + (rebuilt_scores(score.detach(), starts)
                                                                       - score).detach())
        return out.transpose(1, 2) if op.layout == "bthd" else out

    return run


def rebuilt_scores(scores: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """H~ = sum_r conv(b_r, m_r) [B, H, T, T] from the causal scores H [B, H, T, T] and the starts [B, H, K]
    (ascending; T where absent), as in docs/variants.md, "Conv-Basis": b_1 = H[:, 0],
    b_r[t] = H[s_r + t, s_r] - H[s_r - 1 + t, s_r - 1];
    H~[i, j] = sum over r with s_r <= j of b_r[i - j] (i >= j; 0 above the diagonal)."""
    t = scores.shape[-1]
    i = torch.arange(t, device=scores.device).view(t, 1)
    j = torch.arange(t, device=scores.device).view(1, t)
    lag = (i - j).clamp_min(0)  # [T, T]
    out = torch.zeros_like(scores)
    for r in range(starts.shape[-1]):
        s_r = starts[..., r].view(*starts.shape[:2], 1, 1)  # [B, H, 1, 1]
        present = s_r < t
        col = s_r.clamp_max(t - 1)
        rows = (col + lag).clamp_max(t - 1)  # H[s_r + lag, s_r]
        b_r = scores.gather(-1, col.expand(*scores.shape[:2], t, 1)).expand_as(scores).gather(
            -2, rows.expand_as(scores))
        if r > 0:
            prev = (col - 1).clamp_min(0)
            rows_p = (prev + lag).clamp_max(t - 1)
            b_r = b_r - scores.gather(-1, prev.expand(*scores.shape[:2], t, 1)).expand_as(scores).gather(
                -2, rows_p.expand_as(scores))
        use = present & (j >= s_r) & (i >= j) & (s_r + lag < t)
        out = out + torch.where(use, b_r, torch.zeros((), dtype=scores.dtype, device=scores.device))
    return out


# ---------------------------------------------------------------------------------------------
# the cases of `attngen verify` and of the main job `attngen build` (the tests run the same list)
# ---------------------------------------------------------------------------------------------
LENGTHS = (7, 63, 200)
MAX_LENGTH = 4096  # the naive reference materialises [B, H, T, S] in float64: 128 MiB per head pair at 4096
DEFAULT_DTYPES = {"torch": ("float64", "float32"), "triton": ("float32", "float16"), "auto": ("float32", "float16")}
STEP_TOKENS = 4  # decoded with op.step after a prefill, in a step case


@dataclass(frozen=True)
class Case:
    """One verification: ``spec`` on ``backend`` in ``dtype`` at length ``t`` (head dim ``head_dim``), the
    planner's ordering or a forced ``plan``; ``step``: a prefill, then op.step token by token (decode)."""
    spec: Spec
    backend: str
    dtype: str
    t: int
    plan: str | None = None
    step: bool = False
    head_dim: int = 16

    @property
    def id(self) -> str:
        return (f"{self.spec.name}-{self.spec.mode}-{self.backend}-{self.plan or 'auto'}-{self.dtype}-T{self.t}"
                + ("-step" if self.step else ""))


def verify_cases(specs, backend: str = "torch", force=None, dtypes=(), lengths=LENGTHS, head_dim=16) -> list:
    """The cases of `attngen verify`: every spec, dtype and length on one backend, and the decode step of every
    decodable spec (not with a forced ordering other than linear / recurrent)."""
    out = []
    for spec in specs:
        out += _cases(spec, backend, force, dtypes, lengths, head_dim, step=_decodable(spec, backend, force))
    return out


def build_cases(modules, backend=None, force=None, dtypes=(), lengths=LENGTHS, head_dim=16) -> list:
    """The cases of `attngen build` for its rendered ``modules`` (attngen.build.Module): the torch backend (unless
    ``backend`` names another), and each generated module on the Triton backend, with each ordering forced too
    when it holds two (the dispatch reaches one side only at some lengths), and the decode step."""
    out = []
    for m in modules:
        if m.parts:  # a spec with terms: the combined op, on torch and (when every term has a module) on Triton
            out += _cases(m.spec, "torch", force, dtypes, lengths, head_dim, step=False) if backend in (None, "torch") \
                else []
            if backend != "torch" and not m.reason:
                out += _cases(m.spec, backend or "triton", force, dtypes, lengths, head_dim, step=False)
            continue
        if backend in (None, "torch"):
            out += _cases(m.spec, "torch", force, dtypes, lengths, head_dim, step=_decodable(m.spec, "torch", force))
        if m.source is None or backend == "torch":
            continue
        b = backend or "triton"
        step = Ordering.LINEAR in m.orderings and _decodable(m.spec, b, force)
        out += _cases(m.spec, b, force, dtypes, lengths, head_dim, step=step)
        if force is None and len(m.orderings) > 1:
            for o in m.orderings:
                out += _cases(m.spec, b, o.value, dtypes, lengths, head_dim, step=False)
    return out


def _cases(spec, backend, force, dtypes, lengths, head_dim, step: bool) -> list:
    for t in lengths:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_LENGTH:
            raise InputError(f"length {t!r}: expected 1..{MAX_LENGTH} (the naive reference materialises T x T "
                             f"in float64: {MAX_LENGTH}**2 x 8 bytes = 128 MiB per batch and head)")
    kinds = (False, True) if step else (False,)
    return [Case(spec, backend, d, t, force, s, head_dim) for s in kinds
            for d in (dtypes or DEFAULT_DTYPES[backend]) for t in lengths]


def _decodable(spec, backend, force) -> bool:
    if force not in (None, "linear", "recurrent") or spec.terms:  # a spec with terms has no single state
        return False
    target = "torch" if backend == "torch" else "triton"
    return pipeline.plan(spec, target=target, force=force).capabilities.decodable


def run_case(case: Case, device="cpu") -> CaseResult:
    """Compile the case's op and verify it (verify_case, or verify_step for a step case)."""
    op = compile_op(case.spec, backend=case.backend, plan=case.plan)
    check = verify_step if case.step else verify_case
    return check(op, case.spec, dtype=DTYPES[case.dtype], t=case.t, dk=case.head_dim, seed=case.t, device=device)


def verify_step(op, spec: Spec, dtype=torch.float32, b=1, h=2, t=63, dk=16, dv=None, seed=0,
                device="cpu") -> CaseResult:
    """Decode: the first tokens through op(..., return_state=True) (none at T <= STEP_TOKENS: op.init_state),
    the last STEP_TOKENS one by one through op.step; every output row against the float64 reference of the
    whole sequence (a step that read a wrong position, parameter or state fails here)."""
    dv = dk if dv is None else dv
    q, k, v, _, params = _inputs(spec, b, h, t, t, dk, dv, seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def decoder(op):
        return lambda q, k, v, **p: decode(op, q, k, v, **p)

    def decode(op, q, k, v, **p):
        n0 = max(0, q.shape[2] - STEP_TOKENS)
        outs = []
        with torch.no_grad():
            if n0:  # the gates are sliced with the tokens
                o, state = op(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], return_state=True,
                              **(p | {n: p[n][:, :, :n0] for n in spec.gate_names}))
                outs.append(o)
            else:
                state = op.init_state(q.shape[0], q.shape[1], q.shape[3], v.shape[3], dtype=state_dtype,
                                      device=q.device)
            for j in range(n0, q.shape[2]):
                o, state = op.step(q[:, :, j:j + 1], k[:, :, j:j + 1], v[:, :, j:j + 1], state,
                                   **(p | {n: p[n][:, :, j:j + 1] for n in spec.gate_names}))
                outs.append(o)
        return torch.cat(outs, 2)

    def forward(fn, dt, dev):
        pd = torch.float64 if dt == torch.float64 else torch.float32
        with torch.no_grad():
            return fn(*(x.to(dtype=dt, device=dev) for x in (q, k, v)),
                      **{n: x.to(dtype=pd, device=dev) for n, x in params.items()})

    ref = reference(spec)
    golden = forward(ref, torch.float64, "cpu")
    got = forward(decoder(op), dtype, device).cpu()
    backend = resolve_backend(op.backend, torch.device(device))
    # the yardstick: the naive reference in the op's dtype; for generated kernels the torch backend's decode in that
    # dtype (as verify_case), whose states accumulate in float32 like the kernels' (the naive reference in float16
    # materialises row sums that overflow it, e.g. Performer's exp features)
    yard = decoder(compile_op(spec, backend="torch")) if backend == "triton" else ref
    same = forward(yard, dtype, "cpu") if dtype != torch.float64 else golden
    res = CaseResult(spec.name, spec.mode, backend, "step", str(dtype).replace("torch.", ""), f"B{b}-H{h}-T{t}-D{dk}",
                     tolerance=(TRITON_TOLERANCE if backend == "triton" else TOLERANCE)[dtype],
                     noise=NOISE_ULPS * torch.finfo(dtype).eps)
    res.errors["o"] = rel_rms(got, golden)
    res.abs_errors["o"] = float((got.double() - golden).pow(2).mean().sqrt())
    res.ref_errors["o"] = rel_rms(same, golden)
    return res
