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

Gates: the interface passes no gate tensors, so ``add_gates`` gives every attention module an
``attngen.nn.GateProjections`` and a forward pre-hook that forms the gates from the module's input hidden states and
leaves them on the module for this call's attention function, which takes them (packed with the tokens under padding,
one per new token in a StateCache step). A post-hook makes gates that no attngen function read an InputError.
"""
from __future__ import annotations

import math
import threading
import weakref

import torch
import yaml
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, causal_mask_function

from attngen.errors import AttngenError, InputError
from attngen.frontend.spec import Spec, load_spec
from attngen.nn import GateProjections, SpecParameters
from attngen.op import compile as compile_op

PREFIX = "attngen_"
PARAMS_ATTR = "attngen_params"  # the SpecParameters submodule add_parameters gives an attention module
GATES_ATTR = "attngen_gates"  # the GateProjections submodule add_gates gives an attention module
PENDING_ATTR = "_attngen_pending_gates"  # this call's gates {name: [B, T, H(, D)]}, set by the pre-hook, taken once
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
_GATE_HOOKS = weakref.WeakKeyDictionary()  # attention module -> (registered name, its two hook handles)
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

    Gated specs (gla, simple_gla, forgetting) register here but run only in a model given gate projections by
    ``add_gates(model, name)`` (without them a call is an InputError naming add_gates). Refused here: an unknown
    mode (InputError). Registering a name again replaces the previous registration."""
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
    """Remove a name ``register`` added (a model still set to it then fails in transformers' own lookup), and the
    forward hooks ``add_gates`` installed for it (the gate projections stay in their models, weights and all)."""
    with _LOCK:
        if _REGISTRY.pop(name, None) is None:
            raise InputError(f"unregister: {name!r} was not registered by attngen.hf.register "
                             f"(registered: {sorted(_REGISTRY) or 'none'})")
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
        for module, (hooked, _) in list(_GATE_HOOKS.items()):
            if hooked == name:
                _remove_hooks(module)


def _registered(model, name: str | None, caller: str, example: str):
    """(name, the attention function registered as ``name``), ``name`` by default the model's
    ``config._attn_implementation``; InputError naming ``caller`` when it is not attngen's."""
    name = name if name is not None else getattr(getattr(model, "config", None), "_attn_implementation", None)
    attn = _REGISTRY.get(name)
    if attn is None:
        raise InputError(f"{caller}: {name!r} is not an attn_implementation registered by attngen.hf.register "
                         f"(registered: {sorted(_REGISTRY) or 'none'}). Fix: name = attngen.hf.register({example}), "
                         f"then {caller}(model, name)")
    return name, attn


def add_parameters(model, name: str | None = None) -> int:
    """Make the spec's parameters parameters of ``model``: every attention module of ``model`` (a transformers module
    with ``layer_idx`` and ``scaling``, the ones that call the attention interface) gets a SpecParameters submodule
    ``attngen_params`` (learnable ones as nn.Parameters, fixed ones as buffers, at the module's head count and head
    dim, in its dtype and on its device), which the attention function registered as ``name`` (default: the model's
    ``config._attn_implementation``) passes to the op on every call. They then train with the model, appear in its
    state_dict and move with ``.to()``. Call it before building the optimizer. Returns the number of modules given
    parameters; InputError when ``name`` is not attngen's or the model has no attention module."""
    _, attn = _registered(model, name, "add_parameters", "spec")
    modules = _attention_modules(model, "add_parameters")
    for module, heads, head_dim, factory in modules:
        module.add_module(PARAMS_ATTR, SpecParameters(attn.base, heads, head_dim, **factory))
    return len(modules)


def add_gates(model, name: str | None = None, *, gate_logit_normalizer: float = 16.0) -> int:
    """Give every attention module of ``model`` the gates of the gated spec registered as ``name`` (default: the
    model's ``config._attn_implementation``): an ``attngen.nn.GateProjections`` submodule ``attngen_gates`` (one
    ``nn.Linear`` with a bias per gate, hidden size -> H per head or H·D per key dimension, at the module's query
    heads, head dim, dtype and device; ``g = logsigmoid(x W^T + b) / gate_logit_normalizer``, as attngen.nn.Attention
    and fla's gated layers form them) and two forward hooks: a pre-hook that computes the gates from the module's
    input ``hidden_states`` (keyword or first positional argument) and leaves them for this call's attention
    function, and a post-hook that makes gates no attngen attention function read an InputError.

    The projections train with the model, are saved in its state_dict (``model.layers.0.self_attn.attngen_gates.g.
    weight``) and move with ``.to()``; call it before building the optimizer. A module that already has
    ``attngen_gates`` of the same shapes (after ``unregister`` removed the hooks) keeps its weights and gets its hooks
    back; other shapes are an InputError (``remove_gates`` first). Returns the number of modules; InputError when
    ``name`` is not attngen's, its spec has no gates, or the model has no attention module."""
    name, attn = _registered(model, name, "add_gates", "'gla'")
    spec = attn.base
    if not spec.gates:
        raise InputError(f"add_gates: {spec.name} (registered as {name!r}) has no gates; expected a spec with "
                         "`gates:` (gla, simple_gla, forgetting, ...)")
    modules = _attention_modules(model, "add_gates")
    plans = []
    for module, heads, head_dim, factory in modules:
        hidden = int(module.config.hidden_size)
        new = GateProjections(spec, hidden, heads, head_dim, gate_logit_normalizer=gate_logit_normalizer, **factory)
        old = getattr(module, GATES_ATTR, None)
        if old is not None and not _same_gates(old, new):
            raise InputError(f"add_gates: {type(module).__name__} (layer {module.layer_idx}) already has gates "
                             f"{_describe(old)}; {spec.name} needs {_describe(new)}. Fix: "
                             "attngen.hf.remove_gates(model) first (it drops their weights)")
        plans.append((module, new if old is None else None))
    for module, new in plans:
        if new is not None:
            module.add_module(GATES_ATTR, new)
        _remove_hooks(module)
        handles = (module.register_forward_pre_hook(_gates_pre_hook, with_kwargs=True),
                   module.register_forward_hook(_gates_post_hook))
        _GATE_HOOKS[module] = (name, handles)
    return len(plans)


