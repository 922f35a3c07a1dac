"""Context parallelism for separable attention: a sequence sharded over the ranks of a process group, one exchange of
constant-size states per call (LASP-2's scheme, Sun et al. 2025; docs/context_parallel.md).

    o_shard = cp_attention(op, q_shard, k_shard, v_shard, group=None, cu_seqlens=None, **params)

Rank r of the group holds the contiguous shard r of the sequence (positions offset_r .. offset_r + T_r - 1 with
offset_r the sum of the earlier ranks' T; equal shards in the usual case) and gets the op's output on its shard.

Causal specs with a recurrent state (plan.capabilities.decodable) run through the op itself:
 1. the shard's local state S_r (and z_r) from a zero state at position offset_r (the op with ``return_state=True``;
    on the torch backend the middle ranks form the state alone, K'^T diag(w) [V | 1]) and, from the gates and the
    decay, the shard's log decay L_r (one number per state row: log gamma * T_r, the sum of the shard's log gates);
 2. one all-gather of (S_r | z_r, L_r) over the group; rank r forms the state entering its shard,
    P_r = sum_{s<r} exp(L_{s+1} + ... + L_{r-1}) S_s, by Horner's rule (P_{s+1} = exp(L_s) P_s + S_s: every exponent
    <= 0, so no power of gamma above 1 and no cancelling cumulative sum), and runs the op on its shard again with
    ``initial_state`` = (P_r, positions from offset_r).
Rank 0's prefix is zero (its first pass is its output) and no rank reads the last rank's state (it runs only the
second pass). Bidirectional separable specs (no decay, or gamma**|i-j|) run on the torch backend's pieces: the
feature maps at the absolute positions (the lengths n_q, n_k the whole sequence's), the local K'^T [V | 1], and the
total over the ranks (an all-reduce without a decay; with one, the prefix from the left and the suffix from the
right, each by Horner's rule, into the two scans of the two-sided decay).

Gradients flow through the exchange (torch.distributed.nn.functional: the all-gather's backward is a
reduce-scatter of the state gradients, all-to-all plus a sum on gloo; the all-reduce's an all-reduce), to q, k, v,
the gates and the parameters of every rank. Packed sequences (``cu_seqlens`` of the whole sequence, the same on every
rank, B = 1) reset the carried state at each sequence start. Specs without a linear form (softmax, general
similarities) and states that depend on the final length (causal cosFormer with M = max(n_q, n_k)) are refused
with an InputError naming the reason (a quadratic spec's exchange would be its keys and values: ring attention,
which this module does not implement).

``count_traffic()`` records the bytes each rank hands to the collectives (forward and backward).
"""
from __future__ import annotations

import bisect
import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from attngen.errors import AttngenError, InputError
from attngen.ir import ReweightClass
from attngen.op import AttentionOp, TermsOp, _feature_width, _state_heads, resolve_backend
from attngen.runtime.inputs import check_gates, check_params, check_qkv
from attngen.runtime.state import State
from attngen.runtime.torch.backend import CHUNK
from attngen.runtime.torch.common import (
    compute_dtype,
    feature_maps,
    finish,
    grouped,
    log_decay,
    rotate,
    symbol_env,
    token_decay,
    with_ones,
)
from attngen.runtime.torch.linear import causal_chunked

__all__ = ["cp_attention", "count_traffic", "Traffic", "Collective"]


# ---------------------------------------------------------------------------------------------------------- traffic
@dataclass(frozen=True)
class Collective:
    """One collective call as one rank saw it: ``kind`` ("all_gather", "all_reduce", their backward
    "reduce_scatter" / "all_reduce_grad", or "meta": the shapes checked before the exchange), ``nbytes`` the tensor
    this rank handed to it, ``world`` the group's size."""
    kind: str
    nbytes: int
    world: int

    @property
    def sent(self) -> int:
        """Bytes this rank sends in the bandwidth-optimal (ring) algorithm of the collective: (P - 1) * n for an
        all-gather or reduce-scatter of n bytes per rank, 2 (P - 1) / P * n for an all-reduce of n bytes."""
        if self.kind.startswith("all_reduce"):
            return 2 * (self.world - 1) * self.nbytes // self.world
        return (self.world - 1) * self.nbytes


