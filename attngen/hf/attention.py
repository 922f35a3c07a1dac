"""The attention function attngen registers with transformers (``attngen.hf.register``), and its mask function.

transformers 5 calls an attention implementation as ``fn(module, query, key, value, attention_mask, dropout=...,
scaling=..., is_causal=None, **kwargs)`` with query [B, H, T, D] and key, value [B, H_kv, S, D] (after the model's
own rotary embedding and KV-cache update), and expects ``(output [B, T, H, Dv], weights or None)``. Which mask it
gets is decided by the mask function registered under the same name in ``AttentionMaskInterface``: attngen's hands
on the 2-D key-padding mask (bool [B, S], True = token) or None when nothing is padded, like flash-attention's,
and refuses every other pattern (a sliding window, packed sequences, an or/and overlay).

Padding becomes attngen's ``cu_seqlens``: the tokens of every sequence are packed into one B = 1 batch, the op runs
each sequence alone, and the output is scattered back with zeros at the padded positions (their outputs are not
defined; flash-attention's re-pad writes zeros too). Positions the spec computes itself (a reweight in i, j, its own
rotary) count from each sequence's first token.

A KV cache (query length T < key length S) aligns the queries bottom-right: query t is key position S - T + t. One
new token of a spec without positions (softmax, the model-rotated llama, linear_elu) attends all real keys of its
sequence: the spec's bidirectional op with one query. Otherwise the causal op is run on the whole sequence with
zero queries in front of the new ones and the last T rows are kept: row i of a causal op reads only q_i and the
keys and values up to i, so this is the cached computation exactly (at the cost of attending the whole sequence
again). Specs whose math depends on the final length (cosFormer's default
M = max(n_q, n_k)) are refused there: the cached rows were computed at shorter lengths.
"""
from __future__ import annotations

import math
import threading

import torch
import yaml
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function

from attngen.errors import AttngenError, InputError, SpecError
from attngen.frontend.spec import Spec, load_spec
from attngen.nn import SpecParameters
from attngen.op import compile as compile_op

PREFIX = "attngen_"
PARAMS_ATTR = "attngen_params"  # the SpecParameters submodule add_parameters gives an attention module
STATE_LAYER_ATTR = "_attngen_state_layer"  # set by StateLayer.update on the key tensor it hands back
_LENGTH_SYMBOLS = frozenset({"n", "n_q", "n_k"})
_UNSUPPORTED_KWARGS = {
    "sliding_window": "a sliding-window mask (write `window: N` in the spec instead and use a model without one)",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "an additive position bias (T5-style; use attngen's t5_bias spec)",
    "head_mask": "a head mask",
    "cu_seq_lens_q": "packed sequences in flash-attention's varlen form (pad them into rows with an attention_mask)",
    "cu_seq_lens_k": "packed sequences in flash-attention's varlen form (pad them into rows with an attention_mask)",
}
_REGISTRY: dict = {}  # name -> AttngenAttention
_LOCK = threading.Lock()


def register(spec, name: str | None = None, *, backend: str = "auto", keep_rotary: bool = False,
             mode: str | None = None) -> str:
    """Register ``spec`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``; returns the name to
    pass as ``attn_implementation`` (default ``"attngen_<spec name>"``).

    ``spec``: a built-in name, a YAML path or text, a dict (these hold both modes: the model's ``is_causal`` picks
    one per call), or a Spec (its own mode only). ``backend``: as ``attngen.compile``. ``keep_rotary``: transformers'
    rotary models (Llama, Mistral, Qwen, ...) rotate q and k before the attention function, so a spec's own
    ``rotary:`` is dropped by default (it would rotate twice); ``keep_rotary=True`` keeps it for models that do not.
    ``mode``: None follows the model (``is_causal``), "causal" or "bidirectional" forces one (e.g. a causal-only
    approximation inside an encoder: a different model, for experiments).

    Refused here (SpecError / InputError): gated specs (the interface passes no per-token gate tensors), an unknown
    mode. Registering a name again replaces the previous registration."""
    if mode not in (None, "causal", "bidirectional"):
        raise InputError(f"register: mode={mode!r}; expected None (follow the model's is_causal), 'causal' or "
                         "'bidirectional'")
    attn = AttngenAttention(spec, backend=backend, keep_rotary=keep_rotary, mode=mode)
    name = PREFIX + attn.base.name if name is None else name
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") \
            or name.startswith(("flash_attention", "paged|")):
        raise InputError(f"register: name={name!r}; expected a non-empty str that is not one of transformers' own "
                         "implementations (eager, sdpa, flash_attention_*, flex_attention, paged|...)")
    attn.name = name
    with _LOCK:
        AttentionInterface.register(name, attn)
        AttentionMaskInterface.register(name, attn.mask)
        _REGISTRY[name] = attn
    return name