def remove_gates(model) -> int:
    """Remove what ``add_gates`` gave ``model``: the ``attngen_gates`` submodules (their weights with them) and the
    hooks. Returns the number of modules; InputError when none had gates."""
    count = 0
    for module in list(model.modules()):
        if GATES_ATTR in module._modules or module in _GATE_HOOKS:
            _remove_hooks(module)
            module._modules.pop(GATES_ATTR, None)
            module.__dict__.pop(PENDING_ATTR, None)
            count += 1
    if not count:
        raise InputError(f"remove_gates: {type(model).__name__} has no gates from attngen.hf.add_gates")
    return count


def _attention_modules(model, where: str) -> list:
    """(module, query heads, head dim, {dtype, device}) of every attention module of ``model``: the transformers
    modules with layer_idx, scaling and config, the ones that call the attention interface."""
    out = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if not (hasattr(module, "layer_idx") and hasattr(module, "scaling") and config is not None):
            continue
        heads = config.num_attention_heads
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None) \
            or config.hidden_size // heads
        weight = next(module.parameters(), None)
        factory = {} if weight is None else {"dtype": weight.dtype, "device": weight.device}
        out.append((module, int(heads), int(head_dim), factory))
    if not out:
        raise InputError(f"{where}: {type(model).__name__} has no attention module (a submodule with "
                         "layer_idx, scaling and config, as transformers' attention classes have)")
    return out


def _same_gates(a: GateProjections, b: GateProjections) -> bool:
    return a.per == b.per and a.gate_logit_normalizer == b.gate_logit_normalizer \
        and all(a[n].weight.shape == b[n].weight.shape for n in a.per)


def _describe(gates: GateProjections) -> str:
    return ", ".join(f"{n} [{gates[n].in_features} -> {gates[n].out_features}]" for n in gates.per) + \
        f" / {gates.gate_logit_normalizer:g}"


def _remove_hooks(module) -> None:
    entry = _GATE_HOOKS.pop(module, None)
    if entry is not None:
        for handle in entry[1]:
            handle.remove()
    module.__dict__.pop(PENDING_ATTR, None)


