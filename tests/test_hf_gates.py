"""attngen.hf.add_gates: gated specs (gla, simple_gla, forgetting) inside a tiny Llama (from a config, random weights,
fp32 unless stated). Each comparison is against something computed another way, and each shows it can fail:

- the attention module's output against the spec's formula written out here by hand (float64) on the module's own
  hidden states, projections, rotary tables and gate weights;
- a left-padded batch against each sequence run alone without padding;
- generate() with attngen.hf.StateCache (prefill, then op.step with each new token's gate) against use_cache=False;
- the gates' gradients against central finite differences (float64 model).
"""
import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

import attngen.hf  # noqa: E402
from attngen.errors import InputError  # noqa: E402
from attngen.hf.attention import PENDING_ATTR  # noqa: E402

TOL = 1e-5
GATED = ["gla", "simple_gla"]  # with a recurrent state (StateCache); forgetting is quadratic (no StateCache)


def _llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2, attention_dropout=0.0)  # large weights: attention moves the logits
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _gated(spec, dtype=torch.float32, seed=0):
    """A tiny Llama set to ``spec`` with gates added; the gate biases moved off 0 per unit so that the gates differ
    across heads and dimensions (a transposed gate would show)."""
    model = _llama(seed, dtype)
    name = attngen.hf.register(spec, name="gated_" + spec)
    model.set_attn_implementation(name)
    assert attngen.hf.add_gates(model, name) == 2
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in layer.self_attn.attngen_gates.values():
                proj.bias.copy_(4 * torch.randn(proj.bias.shape, generator=g) - 2)
    return model, name