def registered(name: str) -> "AttngenAttention | None":
    """The AttngenAttention registered under ``name`` by ``register`` (None if ``name`` is not attngen's)."""
    return _REGISTRY.get(name)


def unregister(name: str) -> None:
    """Remove a name ``register`` added (a model still set to it then fails in transformers' own lookup)."""
    with _LOCK:
        if _REGISTRY.pop(name, None) is None:
            raise InputError(f"unregister: {name!r} was not registered by attngen.hf.register "
                             f"(registered: {sorted(_REGISTRY) or 'none'})")
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def add_parameters(model, name: str | None = None) -> int:
    """Make the spec's parameters parameters of ``model``: every attention module of ``model`` (a transformers module
    with ``layer_idx`` and ``scaling``, the ones that call the attention interface) gets a SpecParameters submodule
    ``attngen_params`` (learnable ones as nn.Parameters, fixed ones as buffers, at the module's head count and head
    dim, in its dtype and on its device), which the attention function registered as ``name`` (default: the model's
    ``config._attn_implementation``) passes to the op on every call. They then train with the model, appear in its
    state_dict and move with ``.to()``. Call it before building the optimizer. Returns the number of modules given
    parameters; InputError when ``name`` is not attngen's or the model has no attention module."""
    name = name if name is not None else getattr(getattr(model, "config", None), "_attn_implementation", None)
    attn = _REGISTRY.get(name)
    if attn is None:
        raise InputError(f"add_parameters: {name!r} is not an attn_implementation registered by attngen.hf.register "
                         f"(registered: {sorted(_REGISTRY) or 'none'}). Fix: name = attngen.hf.register(spec), then "
                         "add_parameters(model, name)")
    count = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if not (hasattr(module, "layer_idx") and hasattr(module, "scaling") and config is not None):
            continue
        heads = config.num_attention_heads
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None) \
            or config.hidden_size // heads
        weight = next(module.parameters(), None)
        factory = {} if weight is None else {"dtype": weight.dtype, "device": weight.device}
        module.add_module(PARAMS_ATTR, SpecParameters(attn.base, heads, int(head_dim), **factory))
        count += 1
    if not count:
        raise InputError(f"add_parameters: {type(model).__name__} has no attention module (a submodule with "
                         "layer_idx, scaling and config, as transformers' attention classes have)")
    return count


