"""The planner's decisions for the built-in specs, the cost model, and its errors."""
import dataclasses

import networkx as nx
import pytest
import sympy

import attngen
import attngen.frontend.expr
from attngen.frontend.expr import KE, QE, D, J, Norm
from attngen.graph import op_graph
from attngen.ir import N, Ordering, ReweightClass, SimilarityClass
from attngen.passes.rewrite import T_DIFF
from attngen.pipeline import plan as build_plan

LONG = 1 << 20


def plan_of(name, causal=True, **kw):
    return build_plan(attngen.load_spec(name, causal=causal), **kw)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cosformer_linear_two_position_terms(causal):
    p = plan_of("cosformer", causal)
    assert p.similarity.kind is SimilarityClass.SEPARABLE
    assert p.reweight.kind is ReweightClass.SEPARABLE
    assert len(p.linear_terms) == 2
    assert all(t.width(D) == D for t in p.linear_terms)
    heads = {sympy.sstr(t.position.f_i).split("(")[0] for t in p.linear_terms}
    assert heads == {"cos", "sin"}
    assert p.choice.ordering_for(LONG) is Ordering.LINEAR


def test_cottention_rank1_key_weight_and_cosine_rows():
    p = plan_of("cottention")
    assert p.choice.ordering_for(LONG) is Ordering.LINEAR
    (term,) = p.linear_terms
    assert term.position.f_i == 1 and term.position.g_j.has(J) and term.position.g_j.has(attngen.frontend.expr.Sigmoid)
    assert term.feature.q_factors == (QE,) and term.feature.k_factors == (KE,)
    assert term.feature.q_scale.has(Norm(QE)) and term.feature.k_scale.has(Norm(KE))
    bidir = plan_of("cottention", False)
    assert not bidir.linear_terms[0].position.g_j.has(J)  # n**(-sigmoid(m)): a per-head constant


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_retention_decay(causal):
    p = plan_of("retention", causal)
    assert p.reweight.kind is ReweightClass.DECAY
    assert p.reweight.decay.two_sided is (not causal)
    assert sympy.simplify(p.reweight.decay.gamma - (1 - 2 ** (-5 - attngen.frontend.expr.HEAD))) == 0
    assert p.choice.ordering_for(LONG) is Ordering.LINEAR