def _left_padded(lengths=(12, 8, 5), seed=1):
    """Left-padded ids and mask. The padded positions hold random tokens, not the pad id: Llama's pad embedding is 0,
    which gives k = v = 0 there, so a linear attention that read the padding would not show it."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, 128, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, t - n:] = 1
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _max_err(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a - b).abs().max().item()


def _rel_err(a, b):
    """The largest error relative to the largest magnitude (fp32 outputs of size ~50 carry absolute errors ~1e-5)."""
    return _max_err(a, b) / max(1.0, b.abs().max().item())


def _formula(spec, q, k, v, gate):
    """One sequence's attention by the spec's formula, written out: q [T, H, D], k, v [T, H_kv, D] (GQA: query head h
    reads kv head h // (H / H_kv)), the log gate [T, H, D] (gla) or [T, H] and G its cumulative sum: gla
    sum_d q_id k_jd exp(G_id - G_jd) scale v_j, simple_gla exp(G_i - G_j) scale q_i . k_j v_j, forgetting
    softmax_j(scale q_i . k_j + G_i - G_j) v_j, over j <= i. -> [T, H, D]."""
    t, h, d = q.shape
    k, v = (x.repeat_interleave(h // x.shape[1], 1) for x in (k, v))
    big = (gate if spec == "gla" else gate[..., None]).cumsum(0)  # [T, H, D or 1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scale = d ** -0.5
    if spec == "gla":
        decay = (big[:, None] - big[None, :]).masked_fill(~causal[:, :, None, None], -torch.inf).exp()
        scores = torch.einsum("ihd,jhd,ijhd->hij", q, k, decay) * scale
    else:
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale
        shift = (big[:, None, :, 0] - big[None, :, :, 0]).permute(2, 0, 1)  # [H, i, j]: G_i - G_j
        if spec == "forgetting":
            scores = (scores + shift).masked_fill(~causal, -torch.inf).softmax(-1)
        else:
            scores = (scores * shift.exp()).masked_fill(~causal, 0.0)
    return torch.einsum("hij,jhd->ihd", scores, v)


def _by_hand(spec, module, hidden, cos, sin, gates=None):
    """The attention module's output for one unpadded sequence in float64, from its weights: Llama's projections and
    rotary (rotate_half), the gate logsigmoid(x W^T + b) / 16 (per head or per key dim), then _formula."""
    x = hidden.double()
    t, h, hkv, d = x.shape[0], 4, 2, 16

    def lin(layer, x):
        y = x @ layer.weight.double().T
        return y if layer.bias is None else y + layer.bias.double()

    def rot(u):
        u1, u2 = u[..., :d // 2], u[..., d // 2:]
        return u * cos.double()[:, None] + torch.cat([-u2, u1], -1) * sin.double()[:, None]

    q = rot(lin(module.q_proj, x).view(t, h, d))
    k = rot(lin(module.k_proj, x).view(t, hkv, d))
    v = lin(module.v_proj, x).view(t, hkv, d)
    if gates is None:
        gates = F.logsigmoid(lin(module.attngen_gates["g"], x)) / 16.0
    gate = gates.view(t, h, d) if spec == "gla" else gates.view(t, h)
    return lin(module.o_proj, _formula(spec, q, k, v, gate).reshape(t, h * d))


@pytest.mark.parametrize("spec", GATED + ["forgetting"])
def test_gated_attention_module_equals_the_formula_by_hand_on_a_left_padded_batch(spec):
    model, name = _gated(spec)
    ids, mask = _left_padded()
    seen = {}

    def capture(module, args, kwargs, output):
        seen["hidden"], seen["rope"], seen["out"] = kwargs["hidden_states"], kwargs["position_embeddings"], output[0]

    module = model.model.layers[1].self_attn
    handle = module.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
    finally:
        handle.remove()
    assert module.__dict__.get("_attngen_pending_gates") is None  # taken by the attention function, not kept
    cos, sin = seen["rope"]
    for b, row in enumerate(mask.bool()):
        want = _by_hand(spec, module, seen["hidden"][b, row], cos[b, row], sin[b, row])
        assert _rel_err(seen["out"][b, row].double(), want) <= TOL, (spec, b)
        # the check can fail: the same formula with the gates left out (g = 0) is far off
        zero = torch.zeros(int(row.sum()), 4 * (16 if spec == "gla" else 1), dtype=torch.float64)
        ungated = _by_hand(spec, module, seen["hidden"][b, row], cos[b, row], sin[b, row], zero)
        assert _rel_err(seen["out"][b, row].double(), ungated) > 1e-2


@pytest.mark.parametrize("spec", GATED)
def test_left_padded_batch_logits_equal_each_sequence_alone(spec):
    model, _ = _gated(spec)
    ids, mask = _left_padded()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        unmasked = model(input_ids=ids, position_ids=_positions(mask)).logits
    for b, row in enumerate(mask.bool()):
        with torch.no_grad():
            alone = model(input_ids=ids[b:b + 1, row]).logits[0]
        assert _max_err(padded[b, row], alone) <= TOL, (spec, b)
        if not bool(row.all()):  # the check can fail: the padding read as tokens
            assert _max_err(unmasked[b, row], alone) > 1e-2


@pytest.mark.parametrize("spec", GATED)
def test_generate_with_state_cache_equals_no_cache(spec):
    """Greedy, 10 new tokens, a left-padded batch of 3: the same tokens, and every step's logits within 1e-4."""
    model, _ = _gated(spec)
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    plain = model.generate(ids, use_cache=False, **kw)
    cache = attngen.hf.StateCache(model)
    cached = model.generate(ids, cache=cache, **kw)
    assert cached.sequences.shape == (3, 12 + 10)
    assert torch.equal(cached.sequences, plain.sequences)
    assert len(cached.logits) == len(plain.logits) == 10
    for a, b in zip(cached.logits, plain.logits):
        assert _max_err(a, b) <= 1e-4
    assert [layer.state.pos.tolist() for layer in cache.layers] == [[12 + 9, 8 + 9, 5 + 9]] * 2
    # the check can fail: the same model with layer 1's gates shifted generates other logits
    with torch.no_grad():
        for proj in model.model.layers[1].self_attn.attngen_gates.values():
            proj.bias.add_(3.0)
    shifted = model.generate(ids, cache=attngen.hf.StateCache(model), **kw)
    assert max(_max_err(a, b) for a, b in zip(shifted.logits, plain.logits)) > 1e-2


def _register_by_hand(spec, like):
    """An attention function with _formula (per sequence, on the real tokens) in place of attngen's op, reading the
    gates add_gates' hook computed, registered with transformers under "by_hand_<spec>" (with attngen's mask
    function, which hands on the 2-D key-padding mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def by_hand(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        gate = module.__dict__.pop(PENDING_ATTR)["g"]  # [B, T, H(, D)]
        rows = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool) if attention_mask is None \
            else attention_mask
        out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        for b, row in enumerate(rows):
            q, k, v = (x[b].transpose(0, 1)[row] for x in (query, key, value))
            out[b, row] = _formula(spec, q, k, v, gate[b, row])
        return out, None

    name = "by_hand_" + spec
    AttentionInterface.register(name, by_hand)
    AttentionMaskInterface.register(name, attngen.hf.registered(like).mask)
    return name


def test_state_cache_continues_several_tokens_at_once():
    """After a prefill into StateCache, a forward of 3 more tokens per sequence (op with initial_state and the three
    tokens' gates) gives the last 3 rows of the whole sequences run without a cache."""
    model, _ = _gated("gla")
    ids, mask = _left_padded()
    more = torch.randint(3, 128, (3, 3), generator=torch.Generator().manual_seed(4))
    whole_ids, whole_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1)
    pos = _positions(whole_mask)
    cache = attngen.hf.StateCache(model)
    with torch.no_grad():
        whole = model(input_ids=whole_ids, attention_mask=whole_mask, position_ids=pos).logits
        model(input_ids=ids, attention_mask=mask, position_ids=pos[:, :12], cache=cache)
        last = model(input_ids=more, attention_mask=whole_mask, position_ids=pos[:, 12:], cache=cache).logits
    assert [layer.seen for layer in cache.layers] == [15, 15]
    assert _max_err(last, whole[:, 12:]) <= TOL
    assert _max_err(last, whole[:, 11:14]) > 1e-2  # the check can fail: rows one position off


@pytest.mark.parametrize("spec", GATED)
def test_training_step_gradients_equal_the_formula_by_hand_and_finite_differences(spec):
    """float64. (1) A training step of the whole model on a left-padded batch: loss.backward reaches every gate
    projection (finite, non-zero), and every parameter's gradient equals the one with the formula by hand in place of
    attngen's op (the same gates, through transformers' interface). (2) The attention module alone (all float64; the
    whole model rounds through float32 in Llama's RMSNorm): the gates' gradient along a random direction equals the
    central difference; without the bias's share it does not."""
    model, name = _gated(spec, dtype=torch.float64)
    model.train()
    ids, mask = _left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    pos = _positions(mask)
    grads = {}
    for impl in (name, _register_by_hand(spec, name)):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    mine, ref = grads.values()
    gate_names = [n for n, _ in model.named_parameters() if ".attngen_gates." in n]
    assert len(gate_names) == 4 and len(mine) == len(ref) == len(list(model.parameters()))
    for n in gate_names:
        assert torch.isfinite(mine[n]).all() and mine[n].abs().max().item() > 1e-6, n
    for n, g in ref.items():
        assert torch.isfinite(mine[n]).all() and torch.isfinite(g).all(), n
        assert ((mine[n] - g).norm() / g.norm()).item() <= 1e-9, n
    # the check can fail: the layers' gate gradients swapped
    assert ((mine[gate_names[0]] - ref[gate_names[2]]).norm() / ref[gate_names[2]].norm()).item() > 1e-2

    model.set_attn_implementation(name)
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 12, 64, generator=g, dtype=torch.float64)
    rope = model.model.rotary_emb(hidden, pos)
    weight = torch.randn(3, 12, 64, generator=g, dtype=torch.float64) * mask[..., None]  # real tokens only

    def loss():
        return (module(hidden_states=hidden, position_embeddings=rope, attention_mask=mask.bool())[0] * weight).sum()

    gates = list(module.attngen_gates.parameters())
    model.zero_grad()
    loss().backward()
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in gates]
    analytic = sum((p.grad * u).sum() for p, u in zip(gates, direction)).item()
    eps = 1e-6
    with torch.no_grad():
        for p, u in zip(gates, direction):
            p.add_(eps * u)
        up = loss().item()
        for p, u in zip(gates, direction):
            p.sub_(2 * eps * u)
        down = loss().item()
        for p, u in zip(gates, direction):
            p.add_(eps * u)
    numeric = (up - down) / (2 * eps)
    assert abs(numeric) > 1e-3 and abs(analytic - numeric) <= 1e-6 * abs(numeric), (analytic, numeric)
    weight_only = (gates[0].grad * direction[0]).sum().item()  # the check can fail: the bias's share left out
    assert abs(weight_only - numeric) > 1e-2 * abs(numeric)


