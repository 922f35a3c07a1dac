"""attngen.hf: attngen's ops as transformers attention implementations (tiny models from configs, random weights,
no downloads; MiniLM from the weights package when installed).

Every comparison is against transformers' own SDPA implementation of the same model, on the positions that are
tokens (padded positions have no defined output), and each test also shows that its check can fail: the same
comparison without the padding mask, or with a deliberately wrong setting, is far outside the tolerance.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attngen  # noqa: E402
import attngen.hf  # noqa: E402
from attngen.errors import InputError  # noqa: E402

TOL = 1e-5


def _llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2, attention_dropout=0.0, **overrides)  # large weights: attention moves the logits
    return transformers.LlamaForCausalLM(config).eval()


def _bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _left_padded(lengths=(12, 8, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, 128, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, t - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _max_err(a, b, where):
    assert torch.isfinite(a[where]).all() and torch.isfinite(b[where]).all()
    return (a - b)[where].abs().max().item()


def test_import_attngen_does_not_import_transformers_and_hf_names_the_extra():
    code = textwrap.dedent("""
        import sys
        import attngen
        assert "transformers" not in sys.modules, "import attngen imported transformers"

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "transformers":
                    raise ImportError("blocked")

        sys.meta_path.insert(0, _Block())
        try:
            import attngen.hf
        except ImportError as e:
            print("ok", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok") and "pip install 'attngen[hf]'" in out.stdout


def test_register_names_and_refusals():
    assert attngen.hf.register("softmax") == "attngen_softmax"
    assert attngen.hf.register("softmax", name="my_softmax") == "my_softmax"
    assert attngen.hf.registered("my_softmax").base.name == "softmax"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert "my_softmax" in AttentionInterface._global_mapping and "my_softmax" in AttentionMaskInterface._global_mapping
    attngen.hf.unregister("my_softmax")
    assert "my_softmax" not in AttentionInterface._global_mapping and attngen.hf.registered("my_softmax") is None
    # a gated spec registers; a model without attngen.hf.add_gates is refused per call (tests/test_hf_gates.py)
    assert attngen.hf.registered(attngen.hf.register("gla")).base.gate_names == ("g",)
    with pytest.raises(InputError, match="name="):
        attngen.hf.register("softmax", name="sdpa")
    with pytest.raises(InputError, match="mode="):
        attngen.hf.register("softmax", mode="encoder")


def test_llama_left_padded_gqa_logits_and_training_gradients_equal_sdpa():
    model = _llama()
    name = attngen.hf.register("llama")
    ids, mask = _left_padded()
    real = mask.bool()
    ref = _logits(model, "sdpa", ids, mask)
    assert _max_err(_logits(model, name, ids, mask), ref, real) <= TOL
    # the check can fail: without the mask (what a wrapper that drops it computes), or rotating twice
    assert _max_err(_logits(model, "sdpa", ids, None), ref, real) > 1e-2
    twice = attngen.hf.register("llama", name="llama_rotating_twice", keep_rotary=True)
    assert _max_err(_logits(model, twice, ids, mask), ref, real) > 1e-2

    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        model.train()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.eval()
    assert len(grads[name]) == len(list(model.parameters()))
    for n, g in grads["sdpa"].items():
        mine = grads[name][n]
        assert torch.isfinite(g).all() and torch.isfinite(mine).all(), n
        err = ((mine - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert err <= TOL and torch.allclose(mine, g, rtol=1e-4, atol=1e-6), (n, err)


def test_llama_generate_with_kv_cache_gives_sdpas_tokens():
    model = _llama()
    name = attngen.hf.register("llama")
    ids, mask = _left_padded()
    out = {}
    for impl, cache in (("sdpa", True), (name, True), (name, False)):
        model.set_attn_implementation(impl)
        out[impl, cache] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                          use_cache=cache, pad_token_id=0)
    assert out[name, True].shape == (3, 12 + 6)
    assert torch.equal(out[name, True], out["sdpa", True])
    assert torch.equal(out[name, False], out["sdpa", True])


ROTARY_ELU = {"name": "rotary_elu", "causal": True, "similarity": "dot(elu(q) + 1, elu(k) + 1)",
              "rotary": {"theta": 10000}, "normalize": {"kind": "rowsum", "eps": 1e-6, "eps_mode": "add"}}


@pytest.mark.parametrize("spec", ["linear_elu", attngen.load_spec("cosformer", M=64), ROTARY_ELU],
                         ids=["linear_elu", "cosformer_M64", "rotary_elu_kept"])
def test_state_cache_generate_equals_no_cache_and_memory_is_constant(spec):
    """Positions continue per sequence: cosFormer's angles and a spec's own rotary (kept with keep_rotary=True, on
    top of Llama's) are evaluated at each sequence's own count, in the prefill and in every step."""
    model = _llama()
    name = attngen.hf.register(spec, name="state_" + attngen.load_spec(spec).name, keep_rotary=isinstance(spec, dict))
    model.set_attn_implementation(name)
    ids, mask = _left_padded()
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False,
                           pad_token_id=0)
    cache = attngen.hf.StateCache(model)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache=cache, pad_token_id=0)
    assert torch.equal(cached, plain)
    states = [layer.state for layer in cache.layers]
    # left padding: each sequence's state counts its own tokens (prompt + generated, one step behind the last)
    assert all(s.pos.tolist() == [12 + 5, 8 + 5, 5 + 5] for s in states)
    short = attngen.hf.StateCache(model)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, cache=short, pad_token_id=0)
    assert short.nbytes() == cache.nbytes() > 0
    # the state is what the op computes: the same tokens through the KV cache path, and a dropped mask differs
    kv = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(kv, plain)


