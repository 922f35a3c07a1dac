"""The public runtime: ``attngen.compile(spec, ...)`` returns an AttentionOp, callable like SDPA.

    op = attngen.compile("cosformer", backend="auto", plan=None, layout="bhtd")
    o = op(q, k, v)                      # q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv] -> o [B, H, T, Dv]

backend: "torch" runs the Plan in PyTorch ops on any device; "triton" runs the generated kernels (CUDA
tensors; CPU tensors only under TRITON_INTERPRET=1, for verification); "auto" picks triton for CUDA
tensors and torch otherwise, per call, from the inputs' device. The triton backend implements the
linear and quadratic orderings, so its plans choose among those (pipeline.plan(target="triton")) and say so in
plan.explain(); a module holding both dispatches on the key length at the plan's crossover.
plan: None lets the planner choose per call from the key length (a dispatch at the crossover length
it solved); "linear", "quadratic", "recurrent" or "fft" forces one ordering.
"""
from __future__ import annotations

import operator
import os

import torch

from attngen import pipeline
from attngen.approx.conv_basis import execute as conv_basis
from attngen.approx.topk_sparse import execute as topk_sparse
from attngen.approx.topk_sparse.attend import run_triton as run_triton_sparse
from attngen.errors import InputError, PlanError
from attngen.frontend.spec import Spec, load_spec, shared_exp_terms
from attngen.ir import DEFAULT_CHUNK, Ordering, is_softmax
from attngen.runtime import prologue
from attngen.runtime import state as state_lib
from attngen.runtime import terms as terms_lib
from attngen.runtime.inputs import (
    check_cu_seqlens,
    check_gates,
    check_params,
    check_positions,
    check_qkv,
    default_parameters,
    limit_closure,
)
from attngen.runtime.state import State, check_decodable
from attngen.runtime.torch import backend as torch_backend
from attngen.runtime.torch import packed
from attngen.runtime.torch.common import compute_dtype, grouped, rotate
from attngen.runtime.triton import loader as triton_loader

BACKENDS = ("auto", "torch", "triton")
# the approximations' torch execution (the exact orderings run in attngen.runtime.torch.backend)
APPROXIMATIONS = {Ordering.CONV_BASIS: conv_basis.run, Ordering.TOPK_SPARSE: topk_sparse.run}
LAYOUTS = ("bhtd", "bthd")
DEFAULT_HEAD_DIM = 64  # the head dim of op.plan before the first call

_TRITON_CPU = ("backend='triton' got {device} tensors: the generated kernels need CUDA tensors; on a CPU they "
               "run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton; for "
               "verification, it is slow), otherwise use backend='torch'")