@dataclass
class Traffic:
    """What ``count_traffic()`` recorded: one Collective per call, in order."""
    calls: list = field(default_factory=list)

    def sent(self, kinds=None) -> int:
        """Bytes sent by this rank over the recorded calls (of ``kinds`` only, when given)."""
        return sum(c.sent for c in self.calls if kinds is None or c.kind in kinds)

    def handed(self, kinds=None) -> int:
        """Bytes this rank handed to the collectives (the payloads; of ``kinds`` only, when given)."""
        return sum(c.nbytes for c in self.calls if kinds is None or c.kind in kinds)


_COUNTERS: list = []  # the Traffic records of the count_traffic() blocks now open


@contextlib.contextmanager
def count_traffic():
    """``with count_traffic() as t: ...``: every collective cp_attention calls inside the block (and the backward's,
    when the backward runs inside it) is appended to ``t.calls``."""
    record = Traffic()
    _COUNTERS.append(record)
    try:
        yield record
    finally:
        _COUNTERS.remove(record)


def _note(kind: str, nbytes: int, world: int) -> None:
    for record in _COUNTERS:
        record.calls.append(Collective(kind, nbytes, world))


class _Counted(torch.autograd.Function):
    """The identity; records the bytes of the tensor entering a collective (forward) and of its gradient leaving
    the collective's backward."""

    @staticmethod
    def forward(ctx, x, kind: str, back: str, world: int):
        ctx.back, ctx.world = back, world
        _note(kind, x.numel() * x.element_size(), world)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _note(ctx.back, grad.numel() * grad.element_size(), ctx.world)
        return grad, None, None, None


class _Tie(torch.autograd.Function):
    """Returns ``x`` unchanged, with ``others`` in its graph (their gradient: zeros): every rank's backward then
    reaches the collective's backward, which every rank of the group must enter (a rank whose output reads none of
    the exchanged states, rank 0 of a causal call, would otherwise skip it and leave the others waiting)."""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.shapes = [(o.shape, o.dtype, o.device) for o in others]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes))


def _entering(x: torch.Tensor, grad: bool) -> torch.Tensor:
    """``x`` in the autograd graph whenever the call needs gradients, even where this rank's payload needs none (k and
    v frozen, the last rank's unused state): every rank must record the collective to enter its backward."""
    return x.detach().requires_grad_() if grad and not x.requires_grad else x


def _all_gather(x: torch.Tensor, group, world: int, grad: bool) -> list:
    """The tensors of every rank (rank order), differentiable: the backward sums each rank's gradient back to it."""
    x = _Counted.apply(_entering(x.contiguous(), grad), "all_gather", "reduce_scatter", world)
    with warnings.catch_warnings():  # torch 2.13 points at the private _functional_collectives, whose backward (a
        # reduce_scatter_tensor) gloo does not run; this one's backward is an all-to-all plus a sum on gloo
        warnings.simplefilter("ignore", FutureWarning)
        return list(dist_fn.all_gather(x, group=group or dist.group.WORLD))


