"""The one validator of what a caller passes to an attention op: q, k, v, a parameter tensor, cu_seqlens and
the tensors of a recurrent state. The torch op (attngen.op), the naive reference and the generated modules'
shared Triton host all call it, so they accept and refuse the same inputs with the same messages.

What differs between backends is declared, not coded: a ``Limits`` record (the dtypes a backend takes, its
largest head dim, the largest head dim of a tensor-power feature map) that the checks read.

This module and attngen.runtime.triton.host import nothing from attngen but attngen.errors, and import it
relatively: ``attngen build --standalone`` copies the three files beside the generated modules, which then run
without attngen installed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

LAYOUTS = ("bhtd", "bthd")


@dataclass(frozen=True)
class Limits:
    """What a backend accepts. max_head_dim None: no limit; max_power_dim: the largest head dim of a module
    whose linear kernels hold tensor-power features (None: no such features, or no limit)."""
    backend: str
    dtypes: tuple
    max_head_dim: int | None = None
    max_power_dim: int | None = None


TORCH = Limits("torch", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
TRITON = Limits("triton", (torch.float16, torch.bfloat16, torch.float32), max_head_dim=256)


def bhtd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A [B, H, T, D] view of ``x`` stored in ``layout`` (no copy)."""
    return x.transpose(1, 2) if layout == "bthd" else x


