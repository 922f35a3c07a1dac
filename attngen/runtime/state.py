"""The recurrent state of a causal separable op: what `return_state=True`, `op.init_state` and `op.step`
return and what `initial_state=` accepts (docs/api.md; docs/derivations.md section 4).

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

from dataclasses import dataclass, field

import torch

from attngen.errors import InputError
from attngen.runtime import validate

_FROM = "a State from this op's return_state=True, op.init_state or op.step"


@dataclass
class State:
    S: torch.Tensor  # [B, H, F, Dv] fp32
    z: torch.Tensor | None  # [B, H, F] fp32 for row-sum specs, else None
    pos: torch.Tensor  # [B] int64
    spec_hash: str  # the spec this state belongs to
    checked: tuple | None = field(default=None, compare=False, repr=False)  # set by op.step (see AttentionOp)

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
    validate.state_tensors(state.S, state.z, state.pos, batch=batch, heads=heads, width=width, dv=dv, device=device,
                           normalised=spec.normalize.kind != "none", spec=spec.name, dtype=dtype, what=what)


def check_decodable(plan, what: str) -> None:
    """InputError unless ``plan`` has a recurrent state (causal, separable, free of the final length): the
    capabilities pass recorded whether it does and why not."""
    cap = plan.capabilities
    if not cap.decodable:
        raise InputError(f"{what}: {cap.decode_reason}")
