"""``StateCache``: a transformers ``Cache`` whose per-layer entry is attngen's recurrent State (constant memory).

A separable causal spec (linear_elu, retention, cosFormer with a fixed M, ...) needs no KV cache: the state
S = sum_j K'_j^T V_j (and the row-sum z) after a sequence's tokens is all that the next token reads. The model calls
``cache.update(key, value, layer_idx)`` before its attention function; a StateLayer hands the new key and value back
unchanged and marks the key tensor, and attngen's attention function (``attngen.hf.register``) finds the mark and
runs the op from the layer's state:

- prefill (no state yet): ``op(q, k, v, return_state=True)``; with padding the tokens are packed with
  ``cu_seqlens`` so every sequence gets its own state, and ``state.pos`` counts only its real tokens (left padding
  keeps each sequence's positions right: cosFormer's angles, rotary in the spec);
- decode: ``op.step`` for one new token per sequence, ``op(..., initial_state=state, return_state=True)`` for more.

``get_seq_length`` is the number of (padded) positions consumed, as transformers expects from a cache; the State's
``pos`` holds each sequence's own count. A mark that no attngen attention function consumed (the model's
``attn_implementation`` is not attngen's, or the model copied the key) is found at the layer's next update and is an
InputError: the attention would have run on the new tokens alone.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attngen.errors import InputError
from attngen.hf.attention import STATE_LAYER_ATTR, registered, run_padded


class StateLayer(CacheLayerMixin):
    """One layer's recurrent State (``attngen.runtime.state.State``) and the number of positions consumed."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None
        self.seen = 0
        self._pending = None

    def __repr__(self) -> str:
        return f"StateLayer(seen={self.seen}, bytes={self.nbytes()})"

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending is not None:
            raise InputError("attngen.hf.StateCache: the previous keys given to this layer were never attended by an "
                             "attngen attention function, so the model attended the new tokens alone. Fix: load the "
                             "model with attn_implementation=attngen.hf.register(spec) (a separable causal spec)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        setattr(key_states, STATE_LAYER_ATTR, self)
        self._pending = key_states
        return key_states, value_states

    def attend(self, attn, op, query, key, value, mask, params: dict, gates: dict | None = None):
        """Called by the attention function on the keys this layer handed back: [B, H, T, Dv] from the state
        (``gates``: the new tokens' gates, [B, H, T] or [B, H, T, D])."""
        if key is not self._pending:
            raise InputError("attngen.hf.StateCache: the keys reached the attention function out of order")
        self._pending = None
        delattr(key, STATE_LAYER_ATTR)
        t = query.shape[2]
        if key.shape[2] != t:
            raise InputError(f"{attn.name}: StateCache got {key.shape[2]} keys for {t} queries; expected the new "
                             "tokens' keys only")
        if mask is not None and mask.shape[1] != self.seen + t:
            raise InputError(f"{attn.name}: the attention_mask covers {mask.shape[1]} positions; expected the "
                             f"{self.seen} consumed plus {t} new")
        new = None if mask is None else mask[:, self.seen:]
        if self.state is None:
            o, state = run_padded(op, query, key, value, new, params, gates, return_state=True)
        else:
            if new is not None and not bool(new.all()):
                raise InputError(f"{attn.name}: padding among the new tokens after the prefill; StateCache keeps one "
                                 "state per sequence and expects every continuation token to be real. Fix: left-pad "
                                 "the prompts")
            if t == 1:
                o, state = op.step(query, key, value, self.state, **params, **(gates or {}))
            else:
                o, state = op(query, key, value, initial_state=self.state, return_state=True, **params,
                              **(gates or {}))
        self.state, self.seen = state, self.seen + t
        return o

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self._pending = None, 0, None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise InputError("attngen.hf.StateCache cannot crop: a recurrent state cannot forget tokens "
                             "(assisted generation needs a KV cache)")

    def offload(self):
        pass

    def prefetch(self):
        pass

    def _select(self, index) -> None:
        if self.state is not None:
            self.state = self.state.select(index.to(self.state.S.device))

    def reorder_cache(self, beam_idx) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self._select(torch.arange(self.state.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices) -> None:
        self._select(torch.as_tensor(indices))


class StateCache(Cache):
    """A transformers Cache of attngen recurrent states, one StateLayer per decoder layer.

    ``StateCache(model)`` (or a config): the model's ``attn_implementation`` must be a name from
    ``attngen.hf.register`` whose spec has a recurrent state (causal, separable, free of the final length); pass it to
    ``model.generate(..., past_key_values=cache)`` or a forward's ``past_key_values``. ``nbytes()`` is the same after
    any number of tokens."""

    def __init__(self, model_or_config):
        config = getattr(model_or_config, "config", model_or_config)
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        name = getattr(config, "_attn_implementation", None)
        attn = registered(name) if isinstance(name, str) else None
        if attn is None:
            raise InputError(f"StateCache: the model's attn_implementation is {name!r}; expected a name returned by "
                             "attngen.hf.register(spec) (a separable causal spec). Fix: "
                             "model.set_attn_implementation(attngen.hf.register('linear_elu'))")
        op = attn.op_for(True)  # InputError now (not mid-generation) for a spec without a recurrent state
        if not op.plan.capabilities.decodable:
            raise InputError(f"StateCache: {name} has no recurrent state: {op.plan.capabilities.decode_reason}. "
                             "Fix: use the default KV cache (transformers' DynamicCache)")
        layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(layers, int) or layers < 1:
            raise InputError(f"StateCache: the config has num_hidden_layers={layers!r}; expected a positive int")
        self.attention = attn
        super().__init__(layers=[StateLayer() for _ in range(layers)])

    def nbytes(self) -> int:
        """Bytes held by all layers' states (constant in the number of tokens consumed)."""
        return sum(layer.nbytes() for layer in self.layers)