def qkv(q, k, v, layout: str, *, name: str, causal: bool, limits: Limits = TORCH) -> tuple:
    """q, k, v validated, as [B, H, T, D] views (no copies). InputError for what no ordering accepts."""
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: expected 'bhtd' ([B,H,T,D]) or 'bthd' ([B,T,H,D])")
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{label}: expected a torch.Tensor, found {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{label}: expected 4 dimensions ({layout}), found shape {tuple(t.shape)}")
        if t.dtype not in limits.dtypes:
            raise InputError(f"{label}: the {limits.backend} backend takes "
                             f"{', '.join(str(d).replace('torch.', '') for d in limits.dtypes)}; found {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    qh, kh, vh = (bhtd(t, layout) for t in (q, k, v))
    (b, h, t, dk), (bk, hk, s, dk2), (bv, hv, sv, dv) = qh.shape, kh.shape, vh.shape
    if not b == bk == bv:
        raise InputError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(layout {layout})")
    if hk != hv or hk < 1 or h % hk:
        raise InputError(f"heads: q has H = {h}, k {hk}, v {hv} (layout {layout}); expected k and v with the same "
                         f"number of heads H_kv dividing H (grouped-query attention: query head h reads kv head "
                         f"h // (H / H_kv)); found q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if dk != dk2:
        raise InputError(f"q and k head dims differ: {dk} vs {dk2}")
    if s != sv:
        raise InputError(f"k and v lengths differ: {s} vs {sv}")
    if t < 1 or s < 1:
        raise InputError(f"empty sequence: query length {t}, key length {s}")
    if min(dk, dv) < 1 or (limits.max_head_dim is not None and max(dk, dv) > limits.max_head_dim):
        top = f"1..{limits.max_head_dim}" if limits.max_head_dim is not None else ">= 1"
        raise InputError(f"head dims: the {limits.backend} backend takes Dk, Dv in {top}; found Dk={dk}, Dv={dv}")
    if limits.max_power_dim is not None and dk > limits.max_power_dim:
        raise InputError(f"{name}: its tensor-power features (width Dk**2) are generated for head dims up to "
                         f"{limits.max_power_dim}; found Dk={dk}; use plan='quadratic' or backend='torch' for "
                         "larger heads")
    if causal and t != s:
        raise InputError(f"{name} is causal, so the query length must equal the key length (found {t} and {s}); "
                         "load it with causal=False for cross attention")
    return qh, kh, vh


def gate(name: str, value, *, per_dim: bool, shape: tuple, layout: str, like: torch.Tensor, spec: str) -> torch.Tensor:
    """A gate tensor (log-space values, g <= 0) as a [B, H, T] or [B, H, T, Dk] view of the one stored in ``layout``
    ([B, T, H] / [B, T, H, Dk] for "bthd"); ``shape`` is (B, H, T, Dk) of q in [B, H, T, D]."""
    b, h, t, dk = shape
    want = (b, h, t) if layout == "bhtd" else (b, t, h)
    want += (dk,) if per_dim else ()
    what = ("[B, H, T, Dk]" if layout == "bhtd" else "[B, T, H, Dk]") if per_dim else \
        ("[B, H, T]" if layout == "bhtd" else "[B, T, H]")
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{spec}: gate {name!r}: expected a tensor {what} = {list(want)}, found "
                         f"{type(value).__name__}")
    if tuple(value.shape) != want:
        raise InputError(f"{spec}: gate {name!r}: expected shape {what} = {list(want)} (layout {layout}), found "
                         f"{list(value.shape)}")
    if not value.is_floating_point():
        raise InputError(f"{spec}: gate {name!r}: expected floating-point log gates, found {value.dtype}")
    if value.device != like.device:
        raise InputError(f"{spec}: gate {name!r} is on {value.device}, the inputs on {like.device}. Fix: move it "
                         f"with .to({str(like.device)!r})")
    bad = value.detach()
    bad = ((bad > 0) | ~torch.isfinite(bad)).any()
    expected = ("expected log-space gates g <= 0 (a decay factor exp(g) in (0, 1]), e.g. "
                "torch.nn.functional.logsigmoid(x)")
    if torch.compiler.is_compiling():  # a graph has no data-dependent branch: the check is an assertion in it
        torch._assert_async(~bad, f"{spec}: gate {name!r} holds values > 0 or not finite; {expected}")
    elif bool(bad):
        raise InputError(f"{spec}: gate {name!r} holds values > 0 or not finite (largest "
                         f"{float(value.detach().max()):.4g}); {expected}")
    return value.transpose(1, 2) if layout == "bthd" else value


def parameter(name: str, value, *, per_head: bool, heads: int, like: torch.Tensor, spec: str,
              shape: tuple | None = None) -> torch.Tensor:
    """A parameter's value as a tensor of shape [H] (per head) or [] (scalar), or ``shape`` when given (a vector
    or matrix parameter), on ``like``'s device."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{spec}: parameter {name!r}: expected a tensor or a number, found "
                             f"{type(value).__name__}") from None
    want = tuple(shape) if shape is not None else (heads,) if per_head else ()
    if tuple(value.shape) != want:
        raise InputError(f"{spec}: parameter {name!r}: expected shape {list(want)}, found {list(value.shape)}")
    if value.device != like.device:
        raise InputError(f"{spec}: parameter {name!r} is on {value.device}, the inputs on {like.device}. Fix: "
                         f"move it with .to({str(like.device)!r})")
    if not value.is_floating_point():
        value = value.to(like.dtype)
    return value


def positions(end, *, max_length: int | None, spec: str, what: str) -> None:
    """InputError when positions 0 .. end - 1 pass the spec's max_length (None: no limit). ``end``: an int, or
    a tensor of per-sequence ends (its largest is read: one device sync, for specs that declare a limit)."""
    if max_length is None:
        return
    # a length stays a SymInt under torch.compile (int() would specialise the graph on it); the comparison guards
    last = int(end.max()) if isinstance(end, torch.Tensor) else end if isinstance(end, torch.SymInt) else int(end)
    if last > max_length:
        raise InputError(f"{what}: positions up to {last - 1}, but spec {spec!r} declares max_length {max_length} "
                         f"(positions 0 .. {max_length - 1}); past it its position terms leave the range they "
                         "are defined on (cosFormer's cos(pi/2 (i - j) / M) turns negative and the row sum can "
                         "reach zero). Fix: load the spec with a larger limit (load_spec(name, M=...) when "
                         "max_length is the constant M)")


def cu_seqlens(cu, *, batch: int, length: int, device) -> torch.Tensor:
    """Packed sequence boundaries (B = 1, sequences along T) as int64 [N + 1] on ``device``: sequence n holds
    tokens [cu[n], cu[n + 1])."""
    fix = "Fix: cu_seqlens = [0, len_0, len_0 + len_1, ..., T] (an int32/int64 tensor on the inputs' device), B = 1"
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        found = f"{cu.dtype} of shape {list(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise InputError(f"cu_seqlens: expected a 1-D int32/int64 tensor [N + 1], found {found}. {fix}")
    if batch != 1:
        raise InputError(f"cu_seqlens: packed sequences need batch size 1 (the sequences lie along T); found "
                         f"batch {batch}. {fix}")
    if cu.device != torch.device(device):
        raise InputError(f"cu_seqlens: on {cu.device}, the inputs on {device}. {fix}")
    bounds = [int(x) for x in cu.tolist()]
    if len(bounds) < 2:
        raise InputError(f"cu_seqlens: expected at least 2 entries (N + 1 for N sequences), found {bounds}. {fix}")
    if bounds[0] != 0:
        raise InputError(f"cu_seqlens: must start at 0, found {bounds[0]} (in {_short(bounds)}). {fix}")
    bad = next((n for n in range(1, len(bounds)) if bounds[n] <= bounds[n - 1]), None)
    if bad is not None:
        raise InputError(f"cu_seqlens: must be strictly increasing (every sequence holds >= 1 token), found "
                         f"{bounds[bad - 1]} then {bounds[bad]} at entries {bad - 1}, {bad} (in {_short(bounds)}). "
                         f"{fix}")
    if bounds[-1] != length:
        raise InputError(f"cu_seqlens: must end at T = {length} (the packed length), found {bounds[-1]} "
                         f"(in {_short(bounds)}). {fix}")
    return cu.to(torch.int64).contiguous()


def state_tensors(S, z, pos, *, batch: int, heads: int, width: int, dv: int, device, normalised: bool, spec: str,
                  dtype=None, what: str = "initial_state") -> None:
    """InputError unless S [N, H, F, Dv], z [N, H, F] (row-sum specs; else None) and pos [N] int64 >= 0 are a
    state for these sizes on ``device``, S and z float32 or float64 (and of ``dtype`` when given: the dtype
    states accumulate in for the inputs)."""
    want = (batch, heads, width, dv)
    if not isinstance(S, torch.Tensor) or S.dtype not in (torch.float32, torch.float64):
        found = f"{S.dtype} {list(S.shape)}" if isinstance(S, torch.Tensor) else type(S).__name__
        raise InputError(f"{what}: S must be a float32 (or float64) tensor [N, H, F, Dv] = {list(want)}, found "
                         f"{found}")
    if tuple(S.shape) != want:
        raise InputError(f"{what}: S must be a tensor [N, H, F, Dv]: found shape {list(S.shape)}; expected "
                         f"{list(want)} (batch {batch}, {heads} heads, feature width {width}, Dv {dv}). Fix: the "
                         "state's batch must be the inputs' batch (the number of sequences with cu_seqlens); "
                         "select or cat states to match (attngen.runtime.state.cat, State.select)")
    if normalised:
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != want[:3] or z.dtype != S.dtype:
            found = f"{z.dtype} {list(z.shape)}" if isinstance(z, torch.Tensor) else repr(z)
            raise InputError(f"{what}: {spec} normalises by row sums, so z must be a {S.dtype} tensor [N, H, F] = "
                             f"{list(want[:3])}, found {found}")
    elif z is not None:
        raise InputError(f"{what}: {spec} has no row-sum normaliser, so z must be None")
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64 or tuple(pos.shape) != (batch,):
        found = f"{pos.dtype} {list(pos.shape)}" if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise InputError(f"{what}: pos must be an int64 tensor [{batch}] (tokens consumed per sequence), found "
                         f"{found}")
    if dtype is not None and S.dtype != dtype:
        raise InputError(f"{what}: the state has dtype {S.dtype}; expected {dtype}, the dtype states accumulate in "
                         "for these inputs (float64 for float64 tensors, float32 otherwise). Fix: "
                         f"op.init_state(..., dtype={dtype}) or pass inputs of the state's precision")
    for label, t in (("S", S), ("z", z), ("pos", pos)):
        if t is not None and t.device != torch.device(device):
            raise InputError(f"{what}: the state's {label} is on {t.device}; expected {device}, the inputs' device. "
                             "Fix: create the state on that device (op.init_state(..., device=...))")
    if bool((pos < 0).any()):
        raise InputError(f"{what}: pos must be >= 0 (tokens consumed), found {pos.tolist()}")


def _short(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:10]))}, ..., {values[-1]}]"


def power_dim(dk: int, *, name: str, max_power_dim: int | None) -> None:
    """InputError when linear kernels with tensor-power features (width Dk**2, generated for head dims up to
    ``max_power_dim``; None: no such features) would run at head dim ``dk``: the check qkv makes from
    Limits.max_power_dim, for a caller that knows only after qkv whether those kernels run."""
    if max_power_dim is not None and dk > max_power_dim:
        raise InputError(f"{name}: its tensor-power features (width Dk**2) are generated for head dims up to "
                         f"{max_power_dim}; found Dk={dk}; use plan='quadratic' or backend='torch' for "
                         "larger heads")


def state_parts(state, *, what: str = "initial_state") -> tuple:
    """(S, z, pos) of a state given as that tuple (or list), or as an object with the attributes S, z, pos
    (attngen's State); InputError for anything else. state_tensors checks the three."""
    if all(hasattr(state, a) for a in ("S", "z", "pos")):
        return state.S, state.z, state.pos
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise InputError(f"{what}: expected a tuple (S, z, pos) (or a State), found {type(state).__name__}")
    return tuple(state)


def kv_blocks(blocks, block, *, batch: int, heads: int, length: int, key_length: int, device,
              max_block: int) -> torch.Tensor:
    """A block-sparse table validated: ``blocks`` int32/int64 [B, H, NQB, MAXK] (NQB = ceil(T / block)) lists
    for each block of ``block`` query rows the key blocks (0 .. ceil(S / block) - 1, none twice, -1 padding)
    it attends to; ``block`` a power of two in 16 .. max_block. Returned as int32 contiguous (MAXK >= 1)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block > max_block or block & (block - 1):
        raise InputError(f"block={block!r}: expected a power of two in 16..{max_block} (the tile of query rows "
                         "and keys)")
    nqb, nkb = -(-length // block), -(-key_length // block)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype not in (torch.int32, torch.int64):
        found = blocks.dtype if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise InputError(f"kv_blocks: expected an int32/int64 tensor [B, H, NQB, MAXK], found {found}")
    if blocks.dim() != 4 or tuple(blocks.shape[:3]) != (batch, heads, nqb):
        raise InputError(f"kv_blocks: expected shape [B, H, NQB, MAXK] = [{batch}, {heads}, {nqb}, MAXK] (NQB = "
                         f"ceil(T / block) = ceil({length} / {block})), found {list(blocks.shape)}")
    if blocks.device != torch.device(device):
        raise InputError(f"kv_blocks is on {blocks.device}, the inputs on {device}")
    if blocks.numel() and bool(((blocks < -1) | (blocks >= nkb)).any()):
        raise InputError(f"kv_blocks: key-block indices must lie in 0..{nkb - 1} (ceil(S / block) = "
                         f"ceil({key_length} / {block}) blocks), or be -1 for padding")
    ordered = blocks.sort(-1).values
    if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
        raise InputError("kv_blocks: a key block is listed twice for one query block (it would count twice)")
    if blocks.shape[-1] == 0:
        blocks = torch.full((batch, heads, nqb, 1), -1, dtype=torch.int32, device=device)
    return blocks.to(torch.int32).contiguous()