@pytest.mark.parametrize("name", ["softmax", "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_softmax_family_quadratic(name, causal):
    p = plan_of(name, causal)
    assert p.similarity.kind is SimilarityClass.EXP
    assert p.choice.below is p.choice.above is Ordering.QUADRATIC
    assert not p.legal(Ordering.LINEAR)
    if name == "alibi":
        slope = sympy.Symbol("slope", real=True)
        assert p.reweight.log_weight is not None and p.reweight.log_weight.has(slope)


def test_polynomial2_dispatches_at_the_crossover():
    p = plan_of("polynomial2", head_dim=64)
    assert p.feature_width(64) == 64 ** 2
    assert p.choice.below is Ordering.QUADRATIC and p.choice.above is Ordering.LINEAR
    n_star = p.choice.crossover
    assert 1000 < n_star < 100000
    quad, lin = p.candidate(Ordering.QUADRATIC), p.candidate(Ordering.LINEAR)
    at = lambda c, n: c.evaluate(n, 64, p.chunk)[2]  # noqa: E731
    assert at(quad, n_star) == pytest.approx(at(lin, n_star), rel=1e-6)
    assert at(quad, n_star / 2) < at(lin, n_star / 2)
    assert at(quad, n_star * 2) > at(lin, n_star * 2)
    assert p.choice.ordering_for(int(n_star) - 1) is Ordering.QUADRATIC
    assert p.choice.ordering_for(int(n_star) + 1) is Ordering.LINEAR


def test_based_width():
    p = plan_of("based")
    assert sympy.expand(p.feature_width() - (1 + D + D ** 2)) == 0


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_toeplitz_reweight(causal):
    spec = attngen.load_spec({"name": "toe", "similarity": "dot(relu(q), relu(k))",
                              "reweight": "1/(1 + abs(i - j))", "causal": causal})
    p = build_plan(spec)
    assert p.reweight.kind is ReweightClass.TOEPLITZ
    assert p.legal(Ordering.FFT) and not p.legal(Ordering.LINEAR)
    assert p.reweight.kernel.subs(T_DIFF, 3) == sympy.Rational(1, 4)


@pytest.mark.parametrize("kernel", ["1/(1 + abs(i - j))", "exp(-(i - j)**2/50)"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_toeplitz_choice_by_cost(kernel, causal):
    """Quadratic below the solved crossover, FFT above: at n* the two costs are equal, the FFT's memory
    (T * F * Dv per head) in its bytes."""
    spec = attngen.load_spec({"name": "toe", "similarity": "dot(q, k)", "reweight": kernel, "causal": causal})
    p = build_plan(spec, head_dim=64)
    assert p.choice.below is Ordering.QUADRATIC and p.choice.above is Ordering.FFT
    quad, fft = p.candidate(Ordering.QUADRATIC), p.candidate(Ordering.FFT)
    at = lambda c, n: c.evaluate(n, 64, p.chunk)[2]  # noqa: E731
    n_star = p.choice.crossover
    assert at(quad, n_star) == pytest.approx(at(fft, n_star), rel=1e-6)
    assert at(quad, n_star / 2) < at(fft, n_star / 2) and at(quad, n_star * 2) > at(fft, n_star * 2)
    assert fft.bytes.has(N) and sympy.degree(sympy.expand(fft.bytes), N) == 1
    text = p.explain()
    assert f"quadratic below n* = {n_star:.0f}, fft above" in text
    assert "fft          yes" in text and "W = h(i-j): convolution along the sequence" in text


def test_general_similarity_is_quadratic_only():
    spec = attngen.load_spec({"name": "sig", "similarity": "sigmoid(dot(q, k))"})
    p = build_plan(spec)
    assert p.similarity.kind is SimilarityClass.GENERAL
    assert [c.ordering for c in p.candidates if c.legal] == [Ordering.QUADRATIC]


def test_unbounded_decay_is_refused():
    with pytest.raises(attngen.SpecError, match="grows without bound"):
        build_plan(attngen.load_spec({"name": "x", "similarity": "dot(q,k)", "reweight": "0.9**(i - j)",
                                      "causal": False}))


def test_forced_plans():
    assert build_plan(attngen.load_spec("polynomial2"), force="linear").choice.ordering_for(10) is Ordering.LINEAR
    with pytest.raises(attngen.PlanError, match="not legal"):
        build_plan(attngen.load_spec("softmax"), force="linear")
    with pytest.raises(attngen.PlanError, match="expected one of"):
        build_plan(attngen.load_spec("softmax"), force="fastest")


def test_plan_is_frozen_and_graph_is_a_dag():
    p = plan_of("linear_elu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.chunk = 3
    g = op_graph(p)  # built on demand: the plan holds no graph
    assert nx.is_directed_acyclic_graph(g)
    for ordering in ("linear", "quadratic"):
        assert nx.has_path(g, f"{ordering}_q", f"{ordering}_o")


def test_explain_shows_derivation_costs_and_choice():
    text = plan_of("cosformer").explain()
    for needle in ("expand-trig", "similarity: separable", "reweight: separable", "quadratic", "linear",
                   "chosen:", "crossover"):
        assert needle in text


def test_the_triton_target_restricts_the_choice():
    """A Toeplitz spec: torch chooses quadratic then FFT; the triton target has no FFT kernels, so it chooses
    quadratic at every length, says so in the derivation, and refuses a forced fft."""
    toe = attngen.load_spec({"name": "toe", "similarity": "dot(q, k)", "reweight": "1/(1 + abs(i - j))"})
    assert build_plan(toe).choice.above is Ordering.FFT
    p = build_plan(toe, target="triton")
    assert p.choice.below is p.choice.above is Ordering.QUADRATIC and p.choice.crossover is None
    assert "backend implements: linear, quadratic, topk_sparse" in next(
        s.detail for s in p.derivation if s.name == "choose")
    assert p.capabilities.kernels == (Ordering.QUADRATIC,)
    with pytest.raises(attngen.PlanError, match="implements linear, quadratic, topk_sparse.*not fft"):
        build_plan(toe, target="triton", force="fft")
    with pytest.raises(attngen.PlanError, match="target='cuda'"):
        build_plan(toe, target="cuda")


def test_capabilities_record_kernels_decoding_and_length_terms():
    cos = plan_of("cosformer")
    assert cos.capabilities.kernels == (Ordering.LINEAR, Ordering.QUADRATIC)
    assert cos.capabilities.crossover == build_plan(attngen.load_spec("cosformer"), head_dim=64,
                                                    target="triton").choice.dispatch_length()
    assert not cos.capabilities.decodable and "final sequence length" in cos.capabilities.decode_reason
    assert any("Max(n_k, n_q)" in t for t in cos.capabilities.length_terms)
    fixed = build_plan(attngen.load_spec("cosformer", M=4096))
    assert fixed.capabilities.decodable and fixed.capabilities.length_terms == ()
    soft = plan_of("softmax")
    assert soft.capabilities.kernels == (Ordering.QUADRATIC,) and not soft.capabilities.decodable
    assert "no linear (separable) form" in soft.capabilities.decode_reason
    toe = build_plan(attngen.load_spec({"name": "toe", "similarity": "dot(q, k)", "reweight": "1/(1 + abs(i - j))"}))
    assert toe.capabilities.kernels == () and "generates the linear and quadratic" in toe.capabilities.kernels_reason
    text = cos.explain()
    assert "triton kernels: linear, quadratic" in text and "decodable: no" in text