def test_state_cache_beam_search():
    model = _llama()
    model.set_attn_implementation(attngen.hf.register("linear_elu"))
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, cache=attngen.hf.StateCache(model), **kw),
                       model.generate(ids, use_cache=False, **kw))


def test_bert_right_padded_softmax_equals_sdpa():
    model = _bert()
    name = attngen.hf.register("softmax")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    out = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _max_err(out[name], out["sdpa"], mask.bool()) <= TOL
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        unmasked = model(input_ids=ids).last_hidden_state
    assert _max_err(unmasked, out["sdpa"], mask.bool()) > 1e-2


def test_masks_and_settings_it_cannot_express_are_errors():
    model = _llama()
    name = attngen.hf.register("llama")
    model.set_attn_implementation(name)
    ids, mask = _left_padded()
    four_d = torch.zeros(3, 1, 12, 12)
    with pytest.raises(InputError, match="4-D"):
        model(input_ids=ids, attention_mask=four_d)
    # a scaling the spec cannot take (softmax's formula fixes 1/sqrt(d))
    fixed = attngen.hf.registered(attngen.hf.register("softmax"))
    with pytest.raises(InputError, match="scale"):
        fixed(model.model.layers[0].self_attn, torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16),
              torch.randn(1, 2, 3, 16), None, scaling=0.3)
    # dropout in training
    bert = _bert()
    bert.set_attn_implementation(attngen.hf.register("softmax"))
    bert.train()
    with pytest.raises(InputError, match="dropout"):
        bert(input_ids=ids)
    # a sliding window (Mistral) is a mask pattern attngen.hf does not express
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)).eval()
    mistral.set_attn_implementation(name)
    with pytest.raises(InputError, match="sliding"):
        mistral(input_ids=ids, attention_mask=mask)
    # cosFormer's default M depends on the length: a KV cache would mix lengths
    model.set_attn_implementation(attngen.hf.register("cosformer"))
    with pytest.raises(InputError, match="length"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_state_cache_refusals():
    model = _llama()
    model.set_attn_implementation("sdpa")
    with pytest.raises(InputError, match="attn_implementation"):
        attngen.hf.StateCache(model)
    model.set_attn_implementation(attngen.hf.register("softmax"))
    with pytest.raises(InputError, match="no recurrent state"):
        attngen.hf.StateCache(model)
    # a cache whose keys no attngen function attends is caught at the layer's next update
    model.set_attn_implementation(attngen.hf.register("linear_elu"))
    cache = attngen.hf.StateCache(model)
    model.set_attn_implementation("sdpa")
    ids, mask = _left_padded()
    with pytest.raises(InputError, match="never attended"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache=cache, pad_token_id=0)


def _realdata():
    from benchmarks import realdata
    if not realdata.available():
        pytest.skip(f"needs the all-MiniLM-L6-v2 weights: {realdata.INSTALL_COMMAND}")
    return realdata


def test_minilm_sentence_embeddings_through_attngen_softmax():
    """The real model (transformers' BertModel from the weights package): attngen's softmax in every layer gives
    sentence-transformers-style embeddings with cosine >= 0.99999 to SDPA's, on a right-padded batch."""
    realdata = _realdata()
    texts = ["The cat sat on the mat.", "A recipe for bread: flour, water, salt and a long, patient rise.",
             "Share prices dropped steeply this afternoon after the announcement.", "Hello"]
    ref = realdata.sentence_embedding(texts)
    mine = realdata.sentence_embedding(texts, attn_implementation=attngen.hf.register("softmax"))
    assert torch.isfinite(mine).all() and mine.shape == ref.shape == (4, 384)
    cos = (mine * ref).sum(1)
    assert cos.min().item() >= 0.99999, cos.tolist()
    # the check can fail: a variant that is not softmax in every layer is far from it
    other = realdata.sentence_embedding(texts, attn_implementation=attngen.hf.register("linear_elu"))
    assert (other * ref).sum(1).min().item() < 0.99


def test_minilm_swap_report_runs(tmp_path):
    realdata = _realdata()
    from benchmarks import minilm_swap
    names = list(minilm_swap.variants())
    texts = ["The beans go in first along the fence, because they climb and the fence gives them a hold.",
             "Carrots grow crooked and split when they meet a stone in the light soil of the old bed by the shed."]
    path = minilm_swap.minilm_swap(out_dir=tmp_path, texts=texts, layers=[5], names=[names[1], names[2]],
                                   echo=lambda *a: None)
    text = path.read_text()
    assert path.suffix == ".md" and path.stem.endswith("-minilm-swap") and realdata.INSTALL_COMMAND not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 2 and "error" not in text
    values = [float(x) for row in rows for cell in row.split("|")[2:-1] for x in cell.split("/")]
    assert len(values) == 4 and all(-1.0 <= x <= 1.0 + 1e-6 for x in values), values


def test_the_tutorial_runs(capsys):
    """docs/tutorial.md: its Python blocks, in order, in one namespace (they assert what the text claims)."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "tutorial.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 4
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/tutorial.md", "exec"), namespace)
    assert "linear" in capsys.readouterr().out


@pytest.mark.parametrize("spec, fast", [("llama", True), ("linear_elu", True), ("alibi", False),
                                        (attngen.load_spec("cosformer", M=64), False)])
def test_kv_cache_rows_are_the_causal_ops_last_rows(spec, fast):
    """With a KV cache (fewer queries than keys) each new query is the last row of the causal op over its
    sequence's real keys: checked against the op run on each whole sequence. Specs without positions take the
    one-query path (fast), the others the zero-query front; both must agree with the whole-sequence op."""
    attn = attngen.hf.registered(attngen.hf.register(spec, name="kv_rows"))
    assert (attn.row_op() is not None) == fast
    op = attn.op_for(True)
    g = torch.Generator().manual_seed(3)
    b, h, hkv, s, d = 3, 4, 2, 9, 16
    key, value = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, :3] = False
    mask[2, :6] = False
    for t in (1, 2):
        query = torch.randn(b, h, t, d, generator=g)
        out = attn.attend(op, query, key, value, mask, {}, True)
        for n in range(b):
            k, v = key[n:n + 1, :, mask[n]], value[n:n + 1, :, mask[n]]
            q = torch.cat([torch.randn(1, h, k.shape[2] - t, d, generator=g), query[n:n + 1]], 2)
            ref = op(q, k, v)[:, :, -t:]
            assert torch.isfinite(out[n]).all()
            assert (out[n:n + 1] - ref).abs().max().item() <= 1e-5, (spec, t, n)


TEMPERATURE = {"name": "temperature_softmax", "causal": True, "similarity": "exp(dot(q, k) * scale * t)",
               "normalize": "rowsum", "parameters": {"t": {"shape": ["H"], "init": 1.0}}}


def test_add_parameters_trains_the_specs_parameters_with_the_model():
    """A per-head temperature t becomes a parameter of each attention module: at its init the logits are SDPA's; t = 2
    on layer 0 gives SDPA's logits with that layer's scaling doubled; its gradient is the finite difference's."""
    model = _llama().double()
    ids, mask = _left_padded()
    real = mask.bool()
    name = attngen.hf.register(TEMPERATURE)
    assert attngen.hf.add_parameters(model, name) == 2
    names = [n for n, _ in model.named_parameters() if n.endswith("attngen_params.t")]
    assert len(names) == 2 and "model.layers.0.self_attn.attngen_params.t" in model.state_dict()
    t0 = model.model.layers[0].self_attn.attngen_params.t
    assert t0.dtype == torch.float64 and t0.shape == (4,)
    sdpa = _logits(model, "sdpa", ids, mask)
    assert _max_err(_logits(model, name, ids, mask), sdpa, real) < TOL
    with torch.no_grad():
        t0.fill_(2.0)
    ours = _logits(model, name, ids, mask)
    assert _max_err(ours, sdpa, real) > 1e-2  # t is used
    model.model.layers[0].self_attn.scaling *= 2.0
    assert _max_err(ours, _logits(model, "sdpa", ids, mask), real) < TOL
    model.model.layers[0].self_attn.scaling /= 2.0
    model.set_attn_implementation(name)

    def loss():
        return model(input_ids=ids, attention_mask=mask).logits[real].square().mean()

    model.zero_grad()
    loss().backward()
    h = int(t0.grad.abs().argmax())
    grad = t0.grad[h].item()
    with torch.no_grad():  # a central difference (Llama's rotary tables are float32: no smaller step)
        t0[h] += 1e-3
        up = loss().item()
        t0[h] -= 2e-3
        down = loss().item()
        t0[h] += 1e-3
    assert torch.isfinite(t0.grad).all() and abs(grad) > 1e-6
    assert abs(grad - (up - down) / 2e-3) <= 1e-2 * abs(grad)
    with pytest.raises(InputError, match="not an attn_implementation registered"):
        attngen.hf.add_parameters(model, "sdpa")
    attngen.hf.unregister(name)
