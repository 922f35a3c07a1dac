"""T5's relative-position bias (attngen/specs/t5_bias.yaml): table parameters read by lookup(table, t5_bucket(...)).

The bucket function is checked against transformers' T5Attention._relative_position_bucket, imported when
transformers is installed and otherwise written out here from the transformers source (T5 code, Apache 2.0); the
naive reference against scores + rel[h, bucket] built directly in float64; both backends on output and every
gradient (d rel included) by attngen.verify; and the spec errors."""
import math

import pytest
import torch

import attngen
from attngen import pipeline
from attngen.codegen.printer import print_t5_bucket
from attngen.frontend.expr import T5Bucket
from attngen.frontend.t5 import bucket, thresholds
from attngen.ir import Ordering
from attngen.naive import reference
from attngen.runtime.t5 import relative_position_bucket
from attngen.verify import run_case, verify_cases

try:  # pragma: no cover - transformers is not a test dependency
    from transformers.models.t5.modeling_t5 import T5Attention
    HF_BUCKET = T5Attention._relative_position_bucket
except Exception:  # ImportError, or a transformers that fails to import
    HF_BUCKET = None


def hf_formula(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """transformers' T5Attention._relative_position_bucket, copied statement by statement."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def hf_bucket(x, bidirectional, num_buckets, max_distance):
    fn = HF_BUCKET or hf_formula
    return fn(x, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)


SPEC = """
name: t5_small
similarity: exp(dot(q, k))
reweight: exp(lookup(rel, t5_bucket(j - i, {nb}, {md})))
normalize: rowsum
parameters:
  rel: {{shape: {shape}, init: {init}}}
"""


def small_spec(causal, nb=8, md=20, shape="[H, 8]", init="0"):
    """Few buckets and a short max_distance: T = 40 and 70 reach past max_distance, the saturated last bucket."""
    return attngen.load_spec(SPEC.format(nb=nb, md=md, shape=shape, init=init), causal=causal)


# ---------------------------------------------------------------------------------------------
# the bucket function
# ---------------------------------------------------------------------------------------------
SETTINGS = [(32, 128), (8, 20), (2, 5), (4, 5), (16, 1000), (64, 256), (7, 30)]


@pytest.mark.parametrize("num_buckets,max_distance", SETTINGS)
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bucket_function_is_transformers(num_buckets, max_distance, bidirectional):
    if bidirectional and num_buckets < 4:
        pytest.skip("fewer than one exact bucket per sign")
    x = torch.arange(-3 * max_distance - 5, 3 * max_distance + 6)
    want = hf_bucket(x, bidirectional, num_buckets, max_distance)
    got = relative_position_bucket(x, num_buckets, max_distance, bidirectional)
    assert torch.equal(got, want)
    assert torch.equal(relative_position_bucket(x.double(), num_buckets, max_distance, bidirectional), want)
    # the kernels' form: max_exact + the thresholds a distance reaches (the sign offset bidirectional)
    exact, steps = thresholds(num_buckets, max_distance, bidirectional)
    n = x.abs() if bidirectional else (-x).clamp_min(0)
    counted = torch.where(n < exact, n, exact + sum((n >= t).long() for t in steps) if steps else exact)
    offset = (x > 0).long() * (num_buckets // 2) if bidirectional else 0
    assert torch.equal(counted + offset, want)
    # the code generator's plain-Python arithmetic (float32 steps emulated) agrees with torch's on every position
    assert [bucket(int(n), num_buckets, max_distance, bidirectional) for n in x] == want.tolist()


def test_bucket_values_at_the_boundaries():
    """T5's defaults, values written out (float32 rounding included) at 0, +-1, the exact range's end, the
    logarithmic boundaries and past max_distance."""
    x = torch.tensor([0, 1, -1, 7, 8, -8, 15, 16, -16, 31, 32, 64, 127, 128, 500, -500])
    bi = relative_position_bucket(x, 32, 128, True)
    assert bi.tolist() == [0, 17, 1, 23, 24, 8, 25, 26, 10, 27, 28, 30, 31, 31, 31, 15]
    causal = relative_position_bucket(x, 32, 128, False)
    assert causal.tolist() == [0, 0, 1, 0, 0, 8, 0, 0, 16, 0, 0, 0, 0, 0, 0, 31]
    assert torch.equal(bi, hf_bucket(x, True, 32, 128)) and torch.equal(causal, hf_bucket(x, False, 32, 128))


# ---------------------------------------------------------------------------------------------
# the naive reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_scores_plus_the_table_bias(causal):
    spec = attngen.load_spec("t5_bias", causal=causal)
    g = torch.Generator().manual_seed(0)
    b, h, t, d = 2, 3, 150, 8  # past max_distance 128
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    rel = torch.randn(h, 32, generator=g, dtype=torch.float64)
    pos = torch.arange(t)
    bucket = hf_bucket(pos[None, :] - pos[:, None], not causal, 32, 128)  # [T, S]: relative position j - i
    scores = q @ k.transpose(-1, -2) + rel[:, bucket][None]  # [B, H, T, S]
    if causal:
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    want = torch.softmax(scores, -1) @ v
    got = reference(spec)(q, k, v, rel=rel)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_gradient_of_the_table_is_the_sum_per_bucket():
    spec = small_spec(False)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rel = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    reference(spec)(q, k, v, rel=rel).square().sum().backward()
    bias = torch.zeros(2, 30, 30, dtype=torch.float64, requires_grad=True)  # the bias as a free tensor
    pos = torch.arange(30)
    bucket = hf_bucket(pos[None, :] - pos[:, None], True, 8, 20)
    scores = q @ k.transpose(-1, -2) + (rel.detach()[:, bucket] + bias)[None]
    (torch.softmax(scores, -1) @ v).square().sum().backward()
    want = torch.zeros(2, 8, dtype=torch.float64).index_add_(1, bucket.flatten(), bias.grad.flatten(1))
    torch.testing.assert_close(rel.grad, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the planner
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_plan_folds_the_lookup_into_the_score(causal):
    spec = attngen.load_spec("t5_bias", causal=causal)
    plan = pipeline.plan(spec, target="torch")
    assert plan.reweight.kind.value == "toeplitz"
    assert plan.reweight.log_weight == spec.reweight_expr.args[0]
    legal = {c.ordering for c in plan.candidates if c.legal}
    assert legal == {Ordering.QUADRATIC}
    assert plan.sdpa is not None and plan.sdpa.bias == spec.reweight_expr.args[0]
    lw = plan.reweight.log_weight
    assert isinstance(lw.args[1], T5Bucket) and int(lw.args[1].args[3]) == (0 if causal else 1)


def test_a_separable_similarity_runs_the_table_through_the_fft_ordering():
    spec = attngen.load_spec({"name": "t5_linear", "similarity": "dot(elu(q) + 1, elu(k) + 1)",
                              "reweight": "exp(lookup(rel, t5_bucket(j - i, 8, 20)))", "causal": False,
                              "normalize": {"kind": "rowsum", "eps": 1e-6},
                              "parameters": {"rel": {"shape": [8], "init": "normal(0.5)", "seed": 1}}})
    legal = {c.ordering.value for c in pipeline.plan(spec, target="torch").candidates if c.legal}
    assert {"fft", "quadratic"} <= legal
    for force in ("fft", "quadratic"):
        for case in verify_cases([spec], "torch", force=force, dtypes=("float64",), lengths=(7, 40)):
            r = run_case(case)
            assert "drel" in r.errors and r.passed, (force, r.shape, r.errors)


# ---------------------------------------------------------------------------------------------
# the backends
# ---------------------------------------------------------------------------------------------
def _check(spec, backend, dtypes, lengths):
    ran = 0
    for case in verify_cases([spec], backend, dtypes=dtypes, lengths=lengths):
        r = run_case(case)
        assert r.ordering == "quadratic" and r.backend == backend
        assert {"o", "dq", "dk", "dv", "drel"} <= set(r.errors), r.errors
        assert r.passed, (r.shape, r.dtype, r.errors)
        ran += 1
    assert ran == len(dtypes) * len(lengths)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_output_and_every_gradient(causal):
    _check(attngen.load_spec("t5_bias", causal=causal), "torch", ("float64", "float32"), (7, 40, 70))
    _check(small_spec(causal, shape="[10]"), "torch", ("float64",), (40,))


@pytest.mark.parametrize("causal", [True, False])
def test_torch_sdpa_takes_the_bias_without_a_gradient(causal):
    spec = attngen.load_spec("t5_bias", causal=causal)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    rel = torch.randn(2, 32, generator=g)
    op = attngen.compile(spec, backend="torch")
    with torch.no_grad():
        got = op(q, k, v, rel=rel)
    want = reference(spec)(q.double(), k.double(), v.double(), rel=rel.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_backend_output_and_every_gradient(causal):
    _check(attngen.load_spec("t5_bias", causal=causal), "triton", ("float32",), (7, 40, 70))
    _check(small_spec(causal), "triton", ("float32",), (40, 70))  # past max_distance: the last bucket
    _check(small_spec(causal, shape="[8]", init="0.5"), "triton", ("float32",), (40,))  # a shared table


def test_triton_kernels_count_buckets_like_the_reference():
    node = attngen.load_spec("t5_bias", causal=False).reweight_expr.args[0].args[1]
    rel, dist, bucket = print_t5_bucket(node, "o_i[:, None]", "o_j[None, :]", "b_rp0", "b_rd0")
    assert rel == "o_j[None, :] - o_i[:, None]" and dist == "tl.abs(b_rp0)"
    assert "log" not in bucket and "(b_rd0 >= 16)" in bucket and bucket.startswith("tl.where(b_rp0 > 0, 16, 0)")


# ---------------------------------------------------------------------------------------------
# the spec errors
# ---------------------------------------------------------------------------------------------
PARAMS = {"rel": {"shape": ["H", 32], "init": 0}, "m": {"shape": ["H"], "init": 1}}


@pytest.mark.parametrize("key,text,match", [
    ("reweight", "exp(rel)", "the table parameter 'rel' is used outside lookup()"),
    ("reweight", "exp(lookup(m, t5_bucket(j - i, 32, 128)))", "lookup() of a non-table: 'm' is not a table"),
    ("reweight", "exp(lookup(rel, j - i))", "the index 'j - i' of lookup() is not t5_bucket(...)"),
    ("reweight", "exp(t5_bucket(j - i, 32, 128))", "t5_bucket() is a bucket index, used outside lookup()"),
    ("reweight", "exp(lookup(rel, t5_bucket(j - i, 32.5, 128)))", "num_buckets '32.5' is not a positive integer"),
    ("reweight", "exp(lookup(rel, t5_bucket(j - i, -4, 128)))", "num_buckets '-4' is not a positive integer"),
    ("reweight", "exp(lookup(rel, t5_bucket(j - i, 32, 0)))", "max_distance '0' is not a positive integer"),
    ("reweight", "exp(lookup(rel, t5_bucket(j - i, 32, h)))", "max_distance 'h' is not a positive integer"),
    ("reweight", "exp(lookup(rel, t5_bucket(j - i, 32, 10)))", "max_distance 10; expected an integer in 17"),
    ("reweight", "exp(lookup(rel, t5_bucket(j - i, 64, 128)))", "gives buckets 0 .. 63, but 'rel' has 32 entries"),
    ("reweight", "exp(lookup(rel, t5_bucket(2 * (j - i), 32, 128)))", "is not j - i or i - j"),
    ("reweight", "exp(lookup(rel, t5_bucket(q, 32, 128)))", "the vector 'q' is not allowed here"),
    ("similarity", "exp(dot(q, k) + lookup(rel, t5_bucket(j - i, 32, 128)))", "lookup() is not allowed here"),
    ("similarity", "exp(dot(q, k)) * t5_bucket(j - i, 32, 128)", "t5_bucket() is not allowed here"),
    ("similarity", "dot(q, k) * rel", "the table parameter 'rel' is used outside lookup()"),
])
def test_spec_errors(key, text, match):
    data = {"name": "x", "similarity": "exp(dot(q, k))", "parameters": PARAMS, key: text}
    with pytest.raises(attngen.SpecError, match=match.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
                       .replace("*", r"\*")):
        attngen.load_spec(data)


def test_bidirectional_needs_an_exact_bucket_per_sign():
    data = {"name": "x", "similarity": "exp(dot(q, k))", "parameters": PARAMS, "causal": False,
            "reweight": "exp(lookup(rel, t5_bucket(j - i, 2, 8)))"}
    with pytest.raises(attngen.SpecError, match="num_buckets 2 in the bidirectional mode"):
        attngen.load_spec(data)
    assert attngen.load_spec(data, causal=True).causal  # one exact bucket in the causal mode


@pytest.mark.parametrize("shape,match", [
    (["H", 0], r"entries 0; expected an integer in \[1, 4096\]"),
    (["H", 5000], r"entries 5000"),
    (["NB"], "the constant 'NB' in the shape is not an integer known at load time"),
    (["H", "G"], r"shape \['H', 'G'\]"),
])
def test_table_shape_errors(shape, match):
    with pytest.raises(attngen.SpecError, match=match):
        attngen.load_spec({"name": "x", "similarity": "dot(q, k)", "constants": {"NB": "n"},
                           "parameters": {"rel": {"shape": shape, "init": 0}}})


def test_table_shapes_inits_and_reserved_names():
    reweight = "exp(lookup(a, t5_bucket(j - i, 16, 64)) + lookup(b, t5_bucket(i - j, 8, 9)))"
    spec = attngen.load_spec({"name": "x", "similarity": "exp(dot(q, k))", "constants": {"NB": 16},
                              "reweight": reweight,
                              "parameters": {"a": {"shape": ["H", "NB"], "init": "0.1 * h"},
                                             "b": {"shape": [8], "init": "normal(2)", "seed": 5}}})
    kinds = {p.name: (p.kind, p.shape, p.buckets) for p in spec.parameters}
    assert kinds == {"a": ("table", ("H", 16), 16), "b": ("table", (8,), 8)}
    values = attngen.runtime.inputs.default_parameters(spec, 3, torch.float64)  # no head dim needed
    assert torch.equal(values["a"], torch.full((3, 16), 0.1, dtype=torch.float64) * torch.arange(3.0)[:, None])
    want_b = torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    torch.testing.assert_close(values["b"], want_b, rtol=0, atol=0)
    assert attngen.load_spec(spec.to_yaml()).hash == spec.hash
    for name in ("lookup", "t5_bucket"):
        with pytest.raises(attngen.SpecError, match=f"'{name}' is a reserved name"):
            attngen.load_spec({"name": "x", "similarity": "dot(q, k)", "parameters": {name: 1}})


# the hashes of existing built-ins as the committed generated/ modules recorded them before tables existed: the
# language grew, nothing it accepted before changed its canonical form
HASHES = {
    ("alibi", True): "6687620371e8f77f", ("alibi", False): "81577305a7e6a277",
    ("cosformer", True): "7bcc6c76ac93e0cd", ("cottention", False): "7c9ce9fa77ebc46d",
    ("forgetting", True): "f0687c707611ad57", ("llama", True): "a95cb820145ad94e",
    ("retention", False): "1391b8cb17bcf36c", ("softmax", True): "425d5e3c1b9ea6c0",
    ("gla", True): "b805861cd8c68329", ("based", False): "689d429c13335d44",
}


@pytest.mark.parametrize("name,causal", list(HASHES))
def test_hash_stability_of_existing_specs(name, causal):
    spec = attngen.load_spec(name, causal=causal)
    assert spec.hash == HASHES[name, causal]
    assert attngen.load_spec(spec.to_yaml()).hash == spec.hash
