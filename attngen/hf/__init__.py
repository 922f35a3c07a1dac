"""attngen in Hugging Face transformers models (transformers >= 5, the optional extra ``attngen[hf]``).

    import attngen.hf
    name = attngen.hf.register("cosformer")                  # -> "attngen_cosformer"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)   # or model.set_attn_implementation
    model.generate(ids, attention_mask=mask)                  # a KV cache (transformers' DynamicCache)
    model.generate(ids, attention_mask=mask, past_key_values=attngen.hf.StateCache(model))  # separable specs

``register`` adds an attention function to transformers' ``AttentionInterface`` and a mask function of the same
name to its ``AttentionMaskInterface``: padding reaches the attention function as a 2-D key-padding mask, which it
turns into ``cu_seqlens`` (unpad, run, re-pad); any mask it cannot express is an InputError, never dropped.
``StateCache`` is a transformers ``Cache`` whose per-layer entry is attngen's recurrent State (constant memory).
Gated specs (gla, simple_gla, forgetting) need ``add_gates(model, name)``: gate projections in every attention
module, computed from its input hidden states by a forward pre-hook.
See docs/hf.md.
"""
try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess by tests/test_hf.py
    raise ImportError("attngen.hf needs transformers >= 5 (Hugging Face): pip install 'attngen[hf]'") from error

from attngen.hf.attention import (
    AttngenAttention,
    add_gates,
    add_parameters,
    register,
    registered,
    remove_gates,
    unregister,
)
from attngen.hf.cache import StateCache, StateLayer

__all__ = ["register", "registered", "unregister", "add_parameters", "add_gates", "remove_gates", "AttngenAttention",
           "StateCache", "StateLayer"]
