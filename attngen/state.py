"""The recurrent state of a causal separable op: what `return_state=True`, `op.init_state` and `op.step`
return and what `initial_state=` accepts (architecture.md, "The public API"; derivations.md section 4).

After token t of a sequence (0-based, positions counted from the sequence's start):
    S = sum_{j <= t} gamma**(t-j) K'_j^T V_j          [B, H, F, Dv] fp32   (gamma = 1 without a decay)
    z = sum_{j <= t} gamma**(t-j) K'_j                [B, H, F]     fp32   (row-sum specs only, else None)
    pos = t + 1                                        [B]           int64  (tokens consumed so far)
K'_j is the key feature map including its position factors g_r(j) at the absolute position j, so a
continuation starting from a state evaluates f_r(i), g_r(j) at pos + (local index). Sequences in a batch
may be at different positions (serving): ``cat`` joins states of single sequences, ``select`` takes some out.

Only causal plans with a linear (separable) form whose terms do not depend on the final length have a
state; ``check_decodable`` says why any other plan has none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .expr import N_K, N_Q
from .ir import Ordering

_FROM = "a State from this op's return_state=True, op.init_state or op.step"


@dataclass
class State:
    S: torch.Tensor  # [B, H, F, Dv] fp32
    z: torch.Tensor | None  # [B, H, F] fp32 for row-sum specs, else None
    pos: torch.Tensor  # [B] int64
    spec_hash: str  # the spec this state belongs to

    @property
    def batch(self) -> int:
        return self.S.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant in the number of tokens consumed)."""
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.pos) if t is not None)

    def select(self, index) -> "State":
        """The states of some sequences: ``index`` is an int, a slice or a [n] index tensor."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        z = None if self.z is None else self.z[index]
        return State(self.S[index], z, self.pos[index], self.spec_hash)

    def detach(self) -> "State":
        """The same state cut from the autograd graph (e.g. between decode steps of a long generation)."""
        z = None if self.z is None else self.z.detach()
        return State(self.S.detach(), z, self.pos, self.spec_hash)


def cat(states) -> State:
    """One batch from states of the same spec (each sequence keeps its own position)."""
    states = list(states)
    if not states or any(not isinstance(s, State) for s in states):
        raise InputError(f"state.cat: expected a non-empty list of States, found {states!r:.80}")
    if len({s.spec_hash for s in states}) != 1:
        raise InputError("state.cat: the states belong to different specs (hashes "
                         f"{sorted({s.spec_hash for s in states})}); expected states of one op")
    z = None if states[0].z is None else torch.cat([s.z for s in states])
    return State(torch.cat([s.S for s in states]), z, torch.cat([s.pos for s in states]), states[0].spec_hash)


def zeros(spec_hash: str, batch: int, heads: int, width: int, dv: int, normalised: bool,
          dtype=torch.float32, device=None) -> State:
    """The state before any token."""
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"init_state: dtype {dtype}: states accumulate in float32 (or float64 for float64 "
                         "inputs); expected dtype=torch.float32 or torch.float64")
    for name, n in (("batch", batch), ("heads", heads), ("dv", dv)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"init_state: {name}={n!r}; expected a positive integer")
    s = torch.zeros(batch, heads, width, dv, dtype=dtype, device=device)
    z = torch.zeros(batch, heads, width, dtype=dtype, device=device) if normalised else None
    return State(s, z, torch.zeros(batch, dtype=torch.int64, device=device), spec_hash)


def check(state, spec, *, batch: int, heads: int, width: int, dv: int, device, dtype=None,
          what: str = "initial_state"):
    """InputError unless ``state`` is a State of this spec with these sizes, on this device (and, when
    given, of this dtype: the compute dtype of the inputs, float64 for float64 tensors, else float32)."""
    if not isinstance(state, State):
        raise InputError(f"{what}: expected {_FROM}, found {type(state).__name__}")
    if state.spec_hash != spec.hash:
        raise InputError(f"{what}: the state belongs to another spec (hash {state.spec_hash}); expected a state of "
                         f"{spec.name} ({spec.mode}, hash {spec.hash}). Fix: pass {_FROM}")
    want = (batch, heads, width, dv)
    if tuple(state.S.shape) != want:
        raise InputError(f"{what}: S has shape {list(state.S.shape)}; expected {list(want)} ([B, H, F, Dv] for "
                         f"batch {batch}, {heads} heads, feature width {width}, Dv {dv}). Fix: the state's "
                         "batch must be the inputs' batch (the number of sequences with cu_seqlens); select or "
                         "cat states to match (attngen.state.cat, State.select)")
    normalised = spec.normalize.kind != "none"
    if normalised and (state.z is None or tuple(state.z.shape) != want[:3]):
        raise InputError(f"{what}: the normaliser z must have shape {list(want[:3])} for a row-sum spec, "
                         f"found {None if state.z is None else list(state.z.shape)}")
    if not normalised and state.z is not None:
        raise InputError(f"{what}: {spec.name} has no row-sum normaliser, so z must be None; found a tensor "
                         f"of shape {list(state.z.shape)}")
    if tuple(state.pos.shape) != (batch,) or state.pos.dtype != torch.int64:
        raise InputError(f"{what}: pos must be an int64 tensor of shape [{batch}], found "
                         f"{state.pos.dtype} {list(state.pos.shape)}")
    if state.S.dtype not in (torch.float32, torch.float64):
        raise InputError(f"{what}: S has dtype {state.S.dtype}, expected float32 (or float64)")
    if dtype is not None and (state.S.dtype != dtype or (state.z is not None and state.z.dtype != dtype)):
        found = state.S.dtype if state.S.dtype != dtype else state.z.dtype
        raise InputError(f"{what}: the state has dtype {found}; expected {dtype}, the dtype states accumulate "
                         "in for these inputs (float64 for float64 tensors, float32 otherwise). Fix: "
                         f"op.init_state(..., dtype={dtype}) or pass inputs of the state's precision")
    for name, t in (("S", state.S), ("z", state.z), ("pos", state.pos)):
        if t is not None and t.device != torch.device(device):
            raise InputError(f"{what}: the state's {name} is on {t.device}; expected {device}, the inputs' "
                             f"device. Fix: create the state on that device (op.init_state(..., device=...))")
    if bool((state.pos < 0).any()):
        raise InputError(f"{what}: pos must be >= 0 (tokens consumed), found {state.pos.tolist()}")


def length_terms(plan) -> list:
    """The linear plan's factors (features, positions, decay) that depend on n_q or n_k."""
    exprs = [e for t in plan.linear_terms for e in (t.position.coeff, t.position.f_i, t.position.g_j, t.feature.coeff,
                                                     t.feature.q_scale, t.feature.k_scale, *t.feature.q_factors,
                                                     *t.feature.k_factors)]
    if plan.reweight.decay is not None:
        exprs.append(plan.reweight.decay.gamma)
    return [e for e in exprs if e.has(N_Q) or e.has(N_K)]