def _all_reduce(x: torch.Tensor, group, world: int, grad: bool) -> torch.Tensor:
    """The sum over the ranks, differentiable (the backward all-reduces the gradients)."""
    x = _Counted.apply(_entering(x.contiguous(), grad), "all_reduce", "all_reduce_grad", world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_reduce(x, group=group or dist.group.WORLD)


# ------------------------------------------------------------------------------------------------------ the shards
@dataclass(frozen=True)
class _Shard:
    """Where this rank's shard lies: ``offset`` its first position in the whole sequence, ``lengths`` every rank's
    T, and with packed sequences the pieces of the shard (local bounds), the sequence of each rank's first and last
    token, and the position (within its sequence) of this shard's first token."""
    rank: int
    world: int
    lengths: tuple
    bounds: tuple | None = None  # local [0, ..., T] with cu_seqlens, else None
    first_seq: tuple = ()  # per rank: the sequence of its first token (cu_seqlens)
    last_seq: tuple = ()  # per rank: the sequence of its last token
    start: int = 0  # position of the first token within its sequence
    seq_lengths: tuple = ()  # per local piece: its whole sequence's length

    @property
    def offset(self) -> int:
        return sum(self.lengths[:self.rank])

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def joins(self, r: int) -> bool:
        """Whether rank r's first token continues the sequence of rank r - 1's last token."""
        return self.bounds is None or self.first_seq[r] == self.last_seq[r - 1]

    def through(self, r: int) -> bool:
        """Whether one sequence runs through the whole of rank r's shard (a carried state crosses it)."""
        return self.bounds is None or self.first_seq[r] == self.last_seq[r]


def _shard(rank: int, world: int, lengths: list, cu: list | None) -> _Shard:
    if cu is None:
        return _Shard(rank, world, tuple(lengths))
    offsets = [sum(lengths[:r]) for r in range(world + 1)]

    def seq(p: int) -> int:
        return bisect.bisect_right(cu, p) - 1

    a, b = offsets[rank], offsets[rank + 1]
    bounds = [0] + [c - a for c in cu if a < c < b] + [b - a]
    first = tuple(seq(offsets[r]) for r in range(world))
    last = tuple(seq(offsets[r + 1] - 1) for r in range(world))
    pieces = [seq(a + x) for x in bounds[:-1]]
    return _Shard(rank, world, tuple(lengths), tuple(bounds), first, last, a - cu[first[rank]],
                  tuple(cu[n + 1] - cu[n] for n in pieces))


def _carried(states: list, logd: list | None, shard: _Shard, order: list):
    """The state entering the shard of ``order[-1]`` from the ranks before it in ``order`` (rank order for the
    prefix, reversed for the suffix), by Horner's rule with every decay factor exp(L) <= 1; None when nothing is
    carried (the first rank, or a sequence starting at the shard's edge)."""
    acc = None
    for s, nxt in zip(order[:-1], order[1:]):
        joins = shard.bounds is None or (
            shard.first_seq[nxt] == shard.last_seq[s] if nxt > s else shard.last_seq[nxt] == shard.first_seq[s])
        if acc is not None and shard.through(s) and logd is not None:
            acc = states[s] + torch.exp(logd[s]).unsqueeze(-1) * acc
        elif acc is not None and shard.through(s):
            acc = states[s] + acc
        else:
            acc = states[s]
        if not joins:
            acc = None
    return acc


# ----------------------------------------------------------------------------------------------------- the entry
def cp_attention(op, q, k, v, *, group=None, cu_seqlens=None, **params):
    """This rank's shard of the op's output over a sequence sharded along T across ``group`` (default: the world).

    ``op``: an AttentionOp (``attngen.compile(spec)``) of a separable spec: causal with a recurrent state (any
    backend; the op runs twice on the shard), or bidirectional with no decay or a two-sided one (torch ops on the
    inputs' device). q, k, v: this rank's shard in the op's layout, the same B, heads and head dims on every rank;
    rank r holds the positions after those of ranks 0 .. r - 1 (shards may differ in length, each >= 1 token).
    ``params``: the spec's parameters and gates (each rank passes its shard of a gate, the same parameters).
    ``cu_seqlens``: the packed boundaries of the whole sequence (B = 1), the same tensor on every rank; a sequence may
    span ranks. Every rank must call with the same op and the same kinds of arguments (the collectives pair up).

    Raises InputError (on every rank, before the exchange) for a spec without a linear form or with length-dependent
    state, mismatched shapes across ranks, and anything the op itself refuses."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError("cp_attention: torch.distributed is not initialised; expected a process group "
                         "(torch.distributed.init_process_group('gloo' or 'nccl', ...)) with one rank per shard")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    error, prepared = None, None
    try:
        prepared = _prepare(op, q, k, v, cu_seqlens, params)
    except AttngenError as e:
        error = e
    meta = _meta(prepared, error, cu_seqlens, q.device if isinstance(q, torch.Tensor) else "cpu")
    metas = [torch.empty_like(meta) for _ in range(world)]
    _note("meta", meta.numel() * meta.element_size(), world)
    dist.all_gather(metas, meta, group=group)
    if error is not None:
        raise error
    metas = [m.tolist() for m in metas]
    bad = [r for r, m in enumerate(metas) if m[0] == 0]
    if bad:
        raise InputError(f"cp_attention: rank(s) {bad} refused their inputs (their InputError says why); every rank "
                         "of the group stops")
    for name, i in (("batch", 2), ("query heads", 3), ("kv heads", 4), ("head dim of q and k", 5),
                    ("head dim of v", 6), ("number of packed sequences", 7), ("sum of cu_seqlens", 8)):
        values = [m[i] for m in metas]
        if len(set(values)) != 1:
            raise InputError(f"cp_attention: the {name} differs across the ranks ({values}); expected the same on "
                             "every rank: each rank passes its shard of the same sequence(s), sharded along T only")
    lengths = [m[1] for m in metas]
    cu = None
    if cu_seqlens is not None:
        cu = [int(x) for x in cu_seqlens.tolist()]
        if cu[-1] != sum(lengths):
            raise InputError(f"cp_attention: cu_seqlens ends at {cu[-1]}, expected the whole sequence's length "
                             f"{sum(lengths)} (the shards' lengths {lengths} added): pass the boundaries of the whole "
                             "packed sequence on every rank")
    shard = _shard(rank, world, lengths, cu)
    if prepared["causal"] and world == 1:  # the whole sequence on one rank: the op itself
        return op(q, k, v, cu_seqlens=cu_seqlens, **params)
    if prepared["causal"]:
        return _causal(op, prepared, shard, group, params)
    return _bidirectional(op, prepared, shard, group, params)


def _prepare(op, q, k, v, cu_seqlens, params: dict) -> dict:
    """The checks one rank can make alone; the call's views and plan."""
    if isinstance(op, TermsOp):
        raise InputError(f"cp_attention: {op.spec.name} is a sum of terms, each with its own state; context "
                         "parallelism takes an op of one term (attngen.compile of a spec without terms)")
    if not isinstance(op, AttentionOp):
        raise InputError(f"cp_attention: expected an AttentionOp (attngen.compile(spec)), found {type(op).__name__}")
    spec = op.spec
    if spec.approximation is not None:
        raise InputError(f"cp_attention: {spec.name} declares approx ({spec.approx}); the exchange of states is "
                         "exact only for exact separable attention")
    qh, kh, vh = check_qkv(spec, q, k, v, op.layout)
    if qh.shape[2] != kh.shape[2]:
        raise InputError(f"cp_attention: q has {qh.shape[2]} positions and k {kh.shape[2]} on this rank; expected "
                         "self-attention shards (the same positions of q, k and v on each rank)")
    gates = check_gates(spec, {n: params[n] for n in spec.gate_names if n in params}, op.layout, qh)
    values = check_params(spec, {n: x for n, x in params.items() if n not in spec.gate_names}, qh.shape[1], qh,
                          head_dim=qh.shape[3])
    dk = qh.shape[3]
    if spec.causal:
        plan = op._plan_for(resolve_backend(op.backend, qh.device), dk)
        if not plan.capabilities.decodable:
            raise InputError(f"cp_attention: {spec.name} ({spec.mode}) has no recurrent state to exchange: "
                             f"{plan.capabilities.decode_reason}. Context parallelism needs a separable spec; a "
                             "quadratic one would pass its keys and values around a ring instead")
    else:
        plan = op._plan_for("torch", dk)
        if not plan.linear_terms or plan.reweight.kind not in (ReweightClass.NONE, ReweightClass.SEPARABLE,
                                                                ReweightClass.DECAY):
            raise InputError(f"cp_attention: {spec.name} ({spec.mode}) has no linear (separable) form, so no "
                             "constant-size state to exchange (its context-parallel form would pass the keys and "
                             "values around a ring). Expected a separable spec (docs/context_parallel.md)")
        if plan.prologue is not None:  # pragma: no cover - the torch target forms features itself
            raise InputError(f"cp_attention: {spec.name}: a feature prologue in a torch plan")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point \
                or cu_seqlens.numel() < 2:
            raise InputError("cp_attention: cu_seqlens: expected a 1-D integer tensor [N + 1] of the whole packed "
                             f"sequence's boundaries, found {cu_seqlens!r:.80}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or any(b <= a for a, b in zip(cu[:-1], cu[1:])):
            raise InputError(f"cp_attention: cu_seqlens {cu[:8]}...: expected 0 = cu[0] < cu[1] < ... < cu[N] = T")
        if qh.shape[0] != 1:
            raise InputError(f"cp_attention: cu_seqlens packs sequences along T with B = 1; found B = {qh.shape[0]}")
    # whether this call records a backward: the same on every rank when every rank passes the same kinds of arguments
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad
                                           for x in (q, k, v, *params.values()))
    return {"causal": spec.causal, "plan": plan, "grad": grad, "backend": resolve_backend(op.backend, qh.device),
            "qh": qh, "kh": kh, "vh": vh, "gates": gates, "values": values}


def _meta(prepared, error, cu_seqlens, device) -> torch.Tensor:
    """[ok, T, B, H, H_kv, Dk, Dv, N, sum(cu)] of this rank (zeros after an error): checked across the ranks."""
    if error is not None or prepared is None:
        return torch.zeros(9, dtype=torch.int64, device=device)
    qh, kh, vh = prepared["qh"], prepared["kh"], prepared["vh"]
    n = 0 if cu_seqlens is None else cu_seqlens.numel() - 1
    total = 0 if cu_seqlens is None else int(cu_seqlens.sum())
    return torch.tensor([1, qh.shape[2], qh.shape[0], qh.shape[1], kh.shape[1], qh.shape[3], vh.shape[3], n, total],
                        dtype=torch.int64, device=qh.device)


def _local_cu(shard: _Shard, device):
    return None if shard.bounds is None else torch.tensor(shard.bounds, dtype=torch.int64, device=device)


def _log_decay_of_shard(op, p: dict, heads: int) -> torch.Tensor | None:
    """L_r [B, H_state, F]: the log of the factor by which the shard decays a state entering it (a constant decay's
    T_r log gamma plus the shard's sum of log gates), <= 0; None without a decay or a gate."""
    plan, qh = p["plan"], p["qh"]
    gate = p["gates"].get(op.spec.gate.name) if op.spec.gate is not None else None
    if plan.reweight.decay is None and gate is None:
        return None
    dtype = compute_dtype(qh.dtype)
    b, h, t, d = qh.shape
    env = symbol_env(plan, t, t, h, d, p["values"], dtype, qh.device)
    lg = log_decay(plan, env, h, qh.to(dtype)) if plan.reweight.decay is not None else None
    width = _feature_width(plan, d)
    tokens = token_decay(plan, gate, lg, qh.to(dtype))
    if tokens is None:  # a constant decay: [1, H, 1, 1] per token
        total = (lg * t).reshape(1, h, 1).expand(1, h, width)
    elif tokens.dim() == 3:  # per head: [B, H, T]
        total = tokens.sum(2)[..., None].expand(b, h, width)
    else:  # per feature column: [B, H, T, F]
        total = tokens.sum(2)
    groups = h // heads
    return total[:, ::groups] if groups > 1 else total


def _causal(op, p: dict, shard: _Shard, group, params: dict):
    """The shard's local state (rank 0: the op from a zero state with return_state, which is also its output; the
    middle ranks: the state alone on the torch backend, the op with return_state on the triton backend; the last
    rank: none), the exchange, then the op from the state carried into the shard."""
    plan, qh, kh, vh = p["plan"], p["qh"], p["kh"], p["vh"]
    dtype = compute_dtype(qh.dtype)
    heads = _state_heads(plan, qh, kh)
    width, dv = _feature_width(plan, qh.shape[3]), vh.shape[3]
    rowsum = plan.normalize.kind != "none"
    local_cu = _local_cu(shard, qh.device)
    batch = qh.shape[0] if shard.bounds is None else len(shard.bounds) - 1
    pos = torch.zeros(batch, dtype=torch.int64, device=qh.device)  # each piece's first position in its sequence
    if shard.bounds is None:
        pos.fill_(shard.offset)
    else:
        pos[0] = shard.start

    def state(aug: torch.Tensor) -> State:
        return State(aug[..., :-1], aug[..., -1], pos, op.spec.hash) if rowsum else State(aug, None, pos, op.spec.hash)

    zero = torch.zeros(batch, heads, width, dv + rowsum, dtype=dtype, device=qh.device)
    last = shard.rank == shard.world - 1
    out = None
    fast = p["backend"] == "torch" and plan.prologue is None
    if not last and shard.rank > 0 and fast:  # the state alone: K'^T diag(w) [V | 1], no output
        local = _local_state(op, p, shard, heads)
    elif not last:  # the last rank's state is read by no one
        out, st = op(_layout(op, qh), _layout(op, kh), _layout(op, vh), initial_state=state(zero), return_state=True,
                     cu_seqlens=local_cu, **params)
        local = st.S[-1:] if shard.bounds is not None else st.S
        if rowsum:
            local = torch.cat([local, (st.z[-1:] if shard.bounds is not None else st.z)[..., None]], -1)
    else:
        local = zero[-1:] if shard.bounds is not None else zero
    logd = _log_decay_of_shard(op, p, heads)
    payload = [local.to(dtype).flatten()] + ([] if logd is None else [logd.to(dtype).flatten()])
    flat = torch.cat(payload)
    gathered = _all_gather(flat, group, shard.world, p["grad"])
    n_state = local.numel()
    states = [g[:n_state].view_as(local) for g in gathered]
    logds = None if logd is None else [g[n_state:].view_as(logd) for g in gathered]
    if shard.rank == 0:  # nothing enters the first shard: the first pass is the output
        return _Tie.apply(out, *gathered)
    prefix = _carried(states, logds, shard, list(range(shard.rank + 1)))
    if prefix is None and out is not None:  # a sequence starts at this shard's first token
        return _Tie.apply(out, *gathered)
    if prefix is None:
        start = zero
    else:
        start = torch.cat([prefix, zero[1:]]) if shard.bounds is not None else prefix
    out = op(_layout(op, qh), _layout(op, kh), _layout(op, vh), initial_state=state(start), cu_seqlens=local_cu,
             **params)
    return _Tie.apply(out, *gathered)


def _local_state(op, p: dict, shard: _Shard, heads: int) -> torch.Tensor:
    """The state [B, H_state, F, E] after the shard's last piece from a zero state, without its outputs (torch
    backend): sum_j w_j K'_j^T [V_j | 1] with K'_j at the absolute positions and w_j the decay from token j to the
    shard's end (gamma**(T-1-j), times exp of the gates after j: an exclusive suffix sum, every exponent <= 0)."""
    plan, qh, kh, vh, values = p["plan"], p["qh"], p["kh"], p["vh"], p["values"]
    spec = op.spec
    dtype = compute_dtype(qh.dtype)
    gate = p["gates"].get(spec.gate.name) if spec.gate is not None else None
    a = 0 if shard.bounds is None else shard.bounds[-2]
    first = shard.offset if shard.bounds is None else (shard.start if a == 0 else 0)
    b, h, t, d = qh.shape
    kh, vh = grouped(kh, vh, h)
    qp, kp, vp = (x[:, :, a:].to(dtype) for x in (qh, kh, vh))
    n = t - a
    if spec.rotary is not None:
        positions = first + torch.arange(n, device=qh.device)
        kp = rotate(kp, positions, spec.rotary.theta)
    env = symbol_env(plan, n, n, h, d, values, dtype, qh.device)
    blocks = [(term.feature, term.position) for term in plan.linear_terms]
    start = torch.full((b,), first, dtype=torch.int64, device=qh.device)
    _, kf = feature_maps(blocks, env, qp, kp, spec.where, start=start)
    lg = log_decay(plan, env, h, kf) if plan.reweight.decay is not None else None
    tokens = token_decay(plan, None if gate is None else gate[:, :, a:], lg, kf)
    if tokens is None and lg is not None:
        tokens = lg[..., 0].expand(b, h, n)
    if tokens is not None:  # w_j = exp(sum_{u > j} log decay_u): the exclusive suffix sum, no subtraction
        suffix = tokens.flip(2).cumsum(2).flip(2)
        after = torch.cat([suffix[:, :, 1:], torch.zeros_like(suffix[:, :, :1])], 2)
        w = torch.exp(after)
        kf = kf * (w[..., None] if w.dim() == 3 else w)
    state = kf.transpose(-1, -2) @ with_ones(vp, plan.normalize)
    groups = h // heads
    return state[:, ::groups] if groups > 1 else state


def _layout(op, x: torch.Tensor) -> torch.Tensor:
    """A [B, H, T, D] view back in the op's layout (what the op takes)."""
    return x.transpose(1, 2) if op.layout == "bthd" else x


def _bidirectional(op, p: dict, shard: _Shard, group, params: dict):
    """Feature maps at the absolute positions, the local K'^T [V | 1], the states of the other ranks added."""
    plan, qh, kh, vh, values = p["plan"], p["qh"], p["kh"], p["vh"], p["values"]
    spec = op.spec
    dtype = compute_dtype(qh.dtype)
    in_dtype = qh.dtype
    b, h, t, d = qh.shape
    kh, vh = grouped(kh, vh, h)
    qh, kh, vh = (x.to(dtype) for x in (qh, kh, vh))
    bounds = shard.bounds or (0, t)
    pieces = list(zip(bounds[:-1], bounds[1:]))
    # per piece: its positions' start within its sequence and its sequence's length (n_q = n_k)
    starts = [shard.start if n == 0 else 0 for n in range(len(pieces))] if shard.bounds else [shard.offset]
    lengths = list(shard.seq_lengths) if shard.bounds else [shard.total]
    blocks = [(term.feature, term.position) for term in plan.linear_terms]
    decay = plan.reweight.decay is not None
    feats, lgs = [], []
    for (a, z), s0, n in zip(pieces, starts, lengths):
        qp, kp = qh[:, :, a:z], kh[:, :, a:z]
        if spec.rotary is not None:
            positions = s0 + torch.arange(z - a, device=qh.device)
            qp, kp = rotate(qp, positions, spec.rotary.theta), rotate(kp, positions, spec.rotary.theta)
        env = symbol_env(plan, n, n, h, d, values, dtype, qh.device)
        start = torch.full((b,), s0, dtype=torch.int64, device=qh.device)
        qf, kf = feature_maps(blocks, env, qp, kp, spec.where, start=start)
        feats.append((qf, kf, with_ones(vh[:, :, a:z], plan.normalize)))
        lgs.append(log_decay(plan, env, h, qf) if decay else None)
    if not decay and shard.bounds is None:  # one total over every rank: an all-reduce
        qf, kf, vf = feats[0]
        total = _all_reduce(kf.transpose(-1, -2) @ vf, group, shard.world, p["grad"])
        return _layout(op, finish(qf @ total, plan.normalize).to(in_dtype))
    # the state of the last piece seen from the shard's end, and of the first piece seen from its start
    qf, kf, vf = feats[-1]
    right = kf if not decay else kf * torch.exp(lgs[-1] * torch.arange(kf.shape[2] - 1, -1, -1, device=kf.device,
                                                                         dtype=dtype)[:, None])
    qf, kf, vf0 = feats[0]
    left = kf if not decay else kf * torch.exp(lgs[0] * torch.arange(kf.shape[2], device=kf.device,
                                                                     dtype=dtype)[:, None])
    fwd_local = right.transpose(-1, -2) @ feats[-1][2]
    bwd_local = left.transpose(-1, -2) @ vf0
    payload = [fwd_local.flatten(), bwd_local.flatten()]
    logd = None
    if decay:
        logd = (lgs[0] * t).reshape(1, h, 1).expand(b, h, fwd_local.shape[2])
        payload.append(logd.flatten())
    gathered = _all_gather(torch.cat(payload), group, shard.world, p["grad"])
    n = fwd_local.numel()
    fwds = [g[:n].view_as(fwd_local) for g in gathered]
    bwds = [g[n:2 * n].view_as(bwd_local) for g in gathered]
    logds = None if logd is None else [g[2 * n:].view_as(logd) for g in gathered]
    prefix = _carried(fwds, logds, shard, list(range(shard.rank + 1)))
    suffix = _carried(bwds, logds, shard, list(range(shard.world - 1, shard.rank - 1, -1)))
    outs = []
    for idx, ((qf, kf, vf), lg) in enumerate(zip(feats, lgs)):
        into = prefix if idx == 0 else None
        back = suffix if idx == len(feats) - 1 else None
        if not decay:
            state = kf.transpose(-1, -2) @ vf
            state = state + (into if into is not None else 0) + (back if back is not None else 0)
            acc = qf @ state
        else:
            fwd = causal_chunked(qf, kf, vf, CHUNK, lg, initial=into)
            bwd = causal_chunked(qf.flip(2), kf.flip(2), vf.flip(2), CHUNK, lg, strict=True, initial=back).flip(2)
            acc = fwd + bwd
        outs.append(acc)
    out = finish(torch.cat(outs, 2), plan.normalize).to(in_dtype)
    return _layout(op, _Tie.apply(out, *gathered))