def compile(spec, backend: str = "auto", plan=None, layout: str = "bhtd", chunk: int | None = None) -> "AttentionOp":
    """Compile ``spec`` (a Spec, a built-in name, a YAML path or string, or a dict) into an AttentionOp.

    Raises PlanError for an unknown backend, a spec the triton backend cannot generate, or an illegal forced ``plan``,
    and InputError for an unknown ``layout`` or a bad ``chunk``."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if backend not in BACKENDS:
        raise PlanError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r}: expected 'bhtd' ([B, H, T, D], SDPA's) or 'bthd' ([B, T, H, D], fla's)")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk={chunk!r}: expected a positive integer (the causal linear plan's chunk size) "
                         "or None (each backend's own: the plan's 64, the torch scan's CPU-sized chunks)")
    if spec.terms:
        return TermsOp(spec, backend, plan, layout, chunk)
    return AttentionOp(spec, backend, plan, layout, chunk)


class TermsOp:
    """A compiled spec of several terms: one AttentionOp per term (each planned on its own: one may run the linear
    ordering, another a windowed quadratic one), combined by attngen.runtime.terms. Called like AttentionOp; it has
    no recurrent state (each term would carry its own): initial_state, return_state and step are refused."""

    def __init__(self, spec: Spec, backend: str, plan, layout: str, chunk):
        self.spec, self.backend, self.layout, self.chunk = spec, backend, layout, chunk
        self.ops = [AttentionOp(t.spec, backend, plan, layout, chunk) for t in spec.terms]
        for n in shared_exp_terms(spec):  # they run as softmaxes returning their log row sums: refused now if not
            plan = self.ops[n].plan
            if not is_softmax(plan.similarity, plan.normalize):
                raise PlanError(f"{spec.where}: {spec.name} terms[{n}]: an exp term under the shared normaliser runs "
                                "as a softmax that returns its log row sum (the running max and sum of the quadratic "
                                "ordering), which needs exp(score) with a score separable into q and k features; "
                                f"the similarity {spec.terms[n].spec.similarity} is of class "
                                f"{plan.similarity.kind.value}. Fix: give each term its own normalize (no shared "
                                "one), or write the score as a sum of products of q and k features")
        self.head_dim = DEFAULT_HEAD_DIM  # the last call's (the terms' plans are at their slices' widths)
        self._limit = limit_closure(spec)
        self._slices = {}  # head dim -> the terms' slices (terms.slices: sympy, worked out outside any trace)
        self._groups = {}  # head dim -> the terms run as one call (terms.batches)
        self._coefficients = terms_lib.coefficient_closures(spec)
        self._defaults = {}  # (H, d, dtype, device, names) -> the default tensors of those parameters

    def __repr__(self) -> str:
        return f"TermsOp({self.spec.name!r} {self.spec.mode}, {len(self.ops)} terms, backend={self.backend!r})"

    @property
    def plan(self) -> "TermsPlan":
        return TermsPlan(self.spec, tuple(op.plan for op in self.ops), self.head_dim)

    def __call__(self, q, k, v, *, initial_state=None, return_state=False, cu_seqlens=None, **params):
        if initial_state is not None or return_state:
            raise InputError(f"{self.spec.name}: a spec with terms has no single recurrent state (each term would "
                             "carry its own); call the op on whole sequences")
        qh, _, _ = check_qkv(self.spec, q, k, v, self.layout, closure=self._limit)
        head_dim = _static(qh.shape[3])  # the slices and the terms' plans depend on it
        self.head_dim = head_dim
        _terms_ready(self, resolve_backend(self.backend, qh.device), head_dim)
        gates = {n: params.pop(n) for n in self.spec.gate_names if n in params}
        heads = _static(qh.shape[1])
        values = check_params(self.spec, params, heads, qh, head_dim=head_dim,
                              defaults=lambda missing: _default_values(self, heads, head_dim, qh, missing))
        extra = {"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {}
        return terms_lib.combine(self.spec, q, k, v, values, self.layout,
                                 lambda n, qn, kn, vn, ps, lse: (self.ops[n].softmax_lse if lse else self.ops[n])(
                                     qn, kn, vn, **ps, **gates, **extra),
                                 cuts=self._slices[head_dim], closures=self._coefficients,
                                 groups=self._groups[head_dim])

    def init_state(self, *args, **kwargs):
        raise InputError(f"{self.spec.name}: a spec with terms has no recurrent state to decode with")

    step = init_state


class TermsPlan:
    """The plans of a TermsOp's terms (the last call's), read out together."""

    def __init__(self, spec: Spec, plans: tuple, head_dim: int):
        self.spec, self.terms, self.head_dim = spec, plans, head_dim

    @property
    def choice(self):
        return self

    def describe(self) -> str:
        return "; ".join(f"term {n}: {p.choice.describe()}" for n, p in enumerate(self.terms))

    def explain(self, n: int = 4096, head_dim: int | None = None) -> str:
        parts = [f"{self.spec.name} ({self.spec.mode}): {len(self.terms)} terms, O = "
                 + " + ".join(f"({t.coefficient}) * O_{i}" for i, t in enumerate(self.spec.terms))
                 + (" over a shared row sum" if self.spec.normalize.kind != "none" else "")]
        exps = shared_exp_terms(self.spec)
        if exps:
            parts.append(f"term(s) {', '.join(map(str, exps))} (exp) run as softmaxes returning their log row sums "
                         "lse_t (the quadratic ordering: the torch backend's tiles, not SDPA; the flash kernels); the "
                         "others return [N_t | Z_t]; combined with one shift per row, M = max_t lse_t: "
                         "O = sum_t c_t N_t e^-M / (sum_t c_t Z_t e^-M + eps e^-M), N_t e^-M = o_t e^(lse_t - M) "
                         "(docs/specs.md, 'terms')")
        head_dim = head_dim or self.head_dim
        for group in terms_lib.batches(self.spec, terms_lib.slices(self.spec, head_dim)):
            if len(group) > 1:
                parts.append(f"terms {', '.join(map(str, group))} are one computation on slices of one width: the op "
                             f"runs them as one call, their slices stacked along the head axis ({len(group)}H heads)")
        for i, (t, p) in enumerate(zip(self.spec.terms, self.terms)):
            cut = f", q and k dims [{t.slice[0]}, {t.slice[1]})" if t.slice else ""
            parts += ["", f"--- term {i}{cut} ---", p.explain(n, head_dim)]
        return "\n".join(parts)


class AttentionOp:
    """A compiled attention variant. Call it as ``op(q, k, v, **params)``.

    Attributes: ``spec``, ``backend`` ("auto" or "torch"), ``layout``, ``chunk``, and ``plan``: the Plan
    at head dim 64 until the first call, then the plan of the last call's head dim."""

    def __init__(self, spec: Spec, backend: str, plan, layout: str, chunk: int):
        self.spec, self.backend, self.layout, self.chunk = spec, backend, layout, chunk
        self._force = plan
        self.last_basis = None  # conv_basis: the basis recovered on the last call (starts, columns)
        self.last_selection = None  # topk_sparse: the key blocks kept on the last call
        self._plans = {}  # (backend, head dim) -> Plan (the costs, and so the crossover, depend on it)
        self._hot = None  # op.step's hot path: (input signature, the returned state's fingerprint, plan, params)
        self._limit = limit_closure(spec)  # a length-dependent max_length's closure (evaluated under torch.compile)
        self._defaults = {}  # (H, d, dtype, device, names) -> the default tensors of those parameters
        # validates a forced ordering (and, for triton, that the kernels can be generated) now
        self.plan = self._plan_for("torch" if backend == "auto" else backend, DEFAULT_HEAD_DIM)

    def __repr__(self) -> str:
        force = f", plan={self._force!r}" if self._force is not None else ""
        return (f"AttentionOp({self.spec.name!r} {self.spec.mode}, backend={self.backend!r}{force}, "
                f"layout={self.layout!r})")

    def __call__(self, q, k, v, *, initial_state=None, return_state=False, cu_seqlens=None, return_lse=False,
                 **params):
        """o [B, H, T, Dv] ("bhtd") or [B, T, H, Dv] ("bthd"); parameters are keyword tensors named as in
        the spec ([H] per head or [] scalar) and default to their ``init``.

        ``return_lse=True`` (a softmax: exp(score) with a row sum and no eps, the quadratic ordering) returns
        ``(o, lse)``: lse the log row sum log sum_j W_ij exp(s_ij) [B, H, T] ("bhtd") or [B, T, H] ("bthd"), float32
        (float64 for float64 inputs), -inf on rows that attend no key; gradients flow back through it too.

        State passing (causal separable specs whose terms do not depend on the final length): with
        ``initial_state`` (a State of batch B) the positions of sequence b continue from its ``pos`` and
        its S (and z) enter as the state before the first token; gradients reach them. With
        ``return_state=True`` the result is ``(o, state)``, the state after the last token. Both run the
        linear ordering (the recurrent one when forced with plan="recurrent"), also at lengths where the
        planner would choose the quadratic ordering: a state needs the linear form.

        ``cu_seqlens`` [N + 1] (int, 0 = cu[0] < cu[1] < ... < cu[N] = T) packs N sequences along T with
        B = 1 (torch backend: each sequence runs alone); states then have batch N, one per sequence, and
        each sequence's positions start at 0 (or its initial state's pos)."""
        return self._call(q, k, v, initial_state, return_state, cu_seqlens, "output" if return_lse else None, params)

    def softmax_lse(self, q, k, v, *, cu_seqlens=None, **params) -> tuple:
        """(o, lse) as ``op(q, k, v, return_lse=True)`` gives them, but o in the compute dtype (float32 for fp16 / bf16
        inputs: the flash kernels' fp32 copy, the torch tiles' own), for a caller that combines several such pairs
        and rounds once (the terms of a shared normaliser: attngen.runtime.terms)."""
        return self._call(q, k, v, None, False, cu_seqlens, "compute", params)

    def _call(self, q, k, v, initial_state, return_state, cu_seqlens, lse, params: dict):
        """The body of __call__; ``lse``: None, "output" (return_lse: o in q's dtype) or "compute" (softmax_lse)."""
        return_lse = lse is not None
        if torch.compiler.is_compiling() and (initial_state is not None or return_state or cu_seqlens is not None):
            raise InputError(f"{self.spec.name}: initial_state, return_state and cu_seqlens are not supported under "
                             "torch.compile (states and packed boundaries are checked and split on the host); call "
                             "the op eagerly for them (docs/api.md, 'torch.compile')")
        qh, kh, vh = check_qkv(self.spec, q, k, v, self.layout, closure=self._limit)
        backend = resolve_backend(self.backend, qh.device)
        gates, gate = self._gates(params, qh)
        heads, head_dim = _static(qh.shape[1]), _static(qh.shape[3])
        values = check_params(self.spec, params, heads, qh, head_dim=head_dim,
                              defaults=lambda missing: self._default_values(heads, head_dim, qh, missing))
        plan = self._planned(backend, head_dim)
        self.plan = plan
        bounds = None
        if cu_seqlens is not None:
            bounds = check_cu_seqlens(cu_seqlens, qh.shape[0], qh.shape[2], qh.device)
            if kh.shape[2] != qh.shape[2]:
                raise InputError(f"cu_seqlens: packed sequences need the key length to equal the query length "
                                 f"(found {qh.shape[2]} and {kh.shape[2]})")
        stateful = initial_state is not None or return_state
        if return_lse:
            _check_lse(plan, kh.shape[2], stateful)
        state = None
        if stateful:
            check_decodable(plan, "initial_state" if initial_state is not None else "return_state=True")
            n = qh.shape[0] if bounds is None else len(bounds) - 1
            state = self._checked_state(initial_state, plan, qh, vh, n, heads=_state_heads(plan, qh, kh))
            lengths = qh.shape[2] if bounds is None else torch.tensor(
                [b - a for a, b in zip(bounds[:-1], bounds[1:])], device=state.pos.device)
            check_positions(self.spec, state.pos + lengths)
        if backend == "torch" and self.spec.rotary is not None:  # the generated kernels would rotate in place
            qh, kh = self._rotated(qh, kh, bounds, state.pos if state is not None else None)
        out_dtype = qh.dtype
        if plan.prologue is not None and not plan.prologue.fused:  # feature maps computed here: the kernels get q', k'
            qh, kh, vh = prologue.features(plan.prologue, qh, kh, vh, values)
            values = plan.prologue.core_values(values)
        if return_lse:
            o, log_sum = self._run_lse(backend, plan, qh, kh, vh, values, gates, bounds)
            o = o.to(out_dtype) if lse == "output" else o
            return (o.transpose(1, 2), log_sum.transpose(1, 2)) if self.layout == "bthd" else (o, log_sum)
        if backend == "triton" and plan.choice.ordering_for(kh.shape[2]) is Ordering.TOPK_SPARSE:
            o = self._run_triton_sparse(plan, qh, kh, vh, values, bounds)
        elif backend == "triton" and bounds is not None and not stateful and not plan.linear_terms:
            # packed sequences of a quadratic-only module (no recurrent state): one call per sequence, each from
            # position 0 (its gate's cumulative sum and its rotary positions restart)
            o = torch.cat([self._run_triton(plan, qh[:, :, a:b], kh[:, :, a:b], vh[:, :, a:b],
                                            values | {n: x[:, :, a:b] for n, x in gates.items()}, None, False, None)
                           for a, b in zip(bounds[:-1], bounds[1:])], 2)
        elif backend == "triton":
            groups = qh.shape[1] // state.S.shape[1] if stateful else 1
            start = None if initial_state is None else _per_query_head(state, groups)
            out = self._run_triton(plan, qh, kh, vh, values | gates, start, return_state, cu_seqlens)
            o, state = out if return_state else (out, None)
            state = _per_kv_head(state, groups) if return_state else None
        elif stateful:
            groups = qh.shape[1] // state.S.shape[1]
            o, state = self._run_torch_state(plan, qh, kh, vh, values, _per_query_head(state, groups), bounds, gate)
            state = _per_kv_head(state, groups)
        elif bounds is not None and packed.batchable(plan, _lengths(bounds), False, plan.choice.ordering_for):
            (qb, valid), (kb, _), (vb, _) = (packed.pad(x, bounds) for x in (qh, kh, vh))
            o = packed.unpad(self._run_torch(plan, qb, kb, vb, values, {}, _padded_gate(gate, bounds)), valid)
        elif bounds is not None:  # each packed sequence alone, by the ordering the planner picks for its length
            o = torch.cat([self._run_torch(plan, qh[:, :, a:b], kh[:, :, a:b], vh[:, :, a:b], values, {},
                                           None if gate is None else gate[:, :, a:b])
                           for a, b in zip(bounds[:-1], bounds[1:])], 2)
        else:
            info = {}
            o = self._run_torch(plan, qh, kh, vh, values, info, gate)
            self._record(info)
        o = o.to(out_dtype).transpose(1, 2) if self.layout == "bthd" else o.to(out_dtype)
        return (o, state) if return_state else o

    def _run_lse(self, backend, plan, qh, kh, vh, values, gates: dict, bounds) -> tuple:
        """(o [B, H, T, Dv], lse [B, H, T]) of a softmax plan's quadratic ordering (_check_lse), o in the compute dtype;
        packed sequences one at a time (each from position 0)."""
        if bounds is not None:
            pieces = [self._run_lse(backend, plan, qh[:, :, a:b], kh[:, :, a:b], vh[:, :, a:b], values,
                                    {n: x[:, :, a:b] for n, x in gates.items()}, None)
                      for a, b in zip(bounds[:-1], bounds[1:])]
            return torch.cat([o for o, _ in pieces], 2), torch.cat([lse for _, lse in pieces], 2)
        if backend == "triton":
            if qh.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise InputError(_TRITON_CPU.format(device=qh.device.type))
            return triton_loader.run_lse(plan, qh, kh, vh, values | gates, layout="bhtd")
        gate = gates.get(self.spec.gate.name) if self.spec.gate is not None else None
        return torch_backend.run(plan, Ordering.QUADRATIC, qh, kh, vh, values, self.chunk, gate=gate, lse=True)

    def _run_torch(self, plan, qh, kh, vh, values, info: dict, gate=None):
        """The ordering the planner picks for this key length: an approximation's execution, or the exact
        torch backend's."""
        ordering = plan.choice.ordering_for(kh.shape[2])
        if ordering in APPROXIMATIONS:
            kh, vh = grouped(kh, vh, qh.shape[1])
            return APPROXIMATIONS[ordering](plan, qh, kh, vh, values, info)
        return torch_backend.run(plan, ordering, qh, kh, vh, values, self.chunk, gate=gate)

    def _gates(self, params: dict, qh) -> tuple:
        """The spec's gate tensors taken out of the call's keywords (``params`` keeps the parameters), checked, as
        [B, H, T(, Dk)] views by name, and the one gate (or None)."""
        gates = check_gates(self.spec, {n: params.pop(n) for n in self.spec.gate_names if n in params}, self.layout,
                            qh)
        return gates, gates.get(self.spec.gate.name) if self.spec.gate is not None else None

    def _rotated(self, qh, kh, bounds, start):
        """q and k rotated by their positions (RoPE): 0 .. T - 1, from each sequence's start under cu_seqlens, and
        continuing from ``start`` [B] (a state's pos: per sequence, packed or not)."""
        theta = self.spec.rotary.theta
        t, s = qh.shape[2], kh.shape[2]
        if bounds is None and start is None:
            pos_q, pos_k = torch.arange(t, device=qh.device), torch.arange(s, device=qh.device)
        elif bounds is None:
            pos_q = pos_k = start.to(qh.device)[:, None] + torch.arange(t, device=qh.device)  # [B, T]
        else:
            local = torch.cat([torch.arange(b - a, device=qh.device) for a, b in zip(bounds[:-1], bounds[1:])])
            if start is not None:
                local = local + torch.repeat_interleave(start.to(qh.device),
                                                        torch.tensor(_lengths(bounds), device=qh.device))
            pos_q = pos_k = local
        return rotate(qh, pos_q, theta), rotate(kh, pos_k, theta)

    def _record(self, info: dict) -> None:
        """Keep what an approximation decided on the last call (see last_basis, last_selection)."""
        if "basis" in info:
            self.last_basis = info["basis"]
        if "selection" in info:
            self.last_selection = info["selection"]

    def ordering_for(self, head_dim: int, length: int, device="cpu") -> Ordering:
        """The ordering a call with this head dim, key length and device runs."""
        backend = resolve_backend(self.backend, torch.device(device))
        return self._plan_for(backend, head_dim).choice.ordering_for(length)

    def init_state(self, batch: int, heads: int, dk: int, dv: int, *, dtype=torch.float32, device=None) -> State:
        """The state before any token for ``batch`` sequences: S [batch, heads, F, dv] zeros (F the feature
        width at head dim ``dk``), z [batch, heads, F] for row-sum specs, pos [batch] zeros. States
        accumulate in float32 (use float64 with float64 inputs). ``heads``: q's heads, or the kv heads for calls
        with grouped KV heads when the plan keeps one state per kv head (``plan.capabilities.shared_state``)."""
        if isinstance(dk, bool) or not isinstance(dk, int) or dk < 1:
            raise InputError(f"init_state: dk={dk!r}; expected a positive integer (the head dim of q and k)")
        backend = resolve_backend(self.backend, torch.device(device or "cpu"))
        plan = self._plan_for(backend, dk)
        check_decodable(plan, "init_state")
        return state_lib.zeros(self.spec.hash, batch, heads, _feature_width(plan, dk), dv,
                               plan.normalize.kind != "none", dtype=dtype, device=device)

    def step(self, q_t, k_t, v_t, state, **params):
        """One decode step: q_t, k_t [B, H, 1, Dk] and v_t [B, H, 1, Dv] (layout "bhtd"; [B, 1, H, D] for
        "bthd"), ``state`` the State after each sequence's previous tokens (from init_state, step or
        return_state=True). Returns (o_t [B, H, 1, Dv] in the layout, the state after this token).
        Each sequence is at its own position state.pos; memory is constant in the tokens consumed.

        Hot path: a call with no parameters, tensors of the same shapes, dtypes and devices as the previous call,
        and the State that call returned (its tensors untouched) skips the checks that call already made."""
        if torch.compiler.is_compiling():
            raise InputError(f"{self.spec.name}: op.step is not supported under torch.compile (its hot path keys "
                             "on the identities of the state's tensors); call it eagerly (docs/api.md, "
                             "'torch.compile')")
        hot = self._hot
        if hot is not None and not params and getattr(state, "checked", None) is hot[1] \
                and hot[0] == _signature(q_t, k_t, v_t) and hot[1][1:4] == (id(state.S), id(state.z), id(state.pos)):
            check_positions(self.spec, state.pos + 1, "step")
            return self._step_torch(hot[2], q_t, k_t, v_t, state, hot[3], hot[1][0])
        qh, kh, vh = check_qkv(self.spec, q_t, k_t, v_t, self.layout)
        if qh.shape[2] != 1:
            raise InputError(f"step: expected one token per sequence (T = 1 in layout {self.layout}), found "
                             f"T = {qh.shape[2]}. Fix: call the op with initial_state=state, return_state=True "
                             "for several tokens (prefill)")
        backend = resolve_backend(self.backend, qh.device)
        gates, gate = self._gates(params, qh)
        values = check_params(self.spec, params, qh.shape[1], qh, head_dim=qh.shape[3])
        plan = self._plan_for(backend, qh.shape[-1])
        check_decodable(plan, "step")
        if state is None:
            raise InputError("step: state is None; expected a State (op.init_state(batch, heads, dk, dv) before "
                             "the first token, then the state each step returns)")
        key = self._state_key(plan, qh, vh, qh.shape[0], _state_heads(plan, qh, kh))
        state = self._checked_state(state, plan, qh, vh, qh.shape[0], what="step: state", key=key, heads=key[2])
        check_positions(self.spec, state.pos + 1, "step")
        out_dtype = qh.dtype
        if plan.prologue is not None and not plan.prologue.fused:  # (fused: the kernels compute q', k')
            qh, kh, vh = prologue.features(plan.prologue, qh, kh, vh, values)
            values = plan.prologue.core_values(values)
        if backend == "triton":
            if qh.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise InputError(_TRITON_CPU.format(device=qh.device.type))
            if getattr(triton_loader.load_module(plan), f"{self.spec.name}_step", None) is None:
                raise PlanError(f"step: the generated Triton module of {self.spec.name} ({self.spec.mode}) has no "
                                f"{self.spec.name}_step function (no generated decode step); use backend='torch' "
                                "for decoding")
            groups = qh.shape[1] // state.S.shape[1]
            full = _per_query_head(state, groups)
            o, (S, z, pos) = triton_loader.step(plan, qh, kh, vh, (full.S, full.z, full.pos), values | gates,
                                                layout="bhtd")
            new = _per_kv_head(State(S, z if plan.normalize.kind != "none" else None, pos, self.spec.hash), groups)
        else:
            return self._step_torch(plan, q_t, k_t, v_t, state, values, key, hot=not params, gate=gate)
        new.checked = _fingerprint(new, key)  # the next step skips its check
        o = o.to(out_dtype)
        return (o.transpose(1, 2) if self.layout == "bthd" else o), new

    def _step_torch(self, plan, q_t, k_t, v_t, state, values, key, hot=True, gate=None):
        """``hot``: ``values`` are the parameters' defaults (no parameter passed), the same at every call."""
        qh, kh, vh = (x.transpose(1, 2) for x in (q_t, k_t, v_t)) if self.layout == "bthd" else (q_t, k_t, v_t)
        if self.spec.rotary is not None:
            pos = state.pos.to(qh.device)[:, None]  # [B, 1]: each sequence at its own position
            qh, kh = rotate(qh, pos, self.spec.rotary.theta), rotate(kh, pos, self.spec.rotary.theta)
        groups = qh.shape[1] // state.S.shape[1]  # > 1: one state per kv head, shared by its group
        full = _per_query_head(state, groups)
        o, S, z = torch_backend.step(plan, qh, kh, vh, values, full.S, full.z, state.pos, constant=hot, gate=gate)
        new = _per_kv_head(State(S, z, state.pos + 1, self.spec.hash), groups)
        new.checked = _fingerprint(new, key)  # the next step skips its check
        self._hot = (_signature(q_t, k_t, v_t), new.checked, plan, values) if hot else None
        return (o.transpose(1, 2) if self.layout == "bthd" else o), new

    def _state_key(self, plan, qh, vh, batch, heads=None) -> tuple:
        return (self.spec.hash, batch, heads or qh.shape[1], _feature_width(plan, qh.shape[-1]), vh.shape[-1],
                qh.device, compute_dtype(qh.dtype))

    def _checked_state(self, state, plan, qh, vh, batch, what="initial_state", key=None, heads=None):
        """``state`` validated against the inputs (None: a zero state) and ``heads`` (the state's: q's, or the kv
        heads when grouped heads share states). A State that op.step returned for the same sizes, whose tensors
        are still the ones it returned, is not checked again (the decode hot path)."""
        width, dv = _feature_width(plan, qh.shape[-1]), vh.shape[-1]
        dtype = compute_dtype(qh.dtype)
        heads = heads or qh.shape[1]
        if state is None:
            return state_lib.zeros(self.spec.hash, batch, heads, width, dv, plan.normalize.kind != "none",
                                   dtype=dtype, device=qh.device)
        if isinstance(state, State) and state.checked is not None \
                and state.checked == _fingerprint(state, key or self._state_key(plan, qh, vh, batch, heads)):
            return state
        state_lib.check(state, self.spec, batch=batch, heads=heads, width=width, dv=dv, device=qh.device,
                        dtype=dtype, what=what)
        return state

    def _run_torch_state(self, plan, qh, kh, vh, values, state, bounds, gate=None):
        ordering = Ordering.RECURRENT if plan.choice.forced and plan.choice.below is Ordering.RECURRENT \
            else Ordering.LINEAR
        s0 = _augmented(state)
        if bounds is None:
            o, s = torch_backend.run_state(plan, ordering, qh, kh, vh, values, self.chunk, s0, state.pos, gate=gate)
            return o, _from_augmented(s, state.pos + qh.shape[2], plan, self.spec.hash)
        lengths = torch.tensor(_lengths(bounds), device=state.pos.device)
        if packed.batchable(plan, _lengths(bounds), True, lambda n: ordering):  # one padded batch
            (qb, valid), (kb, _), (vb, _) = (packed.pad(x, bounds) for x in (qh, kh, vh))
            o, s = torch_backend.run_state(plan, ordering, qb, kb, vb, values, self.chunk, s0, state.pos, valid=valid,
                                           gate=_padded_gate(gate, bounds))
            return packed.unpad(o, valid), _from_augmented(s, state.pos + lengths, plan, self.spec.hash)
        outs, finals = [], []
        for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            o, s = torch_backend.run_state(plan, ordering, qh[:, :, a:b], kh[:, :, a:b], vh[:, :, a:b], values,
                                           self.chunk, s0[n:n + 1], state.pos[n:n + 1],
                                           gate=None if gate is None else gate[:, :, a:b])
            outs.append(o)
            finals.append(s)
        return torch.cat(outs, 2), _from_augmented(torch.cat(finals), state.pos + lengths, plan, self.spec.hash)

    def _run_triton_sparse(self, plan, qh, kh, vh, values, bounds):
        """topk_sparse on the generated block-sparse kernels, the selection in torch (approx.topk_sparse.attend);
        packed sequences run one at a time."""
        if qh.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError(_TRITON_CPU.format(device=qh.device.type))
        if bounds is not None:
            return torch.cat([run_triton_sparse(plan, qh[:, :, a:b], kh[:, :, a:b], vh[:, :, a:b], values)
                              for a, b in zip(bounds[:-1], bounds[1:])], 2)
        info = {}
        o = run_triton_sparse(plan, qh, kh, vh, values, info)
        self._record(info)
        return o

    def _run_triton(self, plan, qh, kh, vh, values, initial_state, return_state, cu_seqlens):
        """The generated module's forward; states cross as the tuples (S, z, pos) it takes and returns."""
        if qh.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError(_TRITON_CPU.format(device=qh.device.type))
        if initial_state is None and not return_state and cu_seqlens is None:
            return triton_loader.run(plan, qh, kh, vh, values, layout="bhtd")
        start = None if initial_state is None else (initial_state.S, initial_state.z, initial_state.pos)
        out = triton_loader.run(plan, qh, kh, vh, values, layout="bhtd", initial_state=start, return_state=return_state,
                     cu_seqlens=cu_seqlens)
        if not return_state:
            return out
        o, (S, z, pos) = out
        return o, State(S, z if plan.normalize.kind != "none" else None, pos, self.spec.hash)

    def _default_values(self, heads: int, head_dim: int, like, missing: tuple) -> dict:
        return _default_values(self, heads, head_dim, like, missing)

    def _planned(self, backend: str, head_dim: int):
        """The plan for a call: the planner runs outside any torch.compile trace (_plan_ready)."""
        _plan_ready(self, backend, head_dim)
        return self._plans[(backend, head_dim)]

    def _plan_for(self, backend: str, head_dim: int):
        key = (backend, head_dim)
        if key not in self._plans:
            plan = pipeline.plan(self.spec, target=backend, head_dim=head_dim, chunk=self.chunk or DEFAULT_CHUNK,
                                 force=self._force)
            if backend == "torch":  # the closures its calls evaluate, translated now (torch_backend.lowered)
                torch_backend.lowered(plan)
            self._plans[key] = plan
        return self._plans[key]