def check_decodable(plan, what: str) -> None:
    """InputError unless ``plan`` has a recurrent state: causal, separable, and free of the final length."""
    spec = plan.spec
    if not spec.causal:
        raise InputError(f"{what}: {spec.name} is bidirectional: every output depends on every token, so it has "
                         "no recurrent state to carry or decode. Fix: load_spec(..., causal=True) to decode, or "
                         "call the op on the whole sequence")
    if not plan.linear_terms:
        reason = plan.candidate(Ordering.LINEAR).reason
        raise InputError(f"{what}: {spec.name} ({spec.mode}) has no linear (separable) form, so no "
                         f"constant-size state: {reason}. Its decode state would be the whole KV cache. Fix: "
                         "call the op on the whole sequence, or use a separable spec")
    found = length_terms(plan)
    if not found:
        return
    values = spec.constant_values()
    names = [c.name for c in spec.constants if values[c.symbol].has(N_Q) or values[c.symbol].has(N_K)]
    if names:
        fix = (f"fix {', '.join(names)} as a constant at least as long as the longest sequence you will run, "
               f"e.g. attngen.load_spec({spec.name!r}, {names[0]}=4096)")
        cause = "the constant " + ", ".join(f"{c.name} = {values[c.symbol]}" for c in spec.constants
                                            if c.name in names)
    else:
        fix = "write the reweight without n, n_q or n_k (or with a fixed constant in their place)"
        cause = "the reweight"
    raise InputError(f"{what}: {spec.name}'s position terms depend on the final sequence length through {cause} "
                     f"(in {found[0]}), so the weights of tokens already consumed would change as the sequence "
                     f"grows: it cannot be decoded, continued from a state or streamed exactly. Fix: {fix} "
                     "(docs/specs.md, 'Decoding and length-dependent constants')")
