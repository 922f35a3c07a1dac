"""all-MiniLM-L6-v2 with attngen's attention (attngen.hf): how close the sentence embeddings stay to the model's.

The model is transformers' BertModel from the installed weights package (benchmarks.realdata.minilm_model), run on
real text as one right-padded batch. First attngen's exact softmax in every layer (``attngen.hf.register("softmax")``:
the model's own operator, so the embeddings should agree to float32 rounding), then one variant in one layer at a
time, every other layer on transformers' SDPA:

- cosformer (bidirectional, its default M = the sequence length),
- topk_sparse: exact softmax over the top-k key blocks a cosformer estimator picks (docs/sparse.md),
- conv_basis: causal only (docs/conv_basis.md), so it is registered with mode="causal" and the layer attends
  causally inside a bidirectional encoder; the exact causal softmax in the same layer is reported beside it, so
  that the approximation's own share can be told from the causal mask's.

The number per (variant, layer) is the cosine similarity between each text's embedding and the unmodified
model's, mean and minimum over the texts. Nothing here is a pass/fail threshold.

    python -m benchmarks minilm-swap [--out bench/results]      # writes <date>-minilm-swap.md
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attngen.errors import AttngenError, InputError
from benchmarks import realdata
from benchmarks.common import _machine, write_result

SOFTMAX = {"name": "softmax", "causal": True, "similarity": "exp(dot(q, k)/sqrt(d))", "normalize": "rowsum"}


def variants(block: int = 16, k: int = 4, conv_k: int = 8) -> dict:
    """name -> (spec source, register() mode): the specs swapped in, one layer at a time."""
    topk = dict(SOFTMAX, name="softmax_topk_sparse", approx={
        "kind": "topk_sparse", "estimator": "cosformer", "k": k, "block": block,
        "always_keep": {"diagonal": True, "first": 1}})
    conv = dict(SOFTMAX, name="softmax_conv_basis", approx={"kind": "conv_basis", "k": conv_k})
    return {
        "cosformer": ("cosformer", None),
        f"topk_sparse (cosformer estimator, k {k}, block {block})": (topk, None),
        f"conv_basis (k {conv_k}; causal)": (conv, "causal"),
        "softmax, causal (anchor for conv_basis)": (SOFTMAX, "causal"),
    }


def texts_default() -> list:
    """The paragraphs of realdata.DEFAULT_TEXT: six texts of about 100 to 200 tokens."""
    return [p.replace("\n", " ").strip() for p in realdata.DEFAULT_TEXT.split("\n\n") if p.strip()]


class _OneLayer:
    """An attention function running ``inner`` (an attngen.hf function) in one layer and transformers' SDPA in the
    others. Registered under its own name; its mask function is attngen's (a 2-D key-padding mask or None), which
    SDPA gets as a boolean [B, 1, 1, S] mask (bidirectional: every row has a key)."""

    def __init__(self, inner, layer: int):
        self.inner, self.layer = inner, layer

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                 **kwargs):
        if module.layer_idx == self.layer:
            return self.inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None


def _embed(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)


def _batch(texts: list, max_tokens: int):
    tok = realdata._tokenizer(max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    encs = tok.encode_batch(texts)
    return (torch.tensor([e.ids for e in encs], dtype=torch.int64),
            torch.tensor([e.attention_mask for e in encs], dtype=torch.int64))


def measure(texts: list | None = None, layers=None, names=None, max_tokens: int = 256, echo=print) -> dict:
    """{"softmax_all": (mean, min), "rows": {variant: {layer: (mean, min) or an error message}}, "lengths": [...]}"""
    texts = texts_default() if texts is None else texts
    ids, mask = _batch(texts, max_tokens)
    model = realdata._model()  # the shared instance (set back to SDPA at the end)
    try:
        return _measure(model, texts, ids, mask, layers, names, echo)
    finally:
        model.set_attn_implementation("sdpa")


def _measure(model, texts, ids, mask, layers, names, echo) -> dict:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    import attngen.hf  # transformers is optional: imported when the benchmark runs, not with the benchmarks CLI
    layers = list(range(model.config.num_hidden_layers)) if layers is None else list(layers)
    model.set_attn_implementation("sdpa")
    ref = _embed(model, ids, mask)

    def cosines(emb):
        c = (emb * ref).sum(1)
        return float(c.mean()), float(c.min())

    model.set_attn_implementation(attngen.hf.register("softmax", name="attngen_softmax"))
    result = {"softmax_all": cosines(_embed(model, ids, mask)), "rows": {}, "lengths": mask.sum(1).tolist()}
    echo(f"attngen_softmax in every layer: cosine mean {result['softmax_all'][0]:.8f}")
    chosen = variants()
    for name in (chosen if names is None else names):
        source, mode = chosen[name]
        try:
            inner = attngen.hf.registered(attngen.hf.register(source, name="minilm_swap_inner", mode=mode))
        except AttngenError as exc:  # a spec that cannot run here: reported in its row, not hidden
            result["rows"][name] = {layer: f"error: {exc}" for layer in layers}
            continue
        row = {}
        for layer in layers:
            AttentionInterface.register("minilm_swap", _OneLayer(inner, layer))
            AttentionMaskInterface.register("minilm_swap", inner.mask)
            model.set_attn_implementation("minilm_swap")
            try:
                row[layer] = cosines(_embed(model, ids, mask))
            except AttngenError as exc:
                row[layer] = f"error: {exc}"
            echo(f"{name}, layer {layer}: {row[layer]}")
        result["rows"][name] = row
    return result


def minilm_swap(out_dir=Path("bench/results"), texts=None, layers=None, names=None, echo=print) -> Path:
    """Measure and write ``<date>-minilm-swap.md``; returns its path."""
    if not realdata.available():
        raise InputError(f"minilm-swap needs the all-MiniLM-L6-v2 weights: {realdata.INSTALL_COMMAND}")
    start = time.time()
    r = measure(texts, layers, names, echo=echo)
    layer_ids = sorted({n for row in r["rows"].values() for n in row})
    lines = ["# all-MiniLM-L6-v2 with attngen's attention: sentence-embedding cosine per layer swapped", "",
             f"- command: `python -m benchmarks minilm-swap`; {_machine()}; {time.strftime('%Y-%m-%d')}, "
             f"{time.time() - start:.0f} s",
             f"- {len(r['lengths'])} texts (right-padded batch, tokens per text {r['lengths']}), float32, CPU; "
             "embedding = mean over the tokens, L2-normalised (sentence-transformers' pooling)",
             f"- attngen_softmax in every layer vs the model (SDPA): cosine mean {r['softmax_all'][0]:.8f}, "
             f"min {r['softmax_all'][1]:.8f}", "",
             "Cosine between the embeddings with the variant in one layer (the others on SDPA) and the model's, "
             "mean / min over the texts:", "",
             "| variant | " + " | ".join(f"layer {n}" for n in layer_ids) + " |",
             "|---|" + "---|" * len(layer_ids)]
    for name, row in r["rows"].items():
        cells = [row[n] if isinstance(row[n], str) else f"{row[n][0]:.4f} / {row[n][1]:.4f}" for n in layer_ids]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "conv_basis runs only causally: its row is a causal layer inside the bidirectional encoder; compare "
              "it with the exact causal softmax row, not with 1.", ""]
    return write_result("\n".join(lines), Path(out_dir), "minilm-swap", echo=echo)
