"""attngen.nn.Attention against a hand-written layer: the projections done by hand (x W^T + b, the gates'
logsigmoid) around the naive float64 reference (attngen.reference), outputs and the gradient of every parameter;
state_dict and dtype moves; padding masks against per-sequence unpadded runs; prefill + decode against the whole
sequence; bad input."""
import re

import pytest
import torch
from conftest import assert_close
from torch.nn import functional as F

import attngen
from attngen import InputError
from attngen.nn import Attention, KVCache
from attngen.runtime.state import State

E, H = 32, 4


def hand_layer(layer: Attention, x, weights: dict):
    """The layer's forward by hand from ``weights`` (name -> tensor, the layer's named_parameters and buffers):
    projections as x W^T + b, gates logsigmoid(x W^T + b) / normaliser, attention by the naive reference."""
    b, t, _ = x.shape
    d, hkv = layer.head_dim, layer.num_kv_heads

    def proj(name, x):
        y = x @ weights[f"{name}.weight"].T
        return y + weights[f"{name}.bias"] if f"{name}.bias" in weights else y

    q = proj("q_proj", x).view(b, t, H, d)
    k = proj("k_proj", x).view(b, t, hkv, d)
    v = proj("v_proj", x).view(b, t, hkv, d)
    kw = {name[len("params."):]: w for name, w in weights.items() if name.startswith("params.")}
    for g in layer.spec.gates:
        gx = F.logsigmoid(proj(f"gate_proj.{g.name}", x)) / layer.gate_logit_normalizer
        kw[g.name] = gx.view(b, t, H, d) if g.per == "key_dim" else gx.view(b, t, H)
    o = attngen.reference(layer.spec, layout="bthd")(q, k, v, **kw)
    return proj("o_proj", o.reshape(b, t, H * d))


def perturbed(layer: Attention, scale: float = 0.1) -> Attention:
    """The spec's parameters moved off their init (an identity W would hide a transposed matrix)."""
    with torch.no_grad():
        for p in layer.params.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def weights_of(layer: Attention) -> dict:
    return dict(layer.named_parameters()) | dict(layer.named_buffers())


def leaf_copies(layer: Attention) -> dict:
    return {n: w.detach().clone().requires_grad_(w.requires_grad) for n, w in weights_of(layer).items()}


CASES = [  # (spec, num_kv_heads, layout)
    ("softmax", None, "bthd"),
    ("linear_elu", None, "bhtd"),
    ("retention", None, "bthd"),
    ("gla", None, "bhtd"),
    ("simple_gla", None, "bthd"),
    ("forgetting", None, "bthd"),
    ("hedgehog", None, "bthd"),
    ("llama", 2, "bhtd"),
    ("llama", 1, "bthd"),
    ("rebased", None, "bhtd"),
    ("performer", None, "bthd"),
    ("alibi", None, "bthd"),
]


@pytest.mark.parametrize("spec,kv,layout", CASES, ids=[f"{s}-kv{k}-{lay}" for s, k, lay in CASES])
def test_output_and_every_gradient_match_the_hand_written_layer(spec, kv, layout):
    layer = perturbed(Attention(spec, E, H, kv, layout=layout, bias=True, dtype=torch.float64))
    x = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    grad_o = torch.randn(2, 9, E, dtype=torch.float64)
    out = layer(x)
    out.backward(grad_o)
    ref_w = leaf_copies(layer)
    xr = x.detach().clone().requires_grad_()
    ref = hand_layer(layer, xr, ref_w)
    ref.backward(grad_o)
    assert_close("o", out, ref, 1e-10)
    assert_close("dx", x.grad, xr.grad, 1e-10)
    trained = dict(layer.named_parameters())
    assert all(not isinstance(w, torch.nn.Parameter) for _, w in layer.named_buffers())
    for name, p in trained.items():
        assert p.grad is not None, f"{name}: no gradient"
        assert_close(f"d{name}", p.grad, ref_w[name].grad, 1e-10)
    learnable = {p.name for p in layer.spec.parameters if p.learnable}
    assert {n[len("params."):] for n in trained if n.startswith("params.")} == learnable
    assert {n for n in trained if n.startswith("gate_proj.")} == \
        {f"gate_proj.{g.name}.{w}" for g in layer.spec.gates for w in ("weight", "bias")}