def _static(n) -> int:
    """A size as a Python int; under torch.compile with dynamic shapes operator.index specialises a symbolic size
    (a guard on its value: one graph per head dim), where int() would keep it symbolic."""
    return operator.index(n)


def _default_values(op, heads: int, head_dim: int, like, missing: tuple) -> dict:
    """The default tensors of the ``missing`` parameters of ``op`` (an AttentionOp or a TermsOp) at this size, dtype
    and device, evaluated once (outside any torch.compile trace: _defaults_ready) and kept in op._defaults."""
    key = (heads, head_dim, like.dtype, like.device, missing)
    _defaults_ready(op, key)
    return op._defaults[key]


@torch.compiler.assume_constant_result
def _defaults_ready(op, key: tuple) -> bool:
    """Parameter defaults for op._defaults[key] (sympy init expressions and a finiteness check: run as a constant
    under torch.compile, _plan_ready). At most 64 sizes are kept."""
    if key not in op._defaults:
        heads, head_dim, dtype, device, names = key
        if len(op._defaults) >= 64:
            op._defaults.clear()
        op._defaults[key] = default_parameters(op.spec, heads, dtype, device, head_dim=head_dim, names=names)
    return True


@torch.compiler.assume_constant_result
def _terms_ready(op: TermsOp, backend: str, head_dim: int) -> bool:
    """The terms' slices at ``head_dim`` in op._slices and every term's plan (and module) at its slice's width (sympy,
    files: run as a constant under torch.compile, _plan_ready). All terms before the first runs: a trace reads the
    shared tables (the generated modules' custom ops) once, so they must be complete by then."""
    if head_dim not in op._slices:
        op._slices[head_dim] = terms_lib.slices(op.spec, head_dim)
        op._groups[head_dim] = terms_lib.batches(op.spec, op._slices[head_dim])
    for term, cut in zip(op.ops, op._slices[head_dim]):
        _plan_ready(term, backend, head_dim if cut is None else cut[1] - cut[0])
    return True