def test_refusals_hooks_and_removal():
    model = _llama()
    ids, mask = _left_padded()
    name = attngen.hf.register("gla", name="gated_gla")
    model.set_attn_implementation(name)
    with pytest.raises(InputError, match=r"add_gates\(model, 'gated_gla'\)"):  # a gated spec without gates
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(InputError, match="has no gates"):
        attngen.hf.add_gates(model, attngen.hf.register("linear_elu"))
    with pytest.raises(InputError, match="not an attn_implementation registered"):
        attngen.hf.add_gates(model, "sdpa")
    assert attngen.hf.add_gates(model, name) == 2
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.attngen_gates.g.weight"].shape == (4 * 16, 64)
    assert sd["model.layers.1.self_attn.attngen_gates.g.bias"].shape == (4 * 16,)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    # a KV cache cannot carry the gates: StateCache or use_cache=False
    with pytest.raises(InputError, match="StateCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    # another attention function would run the layers without their gates
    model.set_attn_implementation("sdpa")
    with pytest.raises(InputError, match="did not read them"):
        model(input_ids=ids, attention_mask=mask)
    model.set_attn_implementation(name)
    # other gate shapes on the same modules
    with pytest.raises(InputError, match="already has gates"):
        attngen.hf.add_gates(model, attngen.hf.register("simple_gla", name="gated_simple_gla"))
    # unregister removes the hooks, keeps the projections; add_gates again restores the hooks and keeps the weights
    attngen.hf.unregister(name)
    assert attngen.hf.register("gla", name="gated_gla") == name
    with pytest.raises(InputError, match="no hook computed"):
        model(input_ids=ids, attention_mask=mask)
    assert attngen.hf.add_gates(model, name) == 2
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    # remove_gates: projections and hooks gone; sdpa runs, and the gated spec is refused again
    assert attngen.hf.remove_gates(model) == 2
    assert not any(".attngen_gates." in k for k in model.state_dict())
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(InputError, match="no gates from attngen.hf.add_gates"):
        attngen.hf.remove_gates(model)


def test_gates_save_and_load_with_the_model(tmp_path):
    """save_pretrained writes the gate projections; a model loaded with from_pretrained gets them back after
    add_gates from the checkpoint's tensors: the same logits."""
    from safetensors.torch import load_file
    model, name = _gated("simple_gla")
    ids, mask = _left_padded()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert attngen.hf.add_gates(loaded, name) == 2
    with torch.no_grad():
        fresh = loaded(input_ids=ids, attention_mask=mask).logits
    assert _max_err(fresh, ref) > 1e-3  # the check can fail: freshly initialised gates
    gates = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if ".attngen_gates." in k}
    result = loaded.load_state_dict(gates, strict=False)
    assert len(gates) == 4 and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, ref)