def test_float32_layer_within_float32_tolerance_of_the_float64_reference():
    layer = perturbed(Attention("hedgehog", E, H))
    x = torch.randn(2, 9, E)
    ref_w = {n: w.detach().double() for n, w in weights_of(layer).items()}
    assert_close("o", layer(x), hand_layer(layer, x.double(), ref_w).float(), 1e-5)


def test_spec_parameters_are_parameters_and_fixed_ones_buffers():
    layer = Attention("performer", E, H)
    assert "params.W" in layer.state_dict() and "params.W" in dict(layer.named_buffers())
    assert "params.W" not in dict(layer.named_parameters())
    assert not any("scale" in n for n in layer.state_dict())  # the per-call scale keeps the op's default
    hedgehog = Attention("hedgehog", E, H)
    w = dict(hedgehog.named_parameters())["params.W"]
    assert w.shape == (H, 32, E // H)
    eye = torch.eye(32, E // H).expand(H, 32, E // H)
    assert torch.equal(w.detach(), eye)  # its init: eye per head
    alibi = Attention("alibi", E, H)
    slope = dict(alibi.named_parameters())["params.slope"].detach()
    assert torch.allclose(slope, 2.0 ** (-8.0 * (torch.arange(H) + 1) / H))


def test_state_dict_round_trip():
    a = perturbed(Attention("t5_bias", E, H, bias=True), 1.0)
    b = Attention("t5_bias", E, H, bias=True)
    x = torch.randn(2, 9, E)
    assert not torch.allclose(a(x), b(x))
    missing = b.load_state_dict(a.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    assert torch.equal(a(x), b(x))
    assert "params.rel" in a.state_dict() and a.state_dict()["params.rel"].shape == (H, 32)


def test_to_float64_moves_parameters_and_buffers():
    layer = perturbed(Attention("performer", E, H))
    x = torch.randn(2, 9, E)
    o32 = layer(x)
    layer.to(torch.float64)
    assert all(w.dtype == torch.float64 for w in weights_of(layer).values())
    o64 = layer(x.double())
    assert o64.dtype == torch.float64
    assert_close("o", o32.double(), o64, 1e-5)


@pytest.mark.parametrize("spec,kv", [("softmax", None), ("gla", None), ("llama", 2), ("retention", None)])
def test_padding_masks_equal_unpadded_runs(spec, kv):
    layer = perturbed(Attention(spec, E, H, kv, dtype=torch.float64))
    x = torch.randn(3, 8, E, dtype=torch.float64)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    spans = [(3, 8), (0, 5), (0, 8)]
    grad_o = torch.randn(3, 8, E, dtype=torch.float64)
    out = layer(x, attention_mask=mask)
    out.backward(grad_o)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    for i, (a, b) in enumerate(spans):
        alone = layer(x[i:i + 1, a:b])
        alone.backward(grad_o[i:i + 1, a:b])
        assert_close(f"o[{i}]", out[i:i + 1, a:b], alone, 1e-12)
    assert not out[0, :3].any() and not out[1, 5:].any()  # padded rows are 0
    for n, p in layer.named_parameters():
        assert_close(f"d{n}", grads[n], p.grad, 1e-12)


@pytest.mark.parametrize("spec,kv,layout,kind", [
    ("linear_elu", None, "bthd", State), ("gla", None, "bhtd", State), ("hedgehog", None, "bthd", State),
    ("retention", 2, "bthd", State), ("softmax", None, "bhtd", KVCache), ("llama", 2, "bthd", KVCache),
    ("diff_attention", None, "bthd", KVCache)])
def test_prefill_and_decode_equal_the_full_forward(spec, kv, layout, kind):
    layer = perturbed(Attention(spec, E, H, kv, layout=layout, dtype=torch.float64))
    x = torch.randn(2, 9, E, dtype=torch.float64)
    full = layer(x)
    o, state = layer(x[:, :5], use_cache=True)
    assert isinstance(state, kind)
    outs = [o]
    for i in range(5, 9):
        o_t, state = layer(x[:, i:i + 1], state=state, use_cache=True)
        outs.append(o_t)
    assert_close("decoded", torch.cat(outs, 1), full, 1e-12)
    assert int(state.pos.min()) == int(state.pos.max()) == 9
    if kind is State:  # a continuation of several tokens from a state
        o, state = layer(x[:, :4], use_cache=True)
        rest = layer(x[:, 4:], state=state)
        assert_close("continued", torch.cat([o, rest], 1), full, 1e-12)


@pytest.mark.parametrize("spec,kv", [("llama", 2), ("gla", None)])
def test_padded_prefill_then_decode_equals_unpadded_runs(spec, kv):
    """Left and right padding: each sequence's state (or cache) holds only its own tokens and positions."""
    layer = perturbed(Attention(spec, E, H, kv, dtype=torch.float64))
    x = torch.randn(2, 7, E, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    spans = [(2, 7), (0, 4)]
    nxt = torch.randn(2, 3, E, dtype=torch.float64)
    _, state = layer(x, attention_mask=mask, use_cache=True)
    steps = []
    for i in range(3):
        o_t, state = layer(nxt[:, i:i + 1], state=state, use_cache=True)
        steps.append(o_t)
    steps = torch.cat(steps, 1)
    for n, (a, b) in enumerate(spans):
        alone = layer(torch.cat([x[n:n + 1, a:b], nxt[n:n + 1]], 1))
        assert_close(f"seq {n}", steps[n:n + 1], alone[:, b - a:], 1e-12)


def test_bad_masks_raise_input_error():
    layer = Attention("softmax", E, H)
    x = torch.randn(2, 5, E)
    bad = {
        "3-D": (torch.ones(2, 1, 5), "2-D padding mask"),
        "shape": (torch.ones(2, 4), "[B, T] = [2, 5]"),
        "values": (torch.full((2, 5), 2), "0 (padding) and 1 (token)"),
        "additive": (torch.zeros(2, 5).masked_fill(torch.eye(2, 5).bool(), float("-inf")), "0 (padding) and 1"),
        "holes": (torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), "left or right padding"),
        "empty row": (torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]), "no token"),
        "not a tensor": ([[1] * 5] * 2, "expected a tensor"),
    }
    for what, (mask, message) in bad.items():
        with pytest.raises(InputError, match=re.escape(message)):
            layer(x, attention_mask=mask)


def test_bad_inputs_and_unsupported_caches_raise_input_error():
    with pytest.raises(InputError, match="does not divide num_heads"):
        Attention("llama", E, H, 3)
    with pytest.raises(InputError, match="not a multiple of num_heads"):
        Attention("softmax", 30, H)
    with pytest.raises(InputError, match="layout"):
        Attention("softmax", E, H, layout="bshd")
    layer = Attention("softmax", E, H)
    with pytest.raises(InputError, match=r"\[B, T, E\] with E = embed_dim = 32"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(InputError, match="expected the same dtype and device"):
        layer(torch.randn(2, 5, E, dtype=torch.float64))
    for spec, why in (("alibi", "depend on positions"), ("forgetting", "gates"), ("cosformer", "positions")):
        with pytest.raises(InputError, match=why):
            Attention(spec, E, H)(torch.randn(1, 3, E), use_cache=True)
    bidir = Attention(attngen.load_spec("linear_elu", causal=False), E, H)
    with pytest.raises(InputError, match="bidirectional"):
        bidir(torch.randn(1, 3, E), use_cache=True)
    _, cache = layer(torch.randn(2, 4, E), use_cache=True)
    with pytest.raises(InputError, match="one token per sequence"):
        layer(torch.randn(2, 2, E), state=cache, use_cache=True)
    with pytest.raises(InputError, match="batch 1"):
        layer(torch.randn(1, 1, E), state=cache, use_cache=True)
    state_layer = Attention("linear_elu", E, H)
    with pytest.raises(InputError, match="found a KVCache"):
        state_layer(torch.randn(2, 1, E), state=cache, use_cache=True)
    with pytest.raises(InputError, match="expected a KVCache"):
        layer(torch.randn(2, 1, E), state=state_layer(torch.randn(2, 3, E), use_cache=True)[1])