@torch.compiler.assume_constant_result
def _plan_ready(op: AttentionOp, backend: str, head_dim: int) -> bool:
    """Plans ``op`` for a backend and head dim (op._plans). Under torch.compile the planner (sympy) must not be
    traced: dynamo runs this function as it traces (a constant of the graph) and the plan is then read from
    op._plans like any attribute, under dynamo's guards."""
    plan = op._plan_for(backend, head_dim)
    if plan.linear_terms:
        _feature_width(plan, head_dim)  # the state's width (sympy, remembered in plan.memo)
    if backend == "triton" and Ordering.TOPK_SPARSE not in (plan.choice.below, plan.choice.above) \
            and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        # the generated module, imported here (kept in plan.memo), not in a trace; only where its kernels can run
        # (triton decides between compiled and interpreted kernels when the module is imported)
        triton_loader.load_module(plan)
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call runs on: "auto" is triton for CUDA tensors, torch for any other device."""
    if backend != "auto":
        return backend
    return "triton" if torch.device(device).type == "cuda" else "torch"



def _check_lse(plan, length: int, stateful: bool) -> None:
    """return_lse needs a softmax (exp(score), a row sum without eps) run by the exact quadratic ordering, which keeps
    the running max and sum its log row sum comes from: InputError with a state, PlanError otherwise."""
    spec = plan.spec
    if stateful:
        raise InputError(f"{spec.name}: return_lse with initial_state / return_state: a log row sum comes from the "
                         "quadratic ordering, which has no recurrent state; call the op on whole sequences")
    if not is_softmax(plan.similarity, plan.normalize):
        kind, norm = plan.similarity.kind.value, plan.normalize
        raise PlanError(f"{spec.where}: return_lse needs a softmax, an exp(score) similarity with normalize: rowsum "
                        f"and no eps; {spec.name} ({spec.mode}) has the similarity {spec.similarity} (class {kind}) "
                        f"and normalize {norm.kind} (eps {norm.eps:g}). Fix: write the similarity as exp(score) with "
                        "a score separable into q and k features")
    ordering = plan.choice.ordering_for(length)
    if ordering is not Ordering.QUADRATIC:
        raise PlanError(f"{spec.where}: return_lse is computed by the quadratic ordering, and {spec.name} "
                        f"({spec.mode}) runs {ordering.value} at key length {length}; compile with plan='quadratic'")


def _feature_width(plan, head_dim: int) -> int:
    """The width of a recurrent state's rows at the call's head dim (after a prologue's feature maps, if any)."""
    return plan.feature_width(plan.prologue.width(head_dim) if plan.prologue is not None else head_dim)


def _state_heads(plan, qh, kh) -> int:
    """The heads of a call's recurrent state: the kv heads when k, v have fewer heads than q and the plan's states
    are equal across a group (Capabilities.shared_state), else q's heads."""
    grouped = kh.shape[1] != qh.shape[1]
    if plan.prologue is not None and plan.prologue.per_head_keys:  # k' differs per query head
        return qh.shape[1]
    return kh.shape[1] if grouped and plan.capabilities.shared_state else qh.shape[1]


def _per_query_head(state: State, groups: int) -> State:
    """A state kept per kv head, repeated for the query heads of each group (the kernels run per query head;
    gradients of the repeat sum back over the group)."""
    if groups == 1:
        return state
    z = None if state.z is None else state.z.repeat_interleave(groups, 1)
    return State(state.S.repeat_interleave(groups, 1), z, state.pos, state.spec_hash)


def _per_kv_head(state: State, groups: int) -> State:
    """The state of each group's first query head: the heads of a group hold equal states (shared_state)."""
    if groups == 1 or state is None:
        return state
    z = None if state.z is None else state.z[:, ::groups]
    return State(state.S[:, ::groups], z, state.pos, state.spec_hash)


def _padded_gate(gate, bounds: list):
    """A packed gate [1, H, T(, Dk)] as the padded batch's [N, H, T_max(, Dk)]: padded rows hold 0 (no decay)."""
    if gate is None:
        return None
    if gate.dim() == 3:
        return packed.pad(gate[..., None], bounds)[0][..., 0]
    return packed.pad(gate, bounds)[0]


def _lengths(bounds: list) -> list:
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _signature(*xs) -> tuple:
    """Shapes, dtypes and devices of the step's inputs (non-tensors give a signature no call repeats)."""
    return tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else object() for x in xs)


def _fingerprint(state: State, key: tuple) -> tuple:
    """What a checked state is recognised by: the sizes it was checked for and its tensors' identities."""
    return key, id(state.S), id(state.z), id(state.pos), state.spec_hash


def _augmented(state: State) -> torch.Tensor:
    """The state as the kernels carry it: [S | z] [B, H, F, Dv + 1] for a row-sum spec (z rides along as
    the ones column's state, docs/derivations.md section 2), else S."""
    return state.S if state.z is None else torch.cat([state.S, state.z.unsqueeze(-1)], -1)


def _from_augmented(s: torch.Tensor, pos: torch.Tensor, plan, spec_hash: str) -> State:
    if plan.normalize.kind == "none":
        return State(s, None, pos, spec_hash)
    return State(s[..., :-1], s[..., -1], pos, spec_hash)