class AttngenAttention:
    """The callable registered with transformers: one compiled op per mode (causal for decoders, bidirectional for
    encoders), chosen per call from ``is_causal`` (or the module's ``is_causal``)."""

    def __init__(self, spec, *, backend: str = "auto", keep_rotary: bool = False, mode: str | None = None):
        self.source, self.backend, self.keep_rotary, self.forced_mode = spec, backend, keep_rotary, mode
        self.name = None
        self._ops = {}  # causal flag -> compiled op
        self._row_op = False  # the one-query decode op (None: the spec has positions; False: not decided yet)
        self.base = spec if isinstance(spec, Spec) else load_spec(spec)
        if self.base.gates:
            raise SpecError(f"{self.base.name} has gates ({', '.join(self.base.gate_names)}): transformers' attention "
                            "interface passes no per-token gate tensors", where="attngen.hf.register",
                            expected="a spec without gates",
                            fix="call the op yourself in a custom attention module (attngen.compile)")
        if mode is not None:
            self.spec_for(mode == "causal")  # a SpecError now for a mode the spec does not have

    def __repr__(self) -> str:
        return f"AttngenAttention({self.name!r}, spec={self.base.name!r}, backend={self.backend!r})"

    def spec_for(self, causal: bool) -> Spec:
        """The spec in the mode of a call, without its rotary unless keep_rotary."""
        if isinstance(self.source, Spec):
            if self.source.causal != causal:
                want = "causal" if causal else "bidirectional"
                raise InputError(f"{self.name or 'attngen.hf'}: the model asks for {want} attention but was registered "
                                 f"with a Spec of the {self.source.mode} mode only. Fix: register the spec's name, "
                                 f"path or dict (they hold both modes), or a Spec loaded with causal={causal}")
            spec = self.source
        else:
            spec = load_spec(self.source, causal=causal)
        if spec.rotary is not None and not self.keep_rotary:
            data = yaml.safe_load(spec.to_yaml())
            data.pop("rotary", None)
            spec = load_spec(data)
        return spec

    def op_for(self, causal: bool):
        if causal not in self._ops:
            self._ops[causal] = compile_op(self.spec_for(causal), backend=self.backend)
        return self._ops[causal]

    def row_op(self):
        """The bidirectional op when one query over keys 0 .. S - 1 is exactly the causal op's last row (the spec's
        math has no positions and no length, and is the same in both modes: softmax, the model-rotated llama,
        linear_elu), else None. It lets a KV-cache decode step attend the cache once (O(S)) instead of again in
        full."""
        if self._row_op is False:
            self._row_op = None
            try:
                causal, both = self.spec_for(True), self.spec_for(False)
            except AttngenError:  # a spec with one mode only (conv_basis)
                return None
            a, b = causal.canonical(), both.canonical()
            a.pop("causal")
            b.pop("causal")
            positions = {"i", "j"} & {str(x) for x in getattr(causal.similarity_expr, "free_symbols", ())}
            if a == b and causal.reweight.strip() == "1" and causal.approx == "null" and causal.window is None \
                    and not causal.terms and causal.rotary is None and not causal.max_length and not positions \
                    and not length_dependent(causal):
                self._row_op = self.op_for(False)
        return self._row_op

    # -- the mask function (AttentionMaskInterface) -------------------------------------------------------------------
    def mask(self, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
             mask_function=causal_mask_function, attention_mask=None, **kwargs):
        """The 2-D key-padding mask (bool [B, kv_length], True = token), or None when no token is padding.
        Any pattern other than plain causal or bidirectional attention is an InputError."""
        if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
            what = getattr(mask_function, "__qualname__", type(mask_function).__name__)
            raise InputError(f"{self.name}: the model asks for the mask pattern {what}; attngen.hf runs causal or "
                             "bidirectional attention with key padding only (no sliding window, chunked attention, "
                             "packed sequences in one row, or or/and overlays). Fix: pad the sequences into separate "
                             "rows with an attention_mask, or use attn_implementation='sdpa' for this model")
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise InputError(f"{self.name}: expected a 2-D attention_mask [B, S] (1 = token, 0 = padding), found "
                             f"shape {tuple(attention_mask.shape)}")
        if attention_mask.shape[-1] != kv_length + kv_offset or kv_offset:
            raise InputError(f"{self.name}: the attention_mask covers {attention_mask.shape[-1]} positions but the "
                             f"keys are {kv_length} from offset {kv_offset} (a static or sliding cache?); attngen.hf "
                             "supports transformers' DynamicCache and attngen.hf.StateCache")
        mask = attention_mask.to(torch.bool)
        return None if bool(mask.all()) else mask

    # -- the attention function (AttentionInterface) ------------------------------------------------------------------
    def __call__(self, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                 is_causal=None, **kwargs):
        for arg, what in _UNSUPPORTED_KWARGS.items():
            if kwargs.get(arg) is not None:
                raise InputError(f"{self.name}: the model passes {arg} ({what}), which attngen.hf does not run")
        if kwargs.get("output_attentions"):
            raise InputError(f"{self.name}: output_attentions=True needs the attention weights, which attngen's ops "
                             "never form. Fix: attn_implementation='eager' to inspect weights")
        if dropout:
            raise InputError(f"{self.name}: attention dropout {dropout} in training: attngen's ops have no dropout on "
                             "the attention weights. Fix: set the model's attention dropout to 0 (config."
                             "attention_dropout / attention_probs_dropout_prob) or call model.eval()")
        if self.forced_mode is not None:
            causal = self.forced_mode == "causal"
        else:
            causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        groups = getattr(module, "num_key_value_groups", None)
        if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
            raise InputError(f"{self.name}: expected query, key, value [B, H, T, D]; found shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if isinstance(groups, int) and query.shape[1] != key.shape[1] * groups:
            raise InputError(f"{self.name}: the module has {groups} query heads per kv head but query has "
                             f"{query.shape[1]} heads and key {key.shape[1]}")
        op = self.op_for(causal)
        params = self.scale_params(op.spec, query.shape[-1], scaling)
        own = getattr(module, PARAMS_ATTR, None)
        if own is not None:  # add_parameters: the module's own (trainable) values instead of the spec's init
            params = {**own.values(), **params}
        mask = None if attention_mask is None else self._key_padding(attention_mask, query)
        layer = getattr(key, STATE_LAYER_ATTR, None)
        if layer is not None:  # attngen.hf.StateCache: the recurrent state carries the past tokens
            out = layer.attend(self, op, query, key, value, mask, params)
        else:
            out = self.attend(op, query, key, value, mask, params, causal)
        return out.transpose(1, 2).contiguous(), None

    def _key_padding(self, mask, query):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool \
                or mask.shape[0] != query.shape[0]:
            found = f"a {mask.dim()}-D {mask.dtype} tensor of shape {tuple(mask.shape)}" \
                if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InputError(f"{self.name}: attention_mask is {found}; attngen.hf expresses only key padding, the 2-D "
                             "bool mask [B, S] its mask function hands on. A prepared 4-D or custom mask (arbitrary "
                             "float biases, block patterns) cannot be expressed. Fix: pass the model a 2-D "
                             "attention_mask (1 = token, 0 = padding), or use attn_implementation='sdpa'")
        return mask

    def scale_params(self, spec: Spec, head_dim: int, scaling) -> dict:
        """The op's ``scale=`` from the model's ``scaling``: passed when the spec names ``scale``; a spec without it is
        taken as written, which is right only for the default 1/sqrt(d) (InputError for any other scaling)."""
        if "scale" in spec.param_names or any("scale" in t.spec.param_names for t in spec.terms):
            return {} if scaling is None else {"scale": float(scaling)}
        if scaling is None or math.isclose(float(scaling), head_dim ** -0.5, rel_tol=1e-6):
            return {}
        raise InputError(f"{self.name}: the model scales scores by {scaling} but {spec.name} does not use `scale` "
                         f"(its formula is fixed; the default 1/sqrt(d) = {head_dim ** -0.5:.6g} is the only scaling "
                         "it can honour). Fix: write `* scale` into the spec's similarity (docs/specs.md)")

    def attend(self, op, query, key, value, mask, params: dict, causal: bool):
        """[B, H, T, Dv]: the op on query, key, value with key padding ``mask`` (bool [B, S] or None)."""
        t, s = query.shape[2], key.shape[2]
        if t == s:
            return run_padded(op, query, key, value, mask, params)
        if not causal:  # cross attention or a bidirectional cache: each sequence with its own keys
            if mask is None:
                return op(query, key, value, **params)
            return torch.cat([op(query[b:b + 1], key[b:b + 1, :, mask[b]], value[b:b + 1, :, mask[b]], **params)
                              for b in range(query.shape[0])])
        if t > s:
            raise InputError(f"{self.name}: {t} queries but {s} keys in causal attention; expected at least as "
                             "many keys (a KV cache holds the past tokens' keys)")
        if length_dependent(op.spec):
            raise InputError(f"{self.name}: {op.spec.name} depends on the sequence length (n, n_q or n_k: "
                             "cosFormer's default M = max(n_q, n_k)), so rows a KV cache kept were computed at "
                             "other lengths than a full recompute. Fix: fix the constant "
                             f"(register(load_spec('{op.spec.name}', M=4096))) or generate with use_cache=False")
        if mask is not None and not bool(mask[:, s - t:].all()):
            raise InputError(f"{self.name}: with a KV cache the new tokens must not be padding (found padding in the "
                             "last query positions: right padding?). Fix: left-pad prompts for generation")
        row = self.row_op() if t == 1 else None
        if row is not None:  # one new token, a spec without positions: it attends every real key of its sequence
            if mask is None:
                return row(query, key, value, **params)
            return torch.cat([row(query[b:b + 1], key[b:b + 1, :, mask[b]], value[b:b + 1, :, mask[b]], **params)
                              for b in range(query.shape[0])])
        # bottom-right alignment: zero queries in front of the new ones, the causal op over the whole sequence,
        # the last t rows kept (exact: row i reads q_i and keys, values up to i only)
        front = query.new_zeros(query.shape[0], query.shape[1], s - t, query.shape[3])
        full = run_padded(op, torch.cat([front, query], 2), key, value, mask, params)
        return full[:, :, s - t:]


def run_padded(op, query, key, value, mask, params: dict, **extra):
    """The op over query, key, value [B, *, T, *] with key padding ``mask`` (bool [B, T] or None; queries are padded
    like the keys): the tokens packed into one B = 1 batch with cu_seqlens, the outputs scattered back (zeros at
    padding). With ``extra`` (initial_state, return_state) the op's (o, state) is returned, the state one per
    sequence."""
    if mask is None:
        return op(query, key, value, **params, **extra)
    b, t = mask.shape
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise InputError(f"attngen.hf: sequence(s) {empty} of the batch have no token (attention_mask all 0); "
                         "expected at least one token per sequence")
    idx = mask.reshape(-1).nonzero().flatten()
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int64)
    qp, kp, vp = (pack(x, idx) for x in (query, key, value))
    out = op(qp, kp, vp, cu_seqlens=cu, **params, **extra)
    o, state = out if extra.get("return_state") else (out, None)
    o = unpack(o, idx, b, t)
    return (o, state) if extra.get("return_state") else o


def pack(x, idx):
    """[B, H, T, D] -> [1, H, N, D]: the rows ``idx`` of the flattened (B, T)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h, d).index_select(0, idx).transpose(0, 1).unsqueeze(0)


def unpack(o, idx, b: int, t: int):
    """[1, H, N, Dv] -> [B, H, T, Dv], zeros where no token was."""
    rows = o[0].transpose(0, 1)  # [N, H, Dv]
    full = rows.new_zeros(b * t, rows.shape[1], rows.shape[2]).index_copy(0, idx, rows)
    return full.reshape(b, t, rows.shape[1], rows.shape[2]).transpose(1, 2)


def length_dependent(spec: Spec) -> bool:
    """True when the spec's math uses the sequence length (n, n_q, n_k), directly or through a constant."""
    exprs = [spec.similarity_expr, spec.reweight_expr] + [c.expr for c in spec.constants]
    if any(str(s) in _LENGTH_SYMBOLS for e in exprs if e is not None for s in getattr(e, "free_symbols", ())):
        return True
    return any(length_dependent(t.spec) for t in spec.terms)
