"""The public runtime: ``attngen.compile(spec, ...)`` returns an AttentionOp, callable like SDPA.

    op = attngen.compile("cosformer", backend="auto", plan=None, layout="bhtd")
    o = op(q, k, v)                      # q [B, H, T, Dk], k [B, H, S, Dk], v [B, H, S, Dv] -> o [B, H, T, Dv]

backend: "torch" runs the Plan in PyTorch ops on any device; "triton" runs the generated kernels (CUDA
tensors; CPU tensors only under TRITON_INTERPRET=1, for verification); "auto" picks triton for CUDA
tensors and torch otherwise, per call, from the inputs' device. The triton backend implements the
linear ordering, so its plans choose among those (TRITON_ORDERINGS) and say so in plan.explain().
plan: None lets the planner choose per call from the key length (a dispatch at the crossover length
it solved); "linear", "quadratic", "recurrent" or "fft" forces one ordering.
"""
from __future__ import annotations

import os

import torch

from .backends import BACKENDS
from .backends import torch_backend
from .errors import InputError, PlanError
from .inputs import check_params, check_qkv
from .ir import Ordering
from .plan import DEFAULT_CHUNK, build_plan
from .spec import Spec, load_spec

LAYOUTS = ("bhtd", "bthd")
DEFAULT_HEAD_DIM = 64  # the head dim of op.plan before the first call

TRITON_ORDERINGS = (Ordering.LINEAR,)  # orderings with Triton templates
_TRITON_CPU = ("backend='triton' got {device} tensors: the generated kernels need CUDA tensors; on a CPU they "
               "run only under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton; for "
               "verification, it is slow), otherwise use backend='torch'")
_NO_STATE = ("{what} is not supported yet: recurrent states (initial_state, return_state, init_state, step) "
             "arrive with the decode release; call the op on the whole sequence")


def compile(spec, backend: str = "auto", plan=None, layout: str = "bhtd", chunk: int = DEFAULT_CHUNK) -> "AttentionOp":
    """Compile ``spec`` (a Spec, a built-in name, a YAML path or string, or a dict) into an AttentionOp.

    Raises PlanError for an unknown backend, a spec the triton backend cannot generate, or an illegal forced ``plan``,
    and InputError for an unknown ``layout`` or a bad ``chunk``."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if backend not in BACKENDS:
        raise PlanError(f"backend={backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    if layout not in LAYOUTS:
        raise InputError(f"layout={layout!r}: expected 'bhtd' ([B, H, T, D], SDPA's) or 'bthd' ([B, T, H, D], fla's)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk={chunk!r}: expected a positive integer (the causal linear plan's chunk size)")
    return AttentionOp(spec, backend, plan, layout, chunk)


class AttentionOp:
    """A compiled attention variant. Call it as ``op(q, k, v, **params)``.

    Attributes: ``spec``, ``backend`` ("auto" or "torch"), ``layout``, ``chunk``, and ``plan``: the Plan
    at head dim 64 until the first call, then the plan of the last call's head dim."""

    def __init__(self, spec: Spec, backend: str, plan, layout: str, chunk: int):
        self.spec, self.backend, self.layout, self.chunk = spec, backend, layout, chunk
        self._force = plan
        self._plans = {}  # (backend, head dim) -> Plan (the costs, and so the crossover, depend on it)
        # validates a forced ordering (and, for triton, that the kernels can be generated) now
        self.plan = self._plan_for("torch" if backend == "auto" else backend, DEFAULT_HEAD_DIM)

    def __repr__(self) -> str:
        force = f", plan={self._force!r}" if self._force is not None else ""
        return (f"AttentionOp({self.spec.name!r} {self.spec.mode}, backend={self.backend!r}{force}, "
                f"layout={self.layout!r})")

    def __call__(self, q, k, v, *, initial_state=None, return_state=False, **params):
        """o [B, H, T, Dv] ("bhtd") or [B, T, H, Dv] ("bthd"); parameters are keyword tensors named as in
        the spec ([H] per head or [] scalar) and default to their ``init``."""
        if initial_state is not None:
            raise InputError(_NO_STATE.format(what="initial_state"))
        if return_state:
            raise InputError(_NO_STATE.format(what="return_state=True"))
        qh, kh, vh = check_qkv(self.spec, q, k, v, self.layout)
        backend = resolve_backend(self.backend, qh.device)
        values = check_params(self.spec, params, qh.shape[1], qh)
        plan = self._plan_for(backend, qh.shape[-1])
        self.plan = plan
        ordering = plan.choice.ordering_for(kh.shape[2])
        if backend == "triton":
            if qh.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise InputError(_TRITON_CPU.format(device=qh.device.type))
            from . import triton_backend
            out = triton_backend.run(plan, qh, kh, vh, values, layout="bhtd")
        else:
            out = torch_backend.run(plan, ordering, qh, kh, vh, values, self.chunk)
        return out.transpose(1, 2) if self.layout == "bthd" else out

    def ordering_for(self, head_dim: int, length: int, device="cpu") -> Ordering:
        """The ordering a call with this head dim, key length and device runs."""
        backend = resolve_backend(self.backend, torch.device(device))
        return self._plan_for(backend, head_dim).choice.ordering_for(length)

    def init_state(self, batch, heads, dk, dv, *, dtype=torch.float32, device=None):
        raise InputError(_NO_STATE.format(what="init_state"))

    def step(self, q_t, k_t, v_t, state, **params):
        raise InputError(_NO_STATE.format(what="step"))

    def _plan_for(self, backend: str, head_dim: int):
        key = (backend, head_dim)
        if key not in self._plans:
            if backend == "triton":
                from . import codegen
                plan = build_plan(self.spec, head_dim=head_dim, chunk=self.chunk, plan=self._force,
                                  orderings=TRITON_ORDERINGS)
                codegen.check_supported(plan)
            else:
                plan = build_plan(self.spec, head_dim=head_dim, chunk=self.chunk, plan=self._force)
            self._plans[key] = plan
        return self._plans[key]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a call runs on: "auto" is triton for CUDA tensors, torch for any other device."""
    if backend != "auto":
        return backend
    return "triton" if torch.device(device).type == "cuda" else "torch"

