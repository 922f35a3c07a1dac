"""The recurrent state of a causal separable op: what `return_state=True`, `op.init_state` and `op.step`
return and what `initial_state=` accepts (architecture.md, "The public API"; derivations.md section 4).

After token t of a sequence (0-based, positions counted from the sequence's start):
    S = sum_{j <= t} gamma**(t-j) K'_j^T V_j          [B, H, F, Dv] fp32   (gamma = 1 without a decay)
    z = sum_{j <= t} gamma**(t-j) K'_j                [B, H, F]     fp32   (row-sum specs only, else None)
    pos = t + 1                                        [B]           int64  (tokens consumed so far)
K'_j is the key feature map including its position factors g_r(j) at the absolute position j, so a
continuation starting from a state evaluates f_r(i), g_r(j) at pos + (local index). Sequences in a batch
may be at different positions (serving).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


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


def zeros(spec_hash: str, batch: int, heads: int, width: int, dv: int, normalised: bool,
          dtype=torch.float32, device=None) -> State:
    """The state before any token."""
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"init_state: dtype {dtype}: states accumulate in float32 (or float64)")
    s = torch.zeros(batch, heads, width, dv, dtype=dtype, device=device)
    z = torch.zeros(batch, heads, width, dtype=dtype, device=device) if normalised else None
    return State(s, z, torch.zeros(batch, dtype=torch.int64, device=device), spec_hash)


def check(state, spec, *, batch: int, heads: int, width: int, dv: int, device, what: str = "initial_state"):
    """InputError unless ``state`` is a State of this spec with these sizes, on this device."""
    if not isinstance(state, State):
        raise InputError(f"{what}: expected an attngen State (from return_state=True, op.init_state or "
                         f"op.step), found {type(state).__name__}")
    if state.spec_hash != spec.hash:
        raise InputError(f"{what}: the state belongs to another spec (hash {state.spec_hash}, this op's spec "
                         f"{spec.name} has {spec.hash})")
    want = (batch, heads, width, dv)
    if tuple(state.S.shape) != want:
        raise InputError(f"{what}: S has shape {list(state.S.shape)}, expected {list(want)} "
                         f"([B, H, F, Dv] for batch {batch}, {heads} heads, feature width {width}, Dv {dv})")
    normalised = spec.normalize.kind != "none"
    if normalised and (state.z is None or tuple(state.z.shape) != want[:3]):
        raise InputError(f"{what}: the normaliser z must have shape {list(want[:3])} for a row-sum spec, "
                         f"found {None if state.z is None else list(state.z.shape)}")
    if tuple(state.pos.shape) != (batch,) or state.pos.dtype != torch.int64:
        raise InputError(f"{what}: pos must be an int64 tensor of shape [{batch}], found "
                         f"{state.pos.dtype} {list(state.pos.shape)}")
    if state.S.dtype not in (torch.float32, torch.float64):
        raise InputError(f"{what}: S has dtype {state.S.dtype}, expected float32 (or float64)")
    for name, t in (("S", state.S), ("z", state.z), ("pos", state.pos)):
        if t is not None and t.device != device:
            raise InputError(f"{what}: {name} is on {t.device}, the inputs on {device}")