def _gates_pre_hook(module, args, kwargs):
    """Forward pre-hook of add_gates: this call's gates from the module's input hidden states [B, T, E]."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    gates = getattr(module, GATES_ATTR, None)
    if gates is None:
        return None
    width = next(iter(gates.values())).in_features
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != width:
        found = f"shape {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise InputError(f"attngen.hf gates of {type(module).__name__} (layer {module.layer_idx}): expected the "
                         f"module's input hidden_states [B, T, {width}] (keyword hidden_states= or the first "
                         f"positional argument), found {found}")
    module.__dict__[PENDING_ATTR] = gates(hidden)
    return None


def _gates_post_hook(module, args, output):
    """Forward hook of add_gates: gates left unread mean the module ran another attention function without them."""
    if module.__dict__.pop(PENDING_ATTR, None) is not None:
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        hooked = _GATE_HOOKS.get(module, (None,))[0]
        raise InputError(f"{type(module).__name__} (layer {module.layer_idx}) has gates from attngen.hf.add_gates "
                         f"({hooked!r}) but its attention function ({impl!r}) did not read them: the layer ran "
                         f"without its gates. Fix: model.set_attn_implementation({hooked!r}), or "
                         "attngen.hf.remove_gates(model) to run the model without gates")
    return None


class AttngenAttention:
    """The callable registered with transformers: one compiled op per mode (causal for decoders, bidirectional for
    encoders), chosen per call from ``is_causal`` (or the module's ``is_causal``)."""

    def __init__(self, spec, *, backend: str = "auto", keep_rotary: bool = False, mode: str | None = None):
        self.source, self.backend, self.keep_rotary, self.forced_mode = spec, backend, keep_rotary, mode
        self.name = None
        self._ops = {}  # causal flag -> compiled op
        self._row_op = False  # the one-query decode op (None: the spec has positions; False: not decided yet)
        self.base = spec if isinstance(spec, Spec) else load_spec(spec)
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
        gates = self.gates_of(module, op.spec, query)
        mask = None if attention_mask is None else self._key_padding(attention_mask, query)
        layer = getattr(key, STATE_LAYER_ATTR, None)
        if layer is not None:  # attngen.hf.StateCache: the recurrent state carries the past tokens
            out = layer.attend(self, op, query, key, value, mask, params, gates)
        else:
            out = self.attend(op, query, key, value, mask, params, causal, gates)
        return out.transpose(1, 2).contiguous(), None

    def gates_of(self, module, spec: Spec, query) -> dict:
        """This call's gates in the op's layout ({name: [B, H, T] or [B, H, T, D]}), taken from the module (add_gates'
        pre-hook left them there); {} for a spec without gates. InputError when they are missing or do not fit."""
        pending = getattr(module, "__dict__", {}).pop(PENDING_ATTR, None)
        where = f"{self.name}: {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
        if not spec.gates:
            if pending is not None:
                raise InputError(f"{where} has gates from attngen.hf.add_gates ({', '.join(pending)}) but "
                                 f"{spec.name} has none. Fix: attngen.hf.remove_gates(model), or register the gated "
                                 "spec the gates were added for")
            return {}
        if pending is None:
            if getattr(module, GATES_ATTR, None) is None:
                raise InputError(f"{where}: {spec.name} has gates ({', '.join(spec.gate_names)}), and transformers' "
                                 "attention interface passes no gate tensors; the module has no gate projections. "
                                 f"Fix: attngen.hf.add_gates(model, {self.name!r}) (before building the optimizer)")
            raise InputError(f"{where} has gate projections but no hook computed this call's gates (unregister or "
                             f"remove_gates removed it). Fix: attngen.hf.add_gates(model, {self.name!r}) again (it "
                             "keeps the projections' weights)")
        b, h, t, d = query.shape
        if set(pending) != set(spec.gate_names):
            raise InputError(f"{where}: the module's gates are {sorted(pending)}, {spec.name} needs "
                             f"{list(spec.gate_names)}. Fix: attngen.hf.remove_gates(model), then add_gates again")
        out = {}
        for g in spec.gates:
            x = pending[g.name]
            want = (b, t, h, d) if g.per == "key_dim" else (b, t, h)
            if tuple(x.shape) != want:
                raise InputError(f"{where}: gate {g.name} ({g.per}) has shape {tuple(x.shape)}; expected {want} "
                                 f"[B, T, H{', D' if g.per == 'key_dim' else ''}] for query {tuple(query.shape)}. "
                                 "Fix: attngen.hf.remove_gates(model), then add_gates for this spec")
            out[g.name] = x.transpose(1, 2)  # the op's layout: [B, H, T(, D)]
        return out

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

    def attend(self, op, query, key, value, mask, params: dict, causal: bool, gates: dict | None = None):
        """[B, H, T, Dv]: the op on query, key, value with key padding ``mask`` (bool [B, S] or None) and the
        queries' ``gates``."""
        t, s = query.shape[2], key.shape[2]
        if t == s:
            return run_padded(op, query, key, value, mask, params, gates)
        if gates:
            raise InputError(f"{self.name}: {op.spec.name} has gates, and a KV cache ({t} queries after {s} keys) "
                             "holds keys and values but not the past tokens' gates. Fix: generate with "
                             "cache=attngen.hf.StateCache(model) (a recurrent state carries the gates' decay: gla, "
                             "simple_gla) or with use_cache=False")
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


def run_padded(op, query, key, value, mask, params: dict, gates: dict | None = None, **extra):
    """The op over query, key, value [B, *, T, *] and ``gates`` ([B, H, T] or [B, H, T, D]) with key padding ``mask``
    (bool [B, T] or None; queries are padded like the keys): the tokens packed into one B = 1 batch with cu_seqlens,
    the outputs scattered back (zeros at padding). With ``extra`` (initial_state, return_state) the op's (o, state) is
    returned, the state one per sequence."""
    gates = gates or {}
    if mask is None:
        return op(query, key, value, **params, **gates, **extra)
    b, t = mask.shape
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise InputError(f"attngen.hf: sequence(s) {empty} of the batch have no token (attention_mask all 0); "
                         "expected at least one token per sequence")
    idx = mask.reshape(-1).nonzero().flatten()
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int64)
    qp, kp, vp = (pack(x, idx) for x in (query, key, value))
    gp = {n: pack(g, idx) if g.dim() == 4 else pack(g.unsqueeze(-1), idx).squeeze(-1) for n, g in gates.items()}
    out = op(qp, kp, vp, cu_seqlens=cu, **params, **gp, **extra)
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
