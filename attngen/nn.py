"""attngen.nn: an attention layer (torch.nn.Module) around a compiled spec, in the shape of fla's layers.

    layer = attngen.nn.Attention("gla", embed_dim=512, num_heads=8)
    o = layer(x)                                      # x [B, T, E] -> o [B, T, E]
    o, state = layer(x, use_cache=True)               # prefill: the state after the last token
    o_t, state = layer(x_t, state=state, use_cache=True)   # one token [B, 1, E]: a decode step

The layer holds the q, k, v and output projections (k and v with ``num_kv_heads`` heads: grouped-query attention),
one projection per gate of the spec (log gates ``logsigmoid(W x + b) / gate_logit_normalizer``), and the spec's
parameters: learnable ones as nn.Parameters, ``learnable: false`` ones as buffers, initialised from their ``init``
at the layer's head count and head dim, passed to the op as keyword tensors on every call (the per-call ``scale``
keeps the op's default). ``attention_mask`` [B, T] (1 = token, 0 = padding, left or right) unpads the batch into
packed sequences (``cu_seqlens``) and pads the output back. Decoding keeps attngen's recurrent State for causal
specs with a linear form, and a KVCache (keys and values so far) for causal specs without one whose scores do not
depend on positions (softmax, rotary positions included); see docs/nn.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn import functional as F

from attngen.distributed import cp_attention
from attngen.errors import InputError
from attngen.frontend.expr import N_K, N_Q, I, J
from attngen.frontend.spec import Spec, load_spec
from attngen.op import LAYOUTS, AttentionOp
from attngen.op import compile as compile_op
from attngen.runtime.inputs import default_parameters
from attngen.runtime.torch.common import rotate

__all__ = ["Attention", "GateProjections", "KVCache", "SpecParameters"]

_POSITIONS = {I, J, N_Q, N_K}


class SpecParameters(nn.Module):
    """A spec's parameters as a module: learnable ones as nn.Parameters, ``learnable: false`` ones as buffers, under
    their own names (state_dict keys ``<prefix>.<name>``), initialised from their ``init`` at ``heads`` heads and head
    dim ``head_dim``; the per-call ``scale`` is left out (each call takes the op's default). ``values()`` is what the
    op takes as keyword tensors. Used by Attention and by attngen.hf.add_parameters."""

    def __init__(self, spec: Spec, heads: int, head_dim: int, *, dtype=None, device=None):
        super().__init__()
        values = default_parameters(spec, heads, dtype=dtype or torch.get_default_dtype(), device=device,
                                    head_dim=head_dim, names=[p.name for p in spec.parameters if not _is_scale(p)])
        self._names = tuple(values)
        for p in spec.parameters:
            if p.name not in values:
                continue
            try:
                if p.learnable:
                    self.register_parameter(p.name, nn.Parameter(values[p.name]))
                else:
                    self.register_buffer(p.name, values[p.name])
            except KeyError as exc:  # a name torch.nn.Module reserves ("training", "forward", ...)
                raise InputError(f"{spec.name}'s parameter {p.name!r} cannot be an attribute of an nn.Module ({exc}); "
                                 "expected a name Module does not use. Fix: rename it in the spec") from None

    def values(self) -> dict:
        return {name: getattr(self, name) for name in self._names}


class GateProjections(nn.ModuleDict):
    """A spec's gates from hidden states, as fla's gated layers form them: one ``nn.Linear`` per gate (with a bias,
    E -> H per head, E -> H·D per key dimension), ``g = logsigmoid(x W^T + b) / gate_logit_normalizer`` (<= 0).
    A ModuleDict under the gates' names (state_dict keys ``<prefix>.<gate>.weight``, ``.bias``); calling it on x
    [B, T, E] returns {gate: [B, T, H] or [B, T, H, D]} (the "bthd" layout). Used by Attention and by
    attngen.hf.add_gates."""

    def __init__(self, spec: Spec, embed_dim: int, heads: int, head_dim: int, *, gate_logit_normalizer: float = 16.0,
                 dtype=None, device=None):
        normalizer = _normalizer(gate_logit_normalizer, "GateProjections")
        super().__init__({
            g.name: nn.Linear(embed_dim, heads * (head_dim if g.per == "key_dim" else 1), bias=True, device=device,
                              dtype=dtype)
            for g in spec.gates})
        self.per = {g.name: g.per for g in spec.gates}
        self.heads, self.head_dim, self.gate_logit_normalizer = heads, head_dim, normalizer

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, gate_logit_normalizer={self.gate_logit_normalizer:g}"

    def forward(self, x: torch.Tensor) -> dict:
        b, t = x.shape[:2]
        out = {}
        for name, proj in self.items():
            g = F.logsigmoid(proj(x)) / self.gate_logit_normalizer
            out[name] = g.view(b, t, self.heads, self.head_dim) if self.per[name] == "key_dim" \
                else g.view(b, t, self.heads)
        return out


@dataclass
class KVCache:
    """The decode cache of a causal spec without a recurrent state (softmax, Llama's rotary softmax): every key and
    value so far, kept per sequence from index 0 (sequence b's tokens at 0 .. pos[b] - 1, zeros after).

    k [B, H_kv, P, Dk] (before rotary positions), v [B, H_kv, P, Dv], pos [B] int64 (tokens per sequence), and
    the hash of the spec it belongs to."""
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    spec_hash: str

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (grows with the tokens consumed)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))

    def detach(self) -> "KVCache":
        return KVCache(self.k.detach(), self.v.detach(), self.pos, self.spec_hash)


class Attention(nn.Module):
    """Multi-head attention of a spec: x [B, T, E] -> [B, T, E].

    spec: a Spec or anything attngen.load_spec takes (a built-in name, a YAML path or text, a dict).
    embed_dim: E; num_heads: H (query heads); num_kv_heads: heads of k and v (default H; must divide H);
    head_dim: the head dim D of q, k and v (default E // H, then H must divide E);
    bias: bias terms of the q, k, v and output projections (the gate projections always have one);
    layout: how q, k and v are arranged for the op: "bthd" ([B, T, H, D], the projections' own, no copy; fla's)
    or "bhtd" ([B, H, T, D], SDPA's); the result is the same.
    backend, plan, chunk: passed to attngen.compile ("auto": the generated Triton kernels for CUDA tensors,
    the torch backend otherwise).
    gate_logit_normalizer: a gate is logsigmoid(W x + b) / gate_logit_normalizer (fla's GLA layers use 16).
    context_parallel: None, True (torch.distributed's default group) or a process group: x is this rank's
        contiguous shard of the sequence and the op runs through attngen.distributed.cp_attention (separable specs;
        docs/context_parallel.md). Then no attention_mask, state or use_cache; the weights' gradients are this rank's
        share (sum them over the group, as for any sequence-sharded layer).
    device, dtype: of the projections and the spec's parameters (as torch.nn.Linear's factory arguments).
    """

    def __init__(self, spec, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, bias: bool = False, layout: str = "bthd", backend: str = "auto",
                 plan=None, chunk: int | None = None, gate_logit_normalizer: float = 16.0, context_parallel=None,
                 device=None, dtype=None):
        super().__init__()
        spec = spec if isinstance(spec, Spec) else load_spec(spec)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, n in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            _positive(name, n)
        if head_dim is None:
            if embed_dim % num_heads:
                raise InputError(f"Attention: embed_dim={embed_dim} is not a multiple of num_heads={num_heads}; "
                                 "expected H | E (head_dim = E // H), or pass head_dim= explicitly")
            head_dim = embed_dim // num_heads
        _positive("head_dim", head_dim)
        if num_heads % num_kv_heads:
            raise InputError(f"Attention: num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}; "
                             "expected H_kv | H (query head h reads kv head h // (H / H_kv))")
        if layout not in LAYOUTS:
            raise InputError(f"Attention: layout={layout!r}; expected 'bthd' ([B, T, H, D], no copy) or 'bhtd' "
                             "([B, H, T, D])")
        gate_logit_normalizer = _normalizer(gate_logit_normalizer, "Attention")
        if not (context_parallel is None or context_parallel is True or isinstance(context_parallel, ProcessGroup)):
            raise InputError(f"Attention: context_parallel={context_parallel!r}; expected None, True (the default "
                             "process group) or a torch.distributed ProcessGroup")
        self.context_parallel = context_parallel
        self.spec, self.embed_dim, self.num_heads, self.num_kv_heads = spec, embed_dim, num_heads, num_kv_heads
        self.head_dim, self.layout, self.gate_logit_normalizer = head_dim, layout, float(gate_logit_normalizer)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        self.gate_proj = GateProjections(spec, embed_dim, num_heads, head_dim,
                                         gate_logit_normalizer=gate_logit_normalizer, **factory)
        self.params = SpecParameters(spec, num_heads, head_dim, dtype=dtype, device=device)
        self.op = compile_op(spec, backend=backend, plan=plan, layout=layout, chunk=chunk)
        self.cache_kind, self.cache_reason = _cache_kind(spec, self.op)
        # a query after cached keys is the last position: the bidirectional form of the spec over the cache
        self._last_row = compile_op(load_spec(spec, causal=False), backend=backend, layout=layout, chunk=chunk) \
            if self.cache_kind == "kv" else None

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return (f"spec={self.spec.name!r} ({self.spec.mode}), embed_dim={self.embed_dim}, num_heads={self.num_heads}"
                f"{kv}, head_dim={self.head_dim}, layout={self.layout!r}, cache={self.cache_kind}")

    def spec_parameters(self) -> dict:
        """The spec's parameters and fixed tensors as the op takes them: {name: tensor}."""
        return self.params.values()

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, state=None,
                use_cache: bool = False):
        """x [B, T, E] -> o [B, T, E]; with ``use_cache=True`` (o, state), the state after x's tokens.

        attention_mask: None, or [B, T] (bool, integer or 0./1. floats) with 1 for a token and 0 for padding, the
        tokens of each row one contiguous run (left or right padding); padded rows of o are 0, and each sequence
        is attended alone from position 0 (or its state's position): the result of running it unpadded.
        state: what a previous call with use_cache=True returned (an attngen State for specs with a recurrent
        state, a KVCache otherwise); x then continues each sequence. A KVCache continues one token per call."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            found = f"shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"Attention: x: expected a tensor [B, T, E] with E = embed_dim = {self.embed_dim}, "
                             f"found {found}")
        weight = self.q_proj.weight
        if x.dtype != weight.dtype or x.device != weight.device:
            raise InputError(f"Attention: x is {x.dtype} on {x.device}, the layer's weights {weight.dtype} on "
                             f"{weight.device}; expected the same dtype and device. Fix: x.to(...) or layer.to(...)")
        if (state is not None or use_cache) and self.cache_kind is None:
            raise InputError(f"Attention ({self.spec.name}, {self.spec.mode}): "
                             f"{'state' if state is not None else 'use_cache=True'}: this layer has no decode "
                             f"state: {self.cache_reason}")
        if self.context_parallel is not None and (attention_mask is not None or state is not None or use_cache):
            what = "attention_mask" if attention_mask is not None else "state" if state is not None else "use_cache"
            raise InputError(f"Attention ({self.spec.name}): {what} with context_parallel: x is one rank's shard of "
                             "whole sequences; padding, decode states and caches are per-device features. Fix: call "
                             "without it, or build the layer without context_parallel")
        b, t, _ = x.shape
        tokens = _tokens(attention_mask, b, t, x.device)  # None: every position is a token
        if tokens is None:
            o, new = self._attend(x, None, state, use_cache)
            return (o, new) if use_cache else o
        index, lengths = tokens
        packed = x.reshape(b * t, self.embed_dim).index_select(0, index)[None]
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        o, new = self._attend(packed, (cu, lengths), state, use_cache)
        o = o[0].new_zeros(b * t, o.shape[-1]).index_copy(0, index, o[0]).view(b, t, -1)
        return (o, new) if use_cache else o

    def _attend(self, x, packing, state, use_cache: bool):
        """The projections, the op and the output projection of x [B, T, E] (B = 1 and ``packing`` (cu_seqlens,
        lengths) for packed sequences); the new state (None without use_cache)."""
        b, t, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(b, t, h, d)
        k = self.k_proj(x).view(b, t, hkv, d)
        v = self.v_proj(x).view(b, t, hkv, d)
        gates = {name: g.transpose(1, 2) if self.layout == "bhtd" else g  # in the op's layout
                 for name, g in self.gate_proj(x).items()}
        kwargs = self.spec_parameters() | gates
        if self.cache_kind == "kv" and state is not None:
            _check_cache(state, self, x, packing)
        if self.context_parallel is not None:  # this rank's shard (no state, cache or packing: forward refused them)
            group = None if self.context_parallel is True else self.context_parallel
            o = cp_attention(self.op, *self._arranged(q, k, v), group=group, **kwargs)
            o, new = (o.transpose(1, 2) if self.layout == "bhtd" else o), None
        elif self.cache_kind == "kv" and state is not None and state.k.shape[2] > 0:
            o, new = self._decode_kv(q, k, v, state, packing)
        elif self.cache_kind == "kv":  # a whole sequence (an empty cache holds no token)
            o = self.op(*self._arranged(q, k, v), cu_seqlens=None if packing is None else packing[0], **kwargs)
            o = o.transpose(1, 2) if self.layout == "bhtd" else o
            new = _kv_from(k, v, packing, self.spec.hash) if use_cache else None
        else:
            o, new = self._run_state(q, k, v, state, use_cache, kwargs, packing)
        return self.o_proj(o.reshape(b, t, h * d)), new

    def _arranged(self, *xs):
        """[B, T, H, D] tensors (and [B, T, H(, D)] gates) in the op's layout."""
        return tuple(x.transpose(1, 2) if self.layout == "bhtd" else x for x in xs)

    def _run_state(self, q, k, v, state, use_cache, kwargs, packing):
        """The op with attngen's recurrent state: a decode step for one token per sequence after a state, else the
        whole input (continuing ``state`` when given). o [B, T, H, D]."""
        if isinstance(state, KVCache):
            raise InputError(f"Attention ({self.spec.name}): state: expected an attngen State (this spec has a "
                             "recurrent state), found a KVCache. Fix: pass the state this layer returned")
        if state is not None and q.shape[1] == 1 and packing is None:
            o, new = self.op.step(*self._arranged(q, k, v), state, **kwargs)
        elif state is not None or use_cache:
            o, new = self.op(*self._arranged(q, k, v), initial_state=state, return_state=True,
                             cu_seqlens=None if packing is None else packing[0], **kwargs)
        else:
            o, new = self.op(*self._arranged(q, k, v), cu_seqlens=None if packing is None else packing[0],
                             **kwargs), None
        return (o.transpose(1, 2) if self.layout == "bhtd" else o), (new if use_cache else None)

    def _decode_kv(self, q, k, v, cache: KVCache, packing):
        """One query token per sequence after the keys in ``cache``: the causal row at the last position attends
        every key, which is the bidirectional form of the spec over the cache (exact: the spec's scores do not
        depend on positions; rotary positions rotate q at pos here and the op rotates the cached keys from 0)."""
        b = cache.batch
        lengths = [q.shape[1]] * b if packing is None else packing[1].tolist()
        if any(n != 1 for n in lengths):
            raise InputError(f"Attention ({self.spec.name}): a KVCache continues one token per sequence, found "
                             f"{max(lengths)} tokens. Fix: pass one token per call after the prefill (a block of "
                             "causal queries after cached keys is not supported; the prefill itself may be long)")
        if packing is not None:  # one token per sequence, packed: [1, B, ...] as [B, 1, ...]
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        pos = cache.pos
        new = _appended(cache, k, v)
        qh = q.transpose(1, 2)  # [B, H, 1, D]
        if self.spec.rotary is not None:
            qh = rotate(qh, pos.to(qh.device)[:, None], self.spec.rotary.theta)
        q1 = qh.transpose(1, 2) if self.layout == "bthd" else qh
        params = self.spec_parameters()
        ends = (pos + 1).tolist()
        if len(set(ends)) == 1:
            o = self._last_row(q1, *self._cached(new.k, new.v, ends[0]), **params)
        else:  # sequences of different lengths: each over its own keys
            o = torch.cat([self._last_row(q1[n:n + 1], *self._cached(new.k[n:n + 1], new.v[n:n + 1], end), **params)
                           for n, end in enumerate(ends)])
        o = o.transpose(1, 2) if self.layout == "bhtd" else o  # [B, 1, H, D]
        return (o.transpose(0, 1) if packing is not None else o), new

    def _cached(self, k, v, end: int):
        """The first ``end`` cached keys and values ([B, H_kv, P, D]) in the op's layout."""
        k, v = k[:, :, :end], v[:, :, :end]
        return (k.transpose(1, 2), v.transpose(1, 2)) if self.layout == "bthd" else (k, v)


def _positive(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"Attention: {name}={n!r}; expected a positive integer")


def _normalizer(value, where: str) -> float:
    try:
        ok = not isinstance(value, bool) and float(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{where}: gate_logit_normalizer={value!r}; expected a number > 0 (the gate is "
                         "logsigmoid(W x + b) / gate_logit_normalizer)")
    return float(value)


def _is_scale(p) -> bool:
    """The per-call scale (docs/specs.md): not a parameter of the layer; each call takes the op's default."""
    return p.name == "scale" and not p.learnable and p.shape == () and not p.draw


def _cache_kind(spec: Spec, op) -> tuple:
    """("state", "") for causal specs with a recurrent state, ("kv", "") for causal specs whose scores do not
    depend on positions (a query after cached keys is then the bidirectional form's row), else (None, why)."""
    if not spec.causal:
        return None, "a bidirectional spec has no decode state (every output depends on every token); load it " \
                     "with causal=True to decode"
    if isinstance(op, AttentionOp) and op.plan.capabilities.decodable:
        return "state", ""
    why = "" if spec.terms else f"no recurrent state ({op.plan.capabilities.decode_reason}), and "
    for s in [spec] + [t.spec for t in spec.terms]:
        consts = s.constant_values()
        used = (s.similarity_expr.xreplace(consts).free_symbols | s.reweight_expr.xreplace(consts).free_symbols) \
            if not s.terms else set()
        found = sorted(str(x) for x in used & _POSITIONS)
        if s.approximation is not None:
            return None, why + "a KV cache would not reproduce an approximation's choices"
        if s.gates:
            return None, why + "a KV cache cannot carry its gates' cumulative sums"
        if s.window is not None:
            return None, why + "its window (positions) is not kept by a KV cache"
        if found:
            return None, why + f"its scores depend on positions ({', '.join(found)}), which a KV cache decode " \
                               "(the last row by the bidirectional form) does not reproduce"
    return "kv", ""


def _tokens(mask, b: int, t: int, device):
    """The flat indices of the tokens of a [B, T] padding mask and each row's length, or None when every position
    is a token; InputError for any other mask."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"attention_mask: expected a tensor [B, T] = [{b}, {t}] (1 = token, 0 = padding), found "
                         f"{type(mask).__name__}")
    if tuple(mask.shape) != (b, t):
        raise InputError(f"attention_mask: expected a 2-D padding mask [B, T] = [{b}, {t}] (1 = token, 0 = padding), "
                         f"found shape {list(mask.shape)}. Fix: pass the padding mask of x's tokens; causal and other "
                         "masks come from the spec")
    if mask.device != device:
        raise InputError(f"attention_mask is on {mask.device}, x on {device}. Fix: move it with .to({str(device)!r})")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask: expected 0 (padding) and 1 (token) only, found other values. Fix: pass a "
                         "bool or 0/1 padding mask (not an additive float mask of 0 / -inf)")
    m = mask.bool()
    if bool(m.all()):
        return None
    lengths = m.sum(1)
    if bool((lengths == 0).any()):
        raise InputError(f"attention_mask: row(s) {(lengths == 0).nonzero().flatten().tolist()} hold no token; "
                         "expected at least one token per sequence")
    runs = m[:, 0].long() + (m[:, 1:] & ~m[:, :-1]).sum(1)
    if bool((runs != 1).any()):
        raise InputError(f"attention_mask: row(s) {(runs != 1).nonzero().flatten().tolist()} hold tokens with "
                         "padding between them; expected left or right padding (each row's tokens one contiguous "
                         "run)")
    return m.reshape(-1).nonzero().flatten(), lengths


def _kv_from(k, v, packing, spec_hash: str) -> KVCache:
    """The cache after a prefill: k, v [B, T, H_kv, D] (or packed [1, N, H_kv, D]) as [B, H_kv, P, D], each
    sequence from index 0."""
    if packing is None:
        t = k.shape[1]
        pos = torch.full((k.shape[0],), t, dtype=torch.int64, device=k.device)
        return KVCache(k.transpose(1, 2), v.transpose(1, 2), pos, spec_hash)
    cu, lengths = packing
    n = lengths.numel()
    seq = torch.repeat_interleave(torch.arange(n, device=k.device), lengths)
    local = torch.arange(k.shape[1], device=k.device) - torch.repeat_interleave(cu[:-1], lengths)
    longest = int(lengths.max())
    out = []
    for x in (k, v):
        full = x.new_zeros(n, longest, *x.shape[2:])
        full = full.index_put((seq, local), x[0])
        out.append(full.transpose(1, 2))
    return KVCache(out[0], out[1], lengths.to(torch.int64), spec_hash)


def _appended(cache: KVCache, k, v) -> KVCache:
    """The cache with one more token per sequence (k, v [B, 1, H_kv, D]) at index pos[b]."""
    b = cache.batch
    pos = cache.pos.to(cache.k.device)
    length = max(cache.k.shape[2], int(pos.max()) + 1)
    rows = torch.arange(b, device=cache.k.device)
    out = []
    for old, new in ((cache.k, k), (cache.v, v)):
        grow = length - old.shape[2]
        full = torch.cat([old, old.new_zeros(b, old.shape[1], grow, old.shape[3])], 2) if grow else old
        out.append(_put(full, rows, pos, new[:, 0]))  # out of place: the old cache is unchanged
    return KVCache(out[0], out[1], cache.pos + 1, cache.spec_hash)


def _put(full, rows, pos, value):
    """full [B, H, P, D] with full[b, :, pos[b]] = value[b] ([B, H, D]), out of place."""
    return full.transpose(1, 2).index_put((rows, pos), value).transpose(1, 2)


def _check_cache(cache, layer: Attention, like, packing) -> None:
    if not isinstance(cache, KVCache):
        raise InputError(f"Attention ({layer.spec.name}): state: expected a KVCache (this spec has no recurrent "
                         f"state; its decode cache holds the keys and values), found {type(cache).__name__}. Fix: "
                         "pass the state this layer returned with use_cache=True")
    if cache.spec_hash != layer.spec.hash:
        raise InputError(f"Attention ({layer.spec.name}): state: the KVCache belongs to another spec (hash "
                         f"{cache.spec_hash}, expected {layer.spec.hash})")
    batch = like.shape[0] if packing is None else packing[1].numel()
    want = (batch, layer.num_kv_heads, layer.head_dim)
    found = (cache.k.shape[0], cache.k.shape[1], cache.k.shape[3])
    if found != want or cache.v.shape != cache.k.shape or tuple(cache.pos.shape) != (batch,):
        raise InputError(f"Attention ({layer.spec.name}): state: expected a KVCache of batch {batch}, "
                         f"{layer.num_kv_heads} kv heads, head dim {layer.head_dim}; found k {list(cache.k.shape)}, "
                         f"v {list(cache.v.shape)}, pos {list(cache.pos.shape)}")
    if cache.k.device != like.device:
        raise InputError(f"Attention ({layer.spec.name}): state: the KVCache is on {cache.k.device}, x on "
                         f"{like.device}")

